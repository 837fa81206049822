//! A response as it goes onto the client's socket: the head, with the framing and the
//! connection headers the client needs, and the body in that framing.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::response::Parts;
use http::{StatusCode, Version};

use crate::wire::chunked::{chunk_size, end_chunks};
use crate::wire::fields::Fields;

/// How the body of a response is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    /// None is sent: a HEAD request, or a status that has none.
    Bodiless,
    /// Exactly this many bytes are left to send.
    Length(u64),
    Chunked,
    /// An HTTP/1.0 client without a length: the close ends it.
    UntilClose,
}

/// What the request and the service said that shapes the response.
#[derive(Clone, Copy, Debug)]
pub(super) struct Asked {
    pub(super) head: bool,
    pub(super) version: Version,
    /// The service made this response the connection's last, for any reason it has (the
    /// client's wish, the request cap, a conflicting framing).
    pub(super) last: bool,
    /// The request body was not read whole: nothing may follow on the connection.
    pub(super) body_left: bool,
    /// Graceful shutdown began: this response is the connection's last.
    pub(super) closing: bool,
}

/// Queues the head of `parts` and `fields` in `out`, written into `room` and split off it
/// (see [`super::h1`]'s reuse of it); returns the body's framing and whether the connection
/// stays open after the response, which `hint`, a `Keep-Alive` line, is written for.
///
/// The lines of the framing and of the connection are written here, not put in the
/// response's header map: for a forwarded response the map stays empty, and costs nothing.
pub(super) fn head(
    parts: &Parts,
    fields: &Fields,
    exact: Option<u64>,
    asked: Asked,
    hint: &[u8],
    room: &mut BytesMut,
    out: &mut VecDeque<Bytes>,
) -> (Framing, bool) {
    let status = parts.status;
    let headers = &parts.headers;
    let http10 = asked.version == Version::HTTP_10;
    // An interim status as the final answer (a 101 kaguard does not relay) leaves the client
    // waiting for another: only the close ends its wait.
    let mut keep = !(asked.last || asked.body_left || asked.closing || status.is_informational());
    // The framing and the connection are this connection's to say: an upstream's lines for
    // them are hop-by-hop and never forwarded, and kaguard's own responses carry none.
    debug_assert!(
        [
            header::TRANSFER_ENCODING,
            header::CONNECTION,
            header::CONTENT_LENGTH
        ]
        .iter()
        .all(|name| !headers.contains_key(name))
    );
    // A bodiless answer still says the length the upstream gave (of what a GET would get).
    let mut length = fields.content_length();
    let framing = if asked.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Bodiless
    } else if let Some(n) = fields.content_length() {
        Framing::Length(n)
    } else if let Some(n) = exact {
        length = Some(n);
        Framing::Length(n)
    } else if !http10 {
        Framing::Chunked
    } else {
        keep = false;
        Framing::UntilClose
    };
    let reason = status.canonical_reason().unwrap_or("");
    let lines: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    room.reserve(lines + fields.lines().len() + reason.len() + hint.len() + 128);
    room.put_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    room.put_slice(status.as_str().as_bytes());
    room.put_u8(b' ');
    room.put_slice(reason.as_bytes());
    room.put_slice(b"\r\n");
    crate::wire::put_lines(room, headers.iter());
    if let Some(n) = length {
        crate::wire::put_length(room, n);
    }
    if framing == Framing::Chunked {
        room.put_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep {
        room.put_slice(b"connection: close\r\n");
    } else {
        if http10 {
            room.put_slice(b"connection: keep-alive\r\n");
        }
        room.put_slice(hint);
    }
    if !fields.has_date() && !headers.contains_key(header::DATE) {
        crate::wire::put_line(room, b"date", date().as_bytes());
    }
    room.put_slice(fields.lines());
    room.put_slice(b"\r\n");
    out.push_back(crate::wire::split_head(room));
    (framing, keep)
}

/// Queues one frame of data in the framing; false when the frame ran past the
/// Content-Length. Data past the length is dropped, and the connection closes after it.
pub(super) fn data(framing: &mut Framing, data: Bytes, out: &mut VecDeque<Bytes>) -> bool {
    match framing {
        Framing::Bodiless => true,
        Framing::Length(left) => {
            let fits = data.len() as u64 <= *left;
            let data = if fits {
                data
            } else {
                data.slice(..*left as usize)
            };
            *left -= data.len() as u64;
            if !data.is_empty() {
                out.push_back(data);
            }
            fits
        }
        Framing::Chunked => {
            if !data.is_empty() {
                out.push_back(chunk_size(data.len()));
                out.push_back(data);
                out.push_back(Bytes::from_static(b"\r\n"));
            }
            true
        }
        Framing::UntilClose => {
            if !data.is_empty() {
                out.push_back(data);
            }
            true
        }
    }
}

/// Queues the end of the body; false when the body ended short of its Content-Length, so
/// the client can only learn of it by the close.
pub(super) fn end(
    framing: Framing,
    trailers: Option<&HeaderMap>,
    out: &mut VecDeque<Bytes>,
) -> bool {
    match framing {
        Framing::Chunked => {
            out.push_back(end_chunks(trailers));
            true
        }
        Framing::Length(left) => left == 0,
        Framing::Bodiless => true,
        Framing::UntilClose => false,
    }
}

thread_local! {
    /// The `Date` of the current second: formatting it costs more than a response head.
    static DATE: RefCell<(u64, HeaderValue)> = const { RefCell::new((0, HeaderValue::from_static(""))) };
}

