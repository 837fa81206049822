//! The `kaguard probe` subcommand: flags -> [`ProbeOptions`], a spinner, and the report.

use std::io::{self, IsTerminal, Write as _};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{ProbeError, ProbeOptions, ProbeReport, probe};

/// Shown after the flags in `kaguard probe --help`.
pub const PROBE_EXAMPLES: &str = "\
Examples:
  # An app server on this host
  kaguard probe http://127.0.0.1:3000/

  # A server that may keep idle connections longer than 2 minutes (GCP wants over 600 s)
  kaguard probe http://10.0.0.7:8080/healthz --max-idle 15m

  # Only the request cap, as JSON
  kaguard probe http://127.0.0.1:3000/ --no-idle --json

The idle timeout is measured from the end of a response to the moment the server's FIN or RST
arrives, over rounds of parallel connections; a 5 s server takes about 10 s, a 60 s server about
2 minutes. Only GET requests are sent, to the given path. Exit code 0 when the probe ran, 2 on
bad flags or when the server cannot be reached.";

/// Measure a server's keep-alive behaviour and print the settings for what sits in front.
///
/// Finds its idle timeout (to 5 % or 50 ms), its request cap per connection, whether it sends a
/// truthful `Keep-Alive` hint, and whether it closes with FIN or RST.
#[derive(clap::Args, Debug)]
#[command(after_help = PROBE_EXAMPLES)]
pub struct ProbeArgs {
    /// URL to probe, e.g. http://127.0.0.1:3000/ (plain HTTP/1.1; "http://" may be left out).
    #[arg(value_name = "URL", value_parser = parse_url)]
    pub url: http::Uri,

    /// Longest idle time to try; a server that keeps connections longer is reported as such.
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = humantime::parse_duration)]
    pub max_idle: Duration,

    /// Most requests to send on one connection while looking for a request cap.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_requests: u64,

    /// Idle connections per refining round.
    #[arg(long, value_name = "K", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: u16,

    /// Longest wait for one complete response.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Skip the idle timeout measurement.
    #[arg(long)]
    pub no_idle: bool,

    /// Skip the request cap measurement.
    #[arg(long)]
    pub no_cap: bool,

    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,

    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

impl ProbeArgs {
    pub fn options(&self) -> ProbeOptions {
        ProbeOptions {
            max_idle: self.max_idle,
            max_requests: self.max_requests,
            connections: usize::from(self.connections),
            request_timeout: self.request_timeout,
            measure_idle: !self.no_idle,
            measure_cap: !self.no_cap,
            ..ProbeOptions::default()
        }
    }
}

/// Runs the probe, prints the report (or the JSON object) to stdout and returns it.
pub async fn run(args: ProbeArgs) -> Result<ProbeReport, ProbeError> {
    let progress = spinner(args.quiet);
    let probed = probe(&args.url, &args.options(), Some(&progress)).await;
    progress.finish_and_clear();
    let report = probed?;
    let text = if args.json {
        report.json()
    } else {
        report.summary()
    };
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{}", text.trim_end())
        .and_then(|()| stdout.flush())
        .map_err(ProbeError::Output)?;
    Ok(report)
}

/// A spinner on stderr: the request count as prefix, the idle round as message. Hidden with
/// `quiet` or when stderr is not a terminal.
pub(crate) fn spinner(quiet: bool) -> ProgressBar {
    if quiet || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template("{spinner} probe [{elapsed}] {prefix}  {msg}")
        .expect("the template is a constant, checked by a test");
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(style);
    bar.set_message("connecting");
    // The rounds wait silently for up to minutes; the tick shows the probe is alive.
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

pub(crate) fn parse_url(text: &str) -> Result<http::Uri, String> {
    let full = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let uri: http::Uri = full.parse().map_err(|e| format!("{text:?}: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http"), Some(host)) if !host.is_empty() => Ok(uri),
        (Some("http"), _) => Err(format!("{text:?}: the URL has no host")),
        _ => Err(format!("{text:?}: only http:// URLs are supported")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: ProbeArgs,
    }

    #[test]
    fn spinner_template_is_valid() {
        ProgressStyle::with_template("{spinner} probe [{elapsed}] {prefix}  {msg}")
            .expect("valid template");
    }

    #[test]
    fn flags_fill_the_options() {
        let cli =
            Cli::try_parse_from(["probe", "127.0.0.1:3000/x", "--max-idle", "15m", "--no-cap"])
                .expect("valid flags");
        let opts = cli.args.options();
        assert_eq!(cli.args.url.to_string(), "http://127.0.0.1:3000/x");
        assert_eq!(opts.max_idle, Duration::from_secs(900));
        assert!(opts.measure_idle && !opts.measure_cap);
        assert_eq!(opts.connections, 8);
        assert!(Cli::try_parse_from(["probe", "https://x/"]).is_err());
        assert!(Cli::try_parse_from(["probe", "x", "--connections", "0"]).is_err());
    }
}
