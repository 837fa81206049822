//! Header rules on a request's way upstream: hop-by-hop removal, Host, X-Forwarded-*,
//! X-Request-Id. The client's lines kaguard passes on were picked out as its head was read
//! ([`crate::downstream::Lines`]); what they gain is here, written after them. A response's
//! hop-by-hop lines are left out as its head is read ([`crate::hop::Hop`]).

use std::fmt::Write as _;
use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::HeaderValue;

use crate::downstream::Lines;
use crate::upstream::AddedLines;
use crate::wire::put_line;

/// What the request side needs to know about the client.
pub struct Forwarded {
    pub client_ip: IpAddr,
    /// The host the client asked for (from `Host` or an absolute-form target).
    pub host: Option<Bytes>,
}

/// The lines a request gains on its way upstream, after the client's own: what kaguard says
/// of the client replaces what the client said of itself.
pub struct Added {
    /// A Host line of the routed host, where the client's own is not forwarded.
    host_line: bool,
    /// The routed host, also sent as `X-Forwarded-Host`.
    host: Option<Bytes>,
    /// The client's `X-Forwarded-For` values, which the client's address follows.
    forwarded_for: Option<Bytes>,
    client_ip: IpAddr,
    /// `Connection: close`: the group does not reuse upstream connections.
    close: bool,
    /// An id made for a request that came without one.
    request_id: Option<[u8; 32]>,
}

impl AddedLines for Added {
    fn put(&self, head: &mut BytesMut) {
        if let (true, Some(host)) = (self.host_line, &self.host) {
            put_line(head, b"host", host);
        }
        // Every X-Forwarded-For value the client sent, in order, then the client itself.
        head.put_slice(b"x-forwarded-for: ");
        if let Some(before) = &self.forwarded_for {
            head.put_slice(before);
            head.put_slice(b", ");
        }
        push_ip(head, self.client_ip);
        head.put_slice(b"\r\n");
        put_line(head, b"x-forwarded-proto", b"http");
        if let Some(host) = &self.host {
            put_line(head, b"x-forwarded-host", host);
        }
        if self.close {
            put_line(head, b"connection", b"close");
        }
        if let Some(id) = &self.request_id {
            put_line(head, b"x-request-id", id);
        }
    }
}

/// What a client's request gains on its way upstream, with its request id if `keep_id` (the
/// access log alone shows it; a copy of a new id costs an allocation).
pub fn to_upstream(
    lines: &Lines,
    fwd: Forwarded,
    reuse: bool,
    keep_id: bool,
) -> (Option<HeaderValue>, Added) {
    let (id, request_id) = match &lines.request_id {
        Some(id) => (
            keep_id
                .then(|| HeaderValue::from_maybe_shared(id.clone()).ok())
                .flatten(),
            None,
        ),
        None => {
            let id = new_request_id();
            let kept = keep_id.then(|| HeaderValue::from_bytes(&id).expect("hex is a valid value"));
            (kept, Some(id))
        }
    };
    let added = Added {
        host_line: !lines.host_forwarded,
        host: fwd.host,
        forwarded_for: lines.forwarded_for.clone(),
        client_ip: fwd.client_ip,
        close: !reuse,
        request_id,
    };
    (id, added)
}

/// Appends `ip` as text. IPv4, nearly every client, is written digit by digit: `Display` for
/// an address goes through the formatting machinery and costs as much as the rest of the
/// request's header work.
fn push_ip(out: &mut BytesMut, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        // Writing to a BytesMut cannot fail.
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.put_u8(b'.');
        }
        if octet >= 100 {
            out.put_u8(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.put_u8(b'0' + octet / 10 % 10);
        }
        out.put_u8(b'0' + octet % 10);
    }
}

/// A random 128-bit id in hex, like nginx's `$request_id`.
fn new_request_id() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = fastrand::u128(..);
    let mut id = [0u8; 32];
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((bits >> (124 - 4 * i)) & 0xf) as usize];
    }
    id
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn ip_text_is_what_display_writes(bits in any::<u32>(), v6 in any::<u128>()) {
            for ip in [IpAddr::V4(Ipv4Addr::from(bits)), IpAddr::V6(v6.into())] {
                let mut text = BytesMut::from("x, ");
                push_ip(&mut text, ip);
                let display = format!("x, {ip}");
                prop_assert_eq!(&text[..], display.as_bytes());
            }
        }
    }

    /// A client on 127.0.0.1 that asked for `host`.
    fn from_localhost(host: Option<&'static str>) -> Forwarded {
        Forwarded {
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host: host.map(|h| Bytes::from_static(h.as_bytes())),
        }
    }

    /// The lines the upstream gets after the client's own, and the request id kept.
    fn added(lines: &Lines, fwd: Forwarded, reuse: bool) -> (String, Option<HeaderValue>) {
        let (id, added) = to_upstream(lines, fwd, reuse, true);
        let mut head = BytesMut::new();
        added.put(&mut head);
        (String::from_utf8(head.to_vec()).unwrap(), id)
    }

    #[test]
    fn kaguard_says_where_the_request_came_from() {
        let lines = Lines {
            host: Some(Bytes::from_static(b"example.com")),
            host_forwarded: true,
            forwarded_for: Some(Bytes::from_static(b"10.0.0.1, 10.0.0.2")),
            request_id: Some(Bytes::from_static(b"abc")),
            ..Lines::default()
        };
        let (text, id) = added(&lines, from_localhost(Some("example.com")), true);
        assert_eq!(
            text,
            "x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\n\
             x-forwarded-proto: http\r\n\
             x-forwarded-host: example.com\r\n"
        );
        assert_eq!(id.unwrap(), "abc");
    }

    #[test]
    fn the_routed_host_is_written_where_the_clients_line_is_not_forwarded() {
        let lines = Lines {
            host: Some(Bytes::from_static(b"a.example")),
            ..Lines::default()
        };
        let (text, _) = added(&lines, from_localhost(Some("b.example:8080")), true);
        assert!(text.starts_with("host: b.example:8080\r\nx-forwarded-for: 127.0.0.1\r\n"));
        assert!(text.contains("x-forwarded-host: b.example:8080\r\n"));
        // No host at all (HTTP/1.0 without Host): none is made up.
        let (text, _) = added(&Lines::default(), from_localhost(None), true);
        assert!(!text.contains("host"), "{text}");
    }

    #[test]
    fn the_request_id_is_kept_only_when_asked_for_and_sent_either_way() {
        for keep in [true, false] {
            let (id, added) = to_upstream(&Lines::default(), from_localhost(None), true, keep);
            assert_eq!(id.is_some(), keep);
            let sent = added.request_id.expect("a new id is sent");
            assert!(sent.iter().all(u8::is_ascii_hexdigit));
            if let Some(id) = id {
                assert_eq!(id.as_bytes(), sent);
            }
            let lines = Lines {
                request_id: Some(Bytes::from_static(b"from-client")),
                ..Lines::default()
            };
            let (id, added) = to_upstream(&lines, from_localhost(None), true, keep);
            assert_eq!(id.map(|id| id == "from-client"), keep.then_some(true));
            assert!(
                added.request_id.is_none(),
                "the client's goes with its lines"
            );
        }
    }

    #[test]
    fn a_new_request_id_is_written_and_no_reuse_says_close() {
        let (text, id) = added(&Lines::default(), from_localhost(None), false);
        let id = id.unwrap();
        assert_eq!(id.len(), 32);
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(text.ends_with(&format!("x-request-id: {}\r\n", id.to_str().unwrap())));
    }
}
