//! One upstream HTTP/1.1 connection: connect, handshake, drive it, and report how far an
//! exchange got and whether the upstream has closed it.
//!
//! Policy (reuse, retry, status codes) lives elsewhere; this module only observes. Bytes
//! written and read are counted at the socket, which is how a failed exchange is typed:
//! nothing written means the upstream cannot have seen the request.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use socket2::SockRef;
use tokio::net::TcpStream;

use crate::error::{Failure, Transport};
use crate::observed::{Observed, Observer};
use crate::proxy::body::{BodyError, RequestBody};

/// What a non-blocking look at an idle connection's socket found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peek {
    /// Nothing pending: the upstream has not closed it as far as this host knows.
    Clean,
    /// The upstream sent FIN or RST.
    Closed(Transport),
    /// The upstream sent bytes no request asked for; the connection cannot be trusted.
    StrayBytes,
}

/// Counters shared by the I/O wrapper (inside hyper's connection task) and the handle.
#[derive(Debug)]
struct Shared {
    written: AtomicU64,
    read: AtomicU64,
    /// Nanoseconds since `epoch` of the last byte moved either way.
    progress_ns: AtomicU64,
    epoch: Instant,
    /// Set when hyper's connection task ended (the upstream closed, or an error).
    task_done: AtomicBool,
    /// Nanoseconds since `epoch` + 1 when a read first saw EOF or an error; 0 until then.
    closed_ns: AtomicU64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.progress_ns.store(self.now_ns(), Ordering::Relaxed);
    }

    fn mark_closed(&self) {
        let _ = self.closed_ns.compare_exchange(
            0,
            self.now_ns() + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// What the upstream socket reports: bytes moved each way, and when the upstream closed.
struct Counting(Arc<Shared>);

impl Observer for Counting {
    fn read(&mut self, added: &[u8], closed: bool) {
        if !added.is_empty() {
            self.0.read.fetch_add(added.len() as u64, Ordering::Relaxed);
            self.0.touch();
        }
        if closed {
            self.0.mark_closed();
        }
    }

    fn wrote(&mut self, written: usize, _pending: bool) {
        if written > 0 {
            self.0.written.fetch_add(written as u64, Ordering::Relaxed);
            self.0.touch();
        }
    }
}

/// A connection to one upstream server, ready to carry requests one at a time.
pub struct UpstreamConn {
    sender: http1::SendRequest<RequestBody>,
    shared: Arc<Shared>,
    /// A second descriptor of the same socket, so the pool can peek at it while hyper owns
    /// the stream; peeking through it leaves tokio's readiness state alone.
    peek_fd: OwnedFd,
    pub addr: SocketAddr,
}

impl std::fmt::Debug for UpstreamConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConn")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Where an exchange stood when it is looked at: bytes moved since it began.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    written: u64,
    read: u64,
}

impl UpstreamConn {
    /// Connects and performs the (trivial) HTTP/1 handshake.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<UpstreamConn, Failure> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(Failure::ConnectTimeout(timeout)),
            Ok(Err(err)) => return Err(Failure::Connect(err)),
            Ok(Ok(stream)) => stream,
        };
        // Requests are written whole by hyper; Nagle would only add latency.
        stream.set_nodelay(true).map_err(Failure::Connect)?;
        let peek_fd = stream
            .as_fd()
            .try_clone_to_owned()
            .map_err(Failure::Connect)?;
        let shared = Arc::new(Shared {
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
            progress_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            task_done: AtomicBool::new(false),
            closed_ns: AtomicU64::new(0),
        });
        let io = Observed::new(stream, Counting(shared.clone()));
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|err| Failure::Connect(io::Error::other(err)))?;
        let task_shared = shared.clone();
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%addr, error = %err, "upstream connection ended with an error");
            }
            task_shared.mark_closed();
            task_shared.task_done.store(true, Ordering::Release);
        });
        Ok(UpstreamConn {
            sender,
            shared,
            peek_fd,
            addr,
        })
    }

    /// Whether hyper already knows the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.shared.task_done.load(Ordering::Acquire)
            || self.sender.is_closed()
            || self.closed_at().is_some()
    }

    /// When a read first saw the upstream's FIN or an error, if one did.
    pub fn closed_at(&self) -> Option<Instant> {
        match self.shared.closed_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.shared.epoch + Duration::from_nanos(ns - 1)),
        }
    }

    /// Looks, without blocking or consuming anything, for a FIN, RST or stray bytes that
    /// arrived while the connection was idle.
    pub fn peek(&self) -> Peek {
        let mut buf = [MaybeUninit::<u8>::uninit(); 1];
        match SockRef::from(&self.peek_fd).peek(&mut buf) {
            Ok(0) => Peek::Closed(Transport::Eof),
            Ok(_) => Peek::StrayBytes,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Peek::Clean,
            Err(err) => Peek::Closed(Transport::from_io(&err)),
        }
    }

    /// Bytes moved so far, to tell later how far an exchange got.
    pub fn mark(&self) -> Mark {
        Mark {
            written: self.shared.written.load(Ordering::Relaxed),
            read: self.shared.read.load(Ordering::Relaxed),
        }
    }

    /// Whether any byte was written since `mark`.
    pub fn wrote_since(&self, mark: Mark) -> bool {
        self.shared.written.load(Ordering::Relaxed) > mark.written
    }

    /// Whether any byte was read since `mark`.
    pub fn read_since(&self, mark: Mark) -> bool {
        self.shared.read.load(Ordering::Relaxed) > mark.read
    }

    /// The last time a byte moved in either direction.
    pub fn last_progress(&self) -> Instant {
        self.shared.epoch + Duration::from_nanos(self.shared.progress_ns.load(Ordering::Relaxed))
    }

    /// Waits until hyper can take a request on this connection.
    pub async fn ready(&mut self) -> Result<(), hyper::Error> {
        self.sender.ready().await
    }

    /// Sends a request. If hyper hands it back unsent, the error carries it.
    pub fn send(
        &mut self,
        req: Request<RequestBody>,
    ) -> impl Future<
        Output = Result<
            Response<Incoming>,
            hyper::client::conn::TrySendError<Request<RequestBody>>,
        >,
    > + use<> {
        self.sender.try_send_request(req)
    }
}

/// Types a hyper error from an exchange that did not yield a response head.
pub fn classify(err: &hyper::Error, conn: &UpstreamConn, mark: Mark, reused: bool) -> Failure {
    if let Some(body_err) = find_source::<BodyError>(err) {
        return Failure::RequestBody(body_err.clone());
    }
    if err.is_parse() && conn.read_since(mark) {
        return Failure::InvalidResponse;
    }
    if !conn.wrote_since(mark) {
        return Failure::NotSent { reused };
    }
    let transport = match find_source::<io::Error>(err) {
        Some(io_err) => Transport::from_io(io_err),
        None if err.is_incomplete_message() || err.is_canceled() || err.is_closed() => {
            Transport::Eof
        }
        None => Transport::Other,
    };
    Failure::NoResponse { reused, transport }
}

fn find_source<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}
