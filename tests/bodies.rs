//! Bodies through the proxy: streamed both ways in bounded memory, framed as sent (chunked,
//! Content-Length, HEAD, 204, 304, 100-continue, HTTP/1.0), and a body the upstream cuts short
//! never passed off as complete.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use kaguard::tools::upstream::Behaviour;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GIB: u64 = 1 << 30;
/// Above kaguard's 64 KiB request body prefetch, so the body is streamed, not held; odd so
/// that it ends in a partial chunk.
const LARGE: u64 = 1024 * 1024 + 3;
/// Growth of this process's peak RSS allowed while 1 GiB crosses: a proxy that holds even a
/// fifth of the body fails, while buffers, allocator slack and the other tests running in
/// this process fit with room to spare.
const MEMORY_BUDGET_KIB: u64 = 200 * 1024;
/// Bound on one 1 GiB transfer: a hang guard far above the measured time on a busy 2-core
/// machine, not a speed requirement.
const GIB_PATIENCE: Duration = Duration::from_secs(300);

const CHUNK_LEN: usize = 64 * 1024;
/// Every generated body is this chunk repeated; its bytes vary so that a lost, doubled or
/// reordered chunk boundary shows in the echoed bytes.
static CHUNK: [u8; CHUNK_LEN] = pattern();

const fn pattern() -> [u8; CHUNK_LEN] {
    let mut chunk = [0u8; CHUNK_LEN];
    let mut i = 0;
    while i < CHUNK_LEN {
        chunk[i] = (i % 251) as u8;
        i += 1;
    }
    chunk
}

/// A request body generated 64 KiB at a time, never held whole. `exact`: it announces its
/// length (hyper sends Content-Length); otherwise hyper sends it chunked.
struct Generated {
    remaining: u64,
    exact: bool,
}

impl Generated {
    fn sized(len: u64) -> Generated {
        Generated {
            remaining: len,
            exact: true,
        }
    }

    fn chunked(len: u64) -> Generated {
        Generated {
            remaining: len,
            exact: false,
        }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK_LEN as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

/// Sends `req` on a new connection and waits up to `patience` for the response head (which
/// may come only after the whole request body went up); the body is left to the caller.
async fn send<B>(addr: SocketAddr, req: Request<B>, patience: Duration) -> Response<Incoming>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tokio::time::timeout(patience, sender.send_request(req))
        .await
        .expect("response head in time")
        .expect("response head")
}

/// Reads a body frame by frame, keeping only its length; with `check`, every byte must
/// continue the generated pattern.
async fn count(mut body: Incoming, check: bool) -> Result<u64, hyper::Error> {
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            if check {
                for (i, b) in data.iter().enumerate() {
                    let at = (bytes + i as u64) as usize % CHUNK_LEN;
                    assert_eq!(
                        *b,
                        CHUNK[at],
                        "byte {} differs from what was sent",
                        bytes + i as u64
                    );
                }
            }
            bytes += data.len() as u64;
        }
    }
    Ok(bytes)
}

/// A field of /proc/self/status in KiB (VmRSS, VmHWM).
fn vm_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in status"));
    let kib = line.split_whitespace().nth(1).expect("a number");
    kib.parse().expect("KiB")
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    header(headers, name).and_then(|v| v.parse().ok())
}

