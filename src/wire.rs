//! HTTP/1 on the wire, what the client side and the upstream side share: the chunked coding,
//! header lines, and a queue of buffers going out on a socket, written with vectored writes
//! so that a head and its body, or a chunk and its framing, leave in one system call without
//! being copied together.

pub mod chunked;
pub mod fields;

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use tokio::io::AsyncWrite;

/// Most buffers handed to one vectored write; a chunked body queues three per chunk.
const WRITE_SLICES: usize = 16;

/// Writes what one vectored write takes from the front of `out`, and drops it from the
/// queue. A write that takes nothing is an error: the socket can take no more.
pub fn poll_write_queue<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &mut VecDeque<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
    let mut count = 0;
    for (slot, bytes) in slices.iter_mut().zip(out.iter()) {
        *slot = IoSlice::new(bytes);
        count += 1;
    }
    let n = match std::task::ready!(Pin::new(w).poll_write_vectored(cx, &slices[..count])) {
        Ok(0) if count > 0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
        Ok(n) => n,
        Err(err) => return Poll::Ready(Err(err)),
    };
    let mut left = n;
    while left > 0 {
        let front = out.front_mut().expect("written bytes were queued");
        if front.len() <= left {
            left -= front.len();
            out.pop_front();
        } else {
            front.advance(left);
            left = 0;
        }
    }
    Poll::Ready(Ok(n))
}

/// Appends `name: value` lines, one per header.
pub fn put_lines<'h>(
    buf: &mut BytesMut,
    lines: impl Iterator<Item = (&'h HeaderName, &'h HeaderValue)>,
) {
    for (name, value) in lines {
        buf.put_slice(name.as_str().as_bytes());
        buf.put_slice(b": ");
        buf.put_slice(value.as_bytes());
        buf.put_slice(b"\r\n");
    }
}
