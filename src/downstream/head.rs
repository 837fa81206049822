//! A client's request head as it comes off the wire: the request line, the header lines, and
//! how the body is delimited (RFC 9112 §6.3).

use bytes::{Bytes, BytesMut};
use http::{HeaderName, Method, Request, Uri, Version};

use super::lines::{self, Lines};
use crate::wire::chunked::Chunked;

/// Most header lines a request head may carry: as many as hyper's server allowed, which
/// read them before kaguard did.
const MAX_HEADERS: usize = 100;
// A head's lines are marked in one bit each of a `u128` ([`lines::read`]).
const _: () = assert!(MAX_HEADERS <= 128);

/// Header slots tried first: a request rarely carries more, and filling the slots is a cost
/// of every parse.
const FEW_HEADERS: usize = 24;

/// Why a head was refused; each is answered before the connection closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// 400: not HTTP/1, or framed in a way kaguard does not forward.
    Invalid(&'static str),
    /// 431: longer than `max_header_size`, or too many lines.
    TooLarge,
    /// 501: a transfer coding besides chunked, which kaguard would have to pass on undecoded
    /// where it takes the chunked coding off and puts it back (nginx answers 501 too); and
    /// CONNECT.
    Unsupported(&'static str),
}

/// How a request body ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    Length(u64),
    Chunked(Chunked),
}

/// A complete request head.
#[derive(Debug)]
pub(super) struct Head {
    /// The request line; the header map stays empty, the lines being in `lines`.
    pub(super) request: Request<()>,
    pub(super) lines: Lines,
    pub(super) framing: Framing,
    /// Both Content-Length and Transfer-Encoding: the service refuses it, and logs why.
    pub(super) conflict: bool,
    /// The client waits for a 100 (Continue) before it sends the body.
    pub(super) expects_continue: bool,
    /// The names `Connection` listed, which the body's trailers lose too.
    pub(super) listed: Vec<HeaderName>,
}

pub(super) use crate::wire::fields::Spans;

/// The request line's parts, as positions in the buffer.
struct Line {
    len: usize,
    method: (usize, usize),
    target: (usize, usize),
    version: Version,
}

