//! A client's request header lines, read once as its head is parsed: the end-to-end ones go
//! upstream as the client wrote them, and the few kaguard acts on are noted on the way. No
//! header map is built, and none is searched: building one cost about a thousand instructions
//! per line, for lines kaguard only passes on.

use bytes::{Bytes, BytesMut};
use http::{HeaderName, Version};

use super::head::Refused;
use crate::hop::Hop;
use crate::wire::fields::{Builder, Fields, Spans};

/// A request's header lines: those forwarded, and what the proxy needs of the rest.
#[derive(Debug, Default)]
pub struct Lines {
    /// The lines that go upstream as the client wrote them, and its `Content-Length`, which
    /// the upstream's head writes once. Not among them: hop-by-hop lines and the names
    /// `Connection` lists; `Expect`, which kaguard answers itself; `X-Forwarded-For`, `-Proto`
    /// and `-Host`, which kaguard writes from what it knows; a Host line not forwarded as is
    /// (see `host_forwarded`); the `X-Request-Id` lines but the first, and that one too when
    /// it is empty.
    pub fields: Fields,
    /// The Host line's value (a request with more than one is refused).
    pub host: Option<Bytes>,
    /// The client's Host line is among `fields` and names the host the request is routed
    /// by: `Connection` did not list it, and the target is not in absolute form (whose
    /// authority replaces it, RFC 9112 §3.2.2).
    pub host_forwarded: bool,
    pub user_agent: Option<Bytes>,
    /// The values of the client's `X-Forwarded-For` lines, in order, joined by ", ".
    pub forwarded_for: Option<Bytes>,
    /// The client's request id, its first `X-Request-Id` when that is not empty; it goes
    /// upstream among `fields`.
    pub request_id: Option<Bytes>,
    /// The client sent an `Idempotency-Key`: the request may be sent again.
    pub idempotency_key: bool,
    /// The client wants its connection kept open after this request.
    pub keep_alive: bool,
}

/// What a head's lines say that decides whether it is taken, and how its body is read.
#[derive(Debug, Default)]
pub(super) struct Noted {
    /// The length every `Content-Length` line gave.
    pub(super) length: Option<u64>,
    /// Transfer-Encoding was there; whether its final coding is chunked.
    pub(super) chunked: Option<bool>,
    /// Transfer codings named, over every Transfer-Encoding line.
    pub(super) codings: usize,
    /// `Expect: 100-continue`.
    pub(super) expects_continue: bool,
    /// The names `Connection` listed, which the body's trailers lose too.
    pub(super) listed: Vec<HeaderName>,
}

/// The lines kaguard looks at, besides the hop-by-hop ones [`Hop`] finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Name {
    ContentLength,
    TransferEncoding,
    Expect,
    Host,
    UserAgent,
    ForwardedFor,
    ForwardedProto,
    ForwardedHost,
    RequestId,
    IdempotencyKey,
}

/// Which of the lines kaguard looks at `name` is, in any case. The length tells most names
/// apart, so that a line kaguard passes on costs one comparison at most.
pub(super) fn name(name: &[u8]) -> Option<Name> {
    let (known, which): (&[u8], Name) = match name.len() {
        4 => (b"host", Name::Host),
        6 => (b"expect", Name::Expect),
        10 => (b"user-agent", Name::UserAgent),
        12 => (b"x-request-id", Name::RequestId),
        14 => (b"content-length", Name::ContentLength),
        15 if name[0] | 0x20 == b'x' => (b"x-forwarded-for", Name::ForwardedFor),
        15 => (b"idempotency-key", Name::IdempotencyKey),
        16 => (b"x-forwarded-host", Name::ForwardedHost),
        17 if name[0] | 0x20 == b'x' => (b"x-forwarded-proto", Name::ForwardedProto),
        17 => (b"transfer-encoding", Name::TransferEncoding),
        _ => return None,
    };
    crate::wire::name_is(name, known).then_some(which)
}

