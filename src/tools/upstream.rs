//! `kaguard upstream`: an HTTP/1.1 origin that closes keep-alive connections the way app servers do.
//!
//! The keep-alive race happens when an upstream closes an idle connection at the moment a proxy
//! reuses it. To reproduce it on demand this server closes connections on a schedule that tests
//! control exactly: after an idle timeout (measured from the last response byte written to the
//! first byte of the next request), after N responses (announced with `Connection: close` or
//! silent), with FIN or with RST. [`Behaviour`] holds the schedule; [`Behaviour::node`],
//! [`Behaviour::gunicorn`] and [`Behaviour::tomcat`] copy real servers.
//!
//! One request can ask for something special through its query string (unknown keys are
//! ignored, a bad value of a known key gets a 400 that says why):
//! - `status=503`: answer with this status;
//! - `size=1048576`: send this many body bytes;
//! - `delay=200ms`: wait this long before answering;
//! - `echo=1`: stream the request body back as the response body;
//! - `close=fin` / `close=rst`: close the connection right after the request head, with no answer.
//!
//! Every response carries `x-upstream-connection` (serial of the TCP connection, from 1) and
//! `x-upstream-request` (its number on that connection, from 1), so a test looking through a
//! proxy can tell which upstream connection served it. Non-echo responses also carry
//! `x-body-bytes`, the request body length read before answering.
//!
//! It stops in one of two ways, because proxies meet both: [`TestUpstream::shutdown`] closes every
//! connection at once, as a crash or a kill does; [`TestUpstream::drain`] stops as app servers do
//! on a graceful stop (Node's `server.close()` with `closeIdleConnections()`, Gunicorn's graceful
//! timeout, Tomcat's connector stop), so that a rolling restart can be tested as deployed.
//!
//! Files: `conn` drives one TCP connection and decides when it closes; `respond` turns one request
//! into a response; `body` streams response bodies; `cli` is the subcommand.

mod body;
mod cli;
mod conn;
mod respond;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

pub use cli::{Preset, UPSTREAM_EXAMPLES, UpstreamArgs, run};

/// Request heads kept for [`TestUpstream::seen`]: enough to look back over a burst of requests
/// in a test, and a fixed cost in a CLI run that lasts for days.
const SEEN_CAPACITY: usize = 64;

/// How long [`TestUpstream::shutdown`] waits for connections to finish closing. Closing is a
/// drop and takes microseconds; the bound only guards against a task that never yields.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// How long [`TestUpstream::drain`] lets requests in flight finish before closing what is left.
/// Real servers allow their handlers tens of seconds (Gunicorn's `graceful_timeout` is 30 s); the
/// handlers here only wait out a `delay`, which tests and reproducers keep to hundreds of
/// milliseconds, so 5 s is ample on a loaded 2-core machine, yet a client that never finishes
/// its request holds a test or a Ctrl-C for only that long.
pub const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// Pause after a failed accept (e.g. out of file descriptors), so the loop does not spin on an
/// error that persists until some connection closes.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How the test upstream answers and when it closes a connection.
///
/// [`TestUpstream::set_behaviour`] applies to new connections and to the next response on
/// existing ones: each connection follows the behaviour current at its latest request head (or
/// at accept, before its first request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Behaviour {
    /// Status code of every response. Default 200.
    pub status: u16,
    /// Bytes of response body (a repeating `OK` pattern). Default 2, i.e. `OK`.
    pub body_size: usize,
    /// Wait this long before answering (after the request body has been read). Default 0.
    pub delay: Duration,
    /// Close a connection on which nothing has arrived for this long since the last response
    /// was completely written (or since accept, before the first request). `None`: never.
    /// Default 5 s.
    pub idle_timeout: Option<Duration>,
    /// Close the connection after its Nth response. `None`: never; `Some(0)` acts as `Some(1)`.
    /// Default `None`.
    pub max_requests: Option<u64>,
    /// `true`: the Nth response carries `Connection: close`. `false`: it does not, and the
    /// connection is closed right after it is written, without reading another byte (so a
    /// request the client has already sent is left unread, and Linux answers it with RST even
    /// in FIN mode). Default `true`.
    pub announce_last: bool,
    /// Close on idle timeout or after the Nth response with RST (SO_LINGER 0) instead of FIN.
    /// (`?close=` names its own.) Default `false`.
    pub close_with_rst: bool,
    /// Send `Keep-Alive: timeout=N` (whole seconds of `idle_timeout`, rounded down as Node does)
    /// and `max=M` (requests still allowed after this one, as Apache counts) when
    /// `max_requests` is set. Not sent on a response that carries `Connection: close`.
    /// Default `false`.
    pub hint: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            status: 200,
            body_size: 2,
            delay: Duration::ZERO,
            idle_timeout: Some(Duration::from_secs(5)),
            max_requests: None,
            announce_last: true,
            close_with_rst: false,
            hint: false,
        }
    }
}

