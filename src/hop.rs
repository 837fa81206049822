//! Hop-by-hop header fields (RFC 9110 §7.6.1): lines that describe one connection, not the
//! message, so none crosses the proxy; and what a message's `Connection` and `Keep-Alive`
//! lines say about the connection it came on.

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers that never cross the proxy, besides those listed in `Connection`.
/// A static, not a const: a const is built anew, and dropped, wherever it is named.
pub static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Where `Connection` and `Keep-Alive` are in [`HOP_BY_HOP`].
pub const CONNECTION: usize = 0;
const KEEP_ALIVE: usize = 1;

/// Whether a message's `Connection` header carries `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the peer that sent these headers wants the connection kept open afterwards.
pub fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    match version {
        Version::HTTP_11 => !connection_has(headers, "close"),
        Version::HTTP_10 => {
            connection_has(headers, "keep-alive") && !connection_has(headers, "close")
        }
        _ => false,
    }
}

/// What a message's hop-by-hop lines said, noted line by line as its head is read, so that
/// none of them enters the header map that is forwarded: adding a line and removing it again
/// costs two hashed operations on every response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hop {
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive`, which an HTTP/1.0 peer must send to keep the connection.
    pub keep_alive: bool,
    /// `Keep-Alive: timeout=N`: seconds the peer keeps an idle connection open.
    pub timeout: Option<u64>,
    /// `Keep-Alive: max=M`: requests the peer still takes on this connection.
    pub max: Option<u64>,
    /// Other names `Connection` listed: hop-by-hop for this message alone.
    pub listed: Vec<HeaderName>,
}

impl Hop {
    /// Notes one header line. True when it is hop-by-hop, and stays out of the map.
    pub fn note(&mut self, name: &HeaderName, value: &HeaderValue) -> bool {
        let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) else {
            return false;
        };
        // A value that is not visible ASCII names no token and no parameter.
        let text = value.to_str().unwrap_or("");
        if i == CONNECTION {
            for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case("close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    self.keep_alive = true;
                } else if let Ok(listed) = HeaderName::from_bytes(token.as_bytes()) {
                    self.listed.push(listed);
                }
            }
        } else if i == KEEP_ALIVE {
            self.note_params(text);
        }
        true
    }

    /// `Keep-Alive: timeout=N, max=M`; unknown parameters are ignored, and a later value,
    /// readable or not, replaces an earlier one.
    fn note_params(&mut self, text: &str) {
        for param in text.split(',') {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"').parse::<u64>().ok();
            match key.trim() {
                k if k.eq_ignore_ascii_case("timeout") => self.timeout = value,
                k if k.eq_ignore_ascii_case("max") => self.max = value,
                _ => {}
            }
        }
    }

    /// Whether the peer keeps the connection open after this message: the same rules as
    /// [`wants_keep_alive`], on the noted lines.
    pub fn keeps_alive(&self, version: Version) -> bool {
        match version {
            Version::HTTP_11 => !self.close,
            Version::HTTP_10 => self.keep_alive && !self.close,
            _ => false,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header map of `pairs`, in order.
    pub(crate) fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// Notes every line of `head`; returns what was noted and the lines that stay.
    fn noted(head: &HeaderMap) -> (Hop, HeaderMap) {
        let mut hop = Hop::default();
        let mut kept = HeaderMap::new();
        for (name, value) in head {
            if !hop.note(name, value) {
                kept.append(name.clone(), value.clone());
            }
        }
        (hop, kept)
    }

    #[test]
    fn every_hop_by_hop_line_is_noted_and_the_rest_kept() {
        let (hop, kept) = noted(&map(&[
            ("connection", "close, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "basic x"),
            ("proxy-authenticate", "basic"),
            ("x-kept", "yes"),
        ]));
        assert!(hop.close && !hop.keep_alive);
        assert_eq!((hop.timeout, hop.max), (Some(5), None));
        assert_eq!(hop.listed, [HeaderName::from_static("x-secret")]);
        // Listed names are the reader's to remove: they may come before `Connection`.
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert_eq!(kept["x-kept"], "yes");
    }

    #[test]
    fn keep_alive_parameters_are_read() {
        for (value, expected) in [
            ("timeout=5, max=99", (Some(5), Some(99))),
            ("Timeout=0", (Some(0), None)),
            ("timeout=\"7\"", (Some(7), None)),
            ("foo", (None, None)),
            ("timeout=5, timeout=x", (None, None)),
        ] {
            let (hop, _) = noted(&map(&[("keep-alive", value)]));
            assert_eq!((hop.timeout, hop.max), expected, "{value}");
        }
    }

    #[test]
    fn noted_lines_and_the_map_agree_on_keep_alive() {
        let heads = [
            map(&[]),
            map(&[("connection", "Close")]),
            map(&[("connection", "keep-alive"), ("keep-alive", "timeout=3")]),
            map(&[("connection", "keep-alive, close")]),
            map(&[("connection", "upgrade"), ("connection", "keep-alive")]),
        ];
        for version in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
            for head in &heads {
                let (hop, _) = noted(head);
                assert_eq!(
                    hop.keeps_alive(version),
                    wants_keep_alive(version, head),
                    "{version:?} {head:?}"
                );
            }
        }
    }

    #[test]
    fn keep_alive_intent_follows_version_rules() {
        assert!(wants_keep_alive(Version::HTTP_11, &HeaderMap::new()));
        assert!(!wants_keep_alive(
            Version::HTTP_11,
            &map(&[("connection", "Close")])
        ));
        assert!(!wants_keep_alive(Version::HTTP_10, &HeaderMap::new()));
        assert!(wants_keep_alive(
            Version::HTTP_10,
            &map(&[("connection", "keep-alive")])
        ));
    }
}