/// Reads the header lines of a request head: `spans` locate them in `head`. The forwarded
/// lines are written into `room`, which the connection keeps from one request to the next.
pub(super) fn read(
    head: &Bytes,
    spans: &[Spans],
    version: Version,
    absolute_target: bool,
    room: &mut BytesMut,
) -> Result<(Lines, Noted), Refused> {
    // Line i is bit i of each mask; a head has at most 128 lines (see `head::MAX_HEADERS`).
    let mut dropped: u128 = 0;
    // At most one bit, or the head is refused below.
    let mut hosts: u128 = 0;
    let mut ids: u128 = 0;
    let mut first_id: u128 = 0;
    let mut hop = Hop::default();
    let mut lines = Lines::default();
    let mut noted = Noted::default();
    let mut id_kept = None;
    let value = |&(_, value): &Spans| head.slice(value.0..value.1);
    for (i, span) in spans.iter().enumerate() {
        let bit = 1u128 << i;
        let (n, v) = (&head[span.0.0..span.0.1], &head[span.1.0..span.1.1]);
        if hop.note(n, v) {
            dropped |= bit;
        }
        match name(n) {
            None => {}
            Some(Name::ContentLength) => {
                noted.length = crate::wire::content_length(v, noted.length);
                if noted.length.is_none() {
                    return Err(Refused::Invalid("invalid content-length"));
                }
                dropped |= bit;
            }
            Some(Name::TransferEncoding) => {
                // The last line's last coding is the final one.
                let mut last = None;
                for coding in v.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if !coding.is_empty() {
                        noted.codings += 1;
                        last = Some(coding);
                    }
                }
                // An empty element or line names no coding (RFC 9110 §5.6.1).
                match last {
                    Some(last) => noted.chunked = Some(last.eq_ignore_ascii_case(b"chunked")),
                    None => _ = noted.chunked.get_or_insert(false),
                }
            }
            Some(Name::Expect) => {
                noted.expects_continue = v.eq_ignore_ascii_case(b"100-continue");
                dropped |= bit;
            }
            Some(Name::Host) => {
                hosts |= bit;
                lines.host.get_or_insert_with(|| value(span));
            }
            Some(Name::UserAgent) => {
                lines.user_agent.get_or_insert_with(|| value(span));
            }
            Some(Name::ForwardedFor) => {
                lines.forwarded_for = Some(match lines.forwarded_for.take() {
                    None => value(span),
                    Some(before) => [&before[..], &b", "[..], v].concat().into(),
                });
                dropped |= bit;
            }
            Some(Name::ForwardedProto | Name::ForwardedHost) => dropped |= bit,
            Some(Name::RequestId) => {
                ids |= bit;
                if *id_kept.get_or_insert(!v.is_empty()) && lines.request_id.is_none() {
                    lines.request_id = Some(value(span));
                    first_id = bit;
                }
            }
            Some(Name::IdempotencyKey) => lines.idempotency_key = true,
        }
    }
    // RFC 9112 §3.2: a server answers 400 to an HTTP/1.1 request without a Host line, and to
    // any request with more than one.
    match hosts.count_ones() {
        0 if version == Version::HTTP_11 => {
            return Err(Refused::Invalid("HTTP/1.1 request without host"));
        }
        0 | 1 => {}
        _ => return Err(Refused::Invalid("more than one host line")),
    }
    // A name `Connection` lists is hop-by-hop, and kaguard acts on it no more than it
    // forwards it.
    lines.host_forwarded = hosts != 0 && !absolute_target && !hop.lists(b"host");
    if hop.lists(b"x-forwarded-for") {
        lines.forwarded_for = None;
    }
    if hop.lists(b"x-request-id") {
        lines.request_id = None;
    }
    lines.idempotency_key &= !hop.lists(b"idempotency-key");
    if !lines.host_forwarded {
        dropped |= hosts;
    }
    // One id goes upstream, the one the log shows; without one, none of the client's.
    if lines.request_id.is_none() {
        first_id = 0;
    }
    dropped |= ids & !first_id;
    lines.keep_alive = hop.keeps_alive(version);

    let mut fields = Builder::new(room);
    fields.push_kept(head, spans, |i, name| {
        dropped & (1 << i) == 0 && !hop.lists(name)
    });
    if let (Some(n), None) = (noted.length, noted.chunked) {
        fields.content_length(n);
    }
    lines.fields = fields.finish();
    noted.listed = hop.listed;
    Ok((lines, noted))
}

#[cfg(test)]
mod tests;
