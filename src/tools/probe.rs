//! `kaguard probe URL`: measures an HTTP/1.1 server's keep-alive behaviour from the outside,
//! and says what to configure in the proxies and load balancers in front of it.
//!
//! What it measures:
//! - the idle timeout: connections that send one request and then sit idle, each watched by
//!   its own task so the instant the server's FIN or RST arrives is measured against the end of
//!   the response. A connection still open at its deadline (nothing to read, and a second
//!   request succeeds) proves the timeout is longer. Rounds of connections narrow the interval
//!   [survived, closed] until it is within 5 % or 50 ms (see [`idle`]);
//! - the request cap: requests back to back on one connection until the server closes it,
//!   and whether the last response said `Connection: close` (announced) or not (silent);
//! - the `Keep-Alive: timeout=, max=` hint, checked against both;
//! - how an idle connection is closed (FIN or RST) and the HTTP version of the responses.
//!
//! Both measurements run at once. The probe sends only `GET` requests to the given path.
//!
//! Files: `wire` is the raw HTTP/1.1 client; `idle` runs the rounds; `advice` turns a report
//! into hint verdicts and recommended settings; `text` writes the human report; `cli` is the
//! subcommand.

mod advice;
mod cli;
mod idle;
#[cfg(test)]
mod tests;
mod text;
mod wire;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use serde::{Serialize, Serializer};
use tokio::time::Instant;

use wire::{Conn, Failure, Response, Target};

pub use advice::{HintCheck, proxy_idle_below, server_idle_above};
pub(crate) use advice::{config_duration, envoy_duration, secs};
pub use cli::{PROBE_EXAMPLES, ProbeArgs, run};
pub(crate) use cli::{parse_url, spinner};
pub(crate) use text::entry;

/// Most idle connections per round: each holds a socket on the server for up to the idle
/// timeout, and more than this only loads the server without narrowing the interval faster.
const MAX_CONNECTIONS: usize = 64;

/// Longest `max_idle`: no server keeps an idle connection longer, and the bound keeps every
/// instant the rounds compute far from overflow.
const MAX_IDLE_BOUND: Duration = Duration::from_secs(24 * 60 * 60);

/// Shortest `max_idle`: below this the probe's own timer and scheduling noise dominate.
const MIN_IDLE_BOUND: Duration = Duration::from_millis(100);

/// How the server ended an idle connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CloseKind {
    /// An orderly close: the next read returned end of file.
    Fin,
    /// A reset (e.g. `SO_LINGER 0`): the next read failed with ECONNRESET.
    Rst,
}

/// What [`probe`] measures, and its bounds.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Longest idle time tried; a server that keeps connections longer is reported as "longer
    /// than this". Default 120 s (twice an AWS ALB's 60 s).
    pub max_idle: Duration,
    /// Most requests sent on the one connection that looks for a request cap. Default 1000
    /// (nginx's `keepalive_requests`).
    pub max_requests: u64,
    /// Idle connections per refining round. Default 8.
    pub connections: usize,
    /// Longest wait for one complete response. Default 10 s.
    pub request_timeout: Duration,
    /// Longest wait for a TCP connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Measure the idle timeout. Default true.
    pub measure_idle: bool,
    /// Measure the request cap. Default true.
    pub measure_cap: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            max_idle: Duration::from_secs(120),
            max_requests: 1000,
            connections: 8,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            measure_idle: true,
            measure_cap: true,
        }
    }
}

impl ProbeOptions {
    fn validate(&self) -> Result<(), ProbeError> {
        let problem = if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            "--connections must be between 1 and 64"
        } else if self.max_idle < MIN_IDLE_BOUND || self.max_idle > MAX_IDLE_BOUND {
            "--max-idle must be between 100ms and 24h"
        } else if self.max_requests == 0 {
            "--max-requests must be at least 1"
        } else if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            "timeouts must be longer than 0"
        } else {
            return Ok(());
        };
        Err(ProbeError::Options(problem))
    }
}