/// `Date` for a response that has none (kaguard's own, or an upstream's without one).
fn date() -> HeaderValue {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, value)| {
        if *at != secs {
            *at = secs;
            *value = HeaderValue::from_str(&httpdate::fmt_http_date(now))
                .expect("an HTTP date is a valid header value");
        }
        value.clone()
    })
}

#[cfg(test)]
mod tests {
    use http::Response;

    use super::*;

    fn asked(version: Version) -> Asked {
        Asked {
            head: false,
            version,
            last: false,
            body_left: false,
            closing: false,
        }
    }

    const HINT: &[u8] = b"keep-alive: timeout=60\r\n";

    fn written(resp: Response<()>, exact: Option<u64>, asked: Asked) -> (String, Framing, bool) {
        forwarding(resp, &Fields::default(), exact, asked)
    }

    fn forwarding(
        resp: Response<()>,
        fields: &Fields,
        exact: Option<u64>,
        asked: Asked,
    ) -> (String, Framing, bool) {
        let (parts, ()) = resp.into_parts();
        let mut out = VecDeque::new();
        let room = &mut BytesMut::new();
        let (framing, keep) = head(&parts, fields, exact, asked, HINT, room, &mut out);
        let text = String::from_utf8(out.iter().flat_map(|b| b.to_vec()).collect()).unwrap();
        (text, framing, keep)
    }

    #[test]
    fn an_exact_size_becomes_a_content_length() {
        let (text, framing, keep) = written(Response::new(()), Some(2), asked(Version::HTTP_11));
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("content-length: 2\r\n"), "{text}");
        assert!(text.contains("date: "), "{text}");
        assert!(text.contains("keep-alive: timeout=60\r\n"), "{text}");
        assert_eq!((framing, keep), (Framing::Length(2), true));
    }

    #[test]
    fn forwarded_lines_end_the_head_and_give_its_length_and_date() {
        let mut room = BytesMut::new();
        let mut lines = crate::wire::fields::Builder::new(&mut room);
        lines.push(b"Date: Sun, 22 Nov 2026 12:00:00 GMT\r\nETag: \"x\"");
        lines.date();
        lines.content_length(5);
        let fields = lines.finish();
        let last = Asked {
            last: true,
            ..asked(Version::HTTP_11)
        };
        // No exact size: the forwarded length frames the body all the same.
        let (text, framing, keep) = forwarding(Response::new(()), &fields, None, last);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\
             Date: Sun, 22 Nov 2026 12:00:00 GMT\r\nETag: \"x\"\r\n\r\n"
        );
        assert_eq!((framing, keep), (Framing::Length(5), false));
        // A bodiless answer still says the length the upstream gave.
        let head = Asked {
            head: true,
            ..asked(Version::HTTP_11)
        };
        let (text, framing, _) = forwarding(Response::new(()), &fields, Some(0), head);
        assert!(text.contains("content-length: 5\r\n"), "{text}");
        assert_eq!(framing, Framing::Bodiless);
    }

    #[test]
    fn an_unknown_size_is_chunked_for_http11_and_closed_for_http10() {
        let (text, framing, keep) = written(Response::new(()), None, asked(Version::HTTP_11));
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert_eq!((framing, keep), (Framing::Chunked, true));
        let (text, framing, keep) = written(Response::new(()), None, asked(Version::HTTP_10));
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert_eq!((framing, keep), (Framing::UntilClose, false));
    }

    #[test]
    fn an_http10_client_kept_alive_is_told_so() {
        let (text, _, keep) = written(Response::new(()), Some(0), asked(Version::HTTP_10));
        assert!(text.contains("connection: keep-alive\r\n"), "{text}");
        assert!(keep);
    }

    #[test]
    fn the_service_shutdown_or_an_unread_body_end_the_connection_without_a_hint() {
        let base = asked(Version::HTTP_11);
        for ending in [
            Asked { last: true, ..base },
            Asked {
                body_left: true,
                ..base
            },
            Asked {
                closing: true,
                ..base
            },
        ] {
            let (text, _, keep) = written(Response::new(()), Some(0), ending);
            assert!(text.contains("connection: close\r\n"), "{text}");
            // The idle hint is for a connection that stays open.
            assert!(!text.contains("keep-alive"), "{text}");
            assert!(!keep);
        }
    }

    #[test]
    fn an_interim_status_as_the_answer_closes_the_connection() {
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let (text, framing, keep) = written(resp, None, asked(Version::HTTP_11));
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert_eq!((framing, keep), (Framing::Bodiless, false));
    }

    #[test]
    fn head_and_bodiless_statuses_send_no_body() {
        let head = Asked {
            head: true,
            ..asked(Version::HTTP_11)
        };
        assert_eq!(
            written(Response::new(()), Some(0), head).1,
            Framing::Bodiless
        );
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        assert_eq!(
            written(resp, None, asked(Version::HTTP_11)).1,
            Framing::Bodiless
        );
    }

    #[test]
    fn data_past_the_length_is_dropped() {
        let mut framing = Framing::Length(3);
        let mut out = VecDeque::new();
        assert!(data(&mut framing, Bytes::from_static(b"ab"), &mut out));
        assert!(!data(&mut framing, Bytes::from_static(b"cd"), &mut out));
        assert_eq!(
            out.iter().flat_map(|b| b.to_vec()).collect::<Vec<_>>(),
            b"abc"
        );
        assert!(end(framing, None, &mut out));
    }
}
