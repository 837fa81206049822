//! Upstream keep-alive: reuse, no reuse, caps, idle close.

mod support;

use std::time::Duration;

use kaguard::tools::upstream::Behaviour;
use support::*;

#[tokio::test]
async fn ten_sequential_requests_use_one_upstream_connection() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(config(&[up.addr()])).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..10 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    assert_eq!(up.connections(), 1);
    assert_eq!(up.requests(), 10);
    // No Connection header goes upstream when reuse is on.
    assert!(
        up.seen()
            .iter()
            .all(|r| !r.headers.contains_key("connection"))
    );
    assert!(
        up.seen()
            .iter()
            .all(|r| r.version == http::Version::HTTP_11)
    );
}

#[tokio::test]
async fn keepalive_zero_sends_close_and_opens_a_connection_per_request() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.upstreams[0].keepalive = 0;
    let kg = start(cfg).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..5 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    assert_eq!(up.connections(), 5);
    assert!(
        up.seen()
            .iter()
            .all(|r| support::header(&r.headers, "connection") == Some("close"))
    );
}

#[tokio::test]
async fn connection_past_keepalive_requests_is_not_reused() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.upstreams[0].keepalive_requests = 3;
    let kg = start(cfg).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..9 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    assert_eq!(up.connections(), 3);
    let closed = r#"kaguard_upstream_connections_closed_total{upstream="default",server=""#;
    assert!(kg.metrics().await.contains(closed));
}

#[tokio::test]
async fn connection_past_keepalive_time_is_not_reused() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = config(&[up.addr()]);
    cfg.upstreams[0].keepalive_time = Duration::from_millis(300);
    cfg.upstreams[0].keepalive_timeout = Duration::from_secs(10);
    let kg = start(cfg).await;
    let mut client = Client::connect(kg.addr).await;
    assert_eq!(client.get("/").await.status(), 200);
    assert_eq!(client.get("/").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(client.get("/").await.status(), 200);
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn upstream_connection_close_is_not_reused() {
    let up = upstream(Behaviour {
        max_requests: Some(2),
        announce_last: true,
        ..Behaviour::default()
    })
    .await;
    let kg = start(config(&[up.addr()])).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..6 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    assert_eq!(up.connections(), 3);
    let series = format!(
        r#"kaguard_upstream_connections_closed_total{{upstream="default",server="{}",reason="upstream_said_close"}}"#,
        up.addr()
    );
    assert_eq!(kg.metric(&series).await, 3.0);
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_by_kaguard_after_keepalive_timeout() {
    let up = upstream(Behaviour {
        idle_timeout: None,
        ..Behaviour::default()
    })
    .await;
    let mut cfg = config(&[up.addr()]);
    cfg.upstreams[0].keepalive_timeout = Duration::from_millis(200);
    let kg = start(cfg).await;
    assert_eq!(get(kg.addr, "/").await.status(), 200);
    let series = format!(
        r#"kaguard_upstream_connections_closed_total{{upstream="default",server="{}",reason="idle_timeout"}}"#,
        up.addr()
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while kg.metric(&series).await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "kaguard never closed the idle connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        kg.metric(r#"kaguard_upstream_pool_idle{upstream="default"}"#)
            .await,
        0.0
    );
    // The next request needs a new connection.
    assert_eq!(get(kg.addr, "/").await.status(), 200);
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn idle_list_never_holds_more_than_keepalive() {
    let up = upstream(Behaviour {
        delay: Duration::from_millis(100),
        ..Behaviour::default()
    })
    .await;
    let mut cfg = config(&[up.addr()]);
    cfg.upstreams[0].keepalive = 2;
    let kg = start(cfg).await;
    let addr = kg.addr;
    let tasks: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { get(addr, "/").await.status() }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(up.connections(), 6);
    assert_eq!(
        kg.metric(r#"kaguard_upstream_pool_idle{upstream="default"}"#)
            .await,
        2.0
    );
    let series = format!(
        r#"kaguard_upstream_connections_closed_total{{upstream="default",server="{}",reason="pool_full"}}"#,
        up.addr()
    );
    assert_eq!(kg.metric(&series).await, 4.0);
}

#[tokio::test]
async fn servers_are_used_round_robin() {
    let a = upstream(Behaviour::default()).await;
    let b = upstream(Behaviour::default()).await;
    let kg = start(config(&[a.addr(), b.addr()])).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..10 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    assert_eq!(a.requests(), 5);
    assert_eq!(b.requests(), 5);
    assert_eq!(a.connections() + b.connections(), 2);
}

/// A restart closes every idle connection at once, at whatever idle age each had; learning
/// from that would cap reuse at the youngest age for ten minutes.
#[tokio::test]
async fn a_restart_that_closes_every_idle_connection_teaches_nothing() {
    let slow = Behaviour {
        delay: Duration::from_millis(100),
        idle_timeout: None,
        ..Behaviour::default()
    };
    let up = upstream(slow.clone()).await;
    let addr = up.addr();
    let mut cfg = config(&[addr]);
    cfg.upstreams[0].keepalive_timeout = Duration::from_secs(5);
    let kg = start(cfg).await;
    // Three requests at once open three upstream connections.
    let kg_addr = kg.addr;
    let tasks: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { get(kg_addr, "/").await.status() }))
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(up.connections(), 3);
    // One of them is used again later, so the three sit idle for different times.
    up.set_behaviour(Behaviour {
        delay: Duration::ZERO,
        ..slow.clone()
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(get(kg.addr, "/").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    up.shutdown().await;
    // The reaper sees the closes within its sweep gap.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let up = kaguard::tools::upstream::TestUpstream::start(addr, Behaviour::default())
        .await
        .expect("restart on the same port");
    assert_eq!(get(kg.addr, "/").await.status(), 200);
    let budget = format!(
        r#"kaguard_upstream_learned_idle_budget_seconds{{upstream="default",server="{addr}"}}"#
    );
    let metrics = kg.metrics().await;
    assert_eq!(
        kg.metric(&budget).await,
        0.0,
        "a restart taught a budget: {metrics}"
    );
    let closed = format!(
        r#"kaguard_upstream_connections_closed_total{{upstream="default",server="{addr}",reason="closed_by_upstream"}}"#
    );
    assert_eq!(kg.metric(&closed).await, 3.0, "{metrics}");
    drop(up);
}
