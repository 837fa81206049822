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

async fn get(conn: &mut UpstreamConn) -> (Response<Fields>, Bytes) {
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

/// A client's request body, streamed: a POST announcing 1000 bytes, of which the client has
/// sent 10. [`Cut::now`] fails the body as the client's close does.
struct Cut {
    feed: crate::downstream::Feed,
}

impl Cut {
    async fn body() -> (RequestBody, Cut) {
        let (feed, incoming) = crate::downstream::Feed::new(Some(1000));
        feed.data(b"0123456789");
        let body = RequestBody::prefetch(incoming, 0, 0, PATIENCE)
            .await
            .expect("nothing read yet");
        assert!(body.is_streamed());
        (body, Cut { feed })
    }

    async fn now(self) {
        self.feed.cut();
    }
}

fn poll_response(conn: &mut UpstreamConn) -> Poll<Result<(Response<Fields>, Hop), ConnError>> {
    conn.poll_response(&mut Context::from_waker(Waker::noop()))
}

/// Waits until the upstream's answer is in the socket, unread.
async fn answer_arrived(conn: &UpstreamConn) {
    for _ in 0..(PATIENCE.as_millis() / 10) {
        if conn.peek() == Peek::StrayBytes {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the upstream never answered");
}

/// The upstream answered before it had the whole request, and then the client's body failed:
/// the upstream may still wait for the rest, and would read the next request as part of it.
/// Whether the failure is seen in the same poll as the response head or after it, the
/// connection is left unfit for reuse.
#[tokio::test]
async fn a_request_body_cut_short_leaves_the_connection_unfit_for_reuse() {
    let early = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    for failure_with_the_head in [true, false] {
        let (body, cut) = Cut::body().await;
        let (mut conn, _close, _) = connected(early, Waker::noop().clone()).await;
        conn.start(
            &Method::POST,
            &Uri::from_static("/"),
            &Fields::default(),
            &HeaderMap::new(),
            body,
        );
        // The head and the 10 bytes go out; the body waits for more from the client.
        assert!(poll_response(&mut conn).is_pending());
        if failure_with_the_head {
            cut.now().await;
            answer_arrived(&conn).await;
            let Poll::Ready(Ok((response, _))) = poll_response(&mut conn) else {
                panic!("the head");
            };
            assert_eq!(response.status(), 200);
            assert!(
                !conn.is_sending(),
                "the body's failure was seen in that same poll"
            );
        } else {
            answer_arrived(&conn).await;
            let Poll::Ready(Ok((response, _))) = poll_response(&mut conn) else {
                panic!("the head");
            };
            assert_eq!(response.status(), 200);
            assert!(conn.is_sending(), "the body still waits for the client");
            cut.now().await;
        }
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..(PATIENCE.as_millis() / 10) {
            while let Poll::Ready(Some(frame)) = conn.poll_frame(&mut cx) {
                frame.expect("the response body");
            }
            if !conn.is_sending() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(conn.body_ended() && !conn.is_sending());
        assert!(
            !conn.ended_cleanly() && !poolable(&conn),
            "failure with the head: {failure_with_the_head}"
        );
    }
}