/// Parses a request head off the front of `buf`. `None` until a whole head is there; its
/// bytes then leave `buf`. The lines it forwards are written into `room`, kept by the caller
/// from one head to the next, as `spans` is.
pub(super) fn parse(
    buf: &mut BytesMut,
    limit: usize,
    spans: &mut Vec<Spans>,
    room: &mut BytesMut,
) -> Result<Option<Head>, Refused> {
    let Some(line) = locate(buf, limit, spans)? else {
        return Ok(None);
    };
    let bytes = buf.split_to(line.len).freeze();
    let method = Method::from_bytes(&bytes[line.method.0..line.method.1])
        .map_err(|_| Refused::Invalid("invalid method"))?;
    let uri = Uri::from_maybe_shared(bytes.slice(line.target.0..line.target.1))
        .map_err(|_| Refused::Invalid("invalid request target"))?;
    // A CONNECT answered 2xx turns the connection into a tunnel, which kaguard does not
    // carry: the upstream's bytes after it would be read as responses, and the client's as
    // requests. The authority form (`host:port`) is CONNECT's alone (RFC 9112 §3.2.3).
    if method == Method::CONNECT {
        return Err(Refused::Unsupported("CONNECT"));
    }
    if uri.scheme().is_none() && uri.authority().is_some() {
        return Err(Refused::Invalid("authority-form target outside CONNECT"));
    }
    let absolute = uri.authority().is_some();
    let (lines, noted) = lines::read(&bytes, spans, line.version, absolute, room)?;
    let (length, chunked) = (noted.length, noted.chunked);
    let framing = match chunked {
        // RFC 9112 §6.1: an HTTP/1.0 message with a transfer coding has faulty framing.
        Some(_) if line.version == Version::HTTP_10 => {
            return Err(Refused::Invalid("transfer coding in HTTP/1.0"));
        }
        Some(true) if noted.codings > 1 => {
            return Err(Refused::Unsupported("transfer coding other than chunked"));
        }
        Some(true) => Framing::Chunked(Chunked::Size),
        // RFC 9112 §6.3: a request whose final coding is not chunked cannot be delimited.
        Some(false) => return Err(Refused::Invalid("transfer coding other than chunked")),
        None => Framing::Length(length.unwrap_or(0)),
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = line.version;
    Ok(Some(Head {
        request,
        lines,
        framing,
        conflict: chunked.is_some() && length.is_some(),
        expects_continue: noted.expects_continue && line.version == Version::HTTP_11,
        listed: noted.listed,
    }))
}

/// Where the parts of a complete head lie in `buf`.
fn locate(buf: &BytesMut, limit: usize, spans: &mut Vec<Spans>) -> Result<Option<Line>, Refused> {
    let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
    match locate_with(buf, limit, &mut few, spans) {
        Err(None) => {
            let mut all = [httparse::EMPTY_HEADER; MAX_HEADERS];
            locate_with(buf, limit, &mut all, spans).map_err(|e| e.unwrap_or(Refused::TooLarge))
        }
        located => located.map_err(|e| e.expect("only too many headers is unnamed")),
    }
}

/// As [`locate`], with `slots` for the header lines; `Err(None)` when they are too few.
fn locate_with<'b>(
    buf: &'b BytesMut,
    limit: usize,
    slots: &mut [httparse::Header<'b>],
    spans: &mut Vec<Spans>,
) -> Result<Option<Line>, Option<Refused>> {
    let mut req = httparse::Request::new(slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= limit => len,
        Err(httparse::Error::TooManyHeaders) => return Err(None),
        Ok(httparse::Status::Complete(_)) => return Err(Some(Refused::TooLarge)),
        Ok(httparse::Status::Partial) if buf.len() > limit => return Err(Some(Refused::TooLarge)),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Some(Refused::Invalid("invalid request head"))),
    };
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(Some(Refused::Invalid("unsupported version"))),
    };
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(Some(Refused::Invalid("invalid request line")));
    };
    spans.clear();
    spans.extend(
        req.headers
            .iter()
            .map(|h| (at(h.name.as_bytes()), at(h.value))),
    );
    Ok(Some(Line {
        len,
        method: at(method.as_bytes()),
        target: at(target.as_bytes()),
        version,
    }))
}