/// What the probe found. Serialises to the `--json` object (durations in milliseconds).
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    /// The URL as given.
    pub target: String,
    /// HTTP version of the first response: `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Status of the first response.
    pub status: u16,
    /// False when the server closes after every response: nothing else applies then.
    pub keep_alive: bool,
    /// Whether the idle timeout was measured (not skipped).
    pub idle_measured: bool,
    /// Shortest idle time after which the server was seen to close a connection. `None`: it
    /// closed none within `idle_bound` (or it was not measured, or keep-alive is off).
    #[serde(rename = "idle_timeout_ms", serialize_with = "millis_opt")]
    pub idle_timeout: Option<Duration>,
    /// Longest idle time after which a connection was proven still open.
    #[serde(rename = "idle_survived_ms", serialize_with = "millis_opt")]
    pub idle_survived: Option<Duration>,
    /// `max_idle` of the run.
    #[serde(rename = "idle_bound_ms", serialize_with = "millis")]
    pub idle_bound: Duration,
    /// How the server closed idle connections.
    pub idle_close: Option<CloseKind>,
    /// Whether the request cap was measured (not skipped).
    pub cap_measured: bool,
    /// Responses the server sends on one connection before closing it. `None`: no close within
    /// `cap_bound` requests (or not measured).
    pub request_cap: Option<u64>,
    /// Whether the last response before the cap carried `Connection: close`.
    pub cap_announced: Option<bool>,
    /// `max_requests` of the run.
    pub cap_bound: u64,
    /// `Keep-Alive: timeout=N` on the first response, in seconds.
    pub hint_timeout: Option<u64>,
    /// `Keep-Alive: max=M` on the first response.
    pub hint_max: Option<u64>,
    pub hint_timeout_check: Option<HintCheck>,
    pub hint_max_check: Option<HintCheck>,
    /// Idle timeout for a proxy in front of this server; `None` when none is needed or known.
    #[serde(rename = "recommended_idle_ms", serialize_with = "millis_opt")]
    pub recommended_idle: Option<Duration>,
    /// Request limit for a proxy in front of this server.
    pub recommended_requests: Option<u64>,
    /// Rounds of idle connections run, and TCP connections opened in all.
    pub rounds: u32,
    pub connections: u64,
    /// Anything odd seen on the way (unsolicited bytes, failed connections, mixed closes).
    pub notes: Vec<String>,
    #[serde(rename = "duration_s", serialize_with = "seconds")]
    pub elapsed: Duration,
}

impl ProbeReport {
    /// The `--json` object: one line, no newline.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("plain fields and string keys always serialise")
    }

    /// The human report, then the settings for what sits in front of the server.
    pub fn summary(&self) -> String {
        text::summary(self)
    }
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn millis_opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => millis(d, s),
        None => s.serialize_none(),
    }
}

