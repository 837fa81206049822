//! A client's request body as the service sees it. A body that arrived with its head, or
//! none, is held; the rest of one still on the wire passes through a one-frame slot that
//! the connection fills when the service asks for more.
//!
//! The body must be polled on the connection's task, as the proxy does (the request's own
//! task sends it upstream): asking for more wakes no one, the connection sees the ask when
//! the request's future, polled by it, returns.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::proxy::body::BodyError;

/// The body of a request read by [`super::h1`].
#[derive(Debug)]
pub struct Incoming(Kind);

#[derive(Debug)]
enum Kind {
    Empty,
    Held(Bytes),
    Streamed { slot: Arc<Slot>, left: Option<u64> },
}

/// What passes from the connection to the body: one frame at a time, and whether the body
/// wants the next one.
#[derive(Debug, Default)]
pub(super) struct Slot(Mutex<Exchange>);

#[derive(Debug, Default)]
struct Exchange {
    frame: Option<Result<Frame<Bytes>, BodyError>>,
    /// Nothing follows the frame in the slot.
    ended: bool,
    /// The body was polled and found the slot empty.
    wanted: bool,
    waker: Option<Waker>,
    /// The body was dropped: nobody reads what is left.
    gone: bool,
}

/// What the connection learns when it looks at the slot.
pub(super) enum Demand {
    /// The body waits for a frame.
    Wanted,
    /// The body has a frame it has not taken, or has not asked for more.
    Idle,
    /// The body was dropped.
    Gone,
}

impl Slot {
    pub(super) fn demand(&self) -> Demand {
        let x = self.0.lock().expect("slot lock");
        if x.gone {
            Demand::Gone
        } else if x.wanted && x.frame.is_none() {
            Demand::Wanted
        } else {
            Demand::Idle
        }
    }

    /// Puts a frame in the slot for the body, which waits for it; wakes the body when it
    /// waits on another task than the connection's.
    pub(super) fn put(
        &self,
        frame: Result<Frame<Bytes>, BodyError>,
        ended: bool,
        cx: &Context<'_>,
    ) {
        let waker = {
            let mut x = self.0.lock().expect("slot lock");
            x.frame = Some(frame);
            x.ended = ended;
            x.wanted = false;
            x.waker.take()
        };
        if let Some(w) = waker.filter(|w| !w.will_wake(cx.waker())) {
            w.wake();
        }
    }

    /// The body ends with no further frame.
    pub(super) fn end(&self, cx: &Context<'_>) {
        let waker = {
            let mut x = self.0.lock().expect("slot lock");
            x.ended = true;
            x.wanted = false;
            x.waker.take()
        };
        if let Some(w) = waker.filter(|w| !w.will_wake(cx.waker())) {
            w.wake();
        }
    }
}

impl Incoming {
    pub(super) fn empty() -> Incoming {
        Incoming(Kind::Empty)
    }

    pub(super) fn held(data: Bytes) -> Incoming {
        if data.is_empty() {
            return Incoming::empty();
        }
        Incoming(Kind::Held(data))
    }

    /// A body the connection goes on reading; `len` when its head gave one.
    pub(super) fn streamed(slot: Arc<Slot>, len: Option<u64>) -> Incoming {
        Incoming(Kind::Streamed { slot, left: len })
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Kind::Streamed { slot, .. } = &self.0 {
            slot.0.lock().expect("slot lock").gone = true;
        }
    }
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Held(_) => {
                let Kind::Held(data) = std::mem::replace(&mut self.0, Kind::Empty) else {
                    unreachable!("matched above")
                };
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Kind::Streamed { slot, left } => {
                let mut x = slot.0.lock().expect("slot lock");
                if let Some(frame) = x.frame.take() {
                    if let (Some(left), Ok(data)) = (left.as_mut(), &frame)
                        && let Some(data) = data.data_ref()
                    {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(frame));
                }
                if x.ended {
                    return Poll::Ready(None);
                }
                x.wanted = true;
                match &mut x.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    w => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty => true,
            Kind::Held(_) => false,
            Kind::Streamed { slot, .. } => {
                let x = slot.0.lock().expect("slot lock");
                x.ended && x.frame.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Held(data) => SizeHint::with_exact(data.len() as u64),
            Kind::Streamed { left: Some(n), .. } => SizeHint::with_exact(*n),
            Kind::Streamed { left: None, .. } => SizeHint::default(),
        }
    }
}

/// The connection's end of a streamed body, for tests that need a body failing on cue.
#[cfg(test)]
pub(crate) struct Feed(Arc<Slot>);

#[cfg(test)]
impl Feed {
    /// A streamed body announcing `len` bytes, and what feeds it.
    pub(crate) fn new(len: Option<u64>) -> (Feed, Incoming) {
        let slot = Arc::new(Slot::default());
        (Feed(slot.clone()), Incoming::streamed(slot, len))
    }

    pub(crate) fn data(&self, data: &'static [u8]) {
        let cx = Context::from_waker(Waker::noop());
        self.0
            .put(Ok(Frame::data(Bytes::from_static(data))), false, &cx);
    }

    /// The client went away.
    pub(crate) fn cut(&self) {
        let cx = Context::from_waker(Waker::noop());
        self.0.put(Err(BodyError::Closed), true, &cx);
    }
}
