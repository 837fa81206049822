//! One upstream connection: hyper serves HTTP/1.1 on it, and this module decides when it closes.
//!
//! hyper's own timers are not exact and always close with FIN, so closing is done here: the
//! socket is wrapped in [`ActivityIo`], which tells [`Activity`] when request bytes arrive and
//! when a response has been flushed, and [`serve`] races hyper's connection future against the
//! idle deadline and against close requests, then drops the connection with FIN or RST.
//!
//! A graceful stop (draining) is decided here too, from the same phases: hyper's own
//! `graceful_shutdown` treats a connection whose request head has only partly arrived as idle and
//! closes it, while a graceful app server answers that request.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::respond::Handler;
use super::{Behaviour, Shared, Stop, lock, stopped, stopping};

/// How a connection is closed by this side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CloseMode {
    Fin,
    /// SO_LINGER 0: the kernel discards unsent data and answers with RST.
    Rst,
}

impl CloseMode {
    pub(super) fn of(behaviour: &Behaviour) -> CloseMode {
        if behaviour.close_with_rst {
            CloseMode::Rst
        } else {
            CloseMode::Fin
        }
    }
}

/// Why the connection is being closed; goes to the debug log.
#[derive(Clone, Copy, Debug)]
pub(super) enum CloseReason {
    IdleTimeout,
    LastResponse,
    /// `?close=` on a request.
    Requested,
    /// The test upstream is stopping.
    Shutdown,
    /// The test upstream is stopping gracefully and this connection has no request to finish.
    Drain,
}

/// Where the connection is in its request/response cycle, as seen from the socket.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Nothing has arrived since `since`: accept, or the last response completely written.
    Idle { since: Instant },
    /// Bytes of a request have arrived, or its handler is running.
    Busy,
    /// The handler's response body is entirely in hyper's hands; flushing it ends the response.
    /// `next_started`: bytes of another request arrived meanwhile (pipelining).
    Written { last: bool, next_started: bool },
    /// Close now, without reading or writing another byte.
    Closing(CloseMode, CloseReason),
}

#[derive(Debug)]
struct State {
    phase: Phase,
    idle_timeout: Option<Duration>,
    mode: CloseMode,
    /// The upstream is stopping gracefully: the response being prepared is the last one.
    draining: bool,
}

/// What [`serve`] should do next.
enum Next {
    Close(CloseMode, CloseReason),
    WaitUntil(Instant),
    Wait,
}

/// The request/response cycle of one connection, shared by its socket wrapper, its handler
/// and its driving task.
#[derive(Debug)]
pub(super) struct Activity {
    state: Mutex<State>,
    /// Wakes [`serve`] when the phase changes, so it re-arms the idle deadline or closes.
    changed: Notify,
}

impl Activity {
    fn new(behaviour: &Behaviour, now: Instant) -> Activity {
        Activity {
            state: Mutex::new(State {
                phase: Phase::Idle { since: now },
                idle_timeout: behaviour.idle_timeout,
                mode: CloseMode::of(behaviour),
                draining: false,
            }),
            changed: Notify::new(),
        }
    }

    fn bytes_read(&self) {
        let mut state = lock(&self.state);
        match &mut state.phase {
            Phase::Idle { .. } => state.phase = Phase::Busy,
            Phase::Written { next_started, .. } => *next_started = true,
            Phase::Busy | Phase::Closing(..) => {}
        }
    }

    /// A request head arrived; from now on the connection follows `behaviour`.
    pub(super) fn request_started(&self, behaviour: &Behaviour) {
        let mut state = lock(&self.state);
        state.idle_timeout = behaviour.idle_timeout;
        state.mode = CloseMode::of(behaviour);
        if !matches!(state.phase, Phase::Closing(..)) {
            state.phase = Phase::Busy;
        }
    }

    /// hyper let go of the response body: its last byte is buffered, ready to be flushed.
    pub(super) fn response_released(&self, last: bool) {
        let mut state = lock(&self.state);
        if matches!(state.phase, Phase::Busy) {
            state.phase = Phase::Written {
                last,
                next_started: false,
            };
        }
    }

    /// hyper flushed everything it had buffered to the socket.
    fn flushed(&self) {
        let mut state = lock(&self.state);
        if let Phase::Written { last, next_started } = state.phase {
            state.phase = if last {
                // RST could destroy the answer a graceful stop just wrote before it is read.
                let mode = if state.draining {
                    CloseMode::Fin
                } else {
                    state.mode
                };
                Phase::Closing(mode, CloseReason::LastResponse)
            } else if next_started {
                // Pipelined: the next request has begun to arrive, and is answered even when
                // draining (then with `Connection: close`).
                Phase::Busy
            } else if state.draining {
                // A response whose head went out before the drain began; nothing else to finish.
                Phase::Closing(CloseMode::Fin, CloseReason::Drain)
            } else {
                Phase::Idle {
                    since: Instant::now(),
                }
            };
            drop(state);
            self.changed.notify_one();
        }
    }

    pub(super) fn close_now(&self, mode: CloseMode, reason: CloseReason) {
        lock(&self.state).phase = Phase::Closing(mode, reason);
        self.changed.notify_one();
    }

