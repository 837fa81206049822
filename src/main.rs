//! The `kaguard` binary: arguments -> subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kaguard::config::{AccessLog, Config};
use kaguard::tools::audit::AuditArgs;
use kaguard::tools::demo::DemoArgs;
use kaguard::tools::probe::ProbeArgs;
use kaguard::tools::race::RaceArgs;
use kaguard::tools::upstream::UpstreamArgs;

const EXAMPLES: &str = "\
Examples:
  kaguard demo                      # the race, and kaguard's answer, in about 30 s
  kaguard run --listen 127.0.0.1:8080 --upstream 127.0.0.1:3000
  kaguard run --config examples/kaguard.toml
  kaguard check --config examples/kaguard.toml
  kaguard upstream --listen 127.0.0.1:3000 --preset node
  kaguard race --target http://127.0.0.1:8080/ --timeout 500ms --method post
  kaguard probe http://127.0.0.1:3000/
  kaguard audit alb nginx node";

/// A reverse proxy that does not lose the keep-alive race to its upstreams.
#[derive(Parser, Debug)]
#[command(version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the keep-alive race through a plain pool and through kaguard, side by side.
    Demo(DemoArgs),
    /// Run the proxy, from a config file or from flags alone.
    #[command(
        after_help = "Examples:\n  kaguard run --listen 127.0.0.1:8080 --upstream 127.0.0.1:3000,127.0.0.1:3001\n  kaguard run --config /etc/kaguard.toml --workers 2"
    )]
    Run(RunArgs),
    /// Validate a config file and print the effective config, every default filled in.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a test upstream server that closes keep-alive connections like app servers do.
    Upstream(UpstreamArgs),
    /// Provoke the keep-alive race through any proxy and count what the client sees.
    Race(RaceArgs),
    /// Measure a server's keep-alive idle timeout, request cap and Keep-Alive hint from outside.
    Probe(ProbeArgs),
    /// Check a chain of proxies and servers for the idle-timeout inversion behind the race.
    Audit(AuditArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Config file (TOML). Without it, --listen and --upstream are required.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "upstream"])]
    config: Option<PathBuf>,
    /// Address to accept clients on (repeatable).
    #[arg(long, value_name = "ADDR", requires = "upstream")]
    listen: Vec<String>,
    /// Upstream servers, comma-separated host:port, all in one group.
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        requires = "listen"
    )]
    upstream: Vec<String>,
    /// Access log: a file path, "stdout" or "off".
    #[arg(long, value_name = "PATH")]
    access_log: Option<String>,
    /// Admin listener for /metrics and /healthz, e.g. 127.0.0.1:9901.
    #[arg(long, value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,
    /// Runtime worker threads [default: the number of cores].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo runs proxies in-process to show their clients' view; their logs would bury it.
    if !matches!(cli.command, Command::Demo(_)) {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_target(false)
            .init();
    }
    match cli.command {
        Command::Check { config } => match Config::from_file(&config) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(err) => fail(err),
        },
        Command::Upstream(args) => {
            match runtime().and_then(|rt| rt.block_on(kaguard::tools::upstream::run(args))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => fail(err),
            }
        }
        Command::Race(args) => {
            match runtime().map(|rt| rt.block_on(kaguard::tools::race::run(args))) {
                Ok(Ok(_report)) => ExitCode::SUCCESS,
                Ok(Err(err)) => fail(err),
                Err(err) => fail(err),
            }
        }
        Command::Demo(args) => {
            match runtime().map(|rt| rt.block_on(kaguard::tools::demo::run(args))) {
                Ok(Ok(_report)) => ExitCode::SUCCESS,
                Ok(Err(err)) => fail(err),
                Err(err) => fail(err),
            }
        }
        Command::Probe(args) => {
            match runtime().map(|rt| rt.block_on(kaguard::tools::probe::run(args))) {
                Ok(Ok(_report)) => ExitCode::SUCCESS,
                Ok(Err(err)) => fail(err),
                Err(err) => fail(err),
            }
        }
        // 0: no inversion, 1: an inversion was flagged, 2: bad input or a failed probe.
        Command::Audit(args) => {
            match runtime().map(|rt| rt.block_on(kaguard::tools::audit::run(args))) {
                Ok(Ok(report)) => ExitCode::from(report.exit_code()),
                Ok(Err(err)) => fail(err),
                Err(err) => fail(err),
            }
        }
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match &args.config {
        Some(path) => Config::from_file(path),
        None if args.listen.is_empty() => {
            return fail("run: give --config FILE, or --listen ADDR and --upstream ADDR");
        }
        None => Config::from_cli(&args.listen, &args.upstream),
    };
    let mut config = match config {
        Ok(config) => config,
        Err(err) => return fail(err),
    };
    if let Some(log) = args.access_log {
        config.access_log = match log.as_str() {
            "off" => AccessLog::Off,
            "stdout" => AccessLog::Stdout,
            path => AccessLog::File(path.into()),
        };
    }
    if args.admin.is_some() {
        config.admin = args.admin;
    }
    if let Some(workers) = args.workers.filter(|w| *w > 0) {
        config.workers = workers;
    }
    let (rt, workers, _others) = match worker_runtimes(config.workers) {
        Ok(runtimes) => runtimes,
        Err(err) => return fail(err),
    };
    for worker in std::iter::once(rt.handle()).chain(&workers) {
        worker.spawn(kaguard::worker::release_when_quiet(release_free_memory));
    }
    match rt.block_on(kaguard::server::run_on(&config, &workers)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => fail(err),
    }
}

