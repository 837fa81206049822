//! The test upstream against raw TCP clients: every close is observed as the client sees it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, timeout};

use super::*;

/// Upper bound on any single wait in these tests; only reached when something is broken.
const PATIENCE: Duration = Duration::from_secs(5);

async fn start(behaviour: Behaviour) -> TestUpstream {
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    TestUpstream::start(any_port, behaviour)
        .await
        .expect("bind 127.0.0.1:0")
}

fn idle(millis: u64) -> Behaviour {
    Behaviour {
        idle_timeout: Some(Duration::from_millis(millis)),
        ..Behaviour::default()
    }
}

#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn number(&self, name: &str) -> u64 {
        self.header(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("numeric {name} in {self:?}"))
    }
}

/// A client that writes raw bytes and reads responses with `Content-Length` bodies.
struct RawClient {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (read, write) = stream.into_split();
        RawClient {
            read,
            write,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("write request");
    }

    async fn get(&mut self, target: &str) -> RawResponse {
        let request = format!("GET {target} HTTP/1.1\r\nHost: upstream\r\n\r\n");
        self.send(request.as_bytes()).await;
        self.response().await
    }

    async fn response(&mut self) -> RawResponse {
        timeout(PATIENCE, read_response(&mut self.read, &mut self.buf))
            .await
            .expect("response in time")
    }

    /// The next read: Ok(0) for FIN, Err for RST; panics if data arrives or nothing happens.
    async fn next_read(&mut self) -> io::Result<usize> {
        assert!(self.buf.is_empty(), "unread bytes {:?}", self.buf);
        let mut byte = [0; 1];
        let n = timeout(PATIENCE, self.read.read(&mut byte))
            .await
            .expect("close in time")?;
        assert_eq!(n, 0, "expected a close, got data");
        Ok(n)
    }
}

async fn read_response(read: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> RawResponse {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        fill(read, buf).await;
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("ascii head");
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("header line");
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().expect("numeric content-length"))
        .expect("responses here carry content-length");
    while buf.len() < length {
        fill(read, buf).await;
    }
    let body = buf.drain(..length).collect();
    RawResponse {
        status,
        headers,
        body,
    }
}

async fn fill(read: &mut OwnedReadHalf, buf: &mut Vec<u8>) {
    let mut chunk = [0; 64 * 1024];
    let n = read.read(&mut chunk).await.expect("read response");
    assert!(n > 0, "connection closed mid-response");
    buf.extend_from_slice(&chunk[..n]);
}

fn is_reset(result: &io::Result<usize>) -> bool {
    matches!(result, Err(e) if e.kind() == io::ErrorKind::ConnectionReset)
}

#[tokio::test]
async fn keep_alive_requests_share_one_connection_and_new_clients_are_counted() {
    let upstream = start(Behaviour::default()).await;
    let mut first = RawClient::connect(upstream.addr()).await;
    for n in 1..=3 {
        let response = first.get("/").await;
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"OK");
        assert_eq!(response.number("x-upstream-connection"), 1);
        assert_eq!(response.number("x-upstream-request"), n);
    }
    let mut second = RawClient::connect(upstream.addr()).await;
    assert_eq!(second.get("/").await.number("x-upstream-connection"), 2);
    assert_eq!(upstream.connections(), 2);
    assert_eq!(upstream.requests(), 4);
    upstream.shutdown().await;
}

#[tokio::test]
async fn idle_connection_is_closed_with_fin_after_idle_timeout() {
    let upstream = start(idle(100)).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    client.get("/").await;
    let answered = Instant::now();
    assert_eq!(client.next_read().await.expect("FIN, not RST"), 0);
    // The server's clock starts a moment before the client has the response; margin for that.
    assert!(answered.elapsed() >= Duration::from_millis(50));
}

