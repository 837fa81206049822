//! `kaguard race`: makes the keep-alive race happen on purpose, against any HTTP/1.1 target.
//!
//! The race: a proxy reuses a pooled upstream connection at the moment the upstream closes it
//! for being idle, and the request written into the closing socket gets a reset or an EOF.
//! To provoke it, each of K client connections sends its requests over one keep-alive
//! connection with a pause between them that sweeps around the upstream's idle timeout T:
//! T+1 ms, T, T−1 ms, ... T−`below`, then again from T+1 ms. Behind a proxy that keeps one
//! upstream connection per client connection, that is also the idle age at which the proxy
//! reuses its upstream connection. Pointed straight at the upstream, the client itself loses
//! the race (the tests do that).
//!
//! The tool never retries: a request without a complete response is counted as a transport
//! error and the client opens a fresh connection for its next request. Every response counts by
//! its status. `Connection: close` on a response only means a fresh connection next time.
//!
//! Timing, `sync` (the default): rounds. All K clients send at the same instant; when the last
//! of them has its response, all wait the same pause from that moment and send again. So every
//! pooled upstream connection has been idle for the pause (plus the spread of one round's
//! response times, well under a millisecond on a LAN), and the proxy sees K reuses at once, as
//! in a burst. Without `sync` each client starts at a random moment within the first T and
//! paces itself: its pause runs from the end of its own previous response.
//!
//! Pauses are `sleep_until` an instant computed from the end of the previous response, so
//! they do not drift; tokio's timer rounds each one up to its next millisecond tick.
//!
//! Files: `client` is one client connection and classifies failures; `report` counts and
//! prints; `cli` is the subcommand.

mod cli;
mod client;
mod report;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use client::{Client, Target};
use report::Tally;

pub use cli::{RACE_EXAMPLES, RaceArgs, run};
pub use report::{Latency, RaceReport, TransportErrorKinds};

/// Size of one sweep step: tokio's timer resolution, so every step is a distinct idle age.
const SWEEP_STEP: Duration = Duration::from_millis(1);

/// Most client connections: each is a socket and a task, and beyond this the machine's file
/// descriptor limit, not the target, decides what the race counts.
const MAX_CONNECTIONS: usize = 10_000;

/// Longest `timeout` and `below`: no server keeps an idle connection longer, and the bound keeps
/// every instant the sweep computes far from overflow.
const MAX_SWEEP: Duration = Duration::from_secs(24 * 60 * 60);

/// Which request method the clients send.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET, no body: a proxy may resend it safely after losing the race.
    Get,
    /// POST with a 32-byte JSON body: a proxy must not resend it once written.
    Post,
    /// GET and POST alternating on each connection.
    Mix,
}

impl Method {
    /// The name in the summary and in the JSON report.
    pub fn label(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Mix => "MIX",
        }
    }

    /// The method of request number `n` of a client (offset by the client's index, so that
    /// half of each `sync` round is GET and half POST).
    fn of_request(self, n: u64) -> http::Method {
        match self {
            Method::Get => http::Method::GET,
            Method::Post => http::Method::POST,
            Method::Mix if n.is_multiple_of(2) => http::Method::GET,
            Method::Mix => http::Method::POST,
        }
    }
}

/// What [`race`] sends, where, and for how long.
#[derive(Clone, Debug)]
pub struct RaceOptions {
    /// `http://host:port/path`; every request goes to this path.
    pub target: http::Uri,
    /// Client connections sending in parallel. Default 20.
    pub connections: usize,
    /// Default [`Method::Post`], the method no proxy may resend.
    pub method: Method,
    /// The centre of the sweep: the idle timeout of the upstream behind the target. Default
    /// 500 ms.
    pub timeout: Duration,
    /// How far below `timeout` the sweep goes, in 1 ms steps. Default 50 ms.
    pub below: Duration,
    /// All clients send at the same instant each round. Default `true`.
    pub sync: bool,
    /// Requests in total, across all connections. Default 2000.
    pub requests: u64,
    /// No request starts later than this after the start; one already sent still gets up to
    /// `request_timeout`. Default 60 s.
    pub duration: Duration,
    /// Longest wait for one complete response, including a reconnect before it. Default 10 s.
    pub request_timeout: Duration,
}

