//! Hop-by-hop header fields (RFC 9110 §7.6.1): lines that describe one connection, not the
//! message, so none crosses the proxy; and what a message's `Connection` and `Keep-Alive`
//! lines say about the connection it came on.

use http::Version;
use http::header::HeaderName;

/// Hop-by-hop headers that never cross the proxy, besides those listed in `Connection`, in
/// lower case: lines are matched against them as read, before any `HeaderName` is built.
const HOP_BY_HOP: [&[u8]; 9] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authenticate",
    b"proxy-authorization",
];

/// Where `Connection` and `Keep-Alive` are in [`HOP_BY_HOP`].
const CONNECTION: usize = 0;
const KEEP_ALIVE: usize = 1;

/// `name` (in any case) is among the names a `Connection` line listed.
pub fn is_listed(listed: &[HeaderName], name: &[u8]) -> bool {
    listed
        .iter()
        .any(|l| name.eq_ignore_ascii_case(l.as_str().as_bytes()))
}

/// What a message's hop-by-hop lines said, noted line by line as its head is read, so that
/// none of them is forwarded and none needs looking up again.
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
    /// Notes one header line, its name and value as the parser found them. True when it is
    /// hop-by-hop, and is not forwarded.
    // Inlined, so that a line whose length no hop-by-hop name has, most lines, costs its
    // caller a jump and no call.
    #[inline]
    pub fn note(&mut self, name: &[u8], value: &[u8]) -> bool {
        let Some(i) = position(name) else {
            return false;
        };
        self.note_value(i, value);
        true
    }

    /// Notes the value of the hop-by-hop line at `i` in [`HOP_BY_HOP`].
    fn note_value(&mut self, i: usize, value: &[u8]) {
        if i == CONNECTION {
            self.note_connection(text(value));
        } else if i == KEEP_ALIVE {
            self.note_params(std::str::from_utf8(text(value)).unwrap_or(""));
        }
    }

    /// `Connection` listed `name` (in any case) as hop-by-hop for this message.
    pub fn lists(&self, name: &[u8]) -> bool {
        is_listed(&self.listed, name)
    }

    /// `Connection: close, keep-alive, <names>`.
    fn note_connection(&mut self, text: &[u8]) {
        let tokens = text.split(|&b| b == b',').map(<[u8]>::trim_ascii);
        for token in tokens.filter(|t| !t.is_empty()) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if let Ok(listed) = HeaderName::from_bytes(token) {
                self.listed.push(listed);
            }
        }
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

    /// Whether the peer keeps the connection open after this message: an HTTP/1.1 peer
    /// unless it said `close`, an HTTP/1.0 peer only if it said `keep-alive`.
    pub fn keeps_alive(&self, version: Version) -> bool {
        match version {
            Version::HTTP_11 => !self.close,
            Version::HTTP_10 => self.keep_alive && !self.close,
            _ => false,
        }
    }
}

/// Where a header name, in any case, is in [`HOP_BY_HOP`]. Every line of every message
/// asks: most names have a length no hop-by-hop name has, and are ruled out by it.
#[inline]
pub fn position(name: &[u8]) -> Option<usize> {
    let candidates: &[usize] = match name.len() {
        2 => &[3],
        7 => &[4, 6],
        10 => &[0, 1],
        16 => &[2],
        17 => &[5],
        18 => &[7],
        19 => &[8],
        _ => &[],
    };
    candidates
        .iter()
        .copied()
        .find(|&i| crate::wire::name_is(name, HOP_BY_HOP[i]))
}

/// A value that is not visible ASCII names no token and no parameter. `Connection` lines,
/// one on most responses, are read as bytes: checking them as UTF-8 too cost more than the
/// rest of their reading.
fn text(value: &[u8]) -> &[u8] {
    let visible = value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b));
    if visible { value } else { b"" }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Notes every line of `head`; returns what was noted and the lines that stay.
    fn noted<'h>(head: &[(&'h str, &'h str)]) -> (Hop, Vec<&'h str>) {
        let mut hop = Hop::default();
        let mut kept = Vec::new();
        for (name, value) in head {
            if !hop.note(name.as_bytes(), value.as_bytes()) {
                kept.push(*name);
            }
        }
        (hop, kept)
    }

    #[test]
    fn every_hop_by_hop_name_is_found_in_any_case_and_no_other() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let upper = name.to_ascii_uppercase();
            assert_eq!(position(&upper), Some(i), "{upper:?}");
            assert_eq!(position(name), Some(i), "{name:?}");
        }
        for other in ["date", "connections", "tE-", "keep_alive", "", "upgrades"] {
            assert_eq!(position(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn every_hop_by_hop_line_is_noted_and_the_rest_kept() {
        let (hop, kept) = noted(&[
            ("Connection", "close, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "basic x"),
            ("Proxy-Authenticate", "basic"),
            ("x-kept", "yes"),
        ]);
        assert!(hop.close && !hop.keep_alive);
        assert_eq!((hop.timeout, hop.max), (Some(5), None));
        assert_eq!(hop.listed, [HeaderName::from_static("x-secret")]);
        // Listed names are the reader's to leave out: they may come before `Connection`.
        assert_eq!(kept, ["x-secret", "x-kept"]);
        assert!(hop.lists(b"X-SECRET") && !hop.lists(b"x-kept"));
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
            let (hop, _) = noted(&[("keep-alive", value)]);
            assert_eq!((hop.timeout, hop.max), expected, "{value}");
        }
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_lines() {
        // Whether the connection stays open under HTTP/1.0, 1.1 and 2.
        let heads: [(&[(&str, &str)], _); 5] = [
            (&[], [false, true, false]),
            (&[("connection", "Close")], [false, false, false]),
            (
                &[("Connection", "keep-alive"), ("keep-alive", "timeout=3")],
                [true, true, false],
            ),
            (
                &[("connection", "keep-alive, close")],
                [false, false, false],
            ),
            (
                &[("connection", "upgrade"), ("connection", "Keep-Alive")],
                [true, true, false],
            ),
        ];
        let versions = [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2];
        for (head, expected) in &heads {
            for (version, expected) in versions.into_iter().zip(*expected) {
                let (hop, _) = noted(head);
                assert_eq!(hop.keeps_alive(version), expected, "{version:?} {head:?}");
            }
        }
    }
}