/// The one request the upstream saw, with its body length.
fn only_seen(up: &kaguard::tools::upstream::TestUpstream) -> kaguard::tools::upstream::SeenRequest {
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    seen.into_iter().next().expect("one")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_download_streams_through_in_bounded_memory() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let rss_before = vm_kib("VmRSS");
    let started = Instant::now();
    let req = Request::get(format!("/?size={GIB}"))
        .header("host", "test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send(kg.addr, req, PATIENCE).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header_u64(resp.headers(), "content-length"), Some(GIB));
    let got = tokio::time::timeout(GIB_PATIENCE, count(resp.into_body(), false))
        .await
        .expect("1 GiB arrives in time")
        .expect("body arrives whole");
    assert_eq!(got, GIB);
    let growth = vm_kib("VmHWM").saturating_sub(rss_before);
    eprintln!(
        "1 GiB download: {:?}, peak RSS growth {} MiB",
        started.elapsed(),
        growth / 1024
    );
    assert!(
        growth < MEMORY_BUDGET_KIB,
        "peak RSS grew by {growth} KiB while 1 GiB went through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_through_in_bounded_memory() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let rss_before = vm_kib("VmRSS");
    let started = Instant::now();
    let req = Request::post("/")
        .header("host", "test")
        .body(Generated::sized(GIB))
        .unwrap();
    let resp = send(kg.addr, req, GIB_PATIENCE).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header_u64(resp.headers(), "x-body-bytes"),
        Some(GIB),
        "the upstream read the whole body"
    );
    assert_eq!(
        count(resp.into_body(), false).await.expect("response body"),
        2
    );
    let growth = vm_kib("VmHWM").saturating_sub(rss_before);
    eprintln!(
        "1 GiB upload: {:?}, peak RSS growth {} MiB",
        started.elapsed(),
        growth / 1024
    );
    assert_eq!(
        header_u64(&only_seen(&up).headers, "content-length"),
        Some(GIB)
    );
    assert!(
        growth < MEMORY_BUDGET_KIB,
        "peak RSS grew by {growth} KiB while 1 GiB went through"
    );
}

#[tokio::test]
async fn chunked_request_bodies_arrive_whole() {
    for len in [5, LARGE] {
        let up = upstream(Behaviour::default()).await;
        let kg = start(config(&[up.addr()])).await;
        let req = Request::post("/")
            .header("host", "test")
            .body(Generated::chunked(len))
            .unwrap();
        let resp = send(kg.addr, req, PATIENCE).await;
        assert_eq!(resp.status(), 200, "{len} bytes");
        assert_eq!(
            header_u64(resp.headers(), "x-body-bytes"),
            Some(len),
            "{len} bytes"
        );
        assert_eq!(only_seen(&up).body_bytes, len);
    }
}

#[tokio::test]
async fn content_length_request_bodies_arrive_whole() {
    for len in [5, LARGE] {
        let up = upstream(Behaviour::default()).await;
        let kg = start(config(&[up.addr()])).await;
        let req = Request::post("/")
            .header("host", "test")
            .body(Generated::sized(len))
            .unwrap();
        let resp = send(kg.addr, req, PATIENCE).await;
        assert_eq!(resp.status(), 200, "{len} bytes");
        assert_eq!(
            header_u64(resp.headers(), "x-body-bytes"),
            Some(len),
            "{len} bytes"
        );
        let seen = only_seen(&up);
        assert_eq!(seen.body_bytes, len);
        assert_eq!(header_u64(&seen.headers, "content-length"), Some(len));
    }
}

#[tokio::test]
async fn chunked_response_body_arrives_whole_and_in_order() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let req = Request::post("/?echo=1")
        .header("host", "test")
        .body(Generated::chunked(LARGE))
        .unwrap();
    let resp = send(kg.addr, req, PATIENCE).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(resp.headers(), "transfer-encoding"), Some("chunked"));
    assert_eq!(header(resp.headers(), "content-length"), None);
    let got = tokio::time::timeout(PATIENCE, count(resp.into_body(), true))
        .await
        .expect("echo arrives in time")
        .expect("echo arrives whole");
    assert_eq!(got, LARGE);
    assert_eq!(only_seen(&up).body_bytes, LARGE);
}

/// A response without a body on a kept-alive client connection, then a GET on the same one:
/// the connection stays in step and the upstream connection goes back to the pool.
async fn bodyless_then_get(method: Method, path: &str) -> Response<Bytes> {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut client = Client::connect(kg.addr).await;
    let req = Request::builder()
        .method(method.clone())
        .uri(path)
        .header("host", "test")
        .body(Full::default())
        .unwrap();
    let resp = client.send(req).await;
    assert!(
        resp.body().is_empty(),
        "{method} {path}: body {:?}",
        resp.body()
    );
    assert_eq!(
        header(resp.headers(), "transfer-encoding"),
        None,
        "{method} {path}"
    );
    let next = client.get("/").await;
    assert_eq!(next.status(), 200, "{method} {path}: request after it");
    assert_eq!(
        next.body().as_ref(),
        b"OK",
        "{method} {path}: request after it"
    );
    assert_eq!(up.seen()[0].method, method.as_str());
    assert_eq!(
        up.connections(),
        1,
        "{method} {path}: upstream connection not reused"
    );
    resp
}

#[tokio::test]
async fn head_response_has_no_body_and_keeps_the_upstream_content_length() {
    let resp = bodyless_then_get(Method::HEAD, "/?size=12345").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(resp.headers(), "content-length"), Some("12345"));
}

