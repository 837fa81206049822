//! The client side: accept loop, one hyper HTTP/1 server connection per client, keep-alive
//! rules, the client timeouts, and graceful shutdown.

mod io;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::config::DownstreamConfig;
use crate::observed::Observed;
use crate::proxy::body::ResponseBody;
use crate::proxy::{Abort, Client, Proxy, headers};
use io::{ClientSide, Tracker, Wait};

/// How much longer than announced an idle client connection is held. Clients that honor
/// `Keep-Alive: timeout=N` (Node's agent, undici) then always close first, so kaguard never
/// closes a connection a client is about to write into: the race, avoided on our own side.
pub const IDLE_GRACE: Duration = Duration::from_secs(1);

/// Client-side timeouts, resolved from the config.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    header: Duration,
    send: Duration,
    /// `keepalive_timeout` plus [`IDLE_GRACE`].
    idle_hold: Duration,
}

/// Everything a client connection needs, shared by all of them.
pub struct Downstream {
    proxy: Arc<Proxy>,
    timeouts: Timeouts,
    keepalive_requests: u64,
    keepalive_time: Duration,
    max_header_size: usize,
    /// `Keep-Alive: timeout=N`, as announced to clients.
    hint: HeaderValue,
    shutdown: Arc<Shutdown>,
    next_serial: AtomicU64,
}

impl Downstream {
    pub fn new(cfg: &DownstreamConfig, proxy: Arc<Proxy>, shutdown: Arc<Shutdown>) -> Downstream {
        let hint = format!("timeout={}", cfg.keepalive_timeout.as_secs());
        Downstream {
            proxy,
            timeouts: Timeouts {
                header: cfg.client_header_timeout,
                send: cfg.send_timeout,
                idle_hold: cfg.keepalive_timeout + IDLE_GRACE,
            },
            keepalive_requests: cfg.keepalive_requests,
            keepalive_time: cfg.keepalive_time,
            max_header_size: cfg.max_header_size,
            hint: HeaderValue::from_str(&hint).expect("digits are a valid header value"),
            shutdown,
            next_serial: AtomicU64::new(1),
        }
    }

    /// Accepts clients until shutdown begins.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let mut stop = pin!(self.shutdown.begun());
        loop {
            tokio::select! {
                _ = &mut stop => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let this = self.clone();
                        let guard = self.shutdown.track();
                        tokio::spawn(async move {
                            this.connection(stream, addr).await;
                            drop(guard);
                        });
                    }
                    Err(err) => {
                        // Out of descriptors or similar: pause instead of spinning.
                        tracing::warn!(error = %err, "accept() failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, addr: SocketAddr) {
        let metrics = self.proxy.metrics().clone();
        metrics.downstream_accepted.inc();
        metrics.downstream_active.inc();
        let _ = stream.set_nodelay(true);
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let tracker = Arc::new(Tracker::new(Instant::now()));
        let io = Observed::new(
            stream,
            ClientSide::new(tracker.clone(), self.max_header_size),
        );
        let this = self.clone();
        let service_tracker = tracker.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let tracker = service_tracker.clone();
            async move { this.request(req, addr, serial, tracker).await }
        });
        let conn = http1::Builder::new()
            .keep_alive(true)
            .header_read_timeout(None)
            .max_header_size(self.max_header_size)
            .serve_connection(TokioIo::new(io), service);
        let mut conn = pin!(conn);
        let mut stop = pin!(self.shutdown.begun());
        let mut sleep = pin!(tokio::time::sleep(Duration::from_secs(3600)));
        let mut closing = false;
        let result = poll_fn(|cx| {
            loop {
                if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                    return Poll::Ready(Some(res));
                }
                if !closing && stop.as_mut().poll(cx).is_ready() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    continue;
                }
                // While closing, only the abort deadlines still matter: a graceful close can
                // wait forever on a client that does not read.
                let deadline = match tracker.wait(&self.timeouts) {
                    Wait::Busy => return Poll::Pending,
                    Wait::Idle(_) if closing => return Poll::Pending,
                    Wait::Idle(at) | Wait::Abort(at) => at,
                };
                if sleep.deadline() != deadline.into() {
                    sleep.as_mut().reset(deadline.into());
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                match tracker.wait(&self.timeouts) {
                    Wait::Idle(_) if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    Wait::Abort(_) => return Poll::Ready(None),
                    Wait::Idle(_) | Wait::Busy => return Poll::Pending,
                }
            }
        })
        .await;
        match result {
            Some(Err(err)) if err.is_parse() => {
                tracing::info!(client = %addr.ip(), "client sent invalid request: {err}");
            }
            Some(Err(err)) => {
                tracing::debug!(client = %addr.ip(), "client connection ended: {err}")
            }
            Some(Ok(())) => {}
            None => tracing::info!(client = %addr.ip(), "client timed out"),
        }
        metrics.downstream_active.dec();
    }

    async fn request(
        &self,
        req: Request<Incoming>,
        addr: SocketAddr,
        serial: u64,
        tracker: Arc<Tracker>,
    ) -> Result<Response<ResponseBody>, Abort> {
        let (requests, conflicting_framing) = tracker.begin();
        // Ends the request on its connection when the response body is dropped, or right
        // away if the proxy asks to abort.
        let in_flight = InFlight(tracker.clone());
        let keep_alive = headers::wants_keep_alive(req.version(), req.headers());
        let client = Client {
            addr,
            connection: serial,
            requests,
            conflicting_framing,
        };
        // Boxed: hyper keeps room for this future for the whole life of the connection, idle
        // or not, and the proxy's is several KiB; a box of its own lives only while a request
        // does, so an idle client connection costs that much less.
        let resp = Box::pin(self.proxy.handle(req, client)).await?;
        let (mut parts, body) = resp.into_parts();
        let last = !keep_alive
            || conflicting_framing
            || requests >= self.keepalive_requests
            || tracker.accepted.elapsed() >= self.keepalive_time
            || self.shutdown.is_begun();
        if last {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        } else {
            parts
                .headers
                .insert(HeaderName::from_static("keep-alive"), self.hint.clone());
        }
        Ok(Response::from_parts(parts, body.guard(Box::new(in_flight))))
    }
}

/// Marks the end of a request on its client connection when the response body is dropped.
struct InFlight(Arc<Tracker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Graceful shutdown: a flag, a wake-up for everyone waiting on it, and a count of the
/// client connections still open.
#[derive(Debug, Default)]
pub struct Shutdown {
    begun: AtomicBool,
    notify: Notify,
    open: AtomicUsize,
    closed: Notify,
}

/// Counts one open client connection.
pub struct Tracked(Arc<Shutdown>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

impl Shutdown {
    pub fn begin(&self) {
        self.begun.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_begun(&self) -> bool {
        self.begun.load(Ordering::Acquire)
    }

    /// Resolves once shutdown has begun.
    pub async fn begun(&self) {
        let notified = self.notify.notified();
        let mut notified = pin!(notified);
        notified.as_mut().enable();
        if self.is_begun() {
            return;
        }
        notified.await;
    }

    fn track(self: &Arc<Self>) -> Tracked {
        self.open.fetch_add(1, Ordering::AcqRel);
        Tracked(self.clone())
    }

    /// Client connections still open.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves once every client connection has closed.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            let mut notified = pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}
