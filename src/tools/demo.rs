//! `kaguard demo`: the keep-alive race and kaguard's answer to it, in one command and about
//! half a minute, with nothing to install or configure.
//!
//! It starts, in this process, an upstream that closes idle connections after 500 ms (a tuned
//! Node server), a kaguard with its guards off (a plain keep-alive pool, as most proxies have)
//! and a kaguard with its guards on, and drives the race reproducer with GET and with POST
//! through both, all four at once. Then a short steady-traffic phase shows what each side reuses
//! when nobody is racing.

use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::config::{Config, Guards, RetryOn};
use crate::server::{self, Running, StartError};
use crate::tools::race::{self, Method, RaceError, RaceOptions, RaceReport};
use crate::tools::upstream::{Behaviour, TestUpstream};

/// Client connections racing through each proxy, as in the measurements of other proxies.
const CLIENTS: usize = 20;

/// Client connections in the steady phase, and the pause range their requests keep.
const STEADY_CLIENTS: usize = 10;
const STEADY_PAUSE: Duration = Duration::from_millis(10);

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// A short run (about 5 s, 100 ms upstream idle timeout) for CI and the impatient.
    #[arg(long)]
    pub quick: bool,
}

#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// The upstream's idle timeout, and the centre of the reproducer's sweep.
    pub upstream_idle: Duration,
    /// Requests per sweep (one sweep per method and side).
    pub sweep_requests: u64,
    /// Requests in the steady phase, per side.
    pub steady_requests: u64,
}

impl DemoOptions {
    /// About 30 s: a 500 ms upstream, 20 clients, one full sweep each plus a bit.
    pub fn full() -> DemoOptions {
        DemoOptions {
            upstream_idle: Duration::from_millis(500),
            sweep_requests: 1200,
            steady_requests: 3000,
        }
    }

