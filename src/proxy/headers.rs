//! Header rules on a request's way upstream: hop-by-hop removal, Host, X-Forwarded-*,
//! X-Request-Id. A response's hop-by-hop lines never reach its map ([`crate::hop::Hop`]).

use std::fmt::Write as _;
use std::net::IpAddr;

use bytes::Bytes;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::hop::{CONNECTION, HOP_BY_HOP, Hop};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Which of the headers kaguard removes or rewrites a message carries, found in one pass
/// comparing names (an integer compare for standard names). Most messages carry none of
/// them, or only `Connection`, and a hashed lookup of each would cost more than the rest of
/// the header work.
#[derive(Default)]
struct Seen {
    hop_by_hop: [bool; 9],
    expect: bool,
    forwarded_for: bool,
    forwarded_proto: bool,
    forwarded_host: bool,
    request_id: bool,
    /// Host lines: one is left as it is; none or several are replaced by the routed host.
    hosts: usize,
}

impl Seen {
    fn scan(headers: &HeaderMap) -> Seen {
        let mut seen = Seen::default();
        // Every line, not every name: a repeated Host counts.
        for name in headers.iter().map(|(name, _)| name) {
            if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
                seen.hop_by_hop[i] = true;
            } else if name == header::HOST {
                seen.hosts += 1;
            } else if name == header::EXPECT {
                seen.expect = true;
            } else if name == X_FORWARDED_FOR {
                seen.forwarded_for = true;
            } else if name == X_FORWARDED_PROTO {
                seen.forwarded_proto = true;
            } else if name == X_FORWARDED_HOST {
                seen.forwarded_host = true;
            } else if name == X_REQUEST_ID {
                seen.request_id = true;
            }
        }
        seen
    }
}

fn remove_seen_hop_by_hop(headers: &mut HeaderMap, seen: &Seen) {
    if seen.hop_by_hop[CONNECTION] {
        for name in Hop::of_connection(headers).listed {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP
        .iter()
        .zip(seen.hop_by_hop)
        .filter(|(_, there)| *there)
    {
        headers.remove(name);
    }
}

/// What the request side needs to know about the client.
pub struct Forwarded<'a> {
    pub client_ip: IpAddr,
    /// The Host the client asked for (from `Host` or an absolute-form target).
    pub host: Option<&'a HeaderValue>,
    /// `host` came from an absolute-form target, and replaces whatever Host the client sent
    /// (RFC 9112 §3.2.2).
    pub host_from_target: bool,
}

/// Header lines a request gains on its way upstream, written after the client's own by the
/// encoder: inserted into the client's map, each would cost a hashed lookup and could grow
/// the map, on every request.
pub type Added = Vec<(HeaderName, HeaderValue)>;

/// Room for every line a request may gain: X-Forwarded-For, -Proto and -Host, X-Request-Id
/// when the client sent none, and `Connection: close`.
const ADDED: usize = 5;

/// Turns a client's request headers into the upstream's: the map loses what must not go on,
/// and the lines it gains are returned, with the request id if `keep_id` (the access log
/// alone shows it; a copy of a new id costs an allocation).
pub fn to_upstream(
    headers: &mut HeaderMap,
    fwd: &Forwarded<'_>,
    reuse: bool,
    keep_id: bool,
) -> (Option<HeaderValue>, Added) {
    let seen = Seen::scan(headers);
    remove_seen_hop_by_hop(headers, &seen);
    let mut added = Added::with_capacity(ADDED);
    // kaguard answers `Expect: 100-continue` itself (the client connection sends the 100 when
    // the body is first read), so the upstream never waits for a continue nobody relays.
    if seen.expect {
        headers.remove(header::EXPECT);
    }

    // Every X-Forwarded-For line the client sent, in order, then the client itself.
    let mut xff = String::with_capacity(64);
    if seen.forwarded_for {
        for prev in headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            xff.push_str(prev);
            xff.push_str(", ");
        }
        headers.remove(X_FORWARDED_FOR);
    }
    push_ip(&mut xff, fwd.client_ip);
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
        added.push((X_FORWARDED_FOR, v));
    }
    // What kaguard says replaces what the client said of itself.
    if seen.forwarded_proto {
        headers.remove(X_FORWARDED_PROTO);
    }
    added.push((X_FORWARDED_PROTO, HeaderValue::from_static("http")));
    if let Some(host) = fwd.host {
        // The client's own single Host line is the routed host already, unless `Connection`
        // listed it and it was removed with the hop-by-hop headers.
        if fwd.host_from_target || seen.hosts != 1 || seen.hop_by_hop[CONNECTION] {
            headers.insert(header::HOST, host.clone());
        }
        if seen.forwarded_host {
            headers.remove(X_FORWARDED_HOST);
        }
        added.push((X_FORWARDED_HOST, host.clone()));
    }
    if !reuse {
        added.push((header::CONNECTION, HeaderValue::from_static("close")));
    }
    let id = match seen.request_id.then(|| headers.get(X_REQUEST_ID)).flatten() {
        Some(id) if !id.is_empty() => keep_id.then(|| id.clone()),
        _ => {
            if seen.request_id {
                headers.remove(X_REQUEST_ID);
            }
            let id = new_request_id();
            let kept = keep_id.then(|| id.clone());
            added.push((X_REQUEST_ID, id));
            kept
        }
    };
    (id, added)
}

