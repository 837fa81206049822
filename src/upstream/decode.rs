//! An upstream's response as it comes off the wire: the head, how its body is delimited
//! (RFC 9112 §6.3), and the chunked coding. Bytes in, parts out; the connection reads.

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};

use crate::hop::Hop;

/// Most header lines a response head may carry: hyper's default limit, which kaguard's
/// upstreams met before it read responses itself. More is refused, never truncated.
const MAX_HEADERS: usize = 100;

/// Largest response head kept waiting for its end. nginx refuses heads past its 4 or 8 KiB
/// `proxy_buffer_size` ("upstream sent too big header"); 64 KiB lets through the large
/// cookie sets real applications send while bounding what a broken upstream makes us hold.
const MAX_HEAD: usize = 64 * 1024;

pub(super) use crate::wire::chunked::{Chunked, Invalid, Step};

/// How a response body ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    /// After this many bytes; zero for a response that has no body.
    Length(u64),
    Chunked(Chunked),
    /// When the upstream closes the connection.
    UntilClose,
}

/// A final response head, with what it says about its body and its connection.
#[derive(Debug)]
pub(super) struct Head {
    /// Without its hop-by-hop lines: what they said is in `hop`.
    pub(super) response: Response<()>,
    pub(super) hop: Hop,
    pub(super) framing: Framing,
    /// The connection cannot carry another exchange after this one, whatever the headers
    /// say about keep-alive: the body ends with the close, or its framing was ambiguous.
    pub(super) last: bool,
}

/// Parses a response head off the front of `buf`, skipping interim (1xx) responses. `None`
/// until a whole head is there. The head's bytes leave `buf`; its body's bytes stay.
///
/// `spans` is room for the parser's findings, kept by the caller so that it is allocated
/// once per connection, not once per response.
pub(super) fn head(
    buf: &mut BytesMut,
    head_request: bool,
    spans: &mut Vec<Spans>,
) -> Result<Option<Head>, Invalid> {
    loop {
        let Some((len, code, version)) = parse(buf, spans)? else {
            return Ok(None);
        };
        // 1xx other than 101 are interim: the final response follows on the same bytes.
        if (100..200).contains(&code) && code != 101 {
            buf.advance(len);
            continue;
        }
        let bytes = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        let mut lines = Lines::default();
        let mut hop = Hop::default();
        for &(name, value) in spans.iter() {
            let (name, maybe_hop) = header_name(&bytes[name.0..name.1])?;
            let value = HeaderValue::from_maybe_shared(bytes.slice(value.0..value.1))
                .map_err(|_| Invalid)?;
            lines.note(&name, &value)?;
            if !(maybe_hop && hop.note(&name, &value)) {
                headers.append(name, value);
            }
        }
        for name in &hop.listed {
            headers.remove(name);
        }
        let status = StatusCode::from_u16(code).map_err(|_| Invalid)?;
        let (framing, last) = lines.framing(code, head_request);
        if lines.chunked.is_some() && lines.length.is_some() {
            // RFC 9112 §6.3: a proxy forwarding such a message removes its Content-Length,
            // which the body's real length need not match.
            headers.remove(header::CONTENT_LENGTH);
        }
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        return Ok(Some(Head {
            response,
            hop,
            framing,
            last,
        }));
    }
}

/// Where a header's name and value lie in the buffer.
pub(super) type Spans = ((usize, usize), (usize, usize));

/// Header slots tried first: a response rarely carries more, and filling the slots is a
/// cost of every parse.
const FEW_HEADERS: usize = 24;

/// Where each part of a complete head lies in `buf`: the head's length, the status code,
/// the version, and in `spans` each header's name and value. Positions, not slices, so that
/// the head can be split off and its values shared with the header map without a copy.
fn parse(buf: &BytesMut, spans: &mut Vec<Spans>) -> Result<Option<(usize, u16, Version)>, Invalid> {
    let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
    match parse_with(buf, &mut few, spans) {
        Err(httparse::Error::TooManyHeaders) => {
            let mut all = [httparse::EMPTY_HEADER; MAX_HEADERS];
            parse_with(buf, &mut all, spans)
        }
        parsed => parsed,
    }
    .map_err(|_| Invalid)?
    .map_or(Ok(None), |(len, code, version)| {
        Ok(Some((len, code.ok_or(Invalid)?, version.ok_or(Invalid)?)))
    })
}

