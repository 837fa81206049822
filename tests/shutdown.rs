//! Graceful shutdown: in-flight requests finish, kept-alive clients are told to close.

mod support;

use std::time::Duration;

use kaguard::tools::upstream::Behaviour;
use support::*;

#[tokio::test]
async fn shutdown_loses_no_in_flight_request() {
    let up = upstream(Behaviour::default()).await;
    let mut kg = start(config(&[up.addr()])).await;
    let addr = kg.addr;
    let mut idle = Client::connect(addr).await;
    assert_eq!(idle.get("/").await.status(), 200);
    let in_flight: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                client.get("/?delay=500ms").await
            })
        })
        .collect();
    // Let the slow requests reach the upstream before shutdown begins.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while up.requests() < 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(kg.shutdown().await, "drain did not finish");
    for task in in_flight {
        let resp = task.await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(header(resp.headers(), "connection"), Some("close"));
    }
    assert!(
        idle.closed_within(PATIENCE).await,
        "idle client connection left open"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting"
    );
}

/// A kept-alive client connection that has just had its answer, and is not parked yet, is
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
        idle.closed_within(kaguard::downstream::PARK_AFTER / 2)
            .await,
        "the idle connection waited for its park"
    );
    assert!(shutdown.await.unwrap(), "drain did not finish");
}