#[tokio::test]
async fn connection_used_within_idle_timeout_stays_open_then_closes() {
    let upstream = start(idle(200)).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    for n in 1..=10 {
        assert_eq!(client.get("/").await.number("x-upstream-request"), n);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.connections(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(client.next_read().await.expect("FIN"), 0);
}

#[tokio::test]
async fn idle_timeout_does_not_fire_while_the_handler_is_slow() {
    let upstream = start(idle(100)).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    assert_eq!(client.get("/?delay=400ms").await.status, 200);
    assert_eq!(client.get("/").await.number("x-upstream-request"), 2);
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn idle_timeout_does_not_fire_while_a_large_response_waits_for_a_slow_reader() {
    let upstream = start(idle(100)).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    let size = 16 * 1024 * 1024;
    client
        .send(format!("GET /?size={size} HTTP/1.1\r\nHost: u\r\n\r\n").as_bytes())
        .await;
    // Far more than the socket buffers hold, so the server is stuck writing meanwhile.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(client.response().await.body.len(), size);
    assert_eq!(client.get("/").await.number("x-upstream-request"), 2);
}

#[tokio::test]
async fn idle_timeout_is_measured_from_the_last_response() {
    let upstream = start(idle(300)).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    client.get("/").await;
    let answered = Instant::now();
    client.next_read().await.expect("FIN");
    let waited = answered.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}"
    );
    assert!(waited < Duration::from_secs(2), "closed after {waited:?}");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let upstream = start(idle(100)).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    client
        .send(b"GET /a HTTP/1.1\r\nHost: u\r\n\r\nGET /b?delay=200ms HTTP/1.1\r\nHost: u\r\n\r\n")
        .await;
    assert_eq!(client.response().await.number("x-upstream-request"), 1);
    assert_eq!(client.response().await.number("x-upstream-request"), 2);
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn fresh_connection_without_a_request_is_closed_after_idle_timeout() {
    let upstream = start(idle(100)).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    assert_eq!(client.next_read().await.expect("FIN"), 0);
    assert_eq!(upstream.requests(), 0);
}

#[tokio::test]
async fn head_response_ends_the_exchange_and_restarts_the_idle_timer() {
    let upstream = start(idle(100)).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    client.send(b"HEAD / HTTP/1.1\r\nHost: u\r\n\r\n").await;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0; 1];
        let n = timeout(PATIENCE, client.read.read(&mut byte))
            .await
            .expect("head in time")
            .expect("read head");
        assert_eq!(n, 1, "closed before the head ended");
        head.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&head).contains("content-length: 2"));
    assert_eq!(
        client.next_read().await.expect("FIN after idle, no body"),
        0
    );
}

#[tokio::test]
async fn rst_mode_resets_an_idle_connection() {
    let upstream = start(Behaviour {
        close_with_rst: true,
        ..idle(100)
    })
    .await;
    let mut client = RawClient::connect(upstream.addr()).await;
    client.get("/").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let read = client.next_read().await;
    assert!(is_reset(&read), "{read:?}");
}

#[tokio::test]
async fn last_response_announces_connection_close_then_closes() {
    let upstream = start(Behaviour {
        max_requests: Some(3),
        ..Behaviour::default()
    })
    .await;
    let mut client = RawClient::connect(upstream.addr()).await;
    for _ in 0..2 {
        assert_eq!(client.get("/").await.header("connection"), None);
    }
    assert_eq!(client.get("/").await.header("connection"), Some("close"));
    assert_eq!(client.next_read().await.expect("FIN"), 0);
}

#[tokio::test]
async fn silent_last_response_has_no_connection_header_then_closes() {
    let upstream = start(Behaviour {
        max_requests: Some(2),
        announce_last: false,
        ..Behaviour::default()
    })
    .await;
    let mut client = RawClient::connect(upstream.addr()).await;
    client.get("/").await;
    let last = client.get("/").await;
    assert_eq!(last.header("connection"), None);
    assert_eq!(last.number("x-upstream-request"), 2);
    assert_eq!(client.next_read().await.expect("FIN"), 0);

    upstream.set_behaviour(Behaviour {
        max_requests: Some(1),
        announce_last: false,
        close_with_rst: true,
        ..Behaviour::default()
    });
    let mut client = RawClient::connect(upstream.addr()).await;
    assert_eq!(client.get("/").await.header("connection"), None);
    let read = client.next_read().await;
    assert!(is_reset(&read), "{read:?}");
}