#[tokio::test]
async fn no_content_response_has_no_body_and_the_connection_stays_usable() {
    let resp = bodyless_then_get(Method::GET, "/?status=204").await;
    assert_eq!(resp.status(), 204);
}

#[tokio::test]
async fn not_modified_response_has_no_body_and_the_connection_stays_usable() {
    let resp = bodyless_then_get(Method::GET, "/?status=304").await;
    assert_eq!(resp.status(), 304);
}

/// A client socket read response by response, every read bounded by [`PATIENCE`].
struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A response head as read off the socket: lowercase header names.
#[derive(Debug)]
struct RawHead {
    status: u16,
    headers: Vec<(String, String)>,
}

impl RawHead {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl RawConn {
    async fn connect(addr: SocketAddr) -> RawConn {
        RawConn {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads more bytes into the buffer; false at EOF.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "nothing arrived within {PATIENCE:?}; so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
            Ok(Err(_)) | Ok(Ok(0)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn head(&mut self) -> RawHead {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut parsed = httparse::Response::new(&mut headers);
                parsed
                    .parse(&self.buf[..end + 4])
                    .expect("a valid response head");
                let head = RawHead {
                    status: parsed.code.expect("status"),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                self.buf.drain(..end + 4);
                return head;
            }
            assert!(
                self.buf.len() < 64 * 1024,
                "no end of head in {} bytes",
                self.buf.len()
            );
            assert!(
                self.fill().await,
                "connection closed before a response head"
            );
        }
    }

    /// The body of `head`, framed by its Content-Length.
    async fn body(&mut self, head: &RawHead) -> Vec<u8> {
        let len: usize = head
            .header("content-length")
            .expect("content-length")
            .parse()
            .expect("a number");
        while self.buf.len() < len {
            assert!(self.fill().await, "connection closed inside the body");
        }
        self.buf.drain(..len).collect()
    }

    /// Whether the peer closes the connection within [`PATIENCE`] without sending more.
    async fn closed(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => self.buf.is_empty(),
            Ok(Ok(_)) | Err(_) => false,
        }
    }
}

#[tokio::test]
async fn expect_100_continue_is_answered_by_kaguard_and_not_forwarded() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut conn = RawConn::connect(kg.addr).await;
    conn.write(
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    let interim = conn.head().await;
    assert_eq!(interim.status, 100, "{interim:?}");
    conn.write(b"hello").await;
    let last = conn.head().await;
    assert_eq!(last.status, 200, "{last:?}");
    assert_eq!(last.header("x-body-bytes"), Some("5"));
    assert_eq!(conn.body(&last).await, b"OK");
    let seen = only_seen(&up);
    assert!(!seen.headers.contains_key("expect"), "{:?}", seen.headers);
    assert_eq!(seen.body_bytes, 5);
}

#[tokio::test]
async fn http10_client_without_keep_alive_gets_a_response_and_a_close() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut conn = RawConn::connect(kg.addr).await;
    conn.write(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n").await;
    let head = conn.head().await;
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("keep-alive"), None, "{head:?}");
    assert_eq!(conn.body(&head).await, b"OK");
    assert!(
        conn.closed().await,
        "kaguard kept an HTTP/1.0 connection open"
    );
    assert_eq!(only_seen(&up).version, Version::HTTP_11);
}

#[tokio::test]
async fn http10_client_with_keep_alive_keeps_its_connection() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut conn = RawConn::connect(kg.addr).await;
    for _ in 0..2 {
        conn.write(b"GET / HTTP/1.0\r\nHost: test\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let head = conn.head().await;
        assert_eq!(head.status, 200, "{head:?}");
        assert!(
            head.header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("keep-alive")),
            "{head:?}"
        );
        assert_eq!(conn.body(&head).await, b"OK");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|r| r.version == Version::HTTP_11),
        "{seen:?}"
    );
    let lines = kg.log_lines(2).await;
    assert_eq!(
        lines[1]["connection_requests"], 2,
        "second request on the same client connection"
    );
    assert_eq!(lines[0]["connection"], lines[1]["connection"]);
}

/// 100 000 bytes promised, 100 sent, then FIN.
const CUT_LENGTH: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n\
    xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
/// One 16-byte chunk, then FIN instead of the last chunk.
const CUT_CHUNKED: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nxxxxxxxxxxxxxxxx\r\n";