#[allow(clippy::type_complexity)]
fn parse_with<'b>(
    buf: &'b BytesMut,
    slots: &mut [httparse::Header<'b>],
    spans: &mut Vec<Spans>,
) -> Result<Option<(usize, Option<u16>, Option<Version>)>, httparse::Error> {
    let mut resp = httparse::Response::new(slots);
    let len = match resp.parse(buf)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() > MAX_HEAD => {
            return Err(httparse::Error::TooManyHeaders);
        }
        httparse::Status::Partial => return Ok(None),
    };
    let version = match resp.version {
        Some(1) => Some(Version::HTTP_11),
        Some(0) => Some(Version::HTTP_10),
        _ => None,
    };
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    spans.clear();
    spans.extend(
        resp.headers
            .iter()
            .map(|h| (at(h.name.as_bytes()), at(h.value))),
    );
    Ok(Some((len, resp.code, version)))
}

/// A header's name, and false when it is surely not hop-by-hop. The names most servers send
/// on every response, in the case they send them, are matched as they are: the general
/// parse lower-cases each name into a scratch buffer before it looks it up, which cost a
/// quarter of reading a short head, and a name of unknown kind is compared with each
/// hop-by-hop one.
fn header_name(raw: &[u8]) -> Result<(HeaderName, bool), Invalid> {
    Ok(match raw {
        b"Date" => (header::DATE, false),
        b"Server" => (header::SERVER, false),
        b"Content-Type" => (header::CONTENT_TYPE, false),
        b"Content-Length" => (header::CONTENT_LENGTH, false),
        b"Connection" => (header::CONNECTION, true),
        b"Transfer-Encoding" => (header::TRANSFER_ENCODING, true),
        // Node sends it on every response.
        b"Keep-Alive" => (crate::hop::KEEP_ALIVE_NAME, true),
        _ => (HeaderName::from_bytes(raw).map_err(|_| Invalid)?, true),
    })
}

/// The framing lines of a head, noted as the header map is built so that framing costs no
/// lookup: the Content-Length all its values agree on, and, when Transfer-Encoding is there,
/// whether its final coding is chunked.
#[derive(Default)]
struct Lines {
    length: Option<u64>,
    chunked: Option<bool>,
}

impl Lines {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) -> Result<(), Invalid> {
        if name == header::CONTENT_LENGTH {
            // Lines and comma-separated lists alike must all be the same number; a response
            // that disagrees with itself is refused.
            let text = value.to_str().map_err(|_| Invalid)?;
            for part in text.split(',').map(str::trim) {
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Invalid);
                }
                let n: u64 = part.parse().map_err(|_| Invalid)?;
                if self.length.is_some_and(|l| l != n) {
                    return Err(Invalid);
                }
                self.length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            // The last line's last coding is the final one.
            let last = value.to_str().ok().and_then(|v| v.rsplit(',').next());
            self.chunked = Some(last.is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked")));
        }
        Ok(())
    }

    /// RFC 9112 §6.3, in its order.
    fn framing(&self, code: u16, head_request: bool) -> (Framing, bool) {
        if head_request || code == 204 || code == 304 || (100..200).contains(&code) {
            // A 101 hands the connection to another protocol; kaguard relays none.
            return (Framing::Length(0), code == 101);
        }
        match (self.chunked, self.length) {
            // Transfer-Encoding overrides Content-Length; a message carrying both may be an
            // attempt at smuggling, so its connection carries nothing more.
            (Some(true), length) => (Framing::Chunked(Chunked::Size), length.is_some()),
            (Some(false), _) | (None, None) => (Framing::UntilClose, true),
            (None, Some(n)) => (Framing::Length(n), false),
        }
    }
}

#[cfg(test)]
mod tests;
