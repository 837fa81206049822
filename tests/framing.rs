//! Requests framed ambiguously or wrongly get 400 and never reach the upstream.

mod support;

use kaguard::tools::upstream::Behaviour;
use support::*;

async fn refused(request: &[u8]) {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let out = raw(kg.addr, request).await;
    assert_eq!(status_of(&out), Some(400), "{out}");
    assert_eq!(up.requests(), 0, "the upstream saw the request");
    assert_eq!(up.connections(), 0, "the upstream was contacted");
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_400() {
    refused(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await;
}

#[tokio::test]
async fn transfer_encoding_before_content_length_is_400() {
    refused(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n").await;
}

#[tokio::test]
async fn two_different_content_lengths_are_400() {
    refused(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
        .await;
}

#[tokio::test]
async fn bad_chunk_size_is_400() {
    refused(
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
}

#[tokio::test]
async fn bad_chunk_size_after_a_good_chunk_is_400() {
    refused(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n0\r\n\r\n").await;
}

#[tokio::test]
async fn chunked_not_last_is_400() {
    refused(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n")
        .await;
}