fn seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("bad target {target}: {reason}")]
    Target {
        target: String,
        reason: &'static str,
    },
    #[error("{0}")]
    Options(&'static str),
    /// Resolving the host or opening the first connection failed; nothing was sent.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    /// The first request got no complete response, so there is nothing to measure.
    #[error("no response from {target}: {reason}")]
    NoResponse { target: String, reason: String },
    #[error("cannot write the report: {0}")]
    Output(#[source] io::Error),
}

/// Probes the server at `url`: idle timeout and request cap at once, then the hint checks and
/// the recommended proxy settings.
///
/// Fails only before anything is measured: bad options or URL, no connection, or no response
/// to the first request. Later failures become notes. `progress` gets the request count as its
/// prefix and the idle rounds as its message.
pub async fn probe(
    url: &http::Uri,
    opts: &ProbeOptions,
    progress: Option<&ProgressBar>,
) -> Result<ProbeReport, ProbeError> {
    opts.validate()?;
    let started = Instant::now();
    let target = Arc::new(Target::resolve(url).await?);
    let mut conn = Conn::open(&target, opts.connect_timeout)
        .await
        .map_err(|source| ProbeError::Connect {
            target: url.to_string(),
            source,
        })?;
    let first = conn
        .exchange(&target, opts.request_timeout)
        .await
        .map_err(|failure| ProbeError::NoResponse {
            target: url.to_string(),
            reason: describe(&failure),
        })?;
    let mut report = ProbeReport {
        target: url.to_string(),
        version: first.version.to_owned(),
        status: first.status,
        keep_alive: !first.close,
        idle_measured: opts.measure_idle,
        idle_timeout: None,
        idle_survived: None,
        idle_bound: opts.max_idle,
        idle_close: None,
        cap_measured: opts.measure_cap,
        request_cap: None,
        cap_announced: None,
        cap_bound: opts.max_requests,
        hint_timeout: first.hint_timeout,
        hint_max: first.hint_max,
        hint_timeout_check: None,
        hint_max_check: None,
        recommended_idle: None,
        recommended_requests: None,
        rounds: 0,
        connections: 1,
        notes: Vec::new(),
        elapsed: Duration::ZERO,
    };
    if first.close {
        // Keep-alive is off: the first response is also the last on its connection.
        report.request_cap = Some(1);
        report.cap_announced = Some(first.said_close);
    } else {
        let cap = async {
            if opts.measure_cap {
                Some(request_cap(conn, first, &target, opts, progress).await)
            } else {
                None
            }
        };
        let idle = async {
            if opts.measure_idle {
                Some(idle::measure(&target, opts, progress).await)
            } else {
                None
            }
        };
        let (cap, idle) = tokio::join!(cap, idle);
        if let Some(cap) = cap {
            report.request_cap = cap.cap;
            report.cap_announced = cap.announced;
            report.notes.extend(cap.note);
        }
        if let Some(idle) = idle {
            report.idle_timeout = idle.timeout;
            report.idle_survived = idle.survived;
            report.idle_close = idle.close;
            report.rounds = idle.rounds;
            report.connections += idle.connections;
            report.notes.extend(idle.notes);
        }
        if report.request_cap == Some(1) {
            // The server closes after every response without saying so: the "idle closes"
            // were that, not an idle timeout.
            report.keep_alive = false;
            report.idle_timeout = None;
            report.idle_survived = None;
            report.idle_close = None;
        }
    }
    advice::complete(&mut report);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// What the request-cap connection found.
struct Cap {
    cap: Option<u64>,
    announced: Option<bool>,
    note: Option<String>,
}

/// Sends requests back to back on `conn` (which has carried `first`) until the server closes
/// it or `max_requests` responses have arrived.
async fn request_cap(
    mut conn: Conn,
    first: Response,
    target: &Target,
    opts: &ProbeOptions,
    progress: Option<&ProgressBar>,
) -> Cap {
    let mut served = 1u64;
    let mut last = first;
    // Bounded: one response more per pass, up to `max_requests`.
    loop {
        if last.close {
            return Cap {
                cap: Some(served),
                announced: Some(true),
                note: None,
            };
        }
        if served >= opts.max_requests {
            return Cap {
                cap: None,
                announced: None,
                note: None,
            };
        }
        match conn.exchange(target, opts.request_timeout).await {
            Ok(response) => {
                served += 1;
                last = response;
                if let Some(bar) = progress {
                    bar.set_prefix(format!("{served} requests on one connection"));
                }
            }
            // Closed before a byte of the next response: the previous one was the last.
            Err(Failure::Closed(_)) => {
                return Cap {
                    cap: Some(served),
                    announced: Some(false),
                    note: None,
                };
            }
            Err(failure) => {
                return Cap {
                    cap: None,
                    announced: None,
                    note: Some(format!(
                        "request cap not measured: request {} failed: {}",
                        served + 1,
                        describe(&failure)
                    )),
                };
            }
        }
    }
}

fn describe(failure: &Failure) -> String {
    match failure {
        Failure::Closed(CloseKind::Fin) => "the server closed the connection (FIN)".to_owned(),
        Failure::Closed(CloseKind::Rst) => "the server reset the connection (RST)".to_owned(),
        Failure::Timeout => "no complete response in time".to_owned(),
        Failure::Broken(reason) => reason.clone(),
    }
}
