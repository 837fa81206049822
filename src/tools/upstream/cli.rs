//! The `kaguard upstream` subcommand: flags -> [`Behaviour`], then serve until Ctrl-C, and stop
//! as an app server stops on its first signal: gracefully.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use super::respond::final_status;
use super::{Behaviour, TestUpstream};

/// Examples and the per-request overrides, shown after the flags in `kaguard upstream --help`.
pub const UPSTREAM_EXAMPLES: &str = "\
Examples:
  # Node.js defaults: closes after 5 s idle, announced with Keep-Alive: timeout=5
  kaguard upstream --preset node

  # Gunicorn, but closing after 300 ms idle with RST: a race every few requests
  kaguard upstream --preset gunicorn --idle-timeout 300ms --rst

  # Close every connection after its 10th response without saying so
  kaguard upstream --max-requests 10 --silent --report-every 5s

Per-request overrides, in the query string (unknown keys are ignored):
  status=503     answer with this status
  size=1048576   send this many body bytes
  delay=200ms    wait this long before answering
  echo=1         stream the request body back
  close=fin|rst  close the connection right after the request head, without answering

  curl -i 'http://127.0.0.1:8000/anything?status=503&delay=200ms'

Every response carries x-upstream-connection (TCP connection serial) and x-upstream-request
(request number on that connection).";

/// Run an HTTP/1.1 upstream that closes keep-alive connections the way app servers do.
///
/// It emulates the servers that cause the keep-alive race: an idle timeout measured from the
/// last response byte, a cap on requests per connection (announced or silent), FIN or RST.
#[derive(clap::Args, Debug)]
#[command(after_help = UPSTREAM_EXAMPLES)]
pub struct UpstreamArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// Start from a real server's defaults; the other flags override it.
    #[arg(long, value_enum, value_name = "SERVER")]
    pub preset: Option<Preset>,

    /// Status code of every response [default: 200].
    #[arg(long, value_name = "CODE", value_parser = parse_status)]
    pub status: Option<u16>,

    /// Bytes of response body [default: 2, "OK"].
    #[arg(long, value_name = "BYTES")]
    pub body_size: Option<usize>,

    /// Wait this long before answering each request, e.g. 50ms [default: 0s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub delay: Option<Duration>,

    /// Close a connection idle this long after its last response, e.g. 300ms; "none" or 0
    /// never closes it [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_idle_timeout)]
    pub idle_timeout: Option<Duration>,

    /// Close each connection after its Nth response; 0 means no limit [default: no limit].
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,

    /// Do not announce the last response with "Connection: close"; just close after it.
    #[arg(long)]
    pub silent: bool,

    /// Close with RST (SO_LINGER 0) instead of FIN.
    #[arg(long)]
    pub rst: bool,

    /// Send "Keep-Alive: timeout=N" (and "max=M" with --max-requests) on every response.
    #[arg(long)]
    pub hint: bool,

    /// Print "connections=N requests=M" at this interval, e.g. 5s [default: off].
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    pub report_every: Option<Duration>,
}

/// Real servers whose keep-alive defaults `--preset` copies.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// 5 s idle timeout, announced with Keep-Alive: timeout=5.
    Node,
    /// 2 s idle timeout, not announced.
    Gunicorn,
    /// 100 requests per connection, the last with Connection: close; 60 s idle timeout.
    Tomcat,
}

impl Preset {
    pub fn behaviour(self) -> Behaviour {
        match self {
            Preset::Node => Behaviour::node(),
            Preset::Gunicorn => Behaviour::gunicorn(),
            Preset::Tomcat => Behaviour::tomcat(),
        }
    }
}

impl UpstreamArgs {
    /// The preset (or the defaults) with every given flag applied on top.
    pub fn behaviour(&self) -> Behaviour {
        let mut behaviour = self.preset.map(Preset::behaviour).unwrap_or_default();
        if let Some(status) = self.status {
            behaviour.status = status;
        }
        if let Some(size) = self.body_size {
            behaviour.body_size = size;
        }
        if let Some(delay) = self.delay {
            behaviour.delay = delay;
        }
        if let Some(idle) = self.idle_timeout {
            behaviour.idle_timeout = Some(idle).filter(|t| !t.is_zero());
        }
        if let Some(max) = self.max_requests {
            behaviour.max_requests = Some(max).filter(|&n| n > 0);
        }
        behaviour.announce_last &= !self.silent;
        behaviour.close_with_rst |= self.rst;
        behaviour.hint |= self.hint;
        behaviour
    }
}

