//! HTTP/1 on the wire, what the client side and the upstream side share: the chunked coding,
//! header lines, and a queue of buffers going out on a socket, written so that a head and its
//! body, or a chunk and its framing, leave in one system call.

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

/// Most bytes of several buffers copied together for one plain write. A response head with
/// a small body, or a chunk and its framing, fits; copying 2 KiB costs far less than the
/// vectored write it saves (see [`poll_write_queue`]).
const GATHERED: usize = 2 * 1024;

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

/// Writes what one write takes from the front of `out`, and drops it from the queue. A write
/// that takes nothing is an error: the socket can take no more.
///
/// One buffer goes out with a plain write (`send`), as do several that together fit in
/// [`GATHERED`]: they are copied together first. Only larger ones take a vectored write
/// (`writev`), which costs the kernel more per call than `send` does: the file layer and
/// the copy of the vector itself (0.4 to 0.6 µs of 5.5 per write on loopback, measured
/// with a C loop), far more than copying a small head and body together.
pub fn poll_write_queue<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &mut VecDeque<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let written = match out.len() {
        0 => Poll::Ready(Ok(0)),
        1 => Pin::new(w).poll_write(cx, &out[0]),
        _ => match poll_write_gathered(w, out, cx) {
            Some(written) => written,
            None => {
                let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
                let count = slices.len().min(out.len());
                for (slot, bytes) in slices.iter_mut().zip(out.iter()) {
                    *slot = IoSlice::new(bytes);
                }
                Pin::new(w).poll_write_vectored(cx, &slices[..count])
            }
        },
    };
    let n = match std::task::ready!(written) {
        Ok(0) if !out.is_empty() => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
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

thread_local! {
    /// Where [`poll_write_queue`] copies buffers together: one per thread, kept, so that
    /// gathering neither allocates nor zeroes room.
    static GATHER: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(GATHERED));
}

