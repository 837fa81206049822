//! Active health checks (`[upstream.health_check]`): every `interval`, a `GET` of the check
//! path to each server of the group, on a new connection.
//!
//! A new connection each time, closed after the response, so a check never takes a pooled
//! connection from a request nor leaves one behind, and it meets what a new request would:
//! a server that no longer accepts connections fails at once. [`crate::health::Active`] turns
//! the results into up and down; [`super::servers::Servers::pick`] skips a server that is down.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::group::Group;
use crate::config::HealthCheckConfig;
use crate::error::Failure;

/// What a check sends as `User-Agent`, so that upstream logs can tell checks from traffic.
const USER_AGENT: &str = "kaguard-health-check";

/// A check reads at most this much of a response body before it closes the connection:
/// more than any status page, and all a server that streams without end costs per check.
const BODY_LIMIT: usize = 64 * 1024;

/// Checks of one server wait up to this fraction of `interval` longer than `interval`, drawn
/// anew each round, so that the checks of many servers, or of several kaguards started by
/// the same deploy, drift apart instead of reaching the upstreams in lockstep bursts.
const JITTER_DIVISOR: u32 = 10;

/// Why a check failed; the text goes into the log line that takes a server down.
#[derive(Debug, thiserror::Error)]
enum CheckFailed {
    /// [`Failure::Connect`] or [`Failure::ConnectTimeout`], for nginx's words.
    #[error("{0}")]
    Connect(Failure),
    #[error("no response head within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("status {status}, expected {}", expected(*.range))]
    Status { status: u16, range: (u16, u16) },
    /// hyper's error: the server closed or reset the connection, or its response is not HTTP.
    #[error("{}", exchange_text(.0))]
    Exchange(hyper::Error),
}

fn expected((low, high): (u16, u16)) -> String {
    if low == high {
        low.to_string()
    } else {
        format!("{low}-{high}")
    }
}

/// hyper's message and its cause, e.g. "connection error: Connection reset by peer
/// (os error 104)".
fn exchange_text(err: &hyper::Error) -> String {
    match std::error::Error::source(err) {
        Some(cause) => format!("{err}: {cause}"),
        None => err.to_string(),
    }
}

/// Starts a checker per server of `group` when it has `[upstream.health_check]`.
pub(super) fn spawn(group: &Arc<Group>) {
    for server in 0..group.servers.len() {
        spawn_one(group, server);
    }
}

/// Starts a checker for slot `server` (a new address DNS gave it, or one from the start); it
/// ends when the slot's address leaves the answer.
pub(super) fn spawn_one(group: &Arc<Group>, server: usize) {
    let Some(cfg) = &group.health_check else {
        return;
    };
    let target = match Uri::try_from(cfg.path.as_str()) {
        Ok(target) => target,
        Err(err) => {
            // Config validation should have refused the path; without checks the servers
            // stay up, judged by live traffic alone, rather than all going down.
            tracing::error!(upstream = %group.name, "health check path {:?}: {err}; active checks are off", cfg.path);
            return;
        }
    };
    tokio::spawn(check(Arc::downgrade(group), server, cfg.clone(), target));
}

/// Checks `server` at once, then every `interval` (plus jitter) from the start of one check
/// to the start of the next, until the group is gone or the slot's address left DNS. Checks
/// of one server never overlap: `timeout` is below `interval`.
async fn check(group: Weak<Group>, server: usize, cfg: HealthCheckConfig, target: Uri) {
    let Some((addr, generation)) = group
        .upgrade()
        .map(|g| (g.server_addr(server), g.servers.generation(server)))
    else {
        return;
    };
    loop {
        let started = tokio::time::Instant::now();
        let outcome = probe(addr, &target, &cfg).await;
        // Not held across the probe, so a group that is gone is freed without waiting for it.
        let Some(g) = group.upgrade() else { return };
        if !g.servers.listed(server) || g.servers.generation(server) != generation {
            return;
        }
        match g.server_checked(server, addr, outcome.is_ok(), Instant::now()) {
            Some(false) => {
                let reason = outcome.err().map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(upstream = %addr, "upstream server {addr} is down (health check: {reason})");
            }
            Some(true) => {
                tracing::warn!(upstream = %addr, "upstream server {addr} is up again");
            }
            None => {
                if let Err(reason) = &outcome {
                    tracing::debug!(upstream = %addr, "upstream server {addr} failed a health check: {reason}");
                }
            }
        }
        drop(g);
        let jitter = cfg.interval / JITTER_DIVISOR;
        let jitter = jitter.mul_f64(fastrand::f64());
        tokio::time::sleep_until(started + cfg.interval + jitter).await;
    }
}

/// One check: `Ok` when a response head arrives within `timeout` with a status in
/// `expect_status`. The body is read and dropped within the same `timeout`, so that the
/// connection ends with a FIN rather than a reset, but it does not decide the result.
async fn probe(addr: SocketAddr, target: &Uri, cfg: &HealthCheckConfig) -> Result<(), CheckFailed> {
    let deadline = tokio::time::Instant::now() + cfg.timeout;
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Err(CheckFailed::Connect(Failure::Connect(err))),
        Err(_) => return Err(CheckFailed::Connect(Failure::ConnectTimeout(cfg.timeout))),
    };
    let (status, body, driver) = tokio::time::timeout_at(deadline, head(stream, addr, target))
        .await
        .map_err(|_| CheckFailed::Timeout(cfg.timeout))??;
    let _ = tokio::time::timeout_at(deadline, drain(body)).await;
    drop(driver);
    let (low, high) = cfg.expect_status;
    if !(low..=high).contains(&status.as_u16()) {
        return Err(CheckFailed::Status {
            status: status.as_u16(),
            range: cfg.expect_status,
        });
    }
    Ok(())
}

/// Sends the check on `stream` and waits for the response head.
async fn head(
    stream: TcpStream,
    addr: SocketAddr,
    target: &Uri,
) -> Result<(StatusCode, Incoming, Driver), CheckFailed> {
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(CheckFailed::Exchange)?;
    let driver = Driver(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.uri_mut() = target.clone();
    let headers = req.headers_mut();
    let host =
        HeaderValue::from_str(&addr.to_string()).expect("a socket address is a valid header value");
    headers.insert(header::HOST, host);
    headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    let resp = sender
        .send_request(req)
        .await
        .map_err(CheckFailed::Exchange)?;
    let (parts, body) = resp.into_parts();
    Ok((parts.status, body, driver))
}

/// Reads `body` to its end, or to [`BODY_LIMIT`], or to its first error.
async fn drain(mut body: Incoming) {
    let mut read = 0;
    while read < BODY_LIMIT {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
            Some(Err(_)) | None => return,
        }
    }
}

/// The task that drives a check's connection; ending the check ends it and closes the
/// connection, however the check ended, so a server that never finishes its response
/// holds nothing past the check.
struct Driver(JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reasons_say_what_the_check_met() {
        let refused =
            CheckFailed::Connect(Failure::Connect(std::io::Error::from_raw_os_error(111)));
        assert_eq!(
            refused.to_string(),
            "connect() failed (111: Connection refused) while connecting to upstream"
        );
        let slow = CheckFailed::Timeout(Duration::from_millis(50));
        assert_eq!(slow.to_string(), "no response head within 50ms");
        let sick = CheckFailed::Status {
            status: 503,
            range: (200, 399),
        };
        assert_eq!(sick.to_string(), "status 503, expected 200-399");
        let exact = CheckFailed::Status {
            status: 404,
            range: (204, 204),
        };
        assert_eq!(exact.to_string(), "status 404, expected 204");
    }
}
