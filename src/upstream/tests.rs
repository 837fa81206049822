use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Wake;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::*;

/// Bounds every wait of these tests.
const PATIENCE: Duration = Duration::from_secs(5);

/// An upstream that reads one request head, answers `response`, and then closes the
/// connection when `close` fires (or when the test ends). Yields the request it read.
async fn scripted(
    response: &'static [u8],
) -> (SocketAddr, oneshot::Sender<()>, oneshot::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (close, closed) = oneshot::channel::<()>();
    let (seen_tx, seen) = oneshot::channel();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await.expect("read");
            assert!(n > 0, "the request head ended early");
            request.extend_from_slice(&buf[..n]);
        }
        let _ = seen_tx.send(request);
        sock.write_all(response).await.expect("write");
        let _ = closed.await;
    });
    (addr, close, seen)
}

/// A connection to a [`scripted`] upstream, whose idle watch wakes `reaper`.
async fn connected(
    response: &'static [u8],
    reaper: Waker,
) -> (
    UpstreamConn,
    oneshot::Sender<()>,
    oneshot::Receiver<Vec<u8>>,
) {
    let (addr, close, seen) = scripted(response).await;
    let conn = UpstreamConn::connect(addr, PATIENCE, reaper)
        .await
        .expect("connect");
    (conn, close, seen)
}

/// What `Lease::release` reads to pool a connection: a clean end, no framing that makes the
/// exchange the last, no close seen.
fn poolable(conn: &UpstreamConn) -> bool {
    conn.ended_cleanly() && !conn.is_last() && conn.closed_at().is_none()
}

async fn get(conn: &mut UpstreamConn) -> (Response<()>, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::HOST, http::HeaderValue::from_static("up"));
    let uri = Uri::from_static("/path?q=1");
    let exchange = conn.round_trip(&Method::GET, &uri, &headers, RequestBody::empty());
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("in time")
        .expect("a whole response")
}

#[tokio::test]
async fn a_whole_response_leaves_the_connection_reusable() {
    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let (mut conn, _close, seen) = connected(ok, Waker::noop().clone()).await;
    let (response, body) = get(&mut conn).await;
    assert_eq!(response.status(), 200);
    assert_eq!(&body[..], b"ok");
    assert!(poolable(&conn));
    let request = seen.await.expect("the request");
    assert_eq!(request, b"GET /path?q=1 HTTP/1.1\r\nhost: up\r\n\r\n");
}

#[tokio::test]
async fn bytes_after_a_response_make_the_connection_unusable() {
    let extra = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n";
    let (mut conn, _close, _) = connected(extra, Waker::noop().clone()).await;
    let (_, body) = get(&mut conn).await;
    assert_eq!(&body[..], b"ok");
    assert!(!conn.ended_cleanly() && !poolable(&conn));
}

#[tokio::test]
async fn a_response_delimited_by_the_close_is_read_to_the_close_and_not_reused() {
    let to_close = b"HTTP/1.0 200 OK\r\n\r\nuntil the end";
    let (mut conn, close, _) = connected(to_close, Waker::noop().clone()).await;
    let _ = close.send(());
    let (_, body) = get(&mut conn).await;
    assert_eq!(&body[..], b"until the end");
    assert!(conn.ended_cleanly() && conn.is_last() && !poolable(&conn));
}

/// Counts its wake-ups.
struct Counting(AtomicUsize);

impl Wake for Counting {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn an_idle_connection_closed_by_the_upstream_wakes_its_watcher_and_times_the_close() {
    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let woken = Arc::new(Counting(AtomicUsize::new(0)));
    let (mut conn, close, _) = connected(ok, Waker::from(woken.clone())).await;
    get(&mut conn).await;
    assert_eq!(conn.watch_idle(), (Peek::Clean, None));
    assert_eq!(woken.0.load(Ordering::SeqCst), 0);
    let before_close = Instant::now();
    let _ = close.send(());
    // Nobody polls the connection: only the registered waker can tell of the close.
    for _ in 0..(PATIENCE.as_millis() / 10) {
        if woken.0.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        woken.0.load(Ordering::SeqCst),
        1,
        "the close woke the watcher"
    );
    // Looked at well after the close, the close still has its own moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let looked = Instant::now();
    let (found, at) = conn.watch_idle();
    assert_eq!(found, Peek::Closed(Transport::Eof));
    let at = at.expect("the moment of the wake-up");
    assert!(before_close <= at && at + Duration::from_millis(100) < looked);
}