    /// About 5 s: the same race scaled down to a 100 ms upstream.
    pub fn quick() -> DemoOptions {
        DemoOptions {
            upstream_idle: Duration::from_millis(100),
            sweep_requests: 800,
            steady_requests: 3000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("starting a test upstream: {0}")]
    Upstream(io::Error),
    #[error("starting kaguard: {0}")]
    Start(#[from] StartError),
    #[error("the reproducer: {0}")]
    Race(#[from] RaceError),
    #[error("writing the report: {0}")]
    Output(io::Error),
}

/// One line of the comparison.
#[derive(Clone, Debug)]
pub struct Row {
    pub phase: &'static str,
    pub method: &'static str,
    pub guards: bool,
    pub report: RaceReport,
    /// Connections the upstream accepted during the run.
    pub upstream_connections: u64,
}

impl Row {
    /// Share of requests that went out on a reused upstream connection.
    pub fn reuse(&self) -> f64 {
        if self.report.requests == 0 {
            return 0.0;
        }
        1.0 - self.upstream_connections as f64 / self.report.requests as f64
    }
}

#[derive(Clone, Debug)]
pub struct DemoReport {
    pub options: DemoOptions,
    pub rows: Vec<Row>,
}

impl DemoReport {
    /// Client-visible errors on one side, over every row.
    pub fn errors(&self, guards: bool) -> u64 {
        self.rows
            .iter()
            .filter(|r| r.guards == guards)
            .map(|r| r.report.errors())
            .sum()
    }
}

/// One upstream and one kaguard in front of it.
struct Stand {
    upstream: TestUpstream,
    proxy: Running,
}

impl Stand {
    async fn start(idle: Duration, guards: Guards) -> Result<Stand, DemoError> {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("a literal address");
        let upstream = TestUpstream::start(
            any,
            Behaviour {
                idle_timeout: Some(idle),
                ..Behaviour::default()
            },
        )
        .await
        .map_err(DemoError::Upstream)?;
        let mut config = Config::from_cli(&[any.to_string()], &[upstream.addr().to_string()])
            .expect("a config built from two socket addresses is valid");
        config.access_log = crate::config::AccessLog::Off;
        config.upstreams[0].guards = guards;
        if guards == Guards::OFF {
            // A plain pool: no retries either, as most proxies run for POST.
            config.retry.retry_on = RetryOn::default();
        }
        let proxy = server::start(&config).await?;
        Ok(Stand { upstream, proxy })
    }

    fn target(&self) -> http::Uri {
        format!("http://{}/", self.proxy.listen[0])
            .parse()
            .expect("an address makes a valid URI")
    }

    async fn stop(self) {
        self.proxy.shutdown().await;
        self.upstream.shutdown().await;
    }
}

fn bar(multi: &MultiProgress, len: u64, label: String) -> ProgressBar {
    let style = ProgressStyle::with_template("{prefix:28} {bar:30} {pos}/{len}  {msg}")
        .expect("the template is a constant");
    let bar = multi.add(ProgressBar::new(len));
    bar.set_style(style);
    bar.set_prefix(label);
    bar
}

async fn run_one(
    stand: &Stand,
    opts: RaceOptions,
    bar: ProgressBar,
    phase: &'static str,
    guards: bool,
) -> Result<Row, DemoError> {
    let before = stand.upstream.connections();
    let report = race::race(&opts, Some(&bar)).await?;
    bar.finish();
    Ok(Row {
        phase,
        method: opts.method.label(),
        guards,
        report,
        upstream_connections: stand.upstream.connections() - before,
    })
}

/// Runs the demo; `draw` shows progress bars on standard error.
pub async fn demo(options: &DemoOptions, draw: bool) -> Result<DemoReport, DemoError> {
    let target = if draw {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let multi = MultiProgress::with_draw_target(target);
    let idle = options.upstream_idle;
    // One stand per run, so each upstream's connection count belongs to one row.
    let plain_get = Stand::start(idle, Guards::OFF).await?;
    let plain_post = Stand::start(idle, Guards::OFF).await?;
    let kg_get = Stand::start(idle, Guards::ON).await?;
    let kg_post = Stand::start(idle, Guards::ON).await?;

    let sweep = |stand: &Stand, method: Method| {
        let mut o = RaceOptions::new(stand.target());
        o.connections = CLIENTS;
        o.method = method;
        o.timeout = idle;
        o.requests = options.sweep_requests;
        o.duration = Duration::from_secs(120);
        o
    };
    let label = |side: &str, m: Method| format!("race {side} {}", m.label());
    let n = options.sweep_requests;
    let (a, b, c, d) = tokio::join!(
        run_one(
            &plain_get,
            sweep(&plain_get, Method::Get),
            bar(&multi, n, label("plain pool", Method::Get)),
            "race",
            false
        ),
        run_one(
            &kg_get,
            sweep(&kg_get, Method::Get),
            bar(&multi, n, label("kaguard", Method::Get)),
            "race",
            true
        ),
        run_one(
            &plain_post,
            sweep(&plain_post, Method::Post),
            bar(&multi, n, label("plain pool", Method::Post)),
            "race",
            false
        ),
        run_one(
            &kg_post,
            sweep(&kg_post, Method::Post),
            bar(&multi, n, label("kaguard", Method::Post)),
            "race",
            true
        ),
    );
    let mut rows = vec![a?, b?, c?, d?];

    let steady = |stand: &Stand| {
        let mut o = RaceOptions::new(stand.target());
        o.connections = STEADY_CLIENTS;
        o.method = Method::Mix;
        o.timeout = STEADY_PAUSE;
        o.below = STEADY_PAUSE / 2;
        o.sync = false;
        o.requests = options.steady_requests;
        o.duration = Duration::from_secs(60);
        o
    };
    let m = options.steady_requests;
    let (e, f) = tokio::join!(
        run_one(
            &plain_get,
            steady(&plain_get),
            bar(&multi, m, "steady plain pool MIX".into()),
            "steady",
            false
        ),
        run_one(
            &kg_get,
            steady(&kg_get),
            bar(&multi, m, "steady kaguard MIX".into()),
            "steady",
            true
        ),
    );
    rows.push(e?);
    rows.push(f?);
    let _ = multi.clear();
    for stand in [plain_get, plain_post, kg_get, kg_post] {
        stand.stop().await;
    }
    Ok(DemoReport {
        options: options.clone(),
        rows,
    })
}

/// The comparison, side by side.
pub fn render(report: &DemoReport) -> String {
    let idle = humantime::format_duration(report.options.upstream_idle);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "kaguard demo: an upstream that closes idle connections after {idle}; {CLIENTS} clients each pause \
         between requests, sweeping the pause from just above {idle} down to 50 ms below it"
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:7} {:7} {:13} {:>9} {:>14} {:>15} {:>8}",
        "phase", "method", "proxy", "requests", "client errors", "upstream conns", "reused"
    );
    for row in &report.rows {
        let side = if row.guards { "kaguard" } else { "plain pool" };
        let _ = writeln!(
            out,
            "{:7} {:7} {:13} {:>9} {:>14} {:>15} {:>7.1}%",
            row.phase,
            row.method,
            side,
            row.report.requests,
            row.report.errors(),
            row.upstream_connections,
            row.reuse() * 100.0
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "plain pool: a keep-alive pool with no guards and no retry policy, as most proxies run for POST; \
         like Go's and hyper's clients it still resends a request the connection handed back unsent.\n\
         kaguard: every default. In the race it learns the upstream's idle timeout from its first \
         closes and stops reusing connections before it, opening new ones instead; under steady \
         traffic it reuses as much as the plain pool."
    );
    out
}

pub async fn run(args: DemoArgs) -> Result<DemoReport, DemoError> {
    let options = if args.quick {
        DemoOptions::quick()
    } else {
        DemoOptions::full()
    };
    let report = demo(&options, io::stderr().is_terminal()).await?;
    let mut stdout = io::stdout().lock();
    write!(stdout, "{}", render(&report))
        .and_then(|()| stdout.flush())
        .map_err(DemoError::Output)?;
    Ok(report)
}
