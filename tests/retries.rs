//! Retries never send a request whose body is gone.

mod support;

use kaguard::tools::upstream::Behaviour;
use support::*;

/// A PUT whose streamed body went to a server that answered 503 must not be sent again: the
/// body is gone. (It once was, with an empty body, after a next-upstream hop.)
#[tokio::test]
async fn streamed_body_is_never_resent_after_a_status_retry() {
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = gone.local_addr().unwrap();
    drop(gone);
    let busy = upstream(Behaviour {
        status: 503,
        ..Behaviour::default()
    })
    .await;
    let mut cfg = config(&[dead, busy.addr()]);
    cfg.retry.retry_on.retriable_status_codes = true;
    cfg.retry.retriable_status_codes = vec![503];
    cfg.retry.attempts = 3;
    let kg = start(cfg).await;
    // 100 000 bytes, chunked: more than the 64 KiB kaguard holds, so it is streamed.
    let body = "x".repeat(100_000);
    let req = format!(
        "PUT /doc HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n186a0\r\n{body}\r\n0\r\n\r\n"
    );
    let out = raw(kg.addr, req.as_bytes()).await;
    assert_eq!(status_of(&out), Some(503), "{}", &out[..out.len().min(200)]);
    let seen = busy.seen();
    assert_eq!(
        seen.len(),
        1,
        "the PUT went out again: {:?}",
        seen.iter().map(|s| s.body_bytes).collect::<Vec<_>>()
    );
    assert_eq!(seen[0].body_bytes, 100_000);
}
