use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::downstream::head::{Head, Refused, parse};

fn read(raw: &str) -> Result<Head, Refused> {
    let mut buf = BytesMut::from(raw);
    let head = parse(&mut buf, 64 * 1024, &mut Vec::new(), &mut BytesMut::new())?;
    Ok(head.expect("a whole head"))
}

fn lines(raw: &str) -> Lines {
    read(raw).expect("a valid head").lines
}

fn forwarded(lines: &Lines) -> String {
    String::from_utf8(lines.fields.lines().to_vec()).unwrap()
}

#[test]
fn the_lines_kaguard_passes_on_go_as_written() {
    let l = lines(
        "GET / HTTP/1.1\r\nHost: h\r\nACCEPT:text/html\r\nConnection: keep-alive\r\n\
         x-Empty:\r\nCookie: a=1;  b=2 \r\nCookie:\tc=3\r\n\r\n",
    );
    assert_eq!(
        forwarded(&l),
        "Host: h\r\nACCEPT:text/html\r\nx-Empty:\r\nCookie: a=1;  b=2\r\nCookie:\tc=3\r\n"
    );
    assert!(l.host_forwarded);
    assert_eq!(l.host.as_deref(), Some(&b"h"[..]));
}

#[test]
fn what_kaguard_acts_on_is_noted_and_not_passed_on() {
    let l = lines(
        "POST / HTTP/1.1\r\nHost: h\r\nUser-Agent: ua/1\r\nX-Forwarded-For: 10.0.0.1\r\n\
         Expect: 100-continue\r\nContent-Length: 3, 3\r\nx-forwarded-for: 10.0.0.2\r\n\
         X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nKeep-Alive: timeout=5\r\n\
         TE: trailers\r\nProxy-Authorization: secret\r\nIdempotency-Key: k\r\nConnection: X-Gone\r\n\
         X-Gone: 1\r\nX-Kept: 2\r\n\r\n",
    );
    assert_eq!(
        forwarded(&l),
        "Host: h\r\nUser-Agent: ua/1\r\nIdempotency-Key: k\r\nX-Kept: 2\r\n"
    );
    assert_eq!(l.user_agent.as_deref(), Some(&b"ua/1"[..]));
    assert_eq!(l.forwarded_for.as_deref(), Some(&b"10.0.0.1, 10.0.0.2"[..]));
    assert_eq!(l.fields.content_length(), Some(3));
    assert!(l.idempotency_key);
    assert!(l.keep_alive);
}

#[test]
fn the_clients_host_line_goes_as_is_only_when_it_is_the_routed_one() {
    for (raw, host_forwarded) in [
        ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", true),
        ("GET / HTTP/1.0\r\nhost: a\r\n\r\n", true),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n",
            false,
        ),
        ("GET http://b/ HTTP/1.1\r\nHost: a\r\n\r\n", false),
        ("GET / HTTP/1.0\r\n\r\n", false),
    ] {
        let l = lines(raw);
        assert_eq!(l.host_forwarded, host_forwarded, "{raw}");
        assert_eq!(forwarded(&l).contains("ost: a"), host_forwarded, "{raw}");
        assert_eq!(l.host.is_some(), raw.contains("ost: a"), "{raw}");
    }
}

#[test]
fn a_request_id_is_the_first_and_goes_on_alone_unless_it_is_empty() {
    let l = lines("GET / HTTP/1.0\r\nX-Request-Id: a\r\nx-request-id: b\r\n\r\n");
    assert_eq!(l.request_id.as_deref(), Some(&b"a"[..]));
    assert_eq!(forwarded(&l), "X-Request-Id: a\r\n");
    let l = lines("GET / HTTP/1.0\r\nX-Request-Id:\r\nX-Request-Id: b\r\n\r\n");
    assert_eq!(l.request_id, None);
    assert_eq!(forwarded(&l), "");
}

#[test]
fn a_name_connection_lists_is_not_acted_on() {
    let l = lines(
        "POST / HTTP/1.0\r\nConnection: x-request-id, X-Forwarded-For, idempotency-key\r\n\
         X-Request-Id: a\r\nX-Forwarded-For: 10.0.0.1\r\nIdempotency-Key: k\r\n\r\n",
    );
    assert_eq!(l.request_id, None);
    assert_eq!(l.forwarded_for, None);
    assert!(!l.idempotency_key);
    assert_eq!(forwarded(&l), "");
}

