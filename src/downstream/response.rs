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

/// What the request said that shapes its response.
#[derive(Clone, Copy, Debug)]
pub(super) struct Asked {
    pub(super) head: bool,
    pub(super) version: Version,
    /// The request body was not read whole: nothing may follow on the connection.
    pub(super) body_left: bool,
    /// Graceful shutdown began: this response is the connection's last.
    pub(super) closing: bool,
}

/// Queues the head of `parts` and `fields` in `out`, written into `room` and split off it
/// (see [`super::h1`]'s reuse of it); returns the body's framing and whether the connection
/// stays open after the response.
pub(super) fn head(
    parts: &mut Parts,
    fields: &Fields,
    exact: Option<u64>,
    asked: Asked,
    room: &mut BytesMut,
    out: &mut VecDeque<Bytes>,
) -> (Framing, bool) {
    let status = parts.status;
    let headers = &mut parts.headers;
    let http10 = asked.version == Version::HTTP_10;
    // The service says `close` for every reason it has (the client's wish, the request
    // cap, a conflicting framing); the rest are the connection's own.
    let mut keep = !has_close(headers);
    // An interim status as the final answer (a 101 kaguard does not relay) leaves the client
    // waiting for another: only the close ends its wait.
    if keep && (asked.body_left || asked.closing || status.is_informational()) {
        keep = false;
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    // The framing is this connection's to choose: an upstream's Transfer-Encoding is noted
    // as hop-by-hop and never forwarded, and kaguard's own responses carry none.
    debug_assert!(!headers.contains_key(header::TRANSFER_ENCODING));
    let framing = if asked.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Bodiless
    } else if let Some(n) = fields.content_length() {
        Framing::Length(n)
    } else if let Some(n) = exact {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        Framing::Length(n)
    } else if !http10 {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        Framing::Chunked
    } else {
        if keep {
            keep = false;
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Framing::UntilClose
    };
    if !keep {
        // The service's idle hint is for a connection that stays open.
        headers.remove(crate::hop::KEEP_ALIVE_NAME);
    } else if http10 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    if !fields.has_date() && !headers.contains_key(header::DATE) {
        headers.insert(header::DATE, date());
    }
    out.push_back(encode(status, http10, headers, fields, room));
    (framing, keep)
}

fn has_close(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

fn encode(
    status: StatusCode,
    http10: bool,
    headers: &HeaderMap,
    fields: &Fields,
    buf: &mut BytesMut,
) -> Bytes {
    let reason = status.canonical_reason().unwrap_or("");
    let lines: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    buf.reserve(lines + fields.lines().len() + reason.len() + 16);
    buf.put_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    buf.put_slice(status.as_str().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(reason.as_bytes());
    buf.put_slice(b"\r\n");
    crate::wire::put_lines(buf, headers.iter());
    buf.put_slice(fields.lines());
    buf.put_slice(b"\r\n");
    buf.split().freeze()
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
            body_left: false,
            closing: false,
        }
    }

    fn written(resp: Response<()>, exact: Option<u64>, asked: Asked) -> (String, Framing, bool) {
        forwarding(resp, &Fields::default(), exact, asked)
    }

    fn forwarding(
        resp: Response<()>,
        fields: &Fields,
        exact: Option<u64>,
        asked: Asked,
    ) -> (String, Framing, bool) {
        let (mut parts, ()) = resp.into_parts();
        let mut out = VecDeque::new();
        let room = &mut BytesMut::new();
        let (framing, keep) = head(&mut parts, fields, exact, asked, room, &mut out);
        let text = String::from_utf8(out.iter().flat_map(|b| b.to_vec()).collect()).unwrap();
        (text, framing, keep)
    }

    #[test]
    fn an_exact_size_becomes_a_content_length() {
        let (text, framing, keep) = written(Response::new(()), Some(2), asked(Version::HTTP_11));
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("content-length: 2\r\n"), "{text}");
        assert!(text.contains("date: "), "{text}");
        assert_eq!((framing, keep), (Framing::Length(2), true));
    }

    #[test]
    fn forwarded_lines_end_the_head_and_give_its_length_and_date() {
        let mut room = BytesMut::new();
        let mut lines = crate::wire::fields::Builder::new(&mut room);
        lines.push(b"Date: Sun, 22 Nov 2026 12:00:00 GMT\r\nContent-Length: 5");
        lines.date();
        lines.content_length(5);
        let fields = lines.finish();
        let mut resp = Response::new(());
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        // No exact size: the forwarded length frames the body all the same.
        let (text, framing, keep) = forwarding(resp, &fields, None, asked(Version::HTTP_11));
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nconnection: close\r\n\
             Date: Sun, 22 Nov 2026 12:00:00 GMT\r\nContent-Length: 5\r\n\r\n"
        );
        assert_eq!((framing, keep), (Framing::Length(5), false));
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
    fn close_from_the_service_or_an_unread_body_ends_the_connection() {
        let mut resp = Response::new(());
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        assert!(!written(resp, Some(0), asked(Version::HTTP_11)).2);
        let unread = Asked {
            body_left: true,
            ..asked(Version::HTTP_11)
        };
        let mut resp = Response::new(());
        resp.headers_mut().insert(
            crate::hop::KEEP_ALIVE_NAME,
            HeaderValue::from_static("timeout=60"),
        );
        let (text, _, keep) = written(resp, Some(0), unread);
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(!text.contains("keep-alive"), "{text}");
        assert!(!keep);
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