/// Fetches through kaguard from an upstream that sends `response` and closes; returns the
/// status, the bytes received, and whether the body ended cleanly.
async fn through_cut_upstream(response: &'static [u8]) -> (u16, u64, bool, Kaguard) {
    let (addr, _) = scripted_upstream(response).await;
    let kg = start(config(&[addr])).await;
    let req = Request::get("/")
        .header("host", "test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send(kg.addr, req, PATIENCE).await;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut got = 0u64;
    let clean = tokio::time::timeout(PATIENCE, async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => got += frame.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => return false,
            }
        }
        true
    })
    .await
    .expect("the body ends, cleanly or not, in time");
    (status, got, clean, kg)
}

#[tokio::test]
async fn content_length_body_cut_short_by_upstream_is_cut_short_for_the_client() {
    let (status, got, clean, _kg) = through_cut_upstream(CUT_LENGTH).await;
    assert_eq!(status, 200);
    assert!(!clean, "a 100000-byte body ended cleanly after {got} bytes");
    assert!(got <= 100, "{got}");
}

#[tokio::test]
async fn chunked_body_cut_short_by_upstream_is_cut_short_for_the_client() {
    let (status, got, clean, _kg) = through_cut_upstream(CUT_CHUNKED).await;
    assert_eq!(status, 200);
    assert!(
        !clean,
        "a chunked body without its last chunk ended cleanly after {got} bytes"
    );
    assert!(got <= 16, "{got}");
}

#[tokio::test]
async fn body_cut_short_by_upstream_is_logged_as_an_upstream_failure() {
    let (_, _, _, kg) = through_cut_upstream(CUT_LENGTH).await;
    let lines = kg.log_lines(1).await;
    let line = lines.last().expect("one access log line");
    assert_eq!(line["response_flags"], "UC", "{line}");
}

/// An upstream that answers with a chunked head as soon as it has a request head, then reads
/// the request's Content-Length body to its end and only then ends the response: a streaming
/// endpoint. Returns its address and the body bytes it has read so far.
async fn early_answering_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = std::sync::Arc::new(AtomicU64::new(0));
    let seen = got.clone();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        let end = loop {
            if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 && head.len() < 64 * 1024 => head.extend_from_slice(&buf[..n]),
                _ => return,
            }
        };
        let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
        let len: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("a content-length");
        let mut body = (head.len() - end) as u64;
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        while body < len {
            match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => body += n as u64,
                _ => return,
            }
            seen.store(body, Ordering::SeqCst);
        }
        let _ = stream.write_all(b"2\r\nOK\r\n0\r\n\r\n").await;
        let _ = tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await;
    });
    (addr, got)
}

/// The upstream's answer begins while the client still uploads: the rest of the upload goes
/// on reaching it. Sent in pieces after the response head, so that each piece arrives while
/// kaguard writes or waits on the response.
#[tokio::test]
async fn an_upload_goes_on_after_the_upstream_began_its_answer() {
    let (up, got) = early_answering_upstream().await;
    let kg = start(config(&[up])).await;
    let mut conn = RawConn::connect(kg.addr).await;
    let total = 300_000;
    conn.write(format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {total}\r\n\r\n").as_bytes())
        .await;
    conn.write(&[b'a'; 100_000]).await;
    let head = conn.head().await;
    assert_eq!(head.status, 200, "{head:?}");
    for _ in 0..20 {
        conn.write(&[b'b'; 10_000]).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while !conn.buf.ends_with(b"0\r\n\r\n") {
        assert!(
            conn.fill().await,
            "closed; the upstream got {} of {total} body bytes",
            got.load(std::sync::atomic::Ordering::SeqCst)
        );
    }
    assert_eq!(got.load(std::sync::atomic::Ordering::SeqCst), total);
}

/// Requests with bodies of each framing, sent back to back in one write and then again split
/// at every few bytes: each body ends where its framing says, and the next head starts there.
#[tokio::test]
async fn pipelined_requests_with_bodies_keep_their_boundaries() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: t\r\n\r\n";
    for piece in [stream.len(), 7] {
        let mut conn = RawConn::connect(kg.addr).await;
        for part in stream.chunks(piece) {
            conn.write(part).await;
        }
        for expected in ["5", "7", "0"] {
            let head = conn.head().await;
            assert_eq!(head.status, 200, "{head:?}");
            assert_eq!(head.header("x-body-bytes"), Some(expected), "{head:?}");
            assert_eq!(conn.body(&head).await, b"OK");
        }
    }
    let uris: Vec<String> = up.seen().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris, ["/a", "/b", "/c", "/a", "/b", "/c"]);
}
