//! Header rules: hop-by-hop headers stop at kaguard in both directions; Host, X-Forwarded-*
//! and X-Request-Id go up; the access log line describes the exchange.

mod support;

use http::Request;
use http_body_util::Full;
use kaguard::tools::upstream::{Behaviour, SeenRequest, TestUpstream};
use support::*;

/// The last request the upstream saw.
fn last_seen(up: &TestUpstream) -> SeenRequest {
    up.seen().pop().expect("the upstream saw a request")
}

fn builder(path: &str) -> http::request::Builder {
    Request::get(path).header("host", "test")
}

#[tokio::test]
async fn hop_by_hop_request_headers_do_not_reach_the_upstream() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let hop_by_hop = [
        ("connection", "x-custom"),
        ("x-custom", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("trailer", "x"),
        ("upgrade", "websocket"),
        ("proxy-authorization", "basic x"),
    ];
    let request = || {
        let mut req = builder("/").header("x-ordinary", "yes");
        for (name, value) in hop_by_hop {
            req = req.header(name, value);
        }
        req.body(Full::default()).unwrap()
    };
    // Straight to the upstream first: proves the client really sends every one of them.
    assert_eq!(
        Client::connect(up.addr())
            .await
            .send(request())
            .await
            .status(),
        200
    );
    let direct = last_seen(&up);
    for (name, value) in hop_by_hop {
        assert_eq!(
            header(&direct.headers, name),
            Some(value),
            "the client did not send {name}"
        );
    }
    let resp = Client::connect(kg.addr).await.send(request()).await;
    assert_eq!(resp.status(), 200);
    let seen = last_seen(&up);
    for (name, _) in hop_by_hop {
        assert!(
            !seen.headers.contains_key(name),
            "{name} reached the upstream: {:?}",
            seen.headers
        );
    }
    assert_eq!(header(&seen.headers, "x-ordinary"), Some("yes"));
}

#[tokio::test]
async fn upstream_keep_alive_is_replaced_by_kaguards_own() {
    let up = upstream(Behaviour {
        hint: true,
        ..Behaviour::default()
    })
    .await;
    let direct = get(up.addr(), "/").await;
    assert_eq!(
        header(direct.headers(), "keep-alive"),
        Some("timeout=5"),
        "the upstream sends its hint"
    );
    let kg = start(config(&[up.addr()])).await;
    let resp = get(kg.addr, "/").await;
    let values: Vec<_> = resp.headers().get_all("keep-alive").iter().collect();
    assert_eq!(values, ["timeout=620"]);
}

#[tokio::test]
async fn content_length_response_reaches_the_client_without_transfer_encoding() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let resp = get(kg.addr, "/?size=1000").await;
    assert_eq!(header(resp.headers(), "content-length"), Some("1000"));
    assert_eq!(header(resp.headers(), "transfer-encoding"), None);
    assert_eq!(resp.body().len(), 1000);
}

#[tokio::test]
async fn hop_by_hop_response_headers_do_not_reach_the_client() {
    let (addr, _) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-secret\r\nX-Secret: 1\r\n\
          Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: x-t\r\nUpgrade: h2c\r\n\
          X-Kept: yes\r\n\r\nOK",
    )
    .await;
    let kg = start(config(&[addr])).await;
    let resp = get(kg.addr, "/").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.body().as_ref(), b"OK");
    let h = resp.headers();
    for name in ["x-secret", "proxy-authenticate", "trailer", "upgrade"] {
        assert!(!h.contains_key(name), "{name} reached the client: {h:?}");
    }
    assert!(
        h.get_all("connection").iter().all(|v| v != "x-secret"),
        "{h:?}"
    );
    assert_eq!(
        h.get_all("keep-alive").iter().collect::<Vec<_>>(),
        ["timeout=620"]
    );
    assert_eq!(header(h, "x-kept"), Some("yes"));
}

#[tokio::test]
async fn the_client_gets_one_content_length_whatever_the_upstream_did_with_its_own() {
    for head in [
        // Listed in `Connection`: the upstream's is this hop's alone; the body's size stands in.
        &b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"[..],
        // A list and a repeated line: one value, said once.
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\ncontent-length: 5\r\n\r\nhello",
    ] {
        let (addr, _) = scripted_upstream(head).await;
        let kg = start(config(&[addr])).await;
        let resp = get(kg.addr, "/").await;
        assert_eq!(resp.body().as_ref(), b"hello");
        let lengths: Vec<_> = resp.headers().get_all("content-length").iter().collect();
        assert_eq!(lengths, ["5"], "{:?}", resp.headers());
    }
}

