//! Client-side keep-alive: persistence rules, request cap, idle timeout announced and held
//! a little longer, header timeout.

mod support;

use std::time::Duration;

use kaguard::downstream::PARK_AFTER;
use kaguard::tools::upstream::{Behaviour, TestUpstream};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn responses_announce_the_idle_timeout() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let resp = get(kg.addr, "/").await;
    assert_eq!(header(resp.headers(), "keep-alive"), Some("timeout=620"));
    assert_eq!(header(resp.headers(), "connection"), None);
}

#[tokio::test]
async fn last_request_under_keepalive_requests_says_close_and_closes() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.downstream.keepalive_requests = 3;
    let kg = start(cfg).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..2 {
        let resp = client.get("/").await;
        assert_eq!(header(resp.headers(), "connection"), None);
    }
    let last = client.get("/").await;
    assert_eq!(header(last.headers(), "connection"), Some("close"));
    assert!(
        client.closed_within(PATIENCE).await,
        "kaguard kept the connection open"
    );
}

#[tokio::test]
async fn client_asking_for_close_gets_close() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut client = Client::connect(kg.addr).await;
    let req = http::Request::get("/")
        .header("host", "t")
        .header("connection", "close")
        .body(Default::default());
    let resp = client.send(req.unwrap()).await;
    assert_eq!(header(resp.headers(), "connection"), Some("close"));
    assert!(client.closed_within(PATIENCE).await);
    // The client's Connection header is hop-by-hop: the upstream connection stays pooled.
    assert_eq!(get(kg.addr, "/").await.status(), 200);
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn idle_client_connection_is_held_past_the_announced_timeout_then_closed() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.downstream.keepalive_timeout = Duration::from_secs(1);
    let kg = start(cfg).await;
    let mut client = Client::connect(kg.addr).await;
    let resp = client.get("/").await;
    assert_eq!(header(resp.headers(), "keep-alive"), Some("timeout=1"));
    // A client honoring the hint closes at 1 s; kaguard must still be there a bit later.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        !client.closed_within(Duration::ZERO).await,
        "closed before the grace period"
    );
    assert_eq!(client.get("/").await.status(), 200);
    assert!(
        client.closed_within(PATIENCE).await,
        "never closed the idle connection"
    );
}

/// Sends `bytes` to a kaguard whose client_header_timeout is 300 ms, and returns what it
/// answered before closing the connection, which it must within [`PATIENCE`].
async fn with_header_timeout(bytes: &[u8]) -> (String, TestUpstream) {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.downstream.client_header_timeout = Duration::from_millis(300);
    let kg = start(cfg).await;
    let mut stream = tokio::net::TcpStream::connect(kg.addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    (read_until_closed(&mut stream).await, up)
}

#[tokio::test]
async fn slow_request_head_is_cut_off_after_client_header_timeout() {
    let (seen, up) = with_header_timeout(b"GET / HTTP/1.1\r\nHost: t\r\n").await;
    assert!(
        seen.is_empty(),
        "expected the connection closed, got {seen:?}"
    );
    assert_eq!(up.requests(), 0);
}

/// Everything read until kaguard closes the connection, which it must within [`PATIENCE`].
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "connection still open");
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn silent_new_connection_is_closed_after_client_header_timeout() {
    let (seen, _up) = with_header_timeout(b"").await;
    assert!(
        seen.is_empty(),
        "expected the connection closed, got {seen:?}"
    );
}

/// A client that stops reading is cut off after `send_timeout`, even when hyper has already
/// taken the whole response and only the flush is left.
#[tokio::test]
async fn client_that_stops_reading_is_cut_off_after_send_timeout() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.downstream.send_timeout = Duration::from_millis(300);
    let kg = start(cfg).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stream = sock.connect(kg.addr).await.unwrap();
    stream
        .write_all(b"GET /?size=3000000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    // Never read. kaguard must give up on this connection on its own.
    kg.metric_reaches("kaguard_downstream_connections_active", 0.0)
        .await;
    drop(stream);
}

const PARKED: &str = "kaguard_downstream_connections_parked";

#[tokio::test]
async fn an_idle_client_connection_is_parked_and_serves_its_next_request() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..3 {
        assert_eq!(client.get("/").await.status(), 200);
        kg.metric_reaches(PARKED, 1.0).await;
    }
    assert_eq!(client.get("/").await.status(), 200);
    assert_eq!(kg.metric("kaguard_downstream_connections_total").await, 1.0);
}

#[tokio::test]
async fn parked_client_connections_have_no_task_of_their_own() {
    const CLIENTS: usize = 40;
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut first = Client::connect(kg.addr).await;
    assert_eq!(first.get("/").await.status(), 200);
    kg.metric_reaches(PARKED, 1.0).await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    // Bare sockets: the test's own HTTP client would add a task per connection.
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut stream = tokio::net::TcpStream::connect(kg.addr).await.unwrap();
        assert!(exchange(&mut stream).await.starts_with("HTTP/1.1 200"));
        clients.push(stream);
    }
    kg.metric_reaches(PARKED, (CLIENTS + 1) as f64).await;
    // Room for upstream connections opened meanwhile, none for one task per client.
    assert!(
        tasks() < before + CLIENTS / 4,
        "{} tasks with {CLIENTS} more parked connections, {before} before",
        tasks()
    );
    for stream in &mut clients {
        assert!(exchange(stream).await.starts_with("HTTP/1.1 200"));
    }
    assert_eq!(
        kg.metric("kaguard_downstream_connections_total").await,
        (CLIENTS + 1) as f64
    );
}

