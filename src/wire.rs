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

/// Most room a connection keeps from one head it writes to the next. Heads rarely pass 1 KiB
/// (nginx reads a whole upstream head into 4 or 8 KiB by default); a connection, above all
/// one kept idle in the pool, should not hold the room of the largest head it once wrote,
/// up to 64 KiB.
const KEPT_ROOM: usize = 4 * 1024;

/// Splits what was written into `room` off it, to be sent. Once the split-off bytes are
/// dropped, the next head is written over them, with no allocation; a head larger than
/// [`KEPT_ROOM`] takes its room away with it instead.
pub fn split_head(room: &mut BytesMut) -> Bytes {
    let head = room.split().freeze();
    if head.len() > KEPT_ROOM {
        *room = BytesMut::new();
    }
    head
}

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
        put_line(buf, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// Appends one `name: value` line.
pub fn put_line(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    buf.put_slice(name);
    buf.put_slice(b": ");
    buf.put_slice(value);
    buf.put_slice(b"\r\n");
}

/// Appends a `Content-Length` line.
pub fn put_length(buf: &mut BytesMut, n: u64) {
    put_line(
        buf,
        b"content-length",
        itoa::Buffer::new().format(n).as_bytes(),
    );
}

/// The length a `Content-Length` value gives, with `seen`, the length of the message's lines
/// before it: lines and comma-separated lists alike must all give the same number. `None`
/// when they do not, or when a value is no number: the message cannot be delimited.
pub fn content_length(value: &[u8], seen: Option<u64>) -> Option<u64> {
    let mut length = seen;
    for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = std::str::from_utf8(part).ok()?.parse().ok()?;
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// Whether a header's name, as sent, is `known`, given in lower case.
pub fn name_is(name: &[u8], known: &[u8]) -> bool {
    // The lengths differ for most pairs, and comparing them first is cheapest.
    name.len() == known.len() && name.eq_ignore_ascii_case(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_length_is_one_number_however_often_it_is_given() {
        assert_eq!(content_length(b"5", None), Some(5));
        assert_eq!(content_length(b"5, 5 ,5", None), Some(5));
        assert_eq!(content_length(b"5", Some(5)), Some(5));
        for bad in [&b"5, 6"[..], b"", b"5,", b"-5", b"+5", b"0x5", b"5 5"] {
            assert_eq!(content_length(bad, None), None, "{bad:?}");
        }
        assert_eq!(content_length(b"5", Some(6)), None);
        assert_eq!(content_length(b"99999999999999999999", None), None);
    }

    #[test]
    fn a_small_head_leaves_its_room_and_a_large_one_takes_it() {
        let mut room = BytesMut::with_capacity(KEPT_ROOM);
        room.put_slice(b"GET / HTTP/1.1\r\n\r\n");
        let small = split_head(&mut room);
        assert_eq!(&small[..], b"GET / HTTP/1.1\r\n\r\n");
        assert!(
            room.capacity() > 0,
            "the rest of the room stays for the next head"
        );
        drop(small);
        room.put_slice(&vec![b'x'; 16 * KEPT_ROOM]);
        let large = split_head(&mut room);
        assert_eq!(large.len(), 16 * KEPT_ROOM);
        drop(large);
        // Kept, the large room would be whole again for the next head.
        room.reserve(16);
        assert!(
            room.capacity() < KEPT_ROOM,
            "a large head's room goes with it"
        );
    }
}
