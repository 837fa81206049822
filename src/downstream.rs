//! The client side: accept loop, an HTTP/1 server connection per client while it is busy
//! (an idle one holds only its socket), keep-alive rules, the client timeouts, and graceful
//! shutdown.

mod h1;
mod head;
mod incoming;
mod io;
mod lines;
mod lot;
mod observed;
mod response;

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::config::DownstreamConfig;
use crate::proxy::body::{OnDrop, ResponseBody};
use crate::proxy::{Abort, Client, Proxy, Routed};
use h1::Handling;
#[cfg(test)]
pub(crate) use incoming::Feed;
pub use incoming::Incoming;
use io::{ClientSide, Tracker, Wait};
pub use lines::Lines;
use observed::Observed;

/// How much longer than announced an idle client connection is held. Clients that honor
/// `Keep-Alive: timeout=N` (Node's agent, undici) then always close first, so kaguard never
/// closes a connection a client is about to write into: the race, avoided on our own side.
pub const IDLE_GRACE: Duration = Duration::from_secs(1);

/// How long a client connection stays idle before its HTTP/1 state, buffers and more, is
/// dropped until the client sends again. Above the pauses of the race
/// reproducer's quick sweeps (around 100 ms): with 100 ms, the quick demo's steady phase, after
/// sweeps whose pauses crossed it, opened two to three times its usual upstream connections in
/// 4 of 33 runs, for a reason not found yet (250 ms: 1 of 35; without parking: 0 of 52). Short,
/// because a burst of new connections costs the state of every one not parked yet, and the
/// allocator returns it lazily (`bench/idle.sh`, before the lot and with mimalloc v3: 1.61 KiB
/// per idle connection at 250 ms, 7.7 KiB at 1 s).
pub const PARK_AFTER: Duration = Duration::from_millis(250);

/// How a served spell of a connection ended.
enum Served {
    /// The connection is over.
    Ended,
    /// Idle: the HTTP/1 state is dropped, the socket comes back.
    Parked(Observed<ClientSide>),
}

/// A client connection between its served spells; all a parked one keeps.
struct Connection {
    io: Observed<ClientSide>,
    addr: SocketAddr,
    serial: u64,
    tracker: Arc<Tracker>,
    /// The request count when the connection last parked: it parks once per idle spell.
    parked_after: Option<u64>,
    /// The lot of the accept loop that took the connection, on the same worker.
    lot: lot::Entrance,
    /// Counts the connection as open for shutdown until it ends.
    _tracked: Tracked,
}

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
    /// The `Keep-Alive: timeout=N` line announced to clients.
    hint: Bytes,
    shutdown: Arc<Shutdown>,
    next_serial: AtomicU64,
}