impl Behaviour {
    /// Node.js `http.Server` up to v24: `keepAliveTimeout` 5 s, announced as
    /// `Keep-Alive: timeout=5`; no per-socket request cap (`maxRequestsPerSocket` 0).
    ///
    /// Later releases add `keepAliveTimeoutBuffer` (the socket outlives the hint by 1 s) and
    /// raise the default timeout; set `idle_timeout` to copy those.
    pub fn node() -> Self {
        Behaviour {
            idle_timeout: Some(Duration::from_secs(5)),
            hint: true,
            ..Behaviour::default()
        }
    }

    /// Gunicorn with an async or gthread worker: `keepalive` 2 s, no `Keep-Alive` header, no
    /// per-connection request cap. (The default sync worker does not keep connections alive.)
    pub fn gunicorn() -> Self {
        Behaviour {
            idle_timeout: Some(Duration::from_secs(2)),
            hint: false,
            ..Behaviour::default()
        }
    }

    /// Tomcat's HTTP connector: `maxKeepAliveRequests` 100, the 100th response announced with
    /// `Connection: close`; `keepAliveTimeout` falls back to `connectionTimeout`, 60 s (the
    /// `server.xml` shipped with Tomcat sets 20 s).
    ///
    /// Tomcat sends `Keep-Alive: timeout=N` only to requests that carry `Connection:
    /// keep-alive`, which HTTP/1.1 clients rarely send, so the hint is off.
    pub fn tomcat() -> Self {
        Behaviour {
            idle_timeout: Some(Duration::from_secs(60)),
            max_requests: Some(100),
            announce_last: true,
            hint: false,
            ..Behaviour::default()
        }
    }
}

/// One line of `key=value` pairs, for the CLI banner and logs.
impl fmt::Display for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let idle = match self.idle_timeout {
            Some(t) => humantime::format_duration(t).to_string(),
            None => "none".to_owned(),
        };
        let max = match self.max_requests {
            Some(n) => n.to_string(),
            None => "none".to_owned(),
        };
        write!(
            f,
            "status={} body_size={} delay={} idle_timeout={} max_requests={} last={} close={} hint={}",
            self.status,
            self.body_size,
            humantime::format_duration(self.delay),
            idle,
            max,
            if self.announce_last {
                "announced"
            } else {
                "silent"
            },
            if self.close_with_rst { "rst" } else { "fin" },
            if self.hint { "on" } else { "off" },
        )
    }
}

/// The head of one request as the test upstream received it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    /// Request body bytes read; 0 until the body has been read to its end (or abandoned).
    pub body_bytes: u64,
    /// Serial of the TCP connection, from 1.
    pub connection: u64,
    /// Number of this request on its connection, from 1.
    pub request_on_connection: u64,
}

/// What a graceful stop had to do: a test reads it to know that the stop met requests in flight
/// and idle connections, rather than an idle server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Idle keep-alive connections closed with FIN as the stop began.
    pub idle_closed: u64,
    /// Responses built during the stop, each with `Connection: close`: requests whose bytes had
    /// begun to arrive or whose handler was running. (A response already on its way when the stop
    /// began is not counted; its connection closes after it.)
    pub answered: u64,
    /// Connections still open when the wait ran out, closed without an answer.
    pub cut_off: u64,
}

/// A running test upstream. Dropping it stops it too, without waiting.
pub struct TestUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<Stop>,
    accept: JoinHandle<()>,
}

/// What the accept loop and every connection are told; it only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Serving,
    /// Accept nothing more, close idle connections, finish the requests already started.
    Draining,
    /// Close every connection at once. Also what a dropped handle means.
    Now,
}

