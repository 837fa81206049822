//! Each failure gets its status code and its response flag, and never reaches the upstream
//! when it should not.

mod support;

use std::time::Duration;

use kaguard::config::{RetryPolicy, RouteConfig};
use kaguard::tools::upstream::{Behaviour, TestUpstream};
use support::*;

async fn flags_of_last(kg: &Kaguard) -> (u64, String, String) {
    let lines = kg.log_lines(1).await;
    let last = lines.last().expect("one access log line");
    (
        last["status"].as_u64().unwrap(),
        last["response_flags"].as_str().unwrap().to_string(),
        last["response_details"].as_str().unwrap().to_string(),
    )
}

async fn attempts_of_last(kg: &Kaguard) -> u64 {
    kg.log_lines(1).await.last().expect("one access log line")["attempts"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn connect_refused_is_502_uf() {
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = gone.local_addr().unwrap();
    drop(gone);
    let kg = start(config(&[addr])).await;
    assert_eq!(get(kg.addr, "/").await.status(), 502);
    let (status, flags, details) = flags_of_last(&kg).await;
    // The default policy tries a failed connect once more (retry_on connect-failure).
    assert_eq!((status, flags.as_str()), (502, "UF,UF,URX"));
    assert_eq!(
        details,
        "upstream_reset_before_response_started{connection_failure}"
    );
    assert_eq!(attempts_of_last(&kg).await, 2);
}

#[tokio::test]
async fn connect_timeout_is_504_uf() {
    // A listener that never accepts, with its accept queue full: further SYNs go unanswered.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = vec![];
    for _ in 0..8 {
        let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        else {
            break;
        };
        fillers.push(s);
    }
    let mut cfg = config(&[addr]);
    cfg.upstreams[0].connect_timeout = Duration::from_millis(300);
    let kg = start(cfg).await;
    assert_eq!(get(kg.addr, "/").await.status(), 504);
    let (_, flags, details) = flags_of_last(&kg).await;
    assert_eq!(flags, "UF,UF,URX");
    assert_eq!(
        details,
        "upstream_reset_before_response_started{connection_timeout}"
    );
}

#[tokio::test]
async fn upstream_closing_before_response_is_502_uc() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    assert_eq!(get(kg.addr, "/?close=fin").await.status(), 502);
    let (_, flags, details) = flags_of_last(&kg).await;
    // A GET reset on a fresh connection is tried once more (retry_on reset).
    assert_eq!(flags, "UC,UC,URX");
    assert_eq!(up.requests(), 2);
    assert_eq!(
        details,
        "upstream_reset_before_response_started{connection_termination}"
    );
}

#[tokio::test]
async fn upstream_reset_before_response_is_502_uc() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    assert_eq!(get(kg.addr, "/?close=rst").await.status(), 502);
    let (_, flags, _) = flags_of_last(&kg).await;
    assert_eq!(flags, "UC,UC,URX");
}

#[tokio::test]
async fn post_reset_on_a_fresh_connection_is_not_retried() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut client = Client::connect(kg.addr).await;
    assert_eq!(client.post("/?close=fin", b"data").await.status(), 502);
    let (_, flags, _) = flags_of_last(&kg).await;
    assert_eq!(flags, "UC");
    assert_eq!(
        up.requests(),
        1,
        "a POST the upstream may have received was sent again"
    );
}

#[tokio::test]
async fn slow_upstream_is_504_ut() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.upstreams[0].read_timeout = Duration::from_millis(200);
    let kg = start(cfg).await;
    assert_eq!(get(kg.addr, "/?delay=2s").await.status(), 504);
    let (_, flags, details) = flags_of_last(&kg).await;
    assert_eq!(flags, "UT");
    assert_eq!(details, "upstream_response_timeout");
}

