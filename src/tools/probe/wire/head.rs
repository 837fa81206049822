//! Parsing one HTTP/1.1 response head: status, version, framing, `Connection` and the
//! `Keep-Alive` hint.

use super::Failure;

/// Headers parsed per response; a response with more is rejected as malformed.
pub(super) const MAX_HEADERS: usize = 100;

/// How the body of a response ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Head {
    pub(super) status: u16,
    pub(super) version: &'static str,
    pub(super) close: bool,
    pub(super) said_close: bool,
    pub(super) hint_timeout: Option<u64>,
    pub(super) hint_max: Option<u64>,
    pub(super) framing: Framing,
}

/// Parses a response head from the start of `buf`: `None` if incomplete, else the head and the
/// bytes it used.
pub(super) fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let used = match response.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(Failure::Broken(format!("bad response head: {error}"))),
    };
    let status = response.code.unwrap_or(0);
    let version = if response.version == Some(0) {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    let (mut said_close, mut said_keep_alive, mut chunked) = (false, false, false);
    let (mut length, mut hint_timeout, mut hint_max) = (None, None, None);
    for header in response.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("connection") {
            said_close |= has_token(header.value, "close");
            said_keep_alive |= has_token(header.value, "keep-alive");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked |= has_token(header.value, "chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(header.value).unwrap_or("").trim();
            let n = text
                .parse::<u64>()
                .map_err(|_| Failure::Broken(format!("bad Content-Length {text:?}")))?;
            length = Some(n);
        } else if name.eq_ignore_ascii_case("keep-alive") {
            for (key, value) in params(header.value) {
                if key.eq_ignore_ascii_case("timeout") {
                    hint_timeout = value.parse().ok();
                } else if key.eq_ignore_ascii_case("max") {
                    hint_max = value.parse().ok();
                }
            }
        }
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let close = said_close || (version == "HTTP/1.0" && !said_keep_alive);
    let head = Head {
        status,
        version,
        close,
        said_close,
        hint_timeout,
        hint_max,
        framing,
    };
    Ok(Some((head, used)))
}

/// True when the comma-separated header `value` contains `token`, ignoring ASCII case.
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// `timeout=5, max=100` -> `[("timeout", "5"), ("max", "100")]`, quotes removed.
fn params(value: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(value);
    text.split(',')
        .filter_map(|part| {
            let (key, value) = part.split_once('=')?;
            Some((
                key.trim().to_owned(),
                value.trim().trim_matches('"').to_owned(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes())
            .expect("valid head")
            .expect("complete head")
            .0
    }

    #[test]
    fn keep_alive_hint_is_read_with_any_spacing_and_quotes() {
        let h = head(
            "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=\"5\" ,MAX=99\r\nContent-Length: 2\r\n\r\n",
        );
        assert_eq!((h.hint_timeout, h.hint_max), (Some(5), Some(99)));
        assert_eq!(h.framing, Framing::Length(2));
        assert!(!h.close);
    }

    #[test]
    fn http_1_0_without_keep_alive_closes() {
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.version, "HTTP/1.0");
        assert!(h.close && !h.said_close);
        let h = head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n");
        assert!(!h.close);
    }

    #[test]
    fn connection_close_token_is_found_among_others() {
        let h = head("HTTP/1.1 200 OK\r\nConnection: upgrade, Close\r\nContent-Length: 0\r\n\r\n");
        assert!(h.close && h.said_close);
    }

    #[test]
    fn body_framing_follows_status_and_headers() {
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(head(chunked).framing, Framing::Chunked);
        assert_eq!(
            head("HTTP/1.1 204 No Content\r\n\r\n").framing,
            Framing::Empty
        );
        assert_eq!(head("HTTP/1.1 200 OK\r\n\r\n").framing, Framing::UntilClose);
        let partial = parse_head(b"HTTP/1.1 200 OK\r\nContent-").expect("valid so far");
        assert!(partial.is_none());
    }
}
