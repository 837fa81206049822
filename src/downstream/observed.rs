//! The client's `TcpStream`, telling an [`Observer`] what passes through it, so that the
//! client side's timeouts and park see every read and write the connection makes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Told of every read and write attempt, right after it; runs inside the poll, so it must
/// stay cheap.
pub(super) trait Observer {
    /// A read finished: `added` holds its bytes. `closed` is set when it saw the peer's FIN
    /// (a zero-byte read into room) or an error.
    fn read(&mut self, added: &[u8], closed: bool);
    /// A write or flush was attempted: `written` bytes went out, or it is `pending`.
    fn wrote(&mut self, written: usize, pending: bool);
    /// A read found nothing to read. Returning true makes the read end the stream instead of
    /// waiting, so the owner can take the socket back from a reader that would otherwise hold
    /// it, and its buffers, until the peer speaks.
    fn end_instead_of_waiting(&mut self) -> bool {
        false
    }
    /// Whether the stream was ended that way, so that the reader's shutdown must leave the
    /// socket open for the owner.
    fn keeps_open(&self) -> bool {
        false
    }
}

/// The stream the HTTP/1 connection drives, with its observer.
pub(super) struct Observed<O> {
    stream: TcpStream,
    pub(super) observer: O,
    /// Bytes read before, handed out again ahead of the socket's and not observed twice:
    /// what a reader that gave the stream back had read but not used.
    unread: Bytes,
}

impl<O: Observer> Observed<O> {
    pub(super) fn new(stream: TcpStream, observer: O) -> Observed<O> {
        Observed {
            stream,
            observer,
            unread: Bytes::new(),
        }
    }

    pub(super) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Gives `bytes` to the next reads, before anything the socket has. The observer is told
    /// of them now, as bytes arriving for the next reader: a request head begun before a park
    /// gets the header timeout and the framing check like any other.
    pub(super) fn unread(&mut self, bytes: Bytes) {
        self.observer.read(&bytes, false);
        self.unread = bytes;
    }

    pub(super) fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }
}

impl<O: Observer + Unpin> AsyncRead for Observed<O> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.stream).poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) => {
                let added = &buf.filled()[before..];
                let closed = added.is_empty() && buf.remaining() > 0;
                this.observer.read(added, closed);
            }
            Poll::Ready(Err(_)) => this.observer.read(&[], true),
            Poll::Pending if this.observer.end_instead_of_waiting() => return Poll::Ready(Ok(())),
            Poll::Pending => {}
        }
        res
    }
}

impl<O: Observer + Unpin> Observed<O> {
    fn note(&mut self, res: Poll<usize>) {
        match res {
            Poll::Ready(n) => self.observer.wrote(n, false),
            Poll::Pending => self.observer.wrote(0, true),
        }
    }
}

fn written(res: &Poll<io::Result<usize>>) -> Poll<usize> {
    match res {
        Poll::Ready(Ok(n)) => Poll::Ready(*n),
        Poll::Ready(Err(_)) => Poll::Ready(0),
        Poll::Pending => Poll::Pending,
    }
}

impl<O: Observer + Unpin> AsyncWrite for Observed<O> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note(written(&res));
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.note(written(&res));
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.stream).poll_flush(cx);
        self.note(if res.is_pending() {
            Poll::Pending
        } else {
            Poll::Ready(0)
        });
        res
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.observer.keeps_open() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