/// One runtime per worker, each with a single thread of its own: tasks never move between
/// threads. The multi-threaded scheduler with one thread, rather than the current-thread
/// one: a task woken by another runs next on the same thread (tokio's LIFO slot), which
/// mattered while upstream connections had tasks of their own; since they have none, the
/// two measure the same (docs/performance.md). Returns the first runtime, the others'
/// handles, and the others, which must live as long as the process serves.
fn worker_runtimes(workers: usize) -> std::io::Result<WorkerRuntimes> {
    let build = |index: usize| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("kaguard-worker-{index}"))
            .on_thread_start(move || kaguard::worker::set(index))
            .enable_all()
            .build()
    };
    let others = (1..workers.max(1))
        .map(build)
        .collect::<std::io::Result<Vec<_>>>()?;
    let handles = others.iter().map(|rt| rt.handle().clone()).collect();
    Ok((build(0)?, handles, others))
}

type WorkerRuntimes = (
    tokio::runtime::Runtime,
    Vec<tokio::runtime::Handle>,
    Vec<tokio::runtime::Runtime>,
);

/// The tools' runtime: one thread per core, as they run many clients at once.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Exit code 2 with a one-line reason, for bad configs and ports in use.
fn fail(err: impl std::fmt::Display) -> ExitCode {
    eprintln!("kaguard: {err}");
    ExitCode::from(2)
}

/// The request path allocates small, short-lived buffers on every request; mimalloc serves
/// those from thread-local free lists faster than glibc's malloc (measured in bench/).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns the calling thread's free memory to the system now. mimalloc returns it only when
/// it is next called after its purge delay, and a server gone idle makes no calls: after a
/// burst of connections that then stay idle, 1.7 KiB per idle connection stayed resident
/// instead of 0.65 (docs/performance.md).
///
/// The one `unsafe` of the project: the mimalloc crate does not expose this call.
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointer and reads no caller state. `libmimalloc-sys`
    // declares `links = "mimalloc"`, so the allocator it reaches is the one instance that
    // serves `ALLOC`. It walks the calling thread's own heap, then, forced, collects abandoned
    // segments and purges the arenas under mimalloc's own locks: callable from any thread at
    // any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