impl Downstream {
    pub fn new(cfg: &DownstreamConfig, proxy: Arc<Proxy>, shutdown: Arc<Shutdown>) -> Downstream {
        let hint = format!(
            "keep-alive: timeout={}\r\n",
            cfg.keepalive_timeout.as_secs()
        );
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
            hint: Bytes::from(hint),
            shutdown,
            next_serial: AtomicU64::new(1),
        }
    }

    /// Accepts clients until shutdown begins. Idle connections wait in this loop's lot.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let metrics = self.proxy.metrics().clone();
        let downstream = Arc::downgrade(&self);
        let lot = lot::open(lot::Setup {
            shutdown: self.shutdown.clone(),
            metrics: metrics.clone(),
            timeouts: self.timeouts,
            resume: Box::new(move |conn| match downstream.upgrade() {
                Some(downstream) => drop(tokio::spawn(downstream.run(*conn))),
                None => lot::close(*conn, &metrics),
            }),
        });
        let mut stop = pin!(self.shutdown.begun());
        loop {
            tokio::select! {
                _ = &mut stop => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let tracked = self.shutdown.track();
                        tokio::spawn(self.clone().connection(stream, addr, tracked, lot.clone()));
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

    /// Serves a new client connection (see [`Downstream::run`]).
    fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        addr: SocketAddr,
        tracked: Tracked,
        lot: lot::Entrance,
    ) -> impl Future<Output = ()> + Send {
        let metrics = self.proxy.metrics();
        metrics.downstream_accepted.inc();
        metrics.downstream_active.inc();
        let _ = stream.set_nodelay(true);
        let tracker = Arc::new(Tracker::new(Instant::now()));
        let conn = Connection {
            io: Observed::new(stream, ClientSide::new(tracker.clone())),
            addr,
            serial: self.next_serial.fetch_add(1, Ordering::Relaxed),
            tracker,
            parked_after: None,
            lot,
            _tracked: tracked,
        };
        self.run(conn)
    }

    /// Serves a client connection until it ends, or until it has been idle for
    /// [`PARK_AFTER`]: then its HTTP/1 state is dropped, the task ends, and the connection waits
    /// in its lot until the client sends again (a new task serves it from there), the idle
    /// hold passes, or shutdown.
    async fn run(self: Arc<Self>, mut conn: Connection) {
        let metrics = self.proxy.metrics();
        let mut stop = pin!(self.shutdown.begun());
        loop {
            // Not boxed: a parked connection has no task, so the room the HTTP/1 state takes
            // in this one is only held while the connection is busy.
            let served = self
                .serve_until_parked(
                    conn.io,
                    conn.addr,
                    conn.serial,
                    &conn.tracker,
                    stop.as_mut(),
                    &mut conn.parked_after,
                )
                .await;
            let Served::Parked(io) = served else {
                break;
            };
            conn.io = io;
            if conn.io.has_unread() {
                continue;
            }
            if self.shutdown.is_begun() {
                lot::close(conn, metrics);
                return;
            }
            let lot = conn.lot.clone();
            lot::park(&lot, conn, metrics);
            return;
        }
        metrics.downstream_active.dec();
    }

    /// Serves requests until the client is done with the connection, or it has been idle
    /// for [`PARK_AFTER`] and the HTTP/1 state is dropped.
    async fn serve_until_parked(
        self: &Arc<Self>,
        io: Observed<ClientSide>,
        addr: SocketAddr,
        serial: u64,
        tracker: &Arc<Tracker>,
        mut stop: Pin<&mut impl Future<Output = ()>>,
        parked_after: &mut Option<u64>,
    ) -> Served {
        let this = self.clone();
        let service_tracker = tracker.clone();
        let service = move |req: Request<Incoming>, lines: Lines| -> Handling {
            let (requests, conflicting_framing) = service_tracker.begin();
            let asked = Asked {
                // Ends the request on its connection when the response body is dropped, or
                // right away if the proxy asks to abort.
                in_flight: InFlight(Some(service_tracker.clone())),
                keep_alive: lines.keep_alive,
                requests,
                conflicting_framing,
            };
            let client = Client {
                addr,
                connection: serial,
                requests,
                conflicting_framing,
            };
            // Routed before its future is made, so that the future holds what the request
            // became and not its parts too.
            let routed = this.proxy.route(req, lines, client);
            // The request's own future, boxed once: a wrapping block would hold it too, and
            // every layer is one more copy of several KiB per request.
            Box::pin(this.clone().request(routed, asked))
        };
        let mut conn = h1::Conn::new(io, self.max_header_size, self.hint.clone(), service);
        let mut sleep = pin!(tokio::time::sleep(Duration::from_secs(3600)));
        let mut closing = false;
        // The waker `stop` was last polled with. Each poll of `stop` locks a waiter list that
        // every connection of every worker shares, and this runs at every poll of every
        // request: while `stop` holds this task's waker it will wake the task, so reading the
        // shutdown flag is enough.
        let mut stop_waker: Option<Waker> = None;
        let parkable = |parked_after: &Option<u64>| {
            let idle = tracker.idle_since()?;
            (*parked_after != Some(tracker.requests())).then_some(idle + PARK_AFTER)
        };
        let result = poll_fn(|cx| {
            crate::clock::one_poll(|| {
                loop {
                    // Polled as a future, not without shutdown: its shutdown flushes what is left
                    // of the last response. A park's shutdown leaves the socket open.
                    if let Poll::Ready(res) = Pin::new(&mut conn).poll(cx) {
                        return Poll::Ready(Some(res));
                    }
                    let stopping = !closing
                        && if stop_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            self.shutdown.is_begun()
                        } else {
                            stop_waker = Some(cx.waker().clone());
                            stop.as_mut().poll(cx).is_ready()
                        };
                    if stopping {
                        closing = true;
                        conn.graceful_shutdown();
                        continue;
                    }
                    let deadline = match tracker.wait(&self.timeouts) {
                        Wait::Busy => return Poll::Pending,
                        Wait::Idle(_) if closing => return Poll::Pending,
                        Wait::Idle(at) => parkable(parked_after).map_or(at, |p| p.min(at)),
                        Wait::Abort(at) => at,
                    };
                    if sleep.deadline() != deadline.into() {
                        sleep.as_mut().reset(deadline.into());
                    }
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    match tracker.wait(&self.timeouts) {
                        Wait::Idle(at) if !closing && Instant::now() < at => {
                            if parkable(parked_after).is_some() {
                                // The connection reads again when polled; that read ends it.
                                *parked_after = Some(tracker.requests());
                                tracker.ask_to_park();
                            }
                        }
                        Wait::Idle(_) if !closing => {
                            closing = true;
                            conn.graceful_shutdown();
                        }
                        Wait::Abort(_) => return Poll::Ready(None),
                        Wait::Idle(_) | Wait::Busy => return Poll::Pending,
                    }
                }
            })
        })
        .await;
        if tracker.take_parked() {
            // Ended by the park: an empty read buffer, or the start of a request the client
            // sent early, which the next connection reads first.
            let (mut io, unread) = conn.into_parts();
            if !unread.is_empty() {
                io.unread(unread);
            }
            return Served::Parked(io);
        }
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
        Served::Ended
    }

    /// Forwards a routed request, and says whether its response is the connection's last.
    // An async block, not an async fn: an async fn's future keeps its arguments twice, as
    // given and as moved into its body, and `routed` is the largest part of this one.
    #[allow(clippy::manual_async_fn)]
    fn request(
        self: Arc<Self>,
        mut routed: Routed,
        asked: Asked,
    ) -> impl Future<Output = Result<(Response<ResponseBody>, bool), Abort>> + Send + 'static {
        async move {
            let resp = if let Routed::Forward(forward) = &mut routed {
                self.proxy.forward(forward).await?
            } else {
                let Routed::Answered(resp) = routed else {
                    unreachable!("a forwarded request was matched above")
                };
                resp
            };
            let last = !asked.keep_alive
                || asked.conflicting_framing
                || asked.requests >= self.keepalive_requests
                || crate::clock::now()
                    .saturating_duration_since(asked.in_flight.tracker().accepted)
                    >= self.keepalive_time
                || self.shutdown.is_begun();
            Ok((
                resp.map(|body| body.on_drop(asked.in_flight.hand_over())),
                last,
            ))
        }
    }
}

/// What the client side knows of a request besides the request itself.
struct Asked {
    in_flight: InFlight,
    keep_alive: bool,
    /// Requests on the connection, this one included.
    requests: u64,
    conflicting_framing: bool,
}

/// Marks the end of a request on its client connection if the request ends without a
/// response body; the body, once there is one, marks it when it is dropped.
struct InFlight(Option<Arc<Tracker>>);

impl InFlight {
    fn tracker(&self) -> &Arc<Tracker> {
        self.0.as_ref().expect("held until handed over")
    }

    fn hand_over(mut self) -> Arc<Tracker> {
        self.0.take().expect("handed over once")
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(tracker) = self.0.take() {
            tracker.end();
        }
    }
}

impl OnDrop for Tracker {
    fn on_drop(&self) {
        self.end();
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