#[tokio::test]
async fn hint_states_whole_idle_seconds_and_remaining_requests() {
    let upstream = start(Behaviour {
        idle_timeout: Some(Duration::from_millis(5_900)),
        max_requests: Some(10),
        hint: true,
        ..Behaviour::default()
    })
    .await;
    let mut client = RawClient::connect(upstream.addr()).await;
    let hint = |r: &RawResponse| r.header("keep-alive").map(str::to_owned);
    assert_eq!(
        hint(&client.get("/").await).as_deref(),
        Some("timeout=5, max=9")
    );
    assert_eq!(
        hint(&client.get("/").await).as_deref(),
        Some("timeout=5, max=8")
    );

    upstream.set_behaviour(Behaviour::node());
    assert_eq!(hint(&client.get("/").await).as_deref(), Some("timeout=5"));
    upstream.set_behaviour(Behaviour::gunicorn());
    assert_eq!(hint(&client.get("/").await), None);
}

#[tokio::test]
async fn echo_streams_a_large_body_back() {
    let upstream = start(Behaviour::default()).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    let body: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let head = format!(
        "POST /?echo=1 HTTP/1.1\r\nHost: upstream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    client.send(head.as_bytes()).await;
    // Written and read at once: the echo starts before the upload ends, and a client that only
    // wrote would stall once both socket buffers are full.
    let RawClient { read, write, buf } = &mut client;
    let (written, response) = tokio::join!(
        write.write_all(&body),
        timeout(PATIENCE, read_response(read, buf))
    );
    written.expect("upload");
    let response = response.expect("echo in time");
    assert_eq!(response.status, 200);
    assert!(response.body == body, "echoed body differs");
    assert_eq!(response.header("x-body-bytes"), None);
    let seen = upstream.seen();
    assert_eq!(seen.last().map(|s| s.body_bytes), Some(body.len() as u64));
}

#[tokio::test]
async fn query_overrides_status_size_and_delay_for_one_request() {
    let upstream = start(Behaviour::default()).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    let asked = Instant::now();
    let response = client
        .get("/x?status=503&size=200000&delay=100ms&cache=buster")
        .await;
    assert!(asked.elapsed() >= Duration::from_millis(100));
    assert_eq!(response.status, 503);
    assert_eq!(response.body.len(), 200_000);
    assert!(response.body.chunks(2).all(|pair| pair == b"OK"));

    let plain = client.get("/").await;
    assert_eq!((plain.status, plain.body.as_slice()), (200, &b"OK"[..]));
    let bad = client.get("/?delay=soon").await;
    assert_eq!(bad.status, 400);
    assert!(String::from_utf8_lossy(&bad.body).contains("delay=soon"));
}

#[tokio::test]
async fn close_override_drops_the_connection_after_the_head() {
    let upstream = start(Behaviour::default()).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    client
        .send(b"GET /?close=fin HTTP/1.1\r\nHost: u\r\n\r\n")
        .await;
    assert_eq!(client.next_read().await.expect("FIN"), 0);

    let mut client = RawClient::connect(upstream.addr()).await;
    client
        .send(b"GET /?close=rst HTTP/1.1\r\nHost: u\r\n\r\n")
        .await;
    let read = client.next_read().await;
    assert!(is_reset(&read), "{read:?}");
    assert_eq!(upstream.requests(), 2);
}

#[tokio::test]
async fn request_bodies_are_read_counted_and_reported() {
    let upstream = start(Behaviour::default()).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    let body = vec![b'x'; 10_000];
    let head = "POST /up HTTP/1.1\r\nHost: u\r\nContent-Length: 10000\r\n\r\n";
    client.send(head.as_bytes()).await;
    client.send(&body).await;
    assert_eq!(client.response().await.number("x-body-bytes"), 10_000);

    // A chunked upload far larger than any buffer: only its length is kept.
    let chunk_len = 64 * 1024;
    let chunks = 256;
    client
        .send(b"POST /big HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    let mut chunk = format!("{chunk_len:x}\r\n").into_bytes();
    chunk.extend(std::iter::repeat_n(b'y', chunk_len));
    chunk.extend_from_slice(b"\r\n");
    for _ in 0..chunks {
        client.send(&chunk).await;
    }
    client.send(b"0\r\n\r\n").await;
    let total = (chunk_len * chunks) as u64;
    assert_eq!(client.response().await.number("x-body-bytes"), total);

    let seen = upstream.seen();
    let bytes: Vec<u64> = seen.iter().map(|s| s.body_bytes).collect();
    assert_eq!(bytes, [10_000, total]);
    assert_eq!(seen[1].method, "POST");
    assert_eq!(seen[1].uri, "/big");
    assert_eq!((seen[1].connection, seen[1].request_on_connection), (1, 2));
}

#[tokio::test]
async fn http_1_0_client_gets_an_answer_and_a_close() {
    let upstream = start(Behaviour::default()).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    client.send(b"GET /old HTTP/1.0\r\n\r\n").await;
    let response = client.response().await;
    assert_eq!(
        (response.status, response.body.as_slice()),
        (200, &b"OK"[..])
    );
    assert_eq!(client.next_read().await.expect("FIN"), 0);
    assert_eq!(upstream.seen()[0].version, http::Version::HTTP_10);
}

#[tokio::test]
async fn garbage_ends_only_its_own_connection() {
    let upstream = start(Behaviour::default()).await;
    let mut bad = RawClient::connect(upstream.addr()).await;
    bad.send(b"\x00\x01NOT HTTP AT ALL\r\n\r\n").await;
    let mut rest = Vec::new();
    let closed = timeout(PATIENCE, bad.read.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "garbage connection left open");
    let mut good = RawClient::connect(upstream.addr()).await;
    assert_eq!(good.get("/").await.status, 200);
}

#[tokio::test]
async fn seen_keeps_the_last_64_heads_oldest_first() {
    let upstream = start(Behaviour::default()).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    for n in 1..=70 {
        client.get(&format!("/{n}")).await;
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 64);
    assert_eq!(seen[0].uri, "/7");
    assert_eq!(seen[63].uri, "/70");
    assert_eq!(seen[63].request_on_connection, 70);
    assert_eq!(
        seen[0].headers.get("host").map(|h| h.as_bytes()),
        Some(&b"upstream"[..])
    );
}

#[tokio::test]
async fn set_behaviour_changes_the_next_response_on_an_open_connection() {
    let upstream = start(Behaviour::default()).await;
    let mut client = RawClient::connect(upstream.addr()).await;
    assert_eq!(client.get("/").await.status, 200);
    upstream.set_behaviour(Behaviour {
        status: 503,
        body_size: 0,
        ..Behaviour::default()
    });
    let response = client.get("/").await;
    assert_eq!((response.status, response.body.len()), (503, 0));
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn shutdown_closes_open_connections_and_stops_listening() {
    let upstream = start(Behaviour {
        idle_timeout: None,
        ..Behaviour::default()
    })
    .await;
    let addr = upstream.addr();
    let mut client = RawClient::connect(addr).await;
    client.get("/").await;
    timeout(PATIENCE, upstream.shutdown())
        .await
        .expect("bounded shutdown");
    assert_eq!(client.next_read().await.expect("FIN"), 0);
    assert!(TcpStream::connect(addr).await.is_err());
}

/// Retries of a connect that may still reach the listener in the instant before the accept loop
/// has seen the stop; a few suffice, the rest is margin for a loaded machine.
const CONNECT_TRIES: usize = 100;

/// Whether a connect to `addr` is refused within [`CONNECT_TRIES`] attempts 10 ms apart.
async fn refused_soon(addr: SocketAddr) -> bool {
    for _ in 0..CONNECT_TRIES {
        if TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn drain_closes_idle_connections_refuses_new_ones_and_answers_requests_in_flight() {
    // RST mode and no idle timeout: every close seen below is the drain's, and graceful (FIN).
    let upstream = start(Behaviour {
        idle_timeout: None,
        close_with_rst: true,
        ..Behaviour::default()
    })
    .await;
    let addr = upstream.addr();
    let mut idle = RawClient::connect(addr).await;
    assert_eq!(idle.get("/").await.header("connection"), None);
    // Slow enough to be in flight long after the idle connection is closed, on any machine.
    let mut slow = RawClient::connect(addr).await;
    slow.send(b"GET /slow?delay=2s HTTP/1.1\r\nHost: u\r\n\r\n")
        .await;
    let mut partial = RawClient::connect(addr).await;
    partial.send(b"GET /partial HTTP/1.1\r\nHost: u\r\n").await;
    for _ in 0..500 {
        if upstream.requests() == 2 && upstream.connections() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((upstream.connections(), upstream.requests()), (3, 2));
    assert_eq!(upstream.handling(), 1, "the slow request");
    // The partial head is not observable; its bytes are read as soon as its task runs.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let draining = tokio::spawn(upstream.drain());
    assert_eq!(idle.next_read().await.expect("FIN, not RST"), 0);
    let mut byte = [0; 1];
    let pending = slow.read.try_read(&mut byte);
    assert!(
        matches!(&pending, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        "the slow request should still be in flight when the idle connection closes: {pending:?}"
    );
    assert!(refused_soon(addr).await, "still accepting while draining");

    partial.send(b"\r\n").await;
    let answer = partial.response().await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("connection"), Some("close"));
    assert_eq!(partial.next_read().await.expect("FIN"), 0);

    let answer = slow.response().await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("connection"), Some("close"));
    assert_eq!(slow.next_read().await.expect("FIN"), 0);

    let drained = timeout(PATIENCE, draining)
        .await
        .expect("drain ends once the requests are answered")
        .expect("drain task");
    assert_eq!(
        drained,
        Drained {
            idle_closed: 1,
            answered: 2,
            cut_off: 0
        }
    );
}

#[tokio::test]
async fn drain_cuts_off_what_is_left_when_its_wait_runs_out() {
    let upstream = start(Behaviour {
        idle_timeout: None,
        ..Behaviour::default()
    })
    .await;
    let mut stuck = RawClient::connect(upstream.addr()).await;
    stuck
        .send(b"GET /stuck?delay=60s HTTP/1.1\r\nHost: u\r\n\r\n")
        .await;
    for _ in 0..500 {
        if upstream.requests() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.requests(), 1);
    let began = Instant::now();
    let drained = timeout(PATIENCE, upstream.drain_within(Duration::from_millis(300)))
        .await
        .expect("the wait bounds the drain");
    assert!(began.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        drained,
        Drained {
            idle_closed: 0,
            answered: 0,
            cut_off: 1
        }
    );
    assert_eq!(stuck.next_read().await.expect("FIN, no answer"), 0);
}

#[tokio::test]
async fn drain_of_an_idle_server_returns_at_once_and_frees_the_port() {
    let upstream = start(Behaviour::default()).await;
    let addr = upstream.addr();
    let mut client = RawClient::connect(addr).await;
    client.get("/").await;
    let drained = timeout(PATIENCE, upstream.drain())
        .await
        .expect("nothing to wait for");
    assert_eq!(drained.idle_closed, 1);
    assert_eq!(client.next_read().await.expect("FIN"), 0);
    // A rolling restart starts the new server on the same port.
    let again = TestUpstream::start(addr, Behaviour::default())
        .await
        .expect("the port is free again");
    assert_eq!(RawClient::connect(addr).await.get("/").await.status, 200);
    again.shutdown().await;
}