/// The lines kaguard passes on leave as the client wrote them, each ending in CRLF; those it
/// acts on leave as kaguard writes them, once.
#[tokio::test]
async fn request_lines_go_upstream_as_written_and_framing_once() {
    let (addr, _, heads) =
        recording_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let kg = start(config(&[addr])).await;
    let sent = raw(
        kg.addr,
        b"POST /p HTTP/1.1\r\nHost: test\r\nX-Mixed-Case: A b\nContent-Length: 5, 5\r\n\
          content-length: 5\r\nX-Request-Id:\r\nX-Trailing: v \t\r\nx-forwarded-host: evil\r\n\
          Connection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(status_of(&sent), Some(200), "{sent}");
    let head = String::from_utf8(heads.lock().unwrap().pop().expect("a request")).unwrap();
    assert!(
        head.starts_with("POST /p HTTP/1.1\r\nHost: test\r\nX-Mixed-Case: A b\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nX-Trailing: v\r\n"), "{head}");
    assert_eq!(
        head.matches('\n').count(),
        head.matches("\r\n").count(),
        "{head}"
    );
    let lines = |name: &str| {
        head.lines()
            .filter(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(lines("content-length"), ["content-length: 5"]);
    assert_eq!(lines("x-forwarded-host"), ["x-forwarded-host: test"]);
    let ids = lines("x-request-id");
    assert_eq!(ids.len(), 1, "{head}");
    assert_eq!(ids[0].len(), "x-request-id: ".len() + 32, "{head}");
    assert!(lines("connection").is_empty(), "{head}");
}

/// Heads kaguard refuses, and the status each gets: none reaches the upstream. kaguard carries
/// no tunnel, and a target of the authority form is a tunnel's.
#[tokio::test]
async fn a_refused_request_is_never_sent() {
    let (addr, accepted, _) =
        recording_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let kg = start(config(&[addr])).await;
    for (request, status) in [
        (&b"GET / HTTP/1.1\r\n\r\n"[..], 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 501),
        (b"CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n", 501),
        (b"GET h:80 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET user:secret@h:80 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ] {
        let answer = raw(kg.addr, request).await;
        assert_eq!(status_of(&answer), Some(status), "{answer}");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn host_is_passed_through_and_copied_to_x_forwarded_host() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let req = Request::get("/")
        .header("host", "Example.test:8080")
        .body(Full::default())
        .unwrap();
    assert_eq!(Client::connect(kg.addr).await.send(req).await.status(), 200);
    let seen = last_seen(&up);
    assert_eq!(header(&seen.headers, "host"), Some("Example.test:8080"));
    assert_eq!(
        header(&seen.headers, "x-forwarded-host"),
        Some("Example.test:8080")
    );
}

/// An absolute-form target names the host, its user information left out, whatever the
/// Host line says; the access log shows that information masked.
#[tokio::test]
async fn absolute_form_target_replaces_the_host_header() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let rows = [
        ("http://right.test/path", "right.test"),
        ("http://user:secret@right.test:8080/path", "right.test:8080"),
    ];
    for (target, host) in rows {
        let req = Request::get(target)
            .header("host", "wrong.test")
            .body(Full::default())
            .unwrap();
        assert_eq!(Client::connect(kg.addr).await.send(req).await.status(), 200);
        let seen = last_seen(&up);
        assert_eq!(seen.uri, "/path");
        assert_eq!(header(&seen.headers, "x-forwarded-host"), Some(host));
        assert_eq!(header(&seen.headers, "host"), Some(host));
    }
    let logged: Vec<_> = kg
        .log_lines(2)
        .await
        .iter()
        .map(|l| l["request"].clone())
        .collect();
    assert_eq!(
        logged,
        [
            "GET http://right.test/path HTTP/1.1",
            "GET http://***@right.test:8080/path HTTP/1.1"
        ]
    );
}

#[tokio::test]
async fn an_absolute_form_target_without_a_host_is_refused() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let status = async |target: &str| {
        let request = format!("GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        status_of(&raw(kg.addr, request.as_bytes()).await)
    };
    for target in ["http://u@:80/", "http://:80/", "http://[::1@evil]/"] {
        assert_eq!(status(target).await, Some(400), "{target}");
    }
    for target in ["http://u@right.test/", "http://[::1]:8080/"] {
        assert_eq!(status(target).await, Some(200), "{target}");
    }
    assert_eq!(up.requests(), 2);
}

/// A response's trailers go on without framing, hop-by-hop or `Host` lines, nor the names
/// its head's `Connection` line listed (RFC 9110 §7.6.1).
#[tokio::test]
async fn a_responses_trailers_go_on_without_framing_or_hop_by_hop_lines() {
    let (addr, _) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: X-Secret\r\n\r\n\
          2\r\nok\r\n0\r\nX-Sum: 6\r\nContent-Length: 5\r\nConnection: close\r\n\
          Host: elsewhere\r\nx-secret: a\r\n\r\n",
    )
    .await;
    let kg = start(config(&[addr])).await;
    let out = raw(
        kg.addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), Some(200), "{out}");
    let (_, trailers) = out.split_once("\r\n0\r\n").expect("a chunked body");
    assert_eq!(trailers, "x-sum: 6\r\n\r\n", "{out}");
}

/// A request's trailers lose the same lines on their way upstream; here a name its
/// `Connection` line listed.
#[tokio::test]
async fn a_requests_trailers_go_on_without_the_names_connection_listed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("a connection");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Until the chunked body's end: the last chunk, then an empty line.
        while !seen.ends_with(b"\r\n\r\n") || !seen.windows(5).any(|w| w == b"\r\n0\r\n") {
            match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 && seen.len() < 64 * 1024 => seen.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        stream.write_all(response).await.expect("the response");
        String::from_utf8(seen).expect("text")
    });
    let kg = start(config(&[addr])).await;
    let out = raw(
        kg.addr,
        b"POST / HTTP/1.1\r\nHost: t\r\nConnection: close, X-Secret\r\n\
          Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Sum: 6\r\nX-SECRET: a\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), Some(200), "{out}");
    let seen = upstream.await.expect("the upstream's task");
    let (_, trailers) = seen.split_once("\r\n0\r\n").expect("a chunked body");
    assert_eq!(trailers, "x-sum: 6\r\n\r\n", "{seen}");
}

#[tokio::test]
async fn x_forwarded_for_is_appended_to_the_clients_value() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let req = builder("/")
        .header("x-forwarded-for", "10.0.0.1")
        .body(Full::default())
        .unwrap();
    assert_eq!(Client::connect(kg.addr).await.send(req).await.status(), 200);
    let seen = last_seen(&up);
    let values: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(values, ["10.0.0.1, 127.0.0.1"]);
}