/// The head of a refusal, which closes the connection.
pub(super) fn refusal(refused: Refused) -> Bytes {
    Bytes::from_static(match refused {
        Refused::Invalid(_) => {
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        }
        Refused::TooLarge => {
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        }
        Refused::Unsupported(_) => {
            b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        }
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the lines and however the bytes arrive, a head is found only whole, at
        /// its end, with every line, and what follows it stays in the buffer.
        #[test]
        fn a_head_is_found_whole_and_only_whole(
            lines in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,12}", "[ -~]{0,20}"), 0..30),
            tail in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut raw = b"GET /p HTTP/1.1\r\nHost: h\r\n".to_vec();
            for (name, value) in &lines {
                raw.extend_from_slice(format!("{name}: {}\r\n", value.trim()).as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            let head_len = raw.len();
            raw.extend_from_slice(&tail);
            for cut in 0..head_len {
                let mut buf = BytesMut::from(&raw[..cut]);
                prop_assert!(parse(&mut buf, 64 * 1024, &mut Vec::new(), &mut BytesMut::new()).unwrap().is_none());
                prop_assert_eq!(buf.len(), cut);
            }
            let mut buf = BytesMut::from(&raw[..]);
            let parsed = parse(&mut buf, 64 * 1024, &mut Vec::new(), &mut BytesMut::new());
            // Lines kaguard acts on may be left out, or refuse the head.
            prop_assume!(lines.iter().all(|(n, _)| crate::hop::position(n.as_bytes()).is_none()
                && super::lines::name(n.as_bytes()).is_none()));
            let head = parsed.unwrap().unwrap();
            prop_assert_eq!(head.lines.fields.iter().count(), lines.len() + 1);
            prop_assert_eq!(&buf[..], &tail[..]);
        }
    }

    fn parsed(raw: &[u8]) -> Result<Option<Head>, Refused> {
        let mut buf = BytesMut::from(raw);
        parse(&mut buf, 8192, &mut Vec::new(), &mut BytesMut::new())
    }

    #[test]
    fn a_head_is_parsed_and_leaves_the_buffer() {
        let mut buf = BytesMut::from(&b"GET /a?b HTTP/1.1\r\nHost: h\r\nX-Y: z\r\n\r\nNEXT"[..]);
        let head = parse(&mut buf, 8192, &mut Vec::new(), &mut BytesMut::new())
            .unwrap()
            .unwrap();
        assert_eq!(head.request.method(), Method::GET);
        assert_eq!(head.request.uri(), "/a?b");
        let lines: Vec<_> = head.lines.fields.iter().collect();
        assert_eq!(lines, [(&b"Host"[..], &b"h"[..]), (b"X-Y", b"z")]);
        assert_eq!(head.framing, Framing::Length(0));
        assert_eq!(&buf[..], b"NEXT");
    }

    fn assert_invalid(raw: &[u8]) {
        assert!(
            matches!(parsed(raw), Err(Refused::Invalid(_))),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }

    #[test]
    fn a_request_needs_one_host_line_and_http10_none() {
        assert!(parsed(b"GET / HTTP/1.0\r\n\r\n").unwrap().is_some());
        for refused in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET http://h/ HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        ] {
            assert_invalid(refused);
        }
    }

    #[test]
    fn a_partial_head_waits() {
        assert!(parsed(b"GET / HTTP/1.1\r\nHost: h\r\n").unwrap().is_none());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        for chunked in [
            &b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: ,\r\nTransfer-Encoding:  chunked \r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n",
        ] {
            let head = parsed(chunked).unwrap().unwrap();
            assert_eq!(head.framing, Framing::Chunked(Chunked::Size));
        }
        // Codings kaguard would take off and not put back, as nginx refuses them.
        for other in [
            &b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        ] {
            assert!(matches!(parsed(other), Err(Refused::Unsupported(_))));
        }
        let length = parsed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n");
        assert_eq!(length.unwrap().unwrap().framing, Framing::Length(5));
        for refused in [
            &b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \r\n\r\n",
        ] {
            assert_invalid(refused);
        }
        let both =
            parsed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(both.unwrap().unwrap().conflict);
    }

    #[test]
    fn expect_continue_counts_only_in_http11() {
        let h11 = parsed(
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n",
        );
        assert!(h11.unwrap().unwrap().expects_continue);
        let h10 = parsed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
        assert!(!h10.unwrap().unwrap().expects_continue);
    }

    #[test]
    fn many_headers_are_read_whatever_follows_the_head() {
        let mut raw = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 40000\r\n".to_vec();
        for i in 0..30 {
            raw.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        raw.extend(std::iter::repeat_n(b'b', 40_000));
        let mut buf = BytesMut::from(&raw[..]);
        let head = parse(&mut buf, 32 * 1024, &mut Vec::new(), &mut BytesMut::new())
            .unwrap()
            .unwrap();
        assert_eq!(head.lines.fields.iter().count(), 31);
        assert_eq!(head.lines.fields.content_length(), Some(40_000));
        assert_eq!(buf.len(), 40_000);
    }

    #[test]
    fn a_transfer_coding_in_http10_is_refused() {
        let head = parsed(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(head, Err(Refused::Invalid(_))));
    }

    #[test]
    fn a_head_past_the_limit_is_too_large() {
        let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\nX: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 9000));
        assert_eq!(parsed(&raw).unwrap_err(), Refused::TooLarge);
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parsed(&raw).unwrap_err(), Refused::TooLarge);
    }
}