impl TestUpstream {
    /// Binds `addr` (tests pass `127.0.0.1:0`) and serves in background tasks.
    pub async fn start(addr: SocketAddr, behaviour: Behaviour) -> io::Result<TestUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(behaviour),
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            handling: AtomicU64::new(0),
            seen: Mutex::new(VecDeque::with_capacity(SEEN_CAPACITY)),
            drained: DrainCounts::default(),
        });
        let (stop, stopped) = watch::channel(Stop::Serving);
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), stopped));
        Ok(TestUpstream {
            addr,
            shared,
            stop,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Requests whose head has been received so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Requests whose handler is running: head received, response not yet built (reading the
    /// body, or waiting out a `delay`). A test waits for one before a stop that must meet a
    /// request in flight.
    pub fn handling(&self) -> u64 {
        self.shared.handling.load(Ordering::SeqCst)
    }

    /// The last 64 request heads received, oldest first.
    pub fn seen(&self) -> Vec<SeenRequest> {
        lock(&self.shared.seen).iter().cloned().collect()
    }

    /// Replaces the behaviour for new connections and for the next response on existing ones.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.shared.behaviour) = behaviour;
    }

    /// Stops accepting, closes every connection (FIN) and waits until they are closed (at most
    /// about a second).
    pub async fn shutdown(self) {
        // An error only means every receiver is gone, i.e. everything has stopped already.
        let _ = self.stop.send(Stop::Now);
        finish(self.accept).await;
    }

    /// Stops gracefully, waiting at most [`DRAIN_WAIT`] for requests in flight.
    ///
    /// A proxy in front of a graceful server sees what it sees in a rolling restart: new connects
    /// refused at once, idle keep-alive connections closed with FIN at once (the keep-alive race,
    /// for a request the proxy is writing at that moment), and every request the server had
    /// started to receive answered with `Connection: close` before its connection closes.
    pub async fn drain(self) -> Drained {
        self.drain_within(DRAIN_WAIT).await
    }

    /// [`TestUpstream::drain`] with another bound: after `wait`, the connections still open
    /// are closed with FIN as [`TestUpstream::shutdown`] closes them, their requests unanswered
    /// (as Gunicorn kills the workers that outlive its graceful timeout).
    pub async fn drain_within(self, wait: Duration) -> Drained {
        let TestUpstream {
            stop,
            accept,
            shared,
            ..
        } = self;
        let _ = stop.send(Stop::Draining);
        let mut accept = accept;
        // The accept loop ends once the last connection has closed by itself.
        if tokio::time::timeout(wait, &mut accept).await.is_err() {
            tracing::debug!(
                ?wait,
                "requests still in flight after the drain wait, closing"
            );
            let _ = stop.send(Stop::Now);
            finish(accept).await;
        }
        shared.drained.snapshot()
    }
}

/// Waits for an accept loop told to stop now.
async fn finish(mut accept: JoinHandle<()>) {
    // The accept loop itself gives connections SHUTDOWN_WAIT; this bound is the backstop.
    if tokio::time::timeout(SHUTDOWN_WAIT * 2, &mut accept)
        .await
        .is_err()
    {
        accept.abort();
    }
}

/// State every connection of one test upstream reads and updates.
struct Shared {
    behaviour: Mutex<Behaviour>,
    connections: AtomicU64,
    requests: AtomicU64,
    handling: AtomicU64,
    seen: Mutex<VecDeque<SeenRequest>>,
    drained: DrainCounts,
}

/// [`Drained`], counted by the connections as they go.
#[derive(Default)]
struct DrainCounts {
    idle_closed: AtomicU64,
    answered: AtomicU64,
    cut_off: AtomicU64,
}

impl DrainCounts {
    fn snapshot(&self) -> Drained {
        Drained {
            idle_closed: self.idle_closed.load(Ordering::SeqCst),
            answered: self.answered.load(Ordering::SeqCst),
            cut_off: self.cut_off.load(Ordering::SeqCst),
        }
    }
}

impl Shared {
    fn behaviour(&self) -> Behaviour {
        lock(&self.behaviour).clone()
    }

    fn record_head(&self, request: SeenRequest) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut seen = lock(&self.seen);
        if seen.len() == SEEN_CAPACITY {
            seen.pop_front();
        }
        seen.push_back(request);
    }

    /// Fills in the body length of a request recorded by `record_head`, if it is still kept.
    fn record_body(&self, connection: u64, request_on_connection: u64, bytes: u64) {
        let mut seen = lock(&self.seen);
        if let Some(entry) = seen.iter_mut().rev().find(|s| {
            s.connection == connection && s.request_on_connection == request_on_connection
        }) {
            entry.body_bytes = bytes;
        }
    }
}

/// Locks a mutex whose holders never panic while holding it; a poisoned lock still holds
/// consistent data, so it is used as is rather than turned into a second panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Resolves once the upstream is told to stop now or its handle is dropped.
async fn stopped(stop: &mut watch::Receiver<Stop>) {
    // Err means the sender is gone, which is a stop too.
    let _ = stop.wait_for(|stop| *stop == Stop::Now).await;
}

/// Resolves once the upstream is told to stop in any way (draining or now).
async fn stopping(stop: &mut watch::Receiver<Stop>) {
    let _ = stop.wait_for(|stop| *stop != Stop::Serving).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<Stop>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = stopping(&mut stop) => break,
            // Reap finished connections so the set does not grow for the life of the server.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let serial = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    tracing::debug!(conn = serial, %peer, "accepted");
                    conns.spawn(conn::serve(stream, serial, shared.clone(), stop.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    // Connects are refused from here on, and connections still in the backlog are reset.
    drop(listener);
    // Draining: every connection closes by itself once its request is answered; the handle
    // bounds that wait by telling them to stop now.
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            joined = conns.join_next() => if joined.is_none() {
                return;
            },
        }
    }
    // Every connection watches the same stop signal and closes at once.
    let closed = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_WAIT, closed).await.is_err() {
        conns.abort_all();
    }
}
