//! One client connection's HTTP/1: request heads off the socket, each request to the
//! service, its response back onto the socket, one request at a time. The request body is
//! read as the service asks for it, on this connection's task.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderName, Method, Request, Response, Version};
use hyper::body::{Body, Frame};
use tokio::io::AsyncWrite;

use super::head::{self, Framing, Refused};
use super::incoming::{Demand, Incoming, Slot};
use super::io::ClientSide;
use super::lines::Lines;
use super::observed::Observed;
use super::response::{self, Asked};
use crate::proxy::Abort;
use crate::proxy::body::{BodyError, ResponseBody};
use crate::wire::chunked::Step;

/// The future of one request, boxed: the proxy's is several KiB, and a box lives only
/// while a request does. Its output: the response, and whether it is the connection's last
/// for a reason the connection does not see (the client's wish, the request cap, the
/// connection's age, a conflicting framing, shutdown).
pub(super) type Handling =
    Pin<Box<dyn Future<Output = Result<(Response<ResponseBody>, bool), Abort>> + Send>>;

/// Room made for a read of a request head: most heads are a few hundred bytes, and a
/// buffer is split, not copied, into the heads it holds.
const HEAD_READ: usize = 8 * 1024;

/// Room made for a read of a request body: larger, so that an upload moves in few reads.
const BODY_READ: usize = 64 * 1024;

/// Response bytes queued before they are written: a body's frames are gathered up to this
/// so that small ones leave together, and no more is held for a slow client.
const WRITE_HIGH: usize = 64 * 1024;

/// Why a connection ended other than cleanly.
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("{}", refused_text(.0))]
    Refused(Refused),
    #[error("the client closed the connection inside a request head")]
    Incomplete,
    #[error("the client closed the connection before the response")]
    ClientGone,
    #[error("the request was aborted without a response")]
    Aborted,
    #[error("the response body failed")]
    ResponseBody,
}

fn refused_text(refused: &Refused) -> &'static str {
    match refused {
        Refused::Invalid(why) | Refused::Unsupported(why) => why,
        Refused::TooLarge => "request head too large",
    }
}

impl Error {
    /// The client sent something that is not a request kaguard reads.
    pub(super) fn is_parse(&self) -> bool {
        matches!(self, Error::Refused(_))
    }
}

/// The socket and what is read from it and queued for it.
struct Wire {
    io: Observed<ClientSide>,
    buf: BytesMut,
    spans: Vec<head::Spans>,
    /// Room for the header lines each request forwards, kept as `heads` is.
    lines: BytesMut,
    out: VecDeque<Bytes>,
    /// Room for response heads: each is split off it, and once written and dropped its room
    /// serves the next one, so that a head costs no allocation.
    heads: BytesMut,
    /// The rest of a request body still on the wire.
    reading: Option<Reading>,
    limit: usize,
}

struct Reading {
    slot: Arc<Slot>,
    framing: Framing,
    /// A 100 (Continue) is owed before the first read.
    send_continue: bool,
    /// The names the head's `Connection` listed, which its trailers lose too.
    listed: Vec<HeaderName>,
}

// Boxing the response body would cost an allocation per response, to shrink a state that
// lives only while its connection serves a request (an idle connection is parked without
// it).
#[allow(clippy::large_enum_variant)]
enum State {
    Head,
    Handling {
        fut: Handling,
        head: bool,
        version: Version,
    },
    Writing {
        body: ResponseBody,
        framing: response::Framing,
        keep: bool,
    },
    /// The response is whole in the queue; `keep`: another request may follow.
    Flushing {
        keep: bool,
    },
    Shutdown,
    Done,
}

/// A client connection, served until it ends.
pub(super) struct Conn<F> {
    wire: Wire,
    service: F,
    /// The `Keep-Alive` line of a response after which the connection stays open.
    hint: Bytes,
    state: State,
    closing: bool,
    outcome: Option<Result<(), Error>>,
}

impl<F: FnMut(Request<Incoming>, Lines) -> Handling + Unpin> Conn<F> {
    pub(super) fn new(io: Observed<ClientSide>, limit: usize, hint: Bytes, service: F) -> Conn<F> {
        Conn {
            wire: Wire {
                io,
                buf: BytesMut::new(),
                spans: Vec::new(),
                lines: BytesMut::new(),
                out: VecDeque::new(),
                heads: BytesMut::new(),
                reading: None,
                limit,
            },
            service,
            hint,
            state: State::Head,
            closing: false,
            outcome: None,
        }
    }

    /// Serves the request under way, if any, then ends: at once when the connection is
    /// between requests.
    pub(super) fn graceful_shutdown(&mut self) {
        self.closing = true;
        if matches!(self.state, State::Head) && self.wire.buf.is_empty() {
            self.finish(Ok(()));
        }
    }

    /// The socket, and the bytes read from it that no request has used.
    pub(super) fn into_parts(self) -> (Observed<ClientSide>, Bytes) {
        (self.wire.io, self.wire.buf.freeze())
    }