/// Writes the queue's buffers copied together, when they fit in [`GATHERED`] bytes.
fn poll_write_gathered<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &VecDeque<Bytes>,
    cx: &mut Context<'_>,
) -> Option<Poll<io::Result<usize>>> {
    let mut len = 0;
    for part in out {
        len += part.len();
        if len > GATHERED {
            return None;
        }
    }
    GATHER.with(|gathered| {
        // A writer that wrote a queue of its own from inside its write would find the room
        // taken: its queue then takes the vectored write.
        let mut gathered = gathered.try_borrow_mut().ok()?;
        gathered.clear();
        for part in out {
            gathered.extend_from_slice(part);
        }
        Some(Pin::new(w).poll_write(cx, &gathered))
    })
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

/// An authority's host and port, without the user information some targets carry
/// (`user:pass@host:80`): what follows the last `@`, which user information holds only
/// percent-encoded (RFC 3986 §3.2.1).
pub fn host_port(authority: &http::uri::Authority) -> &str {
    authority.as_str().rsplit('@').next().unwrap_or_default()
}

/// Whether a header's name, as sent, is `known`, one of the names kaguard knows, given in lower
/// case: letters, digits and '-' only.
///
/// Every name is a token (the parser refuses others), and setting bit 5 of a token byte makes
/// it such a byte only if it is that byte in either case. One OR per byte then does what
/// `eq_ignore_ascii_case`'s table lookups on both sides do, with no branch per byte: each line
/// of each message is compared with a few known names.
pub fn name_is(name: &[u8], known: &[u8]) -> bool {
    debug_assert!(known.iter().copied().all(known_byte), "{known:?}");
    // The lengths differ for most pairs, and comparing them first is cheapest.
    name.len() == known.len()
        && name
            .iter()
            .zip(known)
            .fold(0, |diff, (&b, &k)| diff | ((b | 0x20) ^ k))
            == 0
}

/// A byte [`name_is`] takes in a known name.
fn known_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
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

    /// The bytes of a token (RFC 9110 §5.6.2).
    fn token_byte(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
    }

    #[test]
    fn a_name_is_a_known_name_exactly_when_they_are_equal_in_any_case() {
        for k in (0..=u8::MAX).filter(|&k| known_byte(k)) {
            for b in (0..=u8::MAX).filter(|&b| token_byte(b)) {
                assert_eq!(
                    name_is(&[b], &[k]),
                    b.eq_ignore_ascii_case(&k),
                    "{:?} against {:?}",
                    b as char,
                    k as char
                );
            }
        }
        assert!(name_is(b"Content-Length", b"content-length"));
        assert!(name_is(b"X-REQUEST-ID", b"x-request-id"));
        assert!(!name_is(b"Content-Lengtx", b"content-length"));
        assert!(!name_is(b"host", b"hosts"));
    }

    /// A socket that records each write it is given, and takes at most `take` bytes of it.
    struct Recorder {
        take: usize,
        plain: Vec<Vec<u8>>,
        vectored: Vec<Vec<u8>>,
    }

    impl Recorder {
        fn taking(take: usize) -> Recorder {
            Recorder {
                take,
                plain: vec![],
                vectored: vec![],
            }
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.take);
            self.plain.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            all.truncate(self.take);
            let n = all.len();
            self.vectored.push(all);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write_once<W: AsyncWrite + Unpin>(
        w: &mut W,
        out: &mut VecDeque<Bytes>,
    ) -> io::Result<usize> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match poll_write_queue(w, out, &mut cx) {
            Poll::Ready(res) => res,
            Poll::Pending => panic!("the recorder never waits"),
        }
    }

    #[test]
    fn a_head_and_a_small_body_leave_in_one_plain_write() {
        let mut w = Recorder::taking(usize::MAX);
        let head = Bytes::from_static(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n");
        let mut out = VecDeque::from([head.clone(), Bytes::from_static(b"ok")]);
        assert_eq!(write_once(&mut w, &mut out).unwrap(), head.len() + 2);
        assert!(out.is_empty());
        assert_eq!(w.plain, [[&head[..], b"ok"].concat()]);
        assert!(w.vectored.is_empty(), "no vectored write for a small queue");
    }

    #[test]
    fn a_large_queue_takes_a_vectored_write_and_keeps_what_it_did_not_take() {
        let mut w = Recorder::taking(100);
        let body = Bytes::from(vec![b'x'; GATHERED]);
        let mut out = VecDeque::from([Bytes::from_static(b"head"), body]);
        assert_eq!(write_once(&mut w, &mut out).unwrap(), 100);
        assert!(w.plain.is_empty());
        assert_eq!(w.vectored.len(), 1);
        assert_eq!(out.len(), 1, "the head was written whole");
        assert_eq!(out[0].len(), GATHERED - 96);
        // What is left is one buffer: a plain write.
        w.take = usize::MAX;
        assert_eq!(write_once(&mut w, &mut out).unwrap(), GATHERED - 96);
        assert!(out.is_empty());
        assert_eq!(w.plain.len(), 1);
    }

    /// A socket whose write writes a queue of its own on another socket first.
    struct Nested(Recorder);

    impl AsyncWrite for Nested {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut inner = VecDeque::from([Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
            write_once(&mut self.0, &mut inner).expect("the inner queue is written");
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_queue_written_from_inside_a_gathered_write_takes_the_vectored_write() {
        let mut w = Nested(Recorder::taking(usize::MAX));
        let mut out = VecDeque::from([Bytes::from_static(b"head"), Bytes::from_static(b"ok")]);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let written = poll_write_queue(&mut w, &mut out, &mut cx);
        assert!(matches!(written, Poll::Ready(Ok(6))));
        assert_eq!(w.0.vectored, [b"ab".to_vec()]);
    }

    #[test]
    fn a_socket_that_takes_nothing_is_an_error() {
        let mut w = Recorder::taking(0);
        let mut out = VecDeque::from([Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        let err = write_once(&mut w, &mut out).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
        assert_eq!(out.len(), 2);
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