#[test]
fn keep_alive_follows_the_version_and_connection() {
    for (raw, keep) in [
        ("GET / HTTP/1.1\r\nHost: h\r\n\r\n", true),
        (
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n",
            false,
        ),
        ("GET / HTTP/1.0\r\n\r\n", false),
        ("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
    ] {
        assert_eq!(lines(raw).keep_alive, keep, "{raw}");
    }
}

#[test]
fn the_lines_of_a_long_head_are_told_apart_to_the_last() {
    let mut raw = String::from("GET / HTTP/1.1\r\n");
    for i in 0..95 {
        raw.push_str(&format!("X-{i}: v\r\n"));
    }
    raw.push_str(
        "Upgrade: h2c\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: x-3, X-93\r\nHost: h\r\n\r\n",
    );
    let l = lines(&raw);
    let kept: Vec<_> = l.fields.iter().map(|(name, _)| name.to_vec()).collect();
    let expected: Vec<_> = (0..95)
        .filter(|&i| i != 3 && i != 93)
        .map(|i| format!("X-{i}").into_bytes())
        .chain([b"Host".to_vec()])
        .collect();
    assert_eq!(kept, expected);
    assert_eq!(l.forwarded_for.as_deref(), Some(&b"10.0.0.1"[..]));
    assert!(l.host_forwarded);
}

/// Names a random head mixes: each rule's, in several cases, and some kaguard passes on.
const NAMES: &[&str] = &[
    "Host",
    "host",
    "X-Request-Id",
    "x-request-id",
    "X-Forwarded-For",
    "X-FORWARDED-PROTO",
    "x-forwarded-host",
    "Expect",
    "Content-Length",
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "Upgrade",
    "TE",
    "Trailer",
    "User-Agent",
    "Idempotency-Key",
    "Accept",
    "Cookie",
    "X-A",
    "x-b",
];
const CONNECTION_VALUES: &[&str] = &["keep-alive", "x-a", "host", "X-Request-Id", "close, X-B"];
const VALUES: &[&str] = &["", "1", "a b", "10.0.0.1"];

/// What the rules say is forwarded of `lines`, line by line; `None` if the head is refused.
fn model(lines: &[(&str, &str)], absolute: bool, http10: bool) -> Option<Vec<String>> {
    let is = |name: &str, known: &str| name.eq_ignore_ascii_case(known);
    let listed = |name: &str| {
        lines
            .iter()
            .filter(|(n, _)| is(n, "connection"))
            .flat_map(|(_, v)| v.split(','))
            .any(|token| is(token.trim(), name))
    };
    let hosts = lines.iter().filter(|(n, _)| is(n, "host")).count();
    if hosts > 1 || hosts == 0 && !http10 {
        return None;
    }
    let first_id = lines.iter().position(|(n, _)| is(n, "x-request-id"));
    let id_sent = first_id.filter(|&i| !lines[i].1.is_empty() && !listed("x-request-id"));
    let own = [
        "content-length",
        "expect",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ];
    let forwarded = lines
        .iter()
        .enumerate()
        .filter(|&(i, (n, _))| {
            crate::hop::position(n.as_bytes()).is_none()
                && !listed(n)
                && !own.iter().any(|o| is(n, o))
                && (!is(n, "host") || hosts == 1 && !absolute)
                && (!is(n, "x-request-id") || id_sent == Some(i))
        })
        .map(|(_, (n, v))| format!("{n}: {v}\r\n"))
        .collect();
    Some(forwarded)
}

proptest! {
    /// Whatever a head mixes, exactly the lines the rules pass on go upstream, each as
    /// written and in order.
    #[test]
    fn exactly_the_lines_the_rules_pass_on_go_upstream(
        picks in proptest::collection::vec((0..NAMES.len(), 0..VALUES.len()), 0..24),
        absolute in any::<bool>(),
        http10 in any::<bool>(),
    ) {
        let head: Vec<(&str, &str)> = picks
            .iter()
            .map(|&(n, v)| match NAMES[n] {
                "Connection" => ("Connection", CONNECTION_VALUES[v % CONNECTION_VALUES.len()]),
                "Content-Length" => ("Content-Length", "0"),
                name => (name, VALUES[v]),
            })
            .collect();
        let target = if absolute { "http://h/" } else { "/" };
        let version = if http10 { "1.0" } else { "1.1" };
        let mut raw = format!("GET {target} HTTP/{version}\r\n");
        for (n, v) in &head {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        match model(&head, absolute, http10) {
            Some(expected) => prop_assert_eq!(forwarded(&lines(&raw)), expected.concat()),
            None => prop_assert!(matches!(read(&raw), Err(Refused::Invalid(_)))),
        }
    }
}