#[tokio::test]
async fn x_forwarded_for_keeps_every_line_the_client_sent() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let req = builder("/")
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-forwarded-for", "10.0.0.2")
        .body(Full::default())
        .unwrap();
    assert_eq!(Client::connect(kg.addr).await.send(req).await.status(), 200);
    let seen = last_seen(&up);
    let values: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(values, ["10.0.0.1, 10.0.0.2, 127.0.0.1"]);
}

#[tokio::test]
async fn x_forwarded_for_and_proto_are_set_when_the_client_sent_none() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    assert_eq!(get(kg.addr, "/").await.status(), 200);
    let seen = last_seen(&up);
    let values: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(values, ["127.0.0.1"]);
    assert_eq!(header(&seen.headers, "x-forwarded-proto"), Some("http"));
}

#[tokio::test]
async fn client_request_id_is_forwarded_and_logged() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let req = builder("/")
        .header("x-request-id", "client-id-42")
        .body(Full::default())
        .unwrap();
    assert_eq!(Client::connect(kg.addr).await.send(req).await.status(), 200);
    assert_eq!(
        header(&last_seen(&up).headers, "x-request-id"),
        Some("client-id-42")
    );
    let lines = kg.log_lines(1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["request_id"], "client-id-42");
}

#[tokio::test]
async fn missing_request_id_is_generated_forwarded_and_logged() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut client = Client::connect(kg.addr).await;
    assert_eq!(client.get("/").await.status(), 200);
    assert_eq!(client.get("/").await.status(), 200);
    let seen = up.seen();
    let ids: Vec<&str> = seen
        .iter()
        .map(|r| header(&r.headers, "x-request-id").expect("an id"))
        .collect();
    for id in &ids {
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    assert_ne!(ids[0], ids[1], "two requests got the same id");
    let lines = kg.log_lines(2).await;
    let logged: Vec<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().expect("a string"))
        .collect();
    assert_eq!(logged, ids);
}

#[tokio::test]
async fn access_log_line_of_a_reused_connection_describes_the_exchange() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..2 {
        let req = builder("/path")
            .header("user-agent", "kaguard-test/1.0")
            .body(Full::default())
            .unwrap();
        assert_eq!(client.send(req).await.status(), 200);
    }
    assert_eq!(up.connections(), 1);
    let lines = kg.log_lines(2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (first, line) = (&lines[0], &lines[1]);
    assert_eq!(first["upstream_connection_reused"], false, "{first}");
    assert_eq!(first["upstream_connection_requests"], 1, "{first}");
    assert_eq!(first["connection_requests"], 1, "{first}");
    assert_eq!(line["connection"], first["connection"], "{line}");
    assert_eq!(line["upstream_connection_reused"], true, "{line}");
    assert_eq!(line["upstream_connection_requests"], 2, "{line}");
    assert_eq!(line["connection_requests"], 2, "{line}");
    assert_eq!(line["attempts"], 1, "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["upstream_status"], 200, "{line}");
    assert_eq!(line["upstream_addr"], up.addr().to_string(), "{line}");
    assert_eq!(line["upstream"], "default", "{line}");
    assert_eq!(line["request"], "GET /path HTTP/1.1", "{line}");
    assert_eq!(line["http_user_agent"], "kaguard-test/1.0", "{line}");
    assert_eq!(line["remote_addr"], "127.0.0.1", "{line}");
    assert_eq!(line["body_bytes_sent"], 2, "{line}");
    assert_eq!(line["response_flags"], "", "{line}");
    let request_time = line["request_time"]
        .as_f64()
        .expect("request_time is a number");
    assert!((0.0..60.0).contains(&request_time), "{line}");
    let timestamp = line["timestamp"].as_str().expect("timestamp is a string");
    assert!(timestamp.ends_with('Z'), "{line}");
    let at = humantime::parse_rfc3339(timestamp).expect("timestamp is ISO 8601");
    let age = std::time::SystemTime::now()
        .duration_since(at)
        .expect("timestamp not in the future");
    assert!(age < std::time::Duration::from_secs(600), "{line}");
}
