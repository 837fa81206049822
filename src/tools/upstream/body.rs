//! Response bodies: a fixed-size body cut from one static buffer, a short text, or the request
//! body streamed back. Each tells the connection when hyper has let go of it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::Shared;
use super::conn::Activity;

/// Size of one response body chunk, and of the static buffer every chunk is cut from: large
/// enough that a 1 GiB body is only 16 Ki frames, small enough to sit in the binary for free.
const FILL_LEN: usize = 64 * 1024;

/// Response body bytes: `OKOK…`, so a 2-byte body reads `OK` and every chunk is the same.
static FILL: [u8; FILL_LEN] = ok_pattern();

const fn ok_pattern() -> [u8; FILL_LEN] {
    let mut fill = [b'K'; FILL_LEN];
    let mut i = 0;
    while i < FILL_LEN {
        fill[i] = b'O';
        i += 2;
    }
    fill
}

/// A response body that tells the connection when hyper is done with it.
pub(super) struct ResponseBody {
    source: Source,
    _release: Release,
}

impl ResponseBody {
    /// `last`: the connection closes once this response is flushed.
    pub(super) fn new(source: Source, activity: Arc<Activity>, last: bool) -> ResponseBody {
        ResponseBody {
            source,
            _release: Release { activity, last },
        }
    }
}

pub(super) enum Source {
    /// `remaining` bytes cut from [`FILL`].
    Fill {
        remaining: u64,
    },
    Text(Option<Bytes>),
    Echo(Echo),
}

impl Source {
    pub(super) fn fill(size: u64) -> Source {
        Source::Fill { remaining: size }
    }

    pub(super) fn text(text: String) -> Source {
        Source::Text(Some(Bytes::from(text)).filter(|t| !t.is_empty()))
    }

    /// The request body, streamed back; its length goes to `recorder` when it ends.
    pub(super) fn echo(incoming: Incoming, recorder: Recorder) -> Source {
        Source::Echo(Echo {
            incoming,
            bytes: 0,
            recorder,
        })
    }

    /// None when only the request body knows (hyper then uses its size hint, if exact).
    pub(super) fn length(&self) -> Option<u64> {
        match self {
            Source::Fill { remaining } => Some(*remaining),
            Source::Text(text) => Some(text.as_ref().map_or(0, |t| t.len() as u64)),
            Source::Echo(_) => None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().source {
            Source::Fill { remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = usize::try_from(*remaining).map_or(FILL_LEN, |r| r.min(FILL_LEN));
                *remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&FILL[..n])))))
            }
            Source::Text(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
            Source::Echo(echo) => echo.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Fill { remaining } => *remaining == 0,
            Source::Text(text) => text.is_none(),
            Source::Echo(echo) => echo.incoming.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Echo(echo) => echo.incoming.size_hint(),
            other => SizeHint::with_exact(other.length().unwrap_or(0)),
        }
    }
}

/// Tells the connection that hyper let go of the response body. hyper drops a body right after
/// buffering its last frame (or at once, for HEAD and empty bodies), so the next flush puts the
/// whole response in the kernel.
struct Release {
    activity: Arc<Activity>,
    last: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.activity.response_released(self.last);
    }
}

/// Records a request body's length in [`Shared`] once it has been read.
pub(super) struct Recorder {
    connection: u64,
    request: u64,
    shared: Arc<Shared>,
}

impl Recorder {
    pub(super) fn new(connection: u64, request: u64, shared: Arc<Shared>) -> Recorder {
        Recorder {
            connection,
            request,
            shared,
        }
    }

    pub(super) fn record(&self, bytes: u64) {
        self.shared
            .record_body(self.connection, self.request, bytes);
    }
}

/// The request body streamed back as it arrives.
pub(super) struct Echo {
    incoming: Incoming,
    bytes: u64,
    recorder: Recorder,
}

impl Echo {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            match ready!(Pin::new(&mut self.incoming).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.bytes += data.len() as u64;
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    // Request trailers describe the request; they are not echoed.
                    Err(_trailers) => continue,
                },
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// hyper drops the body when the request body has ended (or the connection failed), which is
/// when its length is known.
impl Drop for Echo {
    fn drop(&mut self) {
        self.recorder.record(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_reads_ok_from_every_chunk_start() {
        assert_eq!(&FILL[..2], b"OK");
        assert_eq!(&FILL[FILL_LEN - 2..], b"OK");
    }
}
