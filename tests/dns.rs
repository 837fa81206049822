//! Servers given by name follow DNS: a test resolver stands in for DNS (every address is
//! 127.0.0.1, told apart by port), and each upstream counts what reached it.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kaguard::config::{Config, ServerConfig};
use kaguard::tools::upstream::Behaviour;
use support::*;

const NAME: &str = DNS_NAME;

/// One group whose only server is `NAME`, resolved at start to `addrs`, again every 50 ms.
fn named(addrs: &[SocketAddr]) -> Config {
    let mut cfg = config(&[addrs[0]]);
    let mut server = ServerConfig::new(NAME, addrs[0]);
    server.addrs = addrs.to_vec();
    cfg.upstreams[0].servers = vec![server];
    cfg.upstreams[0].resolve_interval = Duration::from_millis(50);
    cfg
}

/// Sends GETs on one client connection until `until` holds (checked after each), at most
/// `PATIENCE`; returns how many failed.
async fn get_until(client: &mut Client, until: impl Fn() -> bool) -> usize {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut errors = 0;
    while !until() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held"
        );
        if !client.get("/").await.status().is_success() {
            errors += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    errors
}

#[tokio::test]
async fn a_dns_change_moves_traffic_and_drains_the_old_address() {
    let old = upstream(Behaviour::default()).await;
    let new = upstream(Behaviour::default()).await;
    let table = Arc::new(DnsTable::default());
    table.set(&[old.addr()]);
    let kg = start_with(named(&[old.addr()]), table.clone()).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..5 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    assert_eq!(old.requests(), 5);

    // A slow request is on the old address when it leaves the answer: it finishes there.
    old.set_behaviour(Behaviour {
        delay: Duration::from_millis(300),
        ..Behaviour::default()
    });
    let addr = kg.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/slow").await.status() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    table.set(&[new.addr()]);
    let errors = get_until(&mut client, || new.requests() >= 5).await;
    assert_eq!(errors, 0);
    assert!(table.lookups.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the request in flight finished"
    );

    // Once the change is seen, no new request goes to the old address, and none of its
    // connections is kept.
    let before = old.requests();
    for _ in 0..20 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    assert_eq!(old.requests(), before);
    let removed = format!(
        r#"kaguard_upstream_connections_closed_total{{upstream="default",server="{}",reason="server_removed"}}"#,
        old.addr()
    );
    assert!(kg.metric(&removed).await >= 2.0, "{}", kg.metrics().await);
    let available = format!(
        r#"kaguard_upstream_server_available{{upstream="default",server="{}"}}"#,
        old.addr()
    );
    assert_eq!(kg.metric(&available).await, 0.0);
}

#[tokio::test]
async fn every_address_of_a_name_takes_traffic_and_a_failed_lookup_keeps_them() {
    let ups = [
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
    ];
    let addrs = addrs_of(&ups);
    let table = Arc::new(DnsTable::default());
    table.set(&addrs[..2]);
    let kg = start_with(named(&addrs[..2]), table.clone()).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..10 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    assert_eq!((ups[0].requests(), ups[1].requests()), (5, 5));

    // The resolver fails for a while: the addresses it gave last keep taking requests.
    table.fail();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    assert_eq!((ups[0].requests(), ups[1].requests()), (10, 10));

    // A third address joins, the first leaves.
    table.set(&addrs[1..]);
    let errors = get_until(&mut client, || ups[2].requests() >= 3).await;
    assert_eq!(errors, 0);
    let first = ups[0].requests();
    let (second, third) = (ups[1].requests(), ups[2].requests());
    for _ in 0..20 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    assert_eq!(
        ups[0].requests(),
        first,
        "the address that left got requests"
    );
    assert_eq!(ups[1].requests() + ups[2].requests(), second + third + 20);
    assert!(
        ups[2].requests() >= third + 9,
        "the new address got its share"
    );
}

#[tokio::test]
async fn a_server_given_by_ip_is_never_resolved_again() {
    let up = upstream(Behaviour::default()).await;
    let table = Arc::new(DnsTable::default());
    let mut cfg = config(&[up.addr()]);
    cfg.upstreams[0].resolve_interval = Duration::from_millis(20);
    let kg = start_with(cfg, table.clone()).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..5 {
        assert_eq!(client.get("/").await.status(), 200);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(up.requests(), 5);
    assert_eq!(table.lookups.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn resolving_again_can_be_switched_off() {
    let up = upstream(Behaviour::default()).await;
    let table = Arc::new(DnsTable::default());
    table.set(&[up.addr()]);
    let mut cfg = named(&[up.addr()]);
    cfg.upstreams[0].resolve_interval = Duration::ZERO;
    let _kg = start_with(cfg, table.clone()).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(table.lookups.load(std::sync::atomic::Ordering::SeqCst), 0);
}
