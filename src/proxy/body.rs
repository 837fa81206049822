//! Bodies crossing the proxy: the request body going up, the response body coming down.
//!
//! Both stream frame by frame; neither is ever held whole. The request body keeps a bounded
//! prefix read before the upstream is contacted, so a malformed or oversized small body is
//! refused before it reaches the upstream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::group::Lease;
use crate::downstream::Incoming;
use crate::upstream::ConnError;
use crate::wire::fields::Fields;

/// Why a client's request body could not be forwarded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("client intended to send too large body: more than {0} bytes")]
    TooLarge(u64),
    #[error("client timed out while reading client request body")]
    Timeout,
    #[error("client sent invalid chunked body")]
    Malformed,
    #[error("client prematurely closed connection while reading client request body")]
    Closed,
}

impl BodyError {
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Timeout => StatusCode::REQUEST_TIMEOUT,
            BodyError::Malformed => StatusCode::BAD_REQUEST,
            // nginx's 499: the client went away; nobody reads this status but the log.
            BodyError::Closed => StatusCode::from_u16(499).expect("499 is in range"),
        }
    }

    /// The access log's `response_details`. Envoy's words where it has them; a timeout or a
    /// malformed body is not a disconnect and is not logged as one.
    pub fn details(&self) -> &'static str {
        match self {
            BodyError::TooLarge(_) => "request_payload_too_large",
            BodyError::Timeout => "downstream_request_body_timeout",
            BodyError::Malformed => "downstream_request_body_malformed",
            BodyError::Closed => "downstream_remote_disconnect",
        }
    }
}

/// A frame-by-frame timer: `timeout` between two successive frames, like nginx's
/// `client_body_timeout` and `proxy_read_timeout`.
struct Gap {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Gap {
    fn new(timeout: Duration) -> Gap {
        Gap {
            timeout,
            sleep: None,
        }
    }

    /// Polls the timer; arms it on the first pending poll.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let timeout = self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        sleep.as_mut().poll(cx).is_ready()
    }

    fn progressed(&mut self) {
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(Instant::now() + self.timeout);
        }
    }
}

/// The client's request body on its way to the upstream.
pub struct RequestBody {
    prefix: Option<Bytes>,
    rest: Option<Incoming>,
    /// Boxed: trailers are rare, and the body moves with every request.
    trailers: Option<Box<HeaderMap>>,
    limit: u64,
    received: u64,
    gap: Gap,
}

impl RequestBody {
    pub fn empty() -> RequestBody {
        RequestBody {
            prefix: None,
            rest: None,
            trailers: None,
            limit: 0,
            received: 0,
            gap: Gap::new(Duration::MAX),
        }
    }

    /// Reads up to `keep` bytes of `incoming` before anything is sent upstream. `limit` is
    /// the largest body accepted (0: no limit); `timeout` is the longest gap between frames.
    pub async fn prefetch(
        mut incoming: Incoming,
        keep: usize,
        limit: u64,
        timeout: Duration,
    ) -> Result<RequestBody, BodyError> {
        if let Some(len) = incoming.size_hint().exact()
            && limit > 0
            && len > limit
        {
            return Err(BodyError::TooLarge(limit));
        }
        if incoming.is_end_stream() {
            return Ok(RequestBody::empty());
        }
        let mut buf = BytesMut::new();
        let mut trailers = None;
        let mut ended = false;
        while buf.len() < keep {
            let frame = match tokio::time::timeout(timeout, incoming.frame()).await {
                Err(_) => return Err(BodyError::Timeout),
                Ok(None) => {
                    ended = true;
                    break;
                }
                Ok(Some(Err(err))) => return Err(err),
                Ok(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    buf.extend_from_slice(&data);
                    if limit > 0 && buf.len() as u64 > limit {
                        return Err(BodyError::TooLarge(limit));
                    }
                }
                Err(frame) => {
                    trailers = frame.into_trailers().ok().map(Box::new);
                    ended = true;
                    break;
                }
            }
        }
        let received = buf.len() as u64;
        let prefix = (!buf.is_empty()).then(|| buf.freeze());
        let rest = (!ended && !incoming.is_end_stream()).then_some(incoming);
        Ok(RequestBody {
            prefix,
            rest,
            trailers,
            limit,
            received,
            gap: Gap::new(timeout),
        })
    }

    /// Whether part of the body is still to be read from the client.
    pub fn is_streamed(&self) -> bool {
        self.rest.is_some()
    }

    /// Takes the data and trailers of a body held whole.
    pub fn take_held(&mut self) -> (Option<Bytes>, Option<Box<HeaderMap>>) {
        debug_assert!(self.rest.is_none());
        (self.prefix.take(), self.trailers.take())
    }

    /// A copy that replays the body from the start, when all of it is held in memory.
    pub fn replay(&self) -> Option<RequestBody> {
        if self.rest.is_some() {
            return None;
        }
        Some(RequestBody {
            prefix: self.prefix.clone(),
            rest: None,
            trailers: self.trailers.clone(),
            limit: self.limit,
            received: self.received,
            gap: Gap::new(self.gap.timeout),
        })
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(*t))));
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Pending => {
                if this.gap.poll_expired(cx) {
                    this.rest = None;
                    return Poll::Ready(Some(Err(BodyError::Timeout)));
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                this.rest = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                this.rest = None;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.gap.progressed();
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    if this.limit > 0 && this.received > this.limit {
                        this.rest = None;
                        return Poll::Ready(Some(Err(BodyError::TooLarge(this.limit))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        match &self.rest {
            None => SizeHint::with_exact(prefix),
            Some(rest) => {
                let hint = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower() + prefix);
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper + prefix);
                }
                out
            }
        }
    }
}

