//! An upstream's response as it comes off the wire: the head, how its body is delimited
//! (RFC 9112 §6.3), and the chunked coding. Bytes in, parts out; the connection reads.

use bytes::{Buf, BytesMut};
use http::{Response, StatusCode, Version};

use crate::hop::Hop;
use crate::wire::fields::{self, Fields};
use crate::wire::name_is as is;

/// Most header lines a response head may carry: hyper's default limit, which kaguard's
/// upstreams met before it read responses itself. More is refused, never truncated.
const MAX_HEADERS: usize = 100;
// A head's hop-by-hop lines are marked in one bit each of a `u128`.
const _: () = assert!(MAX_HEADERS <= 128);

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
    /// Status and version; the header lines are in the body's place, as [`Fields`].
    pub(super) response: Response<Fields>,
    pub(super) hop: Hop,
    pub(super) framing: Framing,
    /// The connection cannot carry another exchange after this one, whatever the headers
    /// say about keep-alive: the body ends with the close, or its framing was ambiguous.
    pub(super) last: bool,
}

/// Parses a response head off the front of `buf`, skipping interim (1xx) responses. `None`
/// until a whole head is there. The head's bytes leave `buf`; its body's bytes stay.
///
/// `spans` is room for the parser's findings, and `room` for the lines forwarded, both kept
/// by the caller so that they are allocated once per connection, not once per response.
pub(super) fn head(
    buf: &mut BytesMut,
    head_request: bool,
    spans: &mut Vec<Spans>,
    room: &mut BytesMut,
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
        let line = |&(name, value): &Spans| (&buf[name.0..name.1], &buf[value.0..value.1]);
        let mut lines = Lines::default();
        let mut hop = Hop::default();
        // Bit i: line i is hop-by-hop.
        let mut hop_lines: u128 = 0;
        for (i, (name, value)) in spans.iter().map(line).enumerate() {
            lines.note(name, value)?;
            if hop.note(name, value) {
                hop_lines |= 1 << i;
            }
        }
        let (framing, last) = lines.framing(code, head_request);
        // RFC 9112 §6.3: a proxy forwarding a message with both removes its Content-Length,
        // which the body's real length need not match.
        let length = match lines.chunked {
            Some(_) => None,
            None => lines.length,
        };
        let mut fields = fields::Builder::new(room);
        let mut date = false;
        fields.push_kept(buf, spans, |i, name| {
            // Listed names are looked for once every line is read: they may come before
            // the `Connection` line that lists them.
            // Content-Length is the client's head's to write, from the length noted: once,
            // where the upstream may have sent a list or repeated lines.
            let forwarded =
                hop_lines & (1 << i) == 0 && !is(name, CONTENT_LENGTH) && !hop.lists(name);
            date |= forwarded && is(name, DATE);
            forwarded
        });
        if date {
            fields.date();
        }
        // Even a `Content-Length` that `Connection` lists, and that is not forwarded, is the
        // length of the body the client gets, which its head must give.
        if let Some(n) = length {
            fields.content_length(n);
        }
        let fields = fields.finish();
        buf.advance(len);
        let status = StatusCode::from_u16(code).map_err(|_| Invalid)?;
        let mut response = Response::new(fields);
        *response.status_mut() = status;
        *response.version_mut() = version;
        return Ok(Some(Head {
            response,
            hop,
            framing,
            last,
        }));
    }
}

const CONTENT_LENGTH: &[u8] = b"content-length";
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding";
const DATE: &[u8] = b"date";

pub(super) use crate::wire::fields::Spans;

/// Header slots tried first: a response rarely carries more, and filling the slots is a
/// cost of every parse.
const FEW_HEADERS: usize = 24;

/// Where each part of a complete head lies in `buf`: the head's length, the status code,
/// the version, and in `spans` each header's name and value. Positions, not slices: the
/// parser's slots, which borrow `buf`, are this call's, and `spans` is the caller's.
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

/// The framing lines of a head, noted as its lines are read so that framing costs no second
/// look: the Content-Length all its values agree on, and, when Transfer-Encoding is there,
/// whether its final coding is chunked.
#[derive(Default)]
struct Lines {
    length: Option<u64>,
    chunked: Option<bool>,
}

impl Lines {
    fn note(&mut self, name: &[u8], value: &[u8]) -> Result<(), Invalid> {
        if is(name, CONTENT_LENGTH) {
            // A response that disagrees with itself is refused.
            self.length = Some(crate::wire::content_length(value, self.length).ok_or(Invalid)?);
        } else if is(name, TRANSFER_ENCODING) {
            // The last line's last coding is the final one.
            let last = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.rsplit(',').next());
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