    fn finish(&mut self, outcome: Result<(), Error>) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
        self.state = State::Shutdown;
    }

    fn start(&mut self, parsed: head::Head) {
        let wire = &mut self.wire;
        wire.io.observer.head_parsed(parsed.conflict);
        let body = match parsed.framing {
            Framing::Length(0) => Incoming::empty(),
            Framing::Length(n) if wire.buf.len() as u64 >= n => {
                Incoming::held(wire.buf.split_to(n as usize).freeze())
            }
            framing => {
                let slot = Arc::new(Slot::default());
                let len = match framing {
                    Framing::Length(n) => Some(n),
                    Framing::Chunked(_) => None,
                };
                wire.reading = Some(Reading {
                    slot: slot.clone(),
                    framing,
                    send_continue: parsed.expects_continue && wire.buf.is_empty(),
                    listed: parsed.listed,
                });
                Incoming::streamed(slot, len)
            }
        };
        let head = parsed.request.method() == Method::HEAD;
        let version = parsed.request.version();
        let fut = (self.service)(parsed.request.map(|()| body), parsed.lines);
        self.state = State::Handling { fut, head, version };
    }

    fn respond(&mut self, resp: Response<ResponseBody>, last: bool, head: bool, version: Version) {
        let (parts, body) = resp.into_parts();
        let asked = Asked {
            head,
            version,
            last,
            body_left: self.wire.reading.is_some(),
            closing: self.closing,
        };
        let exact = body.size_hint().exact();
        let wire = &mut self.wire;
        let (framing, keep) = response::head(
            &parts,
            body.fields(),
            exact,
            asked,
            &self.hint,
            &mut wire.heads,
            &mut wire.out,
        );
        self.state = if framing == response::Framing::Bodiless {
            State::Flushing { keep }
        } else {
            State::Writing {
                body,
                framing,
                keep,
            }
        };
    }
}

impl<F: FnMut(Request<Incoming>, Lines) -> Handling + Unpin> Future for Conn<F> {
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Head => {
                    let wire = &mut this.wire;
                    match head::parse(&mut wire.buf, wire.limit, &mut wire.spans, &mut wire.lines) {
                        Ok(Some(parsed)) => {
                            this.start(parsed);
                            continue;
                        }
                        Err(refused) => {
                            wire.out.push_back(head::refusal(refused));
                            this.outcome = Some(Err(Error::Refused(refused)));
                            this.state = State::Flushing { keep: false };
                            continue;
                        }
                        Ok(None) => {}
                    }
                    if !wire.buf.is_empty() {
                        // Part of a head read ahead while the last request was handled: its
                        // header timeout runs from now.
                        wire.io.observer.head_begun();
                    }
                    match std::task::ready!(wire.poll_fill(cx, HEAD_READ)) {
                        Ok(0) if wire.buf.is_empty() => this.finish(Ok(())),
                        Ok(0) => this.finish(Err(Error::Incomplete)),
                        Ok(_) => {}
                        Err(err) => this.finish(Err(Error::Io(err))),
                    }
                }
                State::Handling { fut, head, version } => {
                    let (head, version) = (*head, *version);
                    match fut.as_mut().poll(cx) {
                        Poll::Ready(Ok((resp, last))) => this.respond(resp, last, head, version),
                        Poll::Ready(Err(Abort)) => this.finish(Err(Error::Aborted)),
                        Poll::Pending => match this.wire.poll_body(cx, true) {
                            Ok(true) => {}
                            Ok(false) => return Poll::Pending,
                            Err(err) => this.finish(Err(err)),
                        },
                    }
                }
                State::Writing {
                    body,
                    framing,
                    keep,
                } => {
                    let wire = &mut this.wire;
                    match gather(body, framing, &mut wire.out, cx) {
                        Gathered::More => {}
                        Gathered::End { whole } => {
                            let keep = *keep && whole;
                            // Dropping the body ends the request on the connection.
                            this.state = State::Flushing { keep };
                            continue;
                        }
                        Gathered::Failed => {
                            // What was queued goes out; the close tells the client the
                            // rest will not.
                            this.outcome = Some(Err(Error::ResponseBody));
                            this.state = State::Flushing { keep: false };
                            continue;
                        }
                    }
                    // After the gathering: the response body may have asked, through the
                    // upstream's send, for more of a request body still arriving.
                    match wire.poll_body(cx, false) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(err) => {
                            this.finish(Err(err));
                            continue;
                        }
                    }
                    if wire.out.is_empty() {
                        return Poll::Pending;
                    }
                    if let Err(err) = std::task::ready!(wire.poll_write(cx)) {
                        this.finish(Err(Error::Io(err)));
                    }
                }
                State::Flushing { keep } => {
                    let keep = *keep;
                    let wire = &mut this.wire;
                    if !wire.out.is_empty() {
                        if let Err(err) = std::task::ready!(wire.poll_write(cx)) {
                            this.finish(Err(Error::Io(err)));
                        }
                        continue;
                    }
                    if keep && !this.closing && wire.reading.is_none() {
                        this.state = State::Head;
                    } else {
                        this.finish(Ok(()));
                    }
                }
                State::Shutdown => {
                    // A close already seen by the peer, or a reset, is no failure here.
                    let _ = std::task::ready!(Pin::new(&mut this.wire.io).poll_shutdown(cx));
                    this.state = State::Done;
                    return Poll::Ready(this.outcome.take().unwrap_or(Ok(())));
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// What gathering a response body's frames found.
enum Gathered {
    /// Frames may follow; what came is queued.
    More,
    /// The body ended; `whole` unless it fell short of its framing, which the client then
    /// learns only by the close.
    End {
        whole: bool,
    },
    Failed,
}

/// Queues the body's ready frames, up to [`WRITE_HIGH`] bytes.
fn gather(
    body: &mut ResponseBody,
    framing: &mut response::Framing,
    out: &mut VecDeque<Bytes>,
    cx: &mut Context<'_>,
) -> Gathered {
    while out.iter().map(Bytes::len).sum::<usize>() < WRITE_HIGH {
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return Gathered::More,
            Poll::Ready(None) => {
                return Gathered::End {
                    whole: response::end(*framing, None, out),
                };
            }
            Poll::Ready(Some(Err(_))) => return Gathered::Failed,
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                if !response::data(framing, data, out) {
                    return Gathered::End { whole: false };
                }
            }
            Err(frame) => {
                return Gathered::End {
                    whole: response::end(*framing, frame.trailers_ref(), out),
                };
            }
        }
    }
    Gathered::More
}

