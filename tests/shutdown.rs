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