impl RaceOptions {
    pub fn new(target: http::Uri) -> Self {
        RaceOptions {
            target,
            connections: 20,
            method: Method::Post,
            timeout: Duration::from_millis(500),
            below: Duration::from_millis(50),
            sync: true,
            requests: 2000,
            duration: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }

    fn validate(&self) -> Result<(), RaceError> {
        let problem = if self.connections == 0 {
            "--connections must be at least 1"
        } else if self.connections > MAX_CONNECTIONS {
            "--connections is at most 10000"
        } else if self.timeout > MAX_SWEEP || self.below > MAX_SWEEP {
            "--timeout and --below are at most 24h"
        } else if self.requests == 0 {
            "--requests must be at least 1"
        } else if self.duration.is_zero() {
            "--duration must be longer than 0"
        } else if self.request_timeout.is_zero() {
            "--request-timeout must be longer than 0"
        } else {
            return Ok(());
        };
        Err(RaceError::Options(problem))
    }

    /// The pause after a client's (or, with `sync`, a round's) request number `gap`, from 0.
    fn pause(&self, gap: u64) -> Duration {
        let below = self.below.as_nanos() / SWEEP_STEP.as_nanos();
        // T+1 step down to T−below inclusive. Starting one step above T means each cycle also
        // covers a connection the upstream has certainly closed already.
        let steps = below.saturating_add(2);
        let down = u32::try_from(u128::from(gap) % steps).unwrap_or(u32::MAX);
        (self.timeout + SWEEP_STEP).saturating_sub(SWEEP_STEP.saturating_mul(down))
    }

    /// The longest and the shortest pause of the sweep.
    pub fn pause_range(&self) -> (Duration, Duration) {
        (
            self.timeout + SWEEP_STEP,
            self.timeout.saturating_sub(self.below),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RaceError {
    #[error("bad target {target}: {reason}")]
    Target {
        target: String,
        reason: &'static str,
    },
    #[error("{0}")]
    Options(&'static str),
    /// Resolving the target or opening the first K connections failed; nothing was sent.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the report: {0}")]
    Output(#[source] io::Error),
}

/// Runs one race and returns what it counted.
///
/// Fails only before the first request: bad options, or the target cannot be resolved or one of
/// the first K connections cannot be opened. After that every failure is a count in the report.
/// `progress` is advanced by one per request, and its message shows the errors so far.
pub async fn race(
    opts: &RaceOptions,
    progress: Option<&ProgressBar>,
) -> Result<RaceReport, RaceError> {
    // Kept alive to the end so that the stop signal never fires.
    let (_never, stop) = watch::channel(false);
    race_until(opts, progress, stop).await
}

/// [`race`], ending early (after the requests in flight) once `stop` turns true.
async fn race_until(
    opts: &RaceOptions,
    progress: Option<&ProgressBar>,
    stop: watch::Receiver<bool>,
) -> Result<RaceReport, RaceError> {
    opts.validate()?;
    let target = Arc::new(Target::resolve(&opts.target).await?);
    let started = Instant::now();
    let deadline = started
        .checked_add(opts.duration)
        .ok_or(RaceError::Options("--duration is too long"))?;

    let mut opening = JoinSet::new();
    for index in 0..opts.connections {
        let target = target.clone();
        opening.spawn(async move { Client::open(index as u64, &target).await });
    }
    let mut clients = Vec::with_capacity(opts.connections);
    while let Some(opened) = opening.join_next().await {
        match joined(opened) {
            Some(Ok(client)) => clients.push(client),
            Some(Err(source)) => {
                return Err(RaceError::Connect {
                    target: opts.target.to_string(),
                    source,
                });
            }
            None => {}
        }
    }
    // Sorted so that client i is always the i-th, which keeps `mix` balanced per round.
    clients.sort_by_key(|client| client.index);

    let mut tally = Tally::new(opts, progress, clients.len() as u64);
    if opts.sync {
        rounds(opts, &target, clients, deadline, stop, &mut tally).await;
    } else {
        spread(opts, &target, clients, deadline, stop, &mut tally).await;
    }
    Ok(tally.report(opts, started.elapsed()))
}

/// `sync`: all clients send together, then wait for the slowest, then pause together.
async fn rounds(
    opts: &RaceOptions,
    target: &Arc<Target>,
    mut clients: Vec<Client>,
    deadline: Instant,
    mut stop: watch::Receiver<bool>,
    tally: &mut Tally<'_>,
) {
    let mut send_at = Instant::now();
    let mut sent = 0u64;
    // Bounded: each round sends at least one request of `opts.requests`, and none starts after
    // `deadline`.
    for round in 0u64.. {
        let budget = opts.requests.saturating_sub(sent);
        let count = usize::try_from(budget).map_or(clients.len(), |b| b.min(clients.len()));
        if count == 0 || send_at >= deadline || !sleep_until_or_stop(send_at, &mut stop).await {
            break;
        }
        let mut exchanges = JoinSet::new();
        for mut client in clients.drain(..count) {
            let (target, serial) = (target.clone(), sent + client.index);
            let method = opts.method.of_request(client.index + client.sent);
            let limit = opts.request_timeout;
            exchanges.spawn(async move {
                let exchange = client.exchange(&target, method, serial, limit).await;
                (client, exchange)
            });
        }
        sent += count as u64;
        let mut last_finished = send_at;
        while let Some(done) = exchanges.join_next().await {
            if let Some((client, exchange)) = joined(done) {
                last_finished = last_finished.max(exchange.finished);
                tally.record(&exchange);
                clients.push(client);
            }
        }
        clients.sort_by_key(|client| client.index);
        send_at = last_finished + opts.pause(round);
    }
}

/// Without `sync`: each client paces itself from a random start within the first T.
async fn spread(
    opts: &RaceOptions,
    target: &Arc<Target>,
    clients: Vec<Client>,
    deadline: Instant,
    stop: watch::Receiver<bool>,
    tally: &mut Tally<'_>,
) {
    let tickets = Arc::new(AtomicU64::new(0));
    // A few results per client may wait while the tally catches up; more would only hide a
    // stalled receiver.
    let (results, mut received) = mpsc::channel(clients.len() * 4);
    let mut workers = JoinSet::new();
    let start = Instant::now();
    let first_window = u64::try_from(opts.timeout.as_nanos()).unwrap_or(u64::MAX);
    for mut client in clients {
        let (opts, target, tickets) = (opts.clone(), target.clone(), tickets.clone());
        let (results, mut stop) = (results.clone(), stop.clone());
        let offset = Duration::from_nanos(fastrand::u64(0..first_window.max(1)));
        workers.spawn(async move {
            let mut send_at = start + offset;
            // Bounded by the shared ticket count and by `deadline`.
            while send_at < deadline && sleep_until_or_stop(send_at, &mut stop).await {
                let serial = tickets.fetch_add(1, Ordering::SeqCst);
                if serial >= opts.requests {
                    break;
                }
                let method = opts.method.of_request(client.index + client.sent);
                let exchange = client
                    .exchange(&target, method, serial, opts.request_timeout)
                    .await;
                let gap = client.sent - 1;
                send_at = exchange.finished + opts.pause(gap);
                if results.send(exchange).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(results);
    while let Some(exchange) = received.recv().await {
        tally.record(&exchange);
    }
    while let Some(done) = workers.join_next().await {
        joined(done);
    }
}

/// Sleeps until `at`; false if `stop` turned true first.
async fn sleep_until_or_stop(at: Instant, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep_until(at) => true,
        // `is_ok` drops the value's read guard, which is not `Send`, before the await below.
        stopped = async { stop.wait_for(|stop| *stop).await.is_ok() } => {
            if !stopped {
                // The sender is gone, so no stop can come any more.
                tokio::time::sleep_until(at).await;
            }
            !stopped
        }
    }
}

/// The value of a finished task. A panic inside it is re-raised here rather than turned into
/// a count; `None` only when the runtime is shutting down and cancelled it.
fn joined<T>(done: Result<T, tokio::task::JoinError>) -> Option<T> {
    match done {
        Ok(value) => Some(value),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_cancelled) => None,
    }
}