impl Wire {
    /// Reads into the buffer, with room for `room` bytes; `Ok(0)` is the client's close.
    fn poll_fill(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < room / 4 {
            self.buf.reserve(room);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            std::task::ready!(crate::wire::poll_write_queue(
                &mut self.io,
                &mut self.out,
                cx
            ))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Moves the request body along while the request is handled: reads it when the body
    /// asks for more and puts what it read in the slot. `Ok(true)` when the body has
    /// something new. `before_response`: no response byte is queued yet, so a 100 (Continue)
    /// may still go out, and without a body to read the client's close is watched for, which
    /// ends the request as the client's going away does in nginx.
    fn poll_body(&mut self, cx: &mut Context<'_>, before_response: bool) -> Result<bool, Error> {
        let Some(reading) = self.reading.as_mut() else {
            return if before_response {
                self.watch(cx)
            } else {
                Ok(false)
            };
        };
        match reading.slot.demand() {
            // Gone: the service dropped the body unread; the connection ends with this
            // response, which says so (`body_left`).
            Demand::Idle | Demand::Gone => return Ok(false),
            Demand::Wanted => {}
        }
        // Once the response has begun, a 100 would land inside it: the client that waits
        // for one sends its body after its own pause, or learns of the close.
        if std::mem::take(&mut reading.send_continue) && before_response {
            self.out
                .push_back(Bytes::from_static(b"HTTP/1.1 100 Continue\r\n\r\n"));
        }
        if !self.out.is_empty() {
            match self.poll_write(cx) {
                Poll::Pending => return Ok(false),
                Poll::Ready(Err(err)) => return Err(Error::Io(err)),
                Poll::Ready(Ok(())) => {}
            }
        }
        loop {
            let reading = self.reading.as_mut().expect("checked above");
            let step = match &mut reading.framing {
                Framing::Length(_) if self.buf.is_empty() => Ok(Step::NeedMore),
                Framing::Length(left) => {
                    let n = (*left).min(self.buf.len() as u64);
                    *left -= n;
                    Ok(Step::Data(self.buf.split_to(n as usize).freeze()))
                }
                Framing::Chunked(chunked) => chunked.step(&mut self.buf, &reading.listed),
            };
            let ended = matches!(reading.framing, Framing::Length(0));
            let (frame, ended) = match step {
                Ok(Step::NeedMore) => match self.poll_fill(cx, BODY_READ) {
                    Poll::Pending => return Ok(false),
                    Poll::Ready(Ok(n)) if n > 0 => continue,
                    Poll::Ready(_) => (Err(BodyError::Closed), true),
                },
                Ok(Step::Data(data)) => (Ok(Frame::data(data)), ended),
                Ok(Step::Trailers(map)) => (Ok(Frame::trailers(map)), true),
                Ok(Step::End) => {
                    let reading = self.reading.take().expect("checked above");
                    reading.slot.end(cx);
                    return Ok(true);
                }
                Err(_) => (Err(BodyError::Malformed), true),
            };
            let slot = &self.reading.as_ref().expect("checked above").slot;
            slot.put(frame, ended, cx);
            if ended {
                self.reading = None;
            }
            return Ok(true);
        }
    }

    /// Reads ahead while a request is handled: a pipelined request's bytes are kept, and
    /// the client's close is an error that drops the request.
    fn watch(&mut self, cx: &mut Context<'_>) -> Result<bool, Error> {
        while self.buf.len() < self.limit {
            match self.poll_fill(cx, HEAD_READ) {
                Poll::Pending => return Ok(false),
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(Error::ClientGone),
                Poll::Ready(Ok(_)) => {}
            }
        }
        Ok(false)
    }
}