/// Serves until Ctrl-C, then drains (a second Ctrl-C stops at once) and prints the final counts.
pub async fn run(args: UpstreamArgs) -> io::Result<()> {
    let behaviour = args.behaviour();
    let upstream = TestUpstream::start(args.listen, behaviour.clone()).await?;
    say(&format!(
        "kaguard upstream listening on {} ({behaviour})",
        upstream.addr()
    ))?;
    let mut report = args.report_every.map(|every| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    let counts = |upstream: &TestUpstream| {
        format!(
            "connections={} requests={}",
            upstream.connections(),
            upstream.requests()
        )
    };
    loop {
        let tick = async {
            match report.as_mut() {
                Some(interval) => interval.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            interrupted = tokio::signal::ctrl_c() => {
                interrupted?;
                break;
            }
            _ = tick => say(&counts(&upstream))?,
        }
    }
    let last = counts(&upstream);
    say(
        "stopping gracefully: new connections refused, idle ones closed, requests in flight \
         answered with Connection: close (Ctrl-C again to close everything now)",
    )?;
    tokio::select! {
        drained = upstream.drain() => {
            say(&last)?;
            say(&format!(
                "drained: idle_closed={} answered={} cut_off={}",
                drained.idle_closed, drained.answered, drained.cut_off
            ))
        }
        interrupted = tokio::signal::ctrl_c() => {
            interrupted?;
            // Dropping the drain drops the handle, which closes every connection at once.
            say(&last)
        }
    }
}

/// One line to stdout; an error (e.g. a closed pipe) is returned rather than panicking.
fn say(line: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

fn parse_status(text: &str) -> Result<u16, String> {
    text.parse()
        .ok()
        .filter(|&code| final_status(code).is_some())
        .ok_or_else(|| format!("{text:?} is not a final status code (200-999)"))
}

fn parse_idle_timeout(text: &str) -> Result<Duration, humantime::DurationError> {
    match text {
        "none" | "never" => Ok(Duration::ZERO),
        _ => humantime::parse_duration(text),
    }
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let every = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if every.is_zero() {
        return Err("the interval must be longer than 0".to_owned());
    }
    Ok(every)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Command {
        Upstream(UpstreamArgs),
    }

    fn parse(args: &[&str]) -> UpstreamArgs {
        let argv = ["kaguard", "upstream"].iter().chain(args);
        match Cli::try_parse_from(argv).expect("valid flags").command {
            Command::Upstream(args) => args,
        }
    }

    #[test]
    fn flags_override_the_preset() {
        let behaviour =
            parse(&["--preset", "node", "--idle-timeout", "300ms", "--rst"]).behaviour();
        assert_eq!(
            behaviour,
            Behaviour {
                idle_timeout: Some(Duration::from_millis(300)),
                close_with_rst: true,
                ..Behaviour::node()
            }
        );
        let tomcat = parse(&["--preset", "tomcat", "--silent", "--max-requests", "0"]).behaviour();
        assert_eq!((tomcat.max_requests, tomcat.announce_last), (None, false));
        assert_eq!(
            parse(&["--idle-timeout", "none"]).behaviour().idle_timeout,
            None
        );
        assert_eq!(
            parse(&["--idle-timeout", "0"]).behaviour().idle_timeout,
            None
        );
        assert_eq!(parse(&[]).behaviour(), Behaviour::default());
    }

    #[test]
    fn bad_flags_are_refused() {
        for bad in [
            &["--status", "101"][..],
            &["--report-every", "0s"],
            &["--delay", "soon"],
        ] {
            let argv = ["kaguard", "upstream"].iter().chain(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn help_shows_examples_and_overrides() {
        let mut command = Cli::command();
        let upstream = command
            .find_subcommand_mut("upstream")
            .expect("upstream subcommand");
        let help = upstream.render_long_help().to_string();
        assert!(help.contains("kaguard upstream --preset node"), "{help}");
        assert!(help.contains("close=fin|rst"), "{help}");
    }

    #[test]
    fn banner_summarises_the_behaviour() {
        assert_eq!(
            Behaviour::tomcat().to_string(),
            "status=200 body_size=2 delay=0s idle_timeout=1m max_requests=100 last=announced \
             close=fin hint=off"
        );
    }
}
