//! The chunked transfer coding (RFC 9112 §7.1) as it comes off the wire, the same from a
//! client and from an upstream: bytes in, data and trailers out.

use std::fmt::Write as _;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Longest chunk-size line (size and extensions) kept waiting for its end.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Most trailer lines after a chunked body; trailers are rare and small.
const MAX_TRAILERS: usize = 32;

/// Largest trailer section kept waiting for its end: as large as a head may be.
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// The peer sent bytes that are not HTTP/1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalid;

/// Where a chunked body's reader stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunked {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

/// What one step of the chunked reader found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    NeedMore,
    End,
}

impl Chunked {
    /// Reads the next piece of the body off the front of `buf`. `listed`: the names the
    /// head's `Connection` line listed, which no trailer section passes on either.
    pub fn step(&mut self, buf: &mut BytesMut, listed: &[HeaderName]) -> Result<Step, Invalid> {
        loop {
            match *self {
                // httparse reads a size line without digits as 0, the last chunk; a size
                // the upstream did not send must not end the body.
                Chunked::Size if buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) => {
                    return Err(Invalid);
                }
                Chunked::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((len, size))) => {
                        buf.advance(len);
                        *self = if size == 0 {
                            Chunked::Trailers
                        } else {
                            Chunked::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                        return Err(Invalid);
                    }
                    Ok(httparse::Status::Partial) => return Ok(Step::NeedMore),
                    Err(_) => return Err(Invalid),
                },
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = left.min(buf.len() as u64);
                    *self = if n == left {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left - n)
                    };
                    return Ok(Step::Data(buf.split_to(n as usize).freeze()));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Invalid);
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers => return self.trailers(buf, listed),
                Chunked::Done => return Ok(Step::End),
            }
        }
    }

    fn trailers(&mut self, buf: &mut BytesMut, listed: &[HeaderName]) -> Result<Step, Invalid> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_TRAILERS];
        let (len, lines) = match httparse::parse_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete(done)) => done,
            Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILER_BYTES => return Err(Invalid),
            Ok(httparse::Status::Partial) => return Ok(Step::NeedMore),
            Err(_) => return Err(Invalid),
        };
        let mut trailers = HeaderMap::with_capacity(lines.len());
        for line in lines
            .iter()
            .filter(|l| passed_on(l.name.as_bytes(), listed))
        {
            let name = HeaderName::from_bytes(line.name.as_bytes()).map_err(|_| Invalid)?;
            let value = HeaderValue::from_bytes(line.value).map_err(|_| Invalid)?;
            trailers.append(name, value);
        }
        buf.advance(len);
        *self = Chunked::Done;
        Ok(if trailers.is_empty() {
            Step::End
        } else {
            Step::Trailers(trailers)
        })
    }
}

/// Whether a trailer line goes on to the next hop. Framing, hop-by-hop and routing fields
/// mean nothing after the body (RFC 9110 §6.5.1), and a recipient that merges trailers into
/// the header section, as some servers do, would act on them: a client could frame or route
/// a request past what kaguard checked, or speak for kaguard in the lines it writes itself
/// (`X-Forwarded-*`, `X-Request-Id`). Such lines are dropped, as nginx drops every request
/// trailer. So are the names the head's `Connection` listed: an intermediary removes them
/// from the header and the trailer section alike (RFC 9110 §7.6.1).
fn passed_on(name: &[u8], listed: &[HeaderName]) -> bool {
    crate::hop::position(name).is_none()
        && !NOT_TRAILERS.iter().any(|n| super::name_is(name, n))
        && !crate::hop::is_listed(listed, name)
}

/// The names besides the hop-by-hop ones that no trailer section passes on.
const NOT_TRAILERS: [&[u8]; 6] = [
    b"content-length",
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
];

/// The size line that goes before a chunk of `len` bytes.
pub fn chunk_size(len: usize) -> Bytes {
    let mut size = BytesMut::with_capacity(18);
    let _ = write!(size, "{len:x}\r\n");
    size.freeze()
}

/// The last chunk and the trailer section.
pub fn end_chunks(trailers: Option<&HeaderMap>) -> Bytes {
    let Some(trailers) = trailers else {
        return Bytes::from_static(b"0\r\n\r\n");
    };
    let mut end = BytesMut::with_capacity(64);
    end.put_slice(b"0\r\n");
    super::put_lines(&mut end, trailers.iter());
    end.put_slice(b"\r\n");
    end.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailers_of(section: &[u8], listed: &[HeaderName]) -> Step {
        let mut chunked = Chunked::Trailers;
        let mut buf = BytesMut::from(section);
        let step = chunked.step(&mut buf, listed).expect("valid");
        assert!(buf.is_empty(), "the whole section is read");
        step
    }

    #[test]
    fn framing_hop_by_hop_and_routing_lines_are_not_passed_on_as_trailers() {
        let section = b"X-Sum: 6\r\nContent-Length: 5\r\nTransfer-Encoding: gzip\r\n\
            Connection: x-sum\r\nHost: elsewhere\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\n\
            x-forwarded-host: admin\r\nX-Forwarded-Proto: https\r\nX-Request-Id: b\r\n\
            X-Check: a\r\n\r\n";
        let Step::Trailers(kept) = trailers_of(section, &[]) else {
            panic!("expected trailers")
        };
        let names: Vec<&str> = kept.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-sum", "x-check"]);
    }

    #[test]
    fn names_the_heads_connection_line_listed_are_not_passed_on_as_trailers() {
        let listed = [HeaderName::from_static("x-secret")];
        let section = b"X-Sum: 6\r\nX-SECRET: a\r\nx-secret: b\r\n\r\n";
        let Step::Trailers(kept) = trailers_of(section, &listed) else {
            panic!("expected trailers")
        };
        let names: Vec<&str> = kept.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-sum"]);
    }

    #[test]
    fn a_section_of_dropped_lines_only_ends_the_body() {
        let step = trailers_of(b"Content-Length: 5\r\nkeep-alive: timeout=5\r\n\r\n", &[]);
        assert_eq!(step, Step::End);
    }
}
