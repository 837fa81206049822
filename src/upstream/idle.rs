//! An idle upstream connection has no reader. What watches it instead: a look at its socket
//! when it is lent (the check before reuse), and a readiness waker, set when it is pooled,
//! that wakes the group's reaper when the upstream closes it and notes when.

use std::io;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::UpstreamConn;
use crate::error::Transport;

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

/// Wakes the reaper for one idle connection, and notes when: the moment the upstream's close
/// arrived, for the learner.
pub(super) struct Watch {
    reaper: Waker,
    woken: Mutex<Option<Instant>>,
}

impl Wake for Watch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut woken = self.woken.lock().unwrap_or_else(PoisonError::into_inner);
        woken.get_or_insert_with(Instant::now);
        drop(woken);
        self.reaper.wake_by_ref();
    }
}

impl Watch {
    pub(super) fn new(reaper: Waker) -> Arc<Watch> {
        Arc::new(Watch {
            reaper,
            woken: Mutex::new(None),
        })
    }
}

impl UpstreamConn {
    /// Looks, without blocking or consuming anything, for a FIN, RST or stray bytes that
    /// arrived while the connection was idle. Leaves tokio's readiness state alone.
    pub fn peek(&self) -> Peek {
        peek(&self.stream)
    }

    /// For an idle connection: makes the upstream's next byte, FIN or RST wake the reaper,
    /// and says what is there already, with the moment a wake-up since the last call
    /// came. A close of an idle connection is then seen, and timed, as it arrives, which is
    /// what the learner needs.
    pub fn watch_idle(&self) -> (Peek, Option<Instant>) {
        let woken = self
            .watch
            .woken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        (self.watch_socket(), woken)
    }

    /// When the idle watch last woke the reaper, if it did since the last [`watch_idle`].
    ///
    /// [`watch_idle`]: UpstreamConn::watch_idle
    pub fn woken_at(&self) -> Option<Instant> {
        *self
            .watch
            .woken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn watch_socket(&self) -> Peek {
        let mut cx = Context::from_waker(&self.watch_waker);
        // Readiness left over from the last response (its reads did not end on
        // WouldBlock) is cleared by the peek that finds nothing. Fresh readiness each
        // round is bytes or a close arriving, which the next peek finds.
        for _ in 0..4 {
            match self.stream.poll_read_ready(&mut cx) {
                Poll::Pending => return Peek::Clean,
                Poll::Ready(Err(err)) => return Peek::Closed(Transport::from_io(&err)),
                Poll::Ready(Ok(())) => {}
            }
            match self
                .stream
                .try_io(Interest::READABLE, || match peek(&self.stream) {
                    Peek::Clean => Err(io::ErrorKind::WouldBlock.into()),
                    found => Ok(found),
                }) {
                Ok(found) => return found,
                Err(_) => continue,
            }
        }
        self.peek()
    }
}

fn peek(stream: &TcpStream) -> Peek {
    let mut buf = [MaybeUninit::<u8>::uninit(); 1];
    match SockRef::from(stream).peek(&mut buf) {
        Ok(0) => Peek::Closed(Transport::Eof),
        Ok(_) => Peek::StrayBytes,
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Peek::Clean,
        Err(err) => Peek::Closed(Transport::from_io(&err)),
    }
}