/// Sends `GET /` and reads the whole response, framed by its Content-Length.
async fn exchange(stream: &mut tokio::net::TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .expect("a Content-Length");
            if seen.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the response in time")
            .unwrap();
        assert!(n > 0, "closed after {text:?}");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// kaguard holding idle client connections for 3 s (the announced 2 s plus the grace of one
/// second), and a client whose connection served one request and parked.
async fn parked_with_a_short_hold() -> (TestUpstream, Kaguard, Client) {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.downstream.keepalive_timeout = Duration::from_secs(2);
    let kg = start(cfg).await;
    let mut client = Client::connect(kg.addr).await;
    assert_eq!(client.get("/").await.status(), 200);
    kg.metric_reaches(PARKED, 1.0).await;
    (up, kg, client)
}

#[tokio::test]
async fn a_connection_parked_again_is_held_from_its_last_request() {
    let (_up, kg, mut client) = parked_with_a_short_hold().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(client.get("/").await.status(), 200);
    kg.metric_reaches(PARKED, 1.0).await;
    // Past the first park's hold, well inside the second's.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(client.get("/").await.status(), 200);
    assert_eq!(kg.metric("kaguard_downstream_connections_total").await, 1.0);
}

#[tokio::test]
async fn a_request_begun_before_the_connection_parked_is_served_after_it() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut stream = tokio::net::TcpStream::connect(kg.addr).await.unwrap();
    // The start of a second request arrives with the first, then nothing for longer than
    // the connection stays unparked.
    stream
        .write_all(b"GET /?delay=50ms HTTP/1.1\r\nHost: t\r\n\r\nGET /second HTTP/1.1\r\nHo")
        .await
        .unwrap();
    tokio::time::sleep(PARK_AFTER + Duration::from_millis(600)).await;
    stream.write_all(b"st: t\r\n\r\n").await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while seen.matches("HTTP/1.1 200").count() < 2 {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("both responses in time")
            .unwrap();
        assert!(n > 0, "closed after {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn a_parked_client_connection_is_closed_at_shutdown() {
    let up = upstream(Behaviour::default()).await;
    let mut kg = start(config(&[up.addr()])).await;
    let mut client = Client::connect(kg.addr).await;
    assert_eq!(client.get("/").await.status(), 200);
    kg.metric_reaches(PARKED, 1.0).await;
    assert!(kg.shutdown().await, "drain did not finish");
    assert!(
        client.closed_within(PATIENCE).await,
        "parked client connection left open"
    );
}

/// The same before the park: a kept-alive client connection that has just had its answer is
/// closed as soon as shutdown begins, not when it would have been parked.
#[tokio::test]
async fn shutdown_closes_a_connection_kept_alive_at_once_not_at_its_park() {
    let up = upstream(Behaviour::default()).await;
    let mut kg = start(config(&[up.addr()])).await;
    let mut idle = Client::connect(kg.addr).await;
    assert_eq!(idle.get("/").await.status(), 200);
    let shutdown = tokio::spawn(async move { kg.shutdown().await });
    // Closed in a few milliseconds when shutdown reaches it; at its park, PARK_AFTER after
    // its answer, when it does not.
    assert!(
        idle.closed_within(PARK_AFTER / 2).await,
        "the idle connection waited for its park"
    );
    assert!(shutdown.await.unwrap(), "drain did not finish");
}

#[tokio::test]
async fn a_parked_client_connection_is_closed_when_idle_past_its_hold() {
    let (_up, kg, mut client) = parked_with_a_short_hold().await;
    assert!(
        client.closed_within(PATIENCE).await,
        "parked client connection left open"
    );
    kg.metric_reaches(PARKED, 0.0).await;
    assert_eq!(
        kg.metric("kaguard_downstream_connections_active").await,
        0.0
    );
}

#[tokio::test]
async fn a_request_head_begun_before_the_connection_parked_gets_the_header_timeout() {
    // The start of a second request arrives with the first, and its end never comes. Only the
    // park hands those bytes to the header timeout; unparked, the idle hold (76 s) applies.
    let (seen, _up) =
        with_header_timeout(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET /second HTTP/1.1\r\nHo").await;
    assert_eq!(seen.matches("HTTP/1.1 200").count(), 1, "{seen}");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut stream = tokio::net::TcpStream::connect(kg.addr).await.unwrap();
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let out = read_until_closed(&mut stream).await;
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{out}");
    let uris: Vec<String> = up.seen().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris, ["/a", "/b"]);
}

/// A client that closes its connection while the upstream works ends the request then, as
/// in nginx: its connection is not held until the upstream answers.
#[tokio::test]
async fn a_client_gone_before_its_response_ends_its_connection_at_once() {
    let up = upstream(Behaviour {
        delay: PATIENCE * 3,
        ..Behaviour::default()
    })
    .await;
    let kg = start(config(&[up.addr()])).await;
    let mut stream = tokio::net::TcpStream::connect(kg.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let series = "kaguard_downstream_connections_active";
    kg.metric_reaches(series, 1.0).await;
    // Wait for the request to reach the upstream, so that kaguard is waiting on it.
    for _ in 0..(PATIENCE.as_millis() / 10) {
        if up.requests() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.requests(), 1);
    drop(stream);
    kg.metric_reaches(series, 0.0).await;
}