/// Appends `ip` as text. IPv4, nearly every client, is written digit by digit: `Display` for
/// an address goes through the formatting machinery and costs as much as the rest of the
/// request's header work.
fn push_ip(out: &mut String, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        // Writing to a String cannot fail.
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

/// A random 128-bit id in hex, like nginx's `$request_id`.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = fastrand::u128(..);
    let mut id = [0u8; 32];
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((bits >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::hop::tests::map;

    proptest! {
        #[test]
        fn ip_text_is_what_display_writes(bits in any::<u32>(), v6 in any::<u128>()) {
            for ip in [IpAddr::V4(Ipv4Addr::from(bits)), IpAddr::V6(v6.into())] {
                let mut text = String::from("x, ");
                push_ip(&mut text, ip);
                prop_assert_eq!(text, format!("x, {ip}"));
            }
        }
    }

    /// A client on 127.0.0.1 that asked for `host` in its Host line.
    fn from_localhost(host: Option<&HeaderValue>) -> Forwarded<'_> {
        Forwarded {
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host,
            host_from_target: false,
        }
    }

    /// What the upstream is sent: the client's map as `to_upstream` leaves it, then the lines
    /// it adds. Returns the request id.
    fn sent(h: &mut HeaderMap, fwd: &Forwarded<'_>, reuse: bool) -> HeaderValue {
        let (id, added) = to_upstream(h, fwd, reuse, true);
        for (name, value) in added {
            h.append(name, value);
        }
        id.expect("kept when asked for")
    }

    #[test]
    fn what_the_client_says_of_itself_is_replaced_not_passed_on() {
        let mut h = map(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("x-request-id", ""),
        ]);
        let host = HeaderValue::from_static("example.com");
        let fwd = from_localhost(Some(&host));
        let id = sent(&mut h, &fwd, true);
        let all = |name| h.get_all(name).iter().collect::<Vec<_>>();
        assert_eq!(all("x-forwarded-proto"), ["http"]);
        assert_eq!(all("x-forwarded-host"), ["example.com"]);
        assert_eq!(all("x-request-id"), [&id]);
        assert_eq!(id.len(), 32);
    }

    #[test]
    fn forwarded_headers_append_and_set() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("host", "example.com"),
            ("x-request-id", "abc"),
        ]);
        let host = HeaderValue::from_static("example.com");
        let fwd = from_localhost(Some(&host));
        let id = sent(&mut h, &fwd, true);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["host"], "example.com");
        assert_eq!(id, "abc");
        assert!(!h.contains_key("connection"));
    }

    #[test]
    fn the_routed_host_replaces_several_host_lines_and_one_connection_removed() {
        let routed = HeaderValue::from_static("a.example");
        let fwd = from_localhost(Some(&routed));
        for mut h in [
            map(&[("host", "a.example"), ("host", "b.example")]),
            map(&[("host", "a.example"), ("connection", "host")]),
        ] {
            sent(&mut h, &fwd, true);
            let hosts: Vec<_> = h.get_all(header::HOST).iter().collect();
            assert_eq!(hosts, [&routed], "{h:?}");
        }
    }

    #[test]
    fn the_request_id_is_kept_only_when_asked_for_and_sent_either_way() {
        for keep in [true, false] {
            let mut h = HeaderMap::new();
            let (id, added) = to_upstream(&mut h, &from_localhost(None), true, keep);
            assert_eq!(id.is_some(), keep);
            let sent = added
                .iter()
                .find(|(n, _)| n == X_REQUEST_ID)
                .map(|(_, v)| v);
            assert_eq!(sent.map(HeaderValue::len), Some(32));
            let mut h = map(&[("x-request-id", "from-client")]);
            let (id, added) = to_upstream(&mut h, &from_localhost(None), true, keep);
            assert_eq!(id.map(|id| id == "from-client"), keep.then_some(true));
            assert_eq!(h["x-request-id"], "from-client");
            assert!(added.iter().all(|(n, _)| n != X_REQUEST_ID));
        }
    }

    #[test]
    fn request_id_is_generated_and_no_reuse_says_close() {
        let mut h = HeaderMap::new();
        let fwd = from_localhost(None);
        let id = sent(&mut h, &fwd, false);
        assert_eq!(id.len(), 32);
        assert_eq!(h["x-request-id"], id);
        assert_eq!(h["connection"], "close");
    }
}