    /// The upstream began a graceful stop. An idle connection closes now, with FIN whatever the
    /// behaviour, since a graceful server has no reason to reset; one with part of a request
    /// received, a handler running or a response being written carries on and closes after its
    /// response, since its client is owed that answer. Returns whether it was idle.
    fn drain(&self) -> bool {
        let mut state = lock(&self.state);
        state.draining = true;
        if !matches!(state.phase, Phase::Idle { .. }) {
            return false;
        }
        state.phase = Phase::Closing(CloseMode::Fin, CloseReason::Drain);
        drop(state);
        self.changed.notify_one();
        true
    }

    /// Whether the response being prepared must be the connection's last.
    pub(super) fn draining(&self) -> bool {
        lock(&self.state).draining
    }

    fn closing(&self) -> bool {
        matches!(lock(&self.state).phase, Phase::Closing(..))
    }

    fn next(&self, now: Instant) -> Next {
        let state = lock(&self.state);
        match (state.phase, state.idle_timeout) {
            (Phase::Closing(mode, reason), _) => Next::Close(mode, reason),
            (Phase::Idle { since }, Some(timeout)) => {
                let deadline = since + timeout;
                if now >= deadline {
                    Next::Close(state.mode, CloseReason::IdleTimeout)
                } else {
                    Next::WaitUntil(deadline)
                }
            }
            _ => Next::Wait,
        }
    }
}

/// The TCP stream as hyper sees it, reporting arrivals and flushes to [`Activity`].
///
/// Once the connection is closing it neither reads nor shuts down: [`serve`] is about to drop
/// it, and a read would consume bytes (turning RST-on-unread-data into FIN) while a shutdown
/// would send a FIN ahead of the chosen close.
struct ActivityIo {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for ActivityIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.closing() {
            // No waker needed: `serve` was notified when the phase became Closing.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.activity.bytes_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ActivityIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // Lets hyper write head and body chunks with writev instead of copying them together.
        self.stream.is_write_vectored()
    }

    /// hyper calls this only after its write buffer is empty, so a response whose body was
    /// released earlier is now entirely in the kernel.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.stream).poll_flush(cx))?;
        this.activity.flushed();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.closing() {
            return Poll::Pending;
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// Serves one accepted connection until the client leaves, the behaviour closes it, or the
/// upstream stops. Errors end this connection only and are logged at debug.
pub(super) async fn serve(
    stream: TcpStream,
    serial: u64,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Stop>,
) {
    // Small responses must leave at once: Nagle's algorithm would hold one back behind the
    // client's delayed ACK (40 ms on Linux) and blur every timing a race test measures.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(conn = serial, %error, "cannot set TCP_NODELAY");
    }
    // A second descriptor of the same socket: the socket closes only when both are dropped, so
    // SO_LINGER can be set here after hyper is gone, and the RST-or-FIN choice stays ours.
    let socket = match SockRef::from(&stream).try_clone() {
        Ok(socket) => socket,
        Err(error) => {
            tracing::debug!(conn = serial, %error, "cannot duplicate socket, closing");
            return;
        }
    };
    let activity = Arc::new(Activity::new(&shared.behaviour(), Instant::now()));
    let io = ActivityIo {
        stream,
        activity: activity.clone(),
    };
    let handler = Handler::new(serial, shared.clone(), activity.clone());
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Idle closing is ours (see the module comment); hyper's timer would close with FIN at an
    // inexact moment.
    builder.header_read_timeout(None);
    // Boxed so that it can be dropped before `socket`, at a moment chosen below.
    let mut conn = Box::pin(builder.serve_connection(TokioIo::new(io), handler));

    // Two receivers of the same signal, since `select!` polls both waits at once.
    let mut drain = stop.clone();
    let mut draining = false;
    let close = loop {
        let deadline = match activity.next(Instant::now()) {
            Next::Close(mode, reason) => break Some((mode, reason)),
            Next::WaitUntil(deadline) => Some(deadline),
            Next::Wait => None,
        };
        let changed = activity.changed.notified();
        let idle_expired = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = stopped(&mut stop) => {
                if draining {
                    shared.drained.cut_off.fetch_add(1, Ordering::SeqCst);
                }
                break Some((CloseMode::Fin, CloseReason::Shutdown));
            }
            // Marked from this task, between two polls of hyper's connection: a response is
            // either already on its way or not yet built, and then sees the mark.
            () = stopping(&mut drain), if !draining => {
                draining = true;
                if activity.drain() {
                    shared.drained.idle_closed.fetch_add(1, Ordering::SeqCst);
                }
            }
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(conn = serial, %error, "connection failed");
                }
                break None;
            }
            () = changed => {}
            () = idle_expired => {}
        }
    };

    if let Some((mode, reason)) = close {
        tracing::debug!(conn = serial, ?mode, ?reason, "closing");
        if mode == CloseMode::Rst
            && let Err(error) = socket.set_linger(Some(Duration::ZERO))
        {
            tracing::debug!(conn = serial, %error, "cannot set SO_LINGER 0, closing with FIN");
        }
    }
    drop(conn);
    drop(socket);
}