/// How a response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Complete,
    /// The upstream failed or stalled after the response had started.
    UpstreamFailed,
    /// The body was dropped before its end: the client went away.
    Abandoned,
}

/// Called once when a response body ends, completely or not, with the upstream connection
/// the body was read from.
pub trait OnEnd: Send + Sync + 'static {
    fn on_end(self: Box<Self>, end: End, body_bytes: u64, lease: Option<Lease>);
}

/// Told when a response body is dropped, after its [`OnEnd`] ran: the downstream side's
/// count of the requests in flight on a connection. Shared, not boxed: the connection's own
/// state takes it, with no allocation per request.
pub trait OnDrop: Send + Sync + 'static {
    fn on_drop(&self);
}

/// The response body on its way to the client.
pub struct ResponseBody {
    kind: Kind,
    /// The upstream's header lines, which go to the client with the head kaguard writes;
    /// none for kaguard's own responses.
    fields: Fields,
    on_end: Option<Box<dyn OnEnd>>,
    sent: u64,
    dropped: Option<Arc<dyn OnDrop>>,
}

enum Kind {
    /// Read from the leased connection; `None` once the body ended and the lease went on.
    Upstream {
        lease: Option<Lease>,
        /// The longest wait for the upstream's next bytes (nginx's `proxy_read_timeout`).
        read_timeout: Duration,
        /// An upstream failure held back one poll; see [`ResponseBody::poll_frame`].
        failed: Option<ConnError>,
    },
    Local(Option<Bytes>),
}

impl ResponseBody {
    /// A body kaguard writes itself (errors, admin pages).
    pub fn local(bytes: impl Into<Bytes>) -> ResponseBody {
        let bytes = bytes.into();
        ResponseBody {
            kind: Kind::Local((!bytes.is_empty()).then_some(bytes)),
            fields: Fields::default(),
            on_end: None,
            sent: 0,
            dropped: None,
        }
    }

    /// The upstream's body, read from `lease`'s connection, with `read_timeout` between
    /// two frames, after the head that carries `fields`.
    pub fn upstream(lease: Lease, read_timeout: Duration, fields: Fields) -> ResponseBody {
        ResponseBody {
            kind: Kind::Upstream {
                lease: Some(lease),
                read_timeout,
                failed: None,
            },
            fields,
            on_end: None,
            sent: 0,
            dropped: None,
        }
    }

    /// The upstream's header lines, for the response's head.
    pub fn fields(&self) -> &Fields {
        &self.fields
    }

    /// Runs `on_end` when the body ends or is dropped.
    pub fn on_end(mut self, on_end: Box<dyn OnEnd>) -> ResponseBody {
        self.on_end = Some(on_end);
        self
    }

    /// Tells `dropped` when the body is dropped.
    pub fn on_drop(mut self, dropped: Arc<dyn OnDrop>) -> ResponseBody {
        self.dropped = Some(dropped);
        self
    }

    fn finish(&mut self, end: End) {
        let lease = match &mut self.kind {
            Kind::Upstream { lease, .. } => lease.take(),
            Kind::Local(_) => None,
        };
        if let Some(on_end) = self.on_end.take() {
            on_end.on_end(end, self.sent, lease);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let end = if self.is_end_stream() {
            End::Complete
        } else {
            End::Abandoned
        };
        self.finish(end);
        if let Some(dropped) = self.dropped.take() {
            dropped.on_drop();
        }
    }
}

/// The upstream body failed or stalled after the response had started.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    #[error("upstream timed out (110: Connection timed out) while reading upstream")]
    Timeout,
    #[error("upstream prematurely closed connection while reading upstream: {0}")]
    Upstream(#[source] ConnError),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream {
                failed: failed @ Some(_),
                ..
            } => Poll::Ready(
                failed
                    .take()
                    .map(|err| Err(ResponseBodyError::Upstream(err))),
            ),
            Kind::Upstream { lease: None, .. } => Poll::Ready(None),
            Kind::Upstream {
                lease: Some(lease),
                read_timeout,
                failed,
            } => match lease.conn_mut().poll_frame(cx) {
                Poll::Pending => {
                    let conn = lease.conn_mut();
                    let deadline = conn.last_progress() + *read_timeout;
                    match conn.poll_deadline(cx, deadline) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(ResponseBodyError::Timeout))),
                        Poll::Pending => Poll::Pending,
                    }
                }
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                // The response head and the body read so far may still wait in the client
                // connection's buffer, and an error now would drop them unsent. The error
                // comes one poll later instead, which gives the client connection a turn to
                // flush them first, so that the client usually sees the response cut short
                // rather than no response at all. Usually: a flush that cannot finish in
                // that turn is still dropped.
                Poll::Ready(Some(Err(err))) => {
                    *failed = Some(err);
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Poll::Ready(None) => Poll::Ready(None),
            },
        };
        match ready!(polled) {
            None => {
                this.finish(End::Complete);
                Poll::Ready(None)
            }
            Some(Err(err)) => {
                this.finish(End::UpstreamFailed);
                Poll::Ready(Some(Err(err)))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Local(bytes) => bytes.is_none(),
            Kind::Upstream { lease, .. } => lease.as_ref().is_none_or(|l| l.conn().body_ended()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Local(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Kind::Upstream { lease: None, .. } => SizeHint::with_exact(0),
            Kind::Upstream {
                lease: Some(lease), ..
            } => lease.conn().body_size_hint(),
        }
    }
}
