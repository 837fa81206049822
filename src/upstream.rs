//! One upstream HTTP/1.1 connection, driven by the task of the request it carries: connect,
//! write the request, read the response, and report how far an exchange got and whether the
//! upstream has closed it.
//!
//! The request's own task does the reading and writing, so an exchange costs no hand-off to
//! another task and no wake-up of one. An idle connection has no reader; its socket's
//! readiness wakes the group's reaper instead (see [`UpstreamConn::watch_idle`]).
//!
//! Policy (reuse, retry, status codes) lives elsewhere; this module only observes. Bytes
//! written and read are counted at the socket, which is how a failed exchange is typed:
//! nothing written means the upstream cannot have seen the request.

mod decode;
mod encode;
mod idle;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, Method, Response, Uri};
use hyper::body::{Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::error::{Failure, Transport};
use crate::hop::Hop;
use crate::proxy::body::{BodyError, RequestBody};
use crate::wire::fields::Fields;
use decode::{Framing, Step};
pub use encode::AddedLines;
use encode::Sending;
pub use idle::Peek;
use idle::Watch;

/// First read size for a response body. Small bodies arrive with their head; this is for
/// the ones that do not.
const READ_MIN: usize = 16 * 1024;

/// Largest read: a read that fills its buffer doubles the next one up to this, so a large
/// body moves in few system calls while a connection never holds more than this unread.
const READ_MAX: usize = 256 * 1024;

/// Where a new connection's timer starts: far off, as no exchange has set it yet.
const IDLE_TIMER: Duration = Duration::from_secs(24 * 3600);

/// Why an exchange stopped. [`UpstreamConn::failure`] types it by how far the exchange got.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("the upstream closed the connection")]
    Eof,
    #[error("the upstream sent bytes that are not HTTP/1")]
    Invalid,
    #[error("{0}")]
    RequestBody(#[source] BodyError),
}

impl ConnError {
    fn transport(&self) -> Transport {
        match self {
            ConnError::Io(err) => Transport::from_io(err),
            ConnError::Eof => Transport::Eof,
            _ => Transport::Other,
        }
    }
}

/// Where the exchange on a connection stands.
#[derive(Debug)]
enum Reading {
    /// No exchange yet, or the last one ended cleanly.
    Idle,
    /// A request is going out; its response head is awaited.
    Head {
        head_request: bool,
    },
    Body(Framing),
    /// The response ended with the upstream's close.
    Drained,
    /// The exchange failed.
    Spent,
}

/// A connection to one upstream server, carrying requests one at a time.
pub struct UpstreamConn {
    stream: TcpStream,
    pub addr: SocketAddr,
    /// Bytes read and not yet handed out.
    buf: BytesMut,
    read_size: usize,
    /// Room for where a response head's lines lie, kept from one response to the next.
    spans: Vec<decode::Spans>,
    /// Bytes still to be written, in order.
    out: VecDeque<Bytes>,
    /// Room for request heads: each head is split off it, and once written and dropped its
    /// room serves the next one, so that a head costs no allocation.
    heads: BytesMut,
    /// Room for the header lines of responses, kept for the same reason.
    fields: BytesMut,
    /// The names the response's `Connection` line listed, which its trailers lose too.
    listed: Vec<HeaderName>,
    /// A streamed request body still going out; boxed, as only streamed bodies need it.
    sending: Option<Box<Sending>>,
    reading: Reading,
    written: u64,
    read: u64,
    last_progress: Instant,
    /// When a read first saw the upstream's FIN or an error.
    closed_at: Option<Instant>,
    /// The exchange under way is the connection's last: its response said so by its
    /// framing (a body delimited by the close, an ambiguous framing, a 101).
    last: bool,
    /// The request was not sent whole: the upstream may still wait for the rest of it.
    cut: bool,
    /// What wakes the group's reaper when the socket of this connection, idle, turns
    /// readable, noting when.
    watch: Arc<Watch>,
    watch_waker: Waker,
    /// The timeouts of the exchange under way. One timer for the life of the connection,
    /// moved later from one exchange to the next: tokio then only stores the later deadline,
    /// where a timer of each exchange's own would be registered and removed each time.
    timer: Pin<Box<Sleep>>,
}

impl std::fmt::Debug for UpstreamConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConn")
            .field("addr", &self.addr)
            .field("reading", &self.reading)
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
    /// Connects to `addr`. `reaper` is woken when the connection, idle, turns readable.
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        reaper: Waker,
    ) -> Result<UpstreamConn, Failure> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(Failure::ConnectTimeout(timeout)),
            Ok(Err(err)) => return Err(Failure::Connect(err)),
            Ok(Ok(stream)) => stream,
        };
        // Requests are written whole; Nagle would only add latency.
        stream.set_nodelay(true).map_err(Failure::Connect)?;
        let watch = Watch::new(reaper);
        Ok(UpstreamConn {
            stream,
            addr,
            buf: BytesMut::new(),
            read_size: READ_MIN,
            spans: Vec::new(),
            out: VecDeque::new(),
            heads: BytesMut::new(),
            fields: BytesMut::new(),
            listed: Vec::new(),
            sending: None,
            reading: Reading::Idle,
            written: 0,
            read: 0,
            last_progress: Instant::now(),
            closed_at: None,
            last: false,
            cut: false,
            watch_waker: Waker::from(watch.clone()),
            watch,
            timer: Box::pin(tokio::time::sleep(IDLE_TIMER)),
        })
    }

    /// Whether the connection is known to be unable to carry another exchange.
    pub fn is_closed(&self) -> bool {
        self.closed_at.is_some() || self.last || matches!(self.reading, Reading::Spent)
    }

    /// Whether the exchange's response made it the connection's last by its framing.
    pub fn is_last(&self) -> bool {
        self.last
    }

    /// Whether the last exchange ended at a message boundary on both sides: the whole
    /// request sent, the whole response read, nothing read after it.
    pub fn ended_cleanly(&self) -> bool {
        matches!(self.reading, Reading::Idle | Reading::Drained)
            && self.out.is_empty()
            && self.sending.is_none()
            && !self.cut
            && self.buf.is_empty()
    }

    /// When a read first saw the upstream's FIN or an error, if one did.
    pub fn closed_at(&self) -> Option<Instant> {
        self.closed_at
    }

    /// Bytes moved so far, to tell later how far an exchange got.
    pub fn mark(&self) -> Mark {
        Mark {
            written: self.written,
            read: self.read,
        }
    }

    /// The last time a byte moved in either direction.
    pub fn last_progress(&self) -> Instant {
        self.last_progress
    }

    /// Polls the connection's timer, set to `deadline`.
    pub fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let deadline = tokio::time::Instant::from_std(deadline);
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        self.timer.as_mut().poll(cx)
    }

    /// Whether some of the request is still going out.
    pub fn is_sending(&self) -> bool {
        self.sending.is_some() || !self.out.is_empty()
    }

    /// Queues a request, whose head carries the lines of `fields` and then those of `added`;
    /// [`UpstreamConn::poll_response`] sends it.
    pub fn start(
        &mut self,
        method: &Method,
        uri: &Uri,
        fields: &Fields,
        added: &dyn AddedLines,
        body: RequestBody,
    ) {
        debug_assert!(matches!(self.reading, Reading::Idle));
        self.sending = encode::request(
            method,
            uri,
            fields,
            added,
            body,
            &mut self.heads,
            &mut self.out,
        )
        .map(Box::new);
        self.reading = Reading::Head {
            head_request: method == Method::HEAD,
        };
    }

    /// The streamed body of a request of which nothing was written, to send it elsewhere.
    pub fn take_unsent_body(&mut self, mark: Mark) -> Option<RequestBody> {
        if self.written > mark.written {
            return None;
        }
        self.out.clear();
        self.sending.take().map(|s| s.into_body())
    }

    /// Types an exchange's error by how far the exchange got since `mark`.
    pub fn failure(&self, err: ConnError, mark: Mark, reused: bool) -> Failure {
        match err {
            ConnError::RequestBody(err) => Failure::RequestBody(err),
            ConnError::Invalid if self.read > mark.read => Failure::InvalidResponse,
            _ if self.written == mark.written => Failure::NotSent { reused },
            err => Failure::NoResponse {
                reused,
                transport: err.transport(),
            },
        }
    }

    /// Sends the request and reads until a final response head. The body stays on the
    /// connection, for [`UpstreamConn::poll_frame`].
    pub fn poll_response(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(Response<Fields>, Hop), ConnError>> {
        let head_request = match self.reading {
            Reading::Head { head_request } => head_request,
            _ => return Poll::Ready(Err(ConnError::Eof)),
        };
        // The upstream may answer before it has the whole request, and may need to, so the
        // head is looked for whatever the sending did.
        let sent = self.poll_send(cx);
        loop {
            let parsed = if self.buf.is_empty() {
                Ok(None)
            } else {
                decode::head(
                    &mut self.buf,
                    head_request,
                    &mut self.spans,
                    &mut self.fields,
                )
            };
            match parsed {
                Err(_) => return Poll::Ready(Err(self.spend(ConnError::Invalid))),
                Ok(Some(head)) => {
                    // The request did not go out whole: the upstream may be waiting for the
                    // rest, so what follows on this connection is not a new request.
                    if let Poll::Ready(Err(_)) = sent {
                        self.cut = true;
                        self.sending = None;
                        self.out.clear();
                    }
                    self.last |= head.last;
                    self.reading = match head.framing {
                        Framing::Length(0) => Reading::Idle,
                        framing => Reading::Body(framing),
                    };
                    self.listed.clone_from(&head.hop.listed);
                    return Poll::Ready(Ok((head.response, head.hop)));
                }
                Ok(None) => {}
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(err)) => {
                    // A failed write says more than the close that followed it.
                    let err = match sent {
                        Poll::Ready(Err(sent)) => sent,
                        _ => err,
                    };
                    return Poll::Ready(Err(self.spend(err)));
                }
                Poll::Pending => {}
            }
            return match sent {
                Poll::Ready(Err(err @ ConnError::RequestBody(_))) => {
                    Poll::Ready(Err(self.spend(err)))
                }
                _ => Poll::Pending,
            };
        }
    }

    /// Sends a request and reads all of its response: for callers that want the whole
    /// exchange at once, without timeouts of their own.
    pub async fn round_trip(
        &mut self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: RequestBody,
    ) -> Result<(Response<Fields>, Bytes), ConnError> {
        self.start(method, uri, &Fields::default(), headers, body);
        let (response, _) = std::future::poll_fn(|cx| self.poll_response(cx)).await?;
        let mut body = BytesMut::new();
        while let Some(frame) = std::future::poll_fn(|cx| self.poll_frame(cx)).await {
            if let Ok(data) = frame?.into_data() {
                body.extend_from_slice(&data);
            }
        }
        Ok((response, body.freeze()))
    }

    /// The response body's next frame. Keeps a streamed request body going out meanwhile,
    /// since an upstream may answer while it still reads (an echo).
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ConnError>>> {
        if self.sending.is_some() || !self.out.is_empty() {
            // The response is what matters now: a request body that fails only means the
            // exchange did not end cleanly, and the connection is not reused.
            if let Poll::Ready(Err(_)) = self.poll_send(cx) {
                self.sending = None;
                self.out.clear();
                self.cut = true;
            }
        }
        loop {
            let Reading::Body(framing) = &mut self.reading else {
                return Poll::Ready(None);
            };
            match framing {
                Framing::Length(left) if !self.buf.is_empty() => {
                    let n = (*left).min(self.buf.len() as u64);
                    *left -= n;
                    let data = self.buf.split_to(n as usize).freeze();
                    if *left == 0 {
                        self.reading = Reading::Idle;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Length(_) => {}
                Framing::Chunked(chunked) => match chunked.step(&mut self.buf, &self.listed) {
                    Err(_) => return Poll::Ready(Some(Err(self.spend(ConnError::Invalid)))),
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::Trailers(trailers)) => {
                        self.reading = Reading::Idle;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Step::End) => {
                        self.reading = Reading::Idle;
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                },
                Framing::UntilClose if !self.buf.is_empty() => {
                    let data = self.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::UntilClose => {}
            }
            match std::task::ready!(self.poll_fill(cx)) {
                Ok(()) => {}
                Err(ConnError::Eof)
                    if matches!(self.reading, Reading::Body(Framing::UntilClose)) =>
                {
                    self.reading = Reading::Drained;
                    return Poll::Ready(None);
                }
                Err(err) => return Poll::Ready(Some(Err(self.spend(err)))),
            }
        }
    }

    /// Whether the response body has been read to its end.
    pub fn body_ended(&self) -> bool {
        matches!(self.reading, Reading::Idle | Reading::Drained)
    }

    pub fn body_size_hint(&self) -> SizeHint {
        match &self.reading {
            Reading::Body(Framing::Length(left)) => SizeHint::with_exact(*left),
            Reading::Body(_) => SizeHint::default(),
            _ => SizeHint::with_exact(0),
        }
    }

    fn spend(&mut self, err: ConnError) -> ConnError {
        self.reading = Reading::Spent;
        err
    }

    /// Writes what is queued, and queues the streamed body's frames as they come, until
    /// the socket or the body makes it wait. `Ready(Ok)` once all of the request is out.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        loop {
            while !self.out.is_empty() {
                let n = match crate::wire::poll_write_queue(&mut self.stream, &mut self.out, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(ConnError::Io(err))),
                    Poll::Ready(Ok(n)) => n,
                };
                self.written += n as u64;
                self.last_progress = crate::clock::now();
            }
            let Some(sending) = self.sending.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match std::task::ready!(sending.poll_next(cx, &mut self.out)) {
                Ok(false) => {}
                Ok(true) => self.sending = None,
                Err(err) => {
                    self.sending = None;
                    return Poll::Ready(Err(ConnError::RequestBody(err)));
                }
            }
        }
    }

    /// Reads more of the response into `buf`. `Err(Eof)` when the upstream closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = match std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.stream),
            cx,
            &mut self.buf
        )) {
            Ok(0) => {
                self.closed_at.get_or_insert(Instant::now());
                return Poll::Ready(Err(ConnError::Eof));
            }
            Ok(n) => n,
            Err(err) => {
                self.closed_at.get_or_insert(Instant::now());
                return Poll::Ready(Err(ConnError::Io(err)));
            }
        };
        self.read += n as u64;
        self.last_progress = crate::clock::now();
        if n == room {
            self.read_size = (self.read_size * 2).min(READ_MAX);
        } else if n < room / 4 {
            self.read_size = (self.read_size / 2).max(READ_MIN);
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
