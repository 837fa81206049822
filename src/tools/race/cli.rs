//! The `kaguard race` subcommand: flags -> [`RaceOptions`], a progress bar, and the summary.

use std::io::{self, IsTerminal, Write as _};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;

use super::client::Target;
use super::{Method, RaceError, RaceOptions, RaceReport, race_until};

/// Shown after the flags in `kaguard race --help`.
pub const RACE_EXAMPLES: &str = "\
Examples:
  # An upstream that closes idle connections after 500 ms, kaguard in front of it
  kaguard upstream --listen 127.0.0.1:3000 --idle-timeout 500ms
  kaguard run --listen 127.0.0.1:8080 --upstream 127.0.0.1:3000
  kaguard race --target http://127.0.0.1:8080/ --timeout 500ms

  # Your own nginx, whose upstream app closes idle connections after 5 s
  kaguard race --target http://127.0.0.1:80/api --timeout 5s --method mix --duration 5m

  # Steady load instead of bursts, one JSON line for a script
  kaguard race --target http://127.0.0.1:8080/ --no-sync --json

The pause between two requests on one connection sweeps from --timeout + 1ms down to
--timeout - --below in 1 ms steps, then starts again. Nothing is ever retried: a request without
a complete response is a transport error. Exit code 0 whatever was counted, 2 on bad flags or
when the target cannot be connected to at the start.";

/// Provoke the keep-alive race through a proxy and count what the client sees.
///
/// Each client connection sends requests over one keep-alive connection with a pause that
/// sweeps around the upstream's idle timeout, so the proxy reuses its pooled upstream
/// connections at the age at which the upstream closes them.
#[derive(clap::Args, Debug)]
#[command(after_help = RACE_EXAMPLES)]
pub struct RaceArgs {
    /// URL to send to, e.g. http://127.0.0.1:8080/ (plain HTTP/1.1; "http://" may be left out).
    #[arg(long, value_name = "URL", value_parser = parse_target)]
    pub target: http::Uri,

    /// Client connections sending in parallel.
    #[arg(long, value_name = "K", default_value_t = 20, value_parser = parse_at_least_one)]
    pub connections: usize,

    /// Request method; post sends a 32-byte JSON body.
    #[arg(long, value_enum, value_name = "METHOD", default_value_t = Method::Post)]
    pub method: Method,

    /// Idle timeout of the upstream behind the target: the centre of the pause sweep.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// How far below --timeout the pause sweep goes.
    #[arg(long, value_name = "DURATION", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub below: Duration,

    /// All connections send at the same instant each round (the default).
    #[arg(long, overrides_with = "no_sync")]
    pub sync: bool,

    /// Each connection starts at a random moment within the first --timeout and paces itself.
    #[arg(long, overrides_with = "sync")]
    pub no_sync: bool,

    /// Requests in total, across all connections.
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,

    /// Send no request later than this after the start.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_positive)]
    pub duration: Duration,

    /// Longest wait for one complete response; a longer one counts as a transport error.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_positive)]
    pub request_timeout: Duration,

    /// Print one JSON line instead of the summary.
    #[arg(long)]
    pub json: bool,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl RaceArgs {
    pub fn options(&self) -> RaceOptions {
        RaceOptions {
            target: self.target.clone(),
            connections: self.connections,
            method: self.method,
            timeout: self.timeout,
            below: self.below,
            sync: !self.no_sync,
            requests: self.requests,
            duration: self.duration,
            request_timeout: self.request_timeout,
        }
    }
}

/// Runs the race, prints the summary (or the JSON line) to stdout and returns the report.
/// Ctrl-C stops sending; the requests in flight finish and the counts so far are printed.
pub async fn run(args: RaceArgs) -> Result<RaceReport, RaceError> {
    let opts = args.options();
    let progress = if args.quiet || !io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        progress_bar(opts.requests)
    };
    let (stop, stopped) = watch::channel(false);
    let interrupt = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            // Err only if the race is over and the receiver gone: nothing left to stop.
            let _ = stop.send(true);
        }
    });
    let raced = race_until(&opts, Some(&progress), stopped).await;
    interrupt.abort();
    progress.finish_and_clear();
    let report = raced?;
    let text = if args.json {
        report.json()
    } else {
        report.summary(&opts)
    };
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(RaceError::Output)?;
    Ok(report)
}

pub(super) fn progress_bar(requests: u64) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "race {bar:30} {pos}/{len} requests  {msg}  [{elapsed_precise}]",
    )
    .expect("the template is a constant, checked by a test");
    let bar = ProgressBar::with_draw_target(Some(requests), ProgressDrawTarget::stderr());
    bar.set_style(style);
    bar.set_message("errors 0");
    bar
}

fn parse_target(text: &str) -> Result<http::Uri, String> {
    let full = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let uri: http::Uri = full.parse().map_err(|e| format!("{text:?}: {e}"))?;
    Target::check(&uri).map_err(|reason| format!("{text:?}: {reason}"))?;
    Ok(uri)
}

fn parse_at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{text:?} is not a whole number of at least 1")),
    }
}

fn parse_positive(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be longer than 0".to_owned());
    }
    Ok(duration)
}
