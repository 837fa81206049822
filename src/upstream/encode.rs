//! A request as it goes onto the wire: the head, and the body in the framing the head
//! announces.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, Method, Uri};
use hyper::body::Body;

use crate::proxy::body::{BodyError, RequestBody};
use crate::wire::chunked::{chunk_size, end_chunks};
use crate::wire::fields::Fields;

/// Header lines a request gains on its way upstream, written after those it forwards: the
/// proxy says which, and this side writes them without knowing what they mean.
pub trait AddedLines {
    /// Appends the lines, each ending in CRLF.
    fn put(&self, head: &mut BytesMut);
}

/// Every line of a map: for requests kaguard makes up whole (tests, tools).
impl AddedLines for HeaderMap {
    fn put(&self, head: &mut BytesMut) {
        crate::wire::put_lines(head, self.iter());
    }
}

/// Room reserved for the lines a request gains, besides its own: the proxy's come to about
/// 150 bytes with a request id and an IPv6 client. More is written all the same, growing the
/// room once.
const ADDED_ROOM: usize = 256;

/// A held body up to this size is copied behind the head, so that the request leaves in
/// one write of one buffer; a larger one goes out as its own buffer, uncopied.
const INLINE_BODY: usize = 4 * 1024;

/// What is left to send of a streamed request body, and in which framing.
pub(super) struct Sending {
    body: RequestBody,
    chunked: bool,
}

/// Queues in `out` the head of a request and, when the body is held whole, the body. The
/// head is written into `head`'s room and split off it, so that a connection reuses that room. A
/// streamed body is returned with the framing its head announced, to be sent frame by frame.
///
/// The framing follows the client's where it can: its Content-Length is kept; a held body
/// the client sent chunked goes out with a Content-Length (trailers keep it chunked); a
/// streamed body without a Content-Length goes out chunked.
pub(super) fn request(
    method: &Method,
    uri: &Uri,
    fields: &Fields,
    added: &dyn AddedLines,
    mut body: RequestBody,
    head: &mut BytesMut,
    out: &mut VecDeque<Bytes>,
) -> Option<Sending> {
    let length = fields.content_length();
    let streamed = body.is_streamed();
    let (data, trailers) = if streamed {
        (None, None)
    } else {
        body.take_held()
    };
    let data_len = data.as_ref().map_or(0, Bytes::len);
    let chunked = if streamed {
        length.is_none()
    } else {
        trailers.is_some()
    };

    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let lines = fields.lines().len() + ADDED_ROOM;
    let inline = data.as_ref().filter(|d| !chunked && d.len() <= INLINE_BODY);
    let size = method.as_str().len() + path.len() + lines + 64 + inline.map_or(0, Bytes::len);
    head.reserve(size);
    head.put_slice(method.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(path.as_bytes());
    head.put_slice(b" HTTP/1.1\r\n");
    head.put_slice(fields.lines());
    added.put(head);
    if chunked {
        head.put_slice(b"transfer-encoding: chunked\r\n");
    } else if let Some(n) = length {
        crate::wire::put_length(head, n);
    } else if data_len > 0 {
        crate::wire::put_length(head, data_len as u64);
    }
    head.put_slice(b"\r\n");

    if streamed {
        out.push_back(crate::wire::split_head(head));
        return Some(Sending { body, chunked });
    }
    match data {
        Some(data) if chunked => {
            out.push_back(crate::wire::split_head(head));
            out.push_back(chunk_size(data.len()));
            out.push_back(data);
            out.push_back(Bytes::from_static(b"\r\n"));
        }
        Some(data) if inline.is_some() => {
            head.put_slice(&data);
            out.push_back(crate::wire::split_head(head));
        }
        Some(data) => {
            out.push_back(crate::wire::split_head(head));
            out.push_back(data);
        }
        None => out.push_back(crate::wire::split_head(head)),
    }
    if chunked {
        out.push_back(end_chunks(trailers.as_deref()));
    }
    None
}

impl Sending {
    /// Hands the body back unsent; only right after [`request`], before any poll.
    pub(super) fn into_body(self) -> RequestBody {
        self.body
    }

    /// Queues the body's next frame in `out`. `Ready(Ok(true))` once the body has ended and
    /// its end is queued.
    pub(super) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<Result<bool, BodyError>> {
        let Some(frame) = ready!(Pin::new(&mut self.body).poll_frame(cx)) else {
            if self.chunked {
                out.push_back(end_chunks(None));
            }
            return Poll::Ready(Ok(true));
        };
        let data = match frame?.into_data() {
            Ok(data) => data,
            Err(frame) => {
                // Trailers end the body; only the chunked coding can carry them.
                if self.chunked {
                    out.push_back(end_chunks(frame.trailers_ref()));
                }
                return Poll::Ready(Ok(true));
            }
        };
        if data.is_empty() {
            return Poll::Ready(Ok(false));
        }
        if self.chunked {
            out.push_back(chunk_size(data.len()));
            out.push_back(data);
            out.push_back(Bytes::from_static(b"\r\n"));
        } else {
            out.push_back(data);
        }
        Poll::Ready(Ok(false))
    }
}