#[tokio::test]
async fn unparseable_request_is_400() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let out = raw(kg.addr, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(status_of(&out), Some(400), "{out}");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let big = "a".repeat(40 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n");
    let out = raw(kg.addr, req.as_bytes()).await;
    assert_eq!(status_of(&out), Some(431), "{}", &out[..out.len().min(200)]);
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn body_over_the_limit_is_413_and_never_reaches_upstream() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.downstream.max_body_size = 10;
    let kg = start(cfg).await;
    let body = "x".repeat(100);
    let with_length = format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{body}");
    assert_eq!(
        status_of(&raw(kg.addr, with_length.as_bytes()).await),
        Some(413)
    );
    let chunked = format!(
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n{body}\r\n0\r\n\r\n"
    );
    assert_eq!(
        status_of(&raw(kg.addr, chunked.as_bytes()).await),
        Some(413)
    );
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn request_without_a_route_is_404_nr() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.routes = vec![RouteConfig {
        host: Some("app.example".into()),
        path_prefix: "/".into(),
        upstream: "default".into(),
        retry: RetryPolicy::default(),
    }];
    let kg = start(cfg).await;
    assert_eq!(get(kg.addr, "/").await.status(), 404);
    let (_, flags, _) = flags_of_last(&kg).await;
    assert_eq!(flags, "NR");
    let mut client = Client::connect(kg.addr).await;
    let req = http::Request::get("/")
        .header("host", "app.example:8080")
        .body(Default::default())
        .unwrap();
    assert_eq!(client.send(req).await.status(), 200);
    assert_eq!(up.requests(), 1);
}

/// Sends a 64 MiB POST through a kaguard whose only upstream accepts and reads nothing, with
/// that upstream's `send_timeout` and `read_timeout`. Returns the status of the answer and the
/// CPU time this thread used until it came.
async fn upload_to_a_deaf_upstream(send: Duration, read: Duration) -> (Option<u16>, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deaf = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = deaf.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = vec![];
        while let Ok((stream, _)) = deaf.accept().await {
            held.push(stream);
        }
    });
    let mut cfg = config(&[addr]);
    cfg.upstreams[0].send_timeout = send;
    cfg.upstreams[0].read_timeout = read;
    cfg.retry.retry_on = Default::default();
    let kg = start(cfg).await;
    let size = 64 * 1024 * 1024;
    let stream = tokio::net::TcpStream::connect(kg.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let before = thread_cpu();
    let writer = tokio::spawn(async move {
        let head = format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n");
        wr.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..size / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(PATIENCE, rd.read(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    let used = thread_cpu() - before;
    let out = String::from_utf8_lossy(&buf[..n]).to_string();
    let (_, flags, details) = flags_of_last(&kg).await;
    assert_eq!(
        (flags.as_str(), details.as_str()),
        ("UT", "upstream_request_send_timeout"),
        "{out}"
    );
    writer.abort();
    held.abort();
    (status_of(&out), used)
}

#[tokio::test]
async fn upstream_not_taking_the_body_is_504_after_send_timeout() {
    let (status, _) =
        upload_to_a_deaf_upstream(Duration::from_millis(300), Duration::from_secs(60)).await;
    assert_eq!(status, Some(504));
}

/// The CPU time this thread has used. A `#[tokio::test]` runs kaguard's tasks on the test's
/// own thread, so this counts kaguard's work and the test's, and no other test's.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("Linux /proc");
    // The fields after the command name, which may hold spaces, are after its closing ')'.
    let after = &stat[stat.rfind(')').expect("a command name") + 2..];
    let ticks: u64 = after
        .split(' ')
        .skip(11)
        .take(2)
        .map(|f| f.parse::<u64>().expect("a number"))
        .sum();
    // /proc counts in USER_HZ ticks, 100 a second on Linux.
    Duration::from_millis(ticks * 10)
}

/// An upstream that stops taking the body, with a read timeout shorter than the send timeout:
/// the attempt sleeps until the send timeout. The wait was woken at the read timeout and then
/// set again to that same past deadline, a busy loop for the difference (here 1.4 s of CPU).
#[tokio::test]
async fn a_stalled_upload_sleeps_until_send_timeout_when_read_timeout_is_shorter() {
    let (status, used) =
        upload_to_a_deaf_upstream(Duration::from_millis(1500), Duration::from_millis(100)).await;
    assert_eq!(status, Some(504));
    // Measured here: 0.9 to 1.4 s with the busy loop, 0 to 10 ms without (filling the sockets'
    // buffers).
    assert!(
        used < Duration::from_millis(400),
        "{used:?} of CPU while stalled"
    );
}

/// Sends a POST head announcing 100 000 bytes, `sent` of them, then nothing more, through a
/// kaguard with `replay_buffer`; checks the answer and the log, and returns the upstream.
async fn stalled_upload_is_408_timeout(replay_buffer: usize, sent: usize) -> TestUpstream {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.downstream.client_body_timeout = Duration::from_millis(200);
    cfg.upstreams[0].replay_buffer = replay_buffer;
    let kg = start(cfg).await;
    let head = "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n";
    let mut request = head.as_bytes().to_vec();
    request.extend(std::iter::repeat_n(b'x', sent));
    let out = raw(kg.addr, &request).await;
    assert_eq!(status_of(&out), Some(408), "{out}");
    let (_, flags, details) = flags_of_last(&kg).await;
    assert_eq!(
        (flags.as_str(), details.as_str()),
        ("DC", "downstream_request_body_timeout")
    );
    up
}

#[tokio::test]
async fn a_client_body_that_stalls_is_408_and_logged_as_a_timeout() {
    // Within the replay buffer, the body is held before anything goes upstream.
    let up = stalled_upload_is_408_timeout(64 * 1024, 10).await;
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_streamed_client_body_that_stalls_is_408_and_logged_as_a_timeout() {
    // Past the replay buffer, the body streams: the stall comes while sending upstream.
    stalled_upload_is_408_timeout(1024, 4096).await;
}
