//! Active health checks: a server that stops answering its checks is taken out of the
//! balancing and brought back when it passes them again; what a check sends; `/upstreams`.
//!
//! Every group here has `max_fails = 0`, so passive health never takes a server out: what
//! these tests see, only the active checks can do.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use kaguard::config::{Config, HealthCheckConfig};
use kaguard::tools::upstream::{Behaviour, TestUpstream};
use serde_json::Value;
use support::*;

/// Checks every 100 ms; two failures take a server down, two passes bring it back.
fn checked(servers: &[SocketAddr]) -> Config {
    let mut cfg = config(servers);
    let group = &mut cfg.upstreams[0];
    group.health_check = Some(HealthCheckConfig {
        interval: Duration::from_millis(100),
        path: "/".to_owned(),
        expect_status: (200, 399),
        rises: 2,
        falls: 2,
        timeout: Duration::from_millis(50),
    });
    group.max_fails = 0;
    for server in &mut group.servers {
        server.max_fails = 0;
    }
    cfg
}

async fn upstreams(kg: &Kaguard) -> Value {
    let resp = get(kg.admin, "/upstreams").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(resp.headers(), "content-type"),
        Some("application/json")
    );
    serde_json::from_slice(resp.body()).expect("/upstreams is JSON")
}

/// `server`'s entry in `/upstreams`.
async fn server_view(kg: &Kaguard, server: SocketAddr) -> Value {
    let view = upstreams(kg).await;
    view[0]["servers"]
        .as_array()
        .expect("servers is an array")
        .iter()
        .find(|s| s["addr"] == server.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("{server} not in {view}"))
}

async fn available(kg: &Kaguard, server: SocketAddr) -> f64 {
    kg.metric(&format!(
        r#"kaguard_upstream_server_available{{upstream="default",server="{server}"}}"#
    ))
    .await
}

/// Polls, at most [`PATIENCE`], until the gauge and `/upstreams` both say `server` is up (or
/// down); panics if they never do.
async fn wait_until(kg: &Kaguard, server: SocketAddr, up: bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let state = if up { "up" } else { "down" };
    loop {
        let gauge = available(kg, server).await;
        let view = server_view(kg, server).await;
        if gauge == f64::from(u8::from(up))
            && view["active_check"] == state
            && view["available"] == up
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{server} not {state} within {PATIENCE:?}: gauge {gauge}, {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Requests `upstream` received whose path starts with `prefix` (health checks go to `/`).
fn received(upstream: &TestUpstream, prefix: &str) -> usize {
    upstream
        .seen()
        .iter()
        .filter(|s| s.uri.starts_with(prefix))
        .count()
}

#[tokio::test]
async fn server_that_stops_accepting_is_taken_out_by_checks_and_back_once_it_passes_again() {
    let mut ups = several(3, Behaviour::default()).await;
    let addrs = addrs_of(&ups);
    let kg = start(checked(&addrs)).await;
    let mut client = Client::connect(kg.addr).await;
    for i in 0..6 {
        assert_eq!(client.get(&format!("/before/{i}")).await.status(), 200);
    }
    assert!(ups.iter().all(|u| received(u, "/before/") == 2));

    let dead = ups.pop().expect("three upstreams");
    let dead_addr = dead.addr();
    dead.shutdown().await;
    wait_until(&kg, dead_addr, false).await;
    let fails = format!(
        r#"kaguard_upstream_health_checks_total{{upstream="default",server="{dead_addr}",result="fail"}}"#
    );
    assert!(kg.metric(&fails).await >= 2.0);

    for i in 0..20 {
        assert_eq!(client.get(&format!("/after-down/{i}")).await.status(), 200);
    }
    let served: usize = ups.iter().map(|u| received(u, "/after-down/")).sum();
    assert_eq!(served, 20, "the two live upstreams took every request");
    let connect_failures = format!(
        r#"kaguard_upstream_connect_failures_total{{upstream="default",server="{dead_addr}"}}"#
    );
    assert_eq!(
        kg.metric(&connect_failures).await,
        0.0,
        "no request tried the server that is down"
    );
    let lines = kg.log_lines(26).await;
    let after: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["request"]
                .as_str()
                .is_some_and(|r| r.contains("/after-down/"))
        })
        .collect();
    assert_eq!(after.len(), 20);
    for line in after {
        assert_eq!(line["attempts"], 1, "{line}");
        assert_ne!(line["upstream_addr"], dead_addr.to_string(), "{line}");
    }

    let back = TestUpstream::start(dead_addr, Behaviour::default())
        .await
        .expect("the address is free again");
    wait_until(&kg, dead_addr, true).await;
    for i in 0..30 {
        assert_eq!(client.get(&format!("/after-up/{i}")).await.status(), 200);
    }
    // Round robin over three servers gives it 10 of 30.
    let got = received(&back, "/after-up/");
    assert!(got >= 5, "the server that came back took {got} of 30");
}

#[tokio::test]
async fn server_answering_its_check_outside_expect_status_is_taken_out_and_the_others_stay() {
    let sick = Behaviour {
        status: 503,
        ..Behaviour::default()
    };
    let ups = [
        upstream(Behaviour::default()).await,
        upstream(sick).await,
        upstream(Behaviour::default()).await,
    ];
    let addrs = addrs_of(&ups);
    let kg = start(checked(&addrs)).await;
    wait_until(&kg, addrs[1], false).await;
    for healthy in [addrs[0], addrs[2]] {
        let view = server_view(&kg, healthy).await;
        assert_eq!(view["active_check"], "up", "{view}");
        assert_eq!(view["available"], true, "{view}");
        assert_eq!(available(&kg, healthy).await, 1.0);
    }

    // A 503 proxied from the sick server would reach the client: every 200 is a healthy one.
    let mut client = Client::connect(kg.addr).await;
    for i in 0..20 {
        assert_eq!(client.get(&format!("/traffic/{i}")).await.status(), 200);
    }
    assert_eq!(received(&ups[1], "/traffic/"), 0);
    assert_eq!(
        received(&ups[0], "/traffic/") + received(&ups[2], "/traffic/"),
        20
    );
}

#[tokio::test]
async fn each_check_is_a_get_of_the_path_on_a_new_connection_that_it_closes() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = checked(&[up.addr()]);
    let check = cfg.upstreams[0].health_check.as_mut().expect("set above");
    check.path = "/healthz?deep=1".to_owned();
    let _kg = start(cfg).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while up.requests() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} checks within {PATIENCE:?}",
            up.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = up.seen();
    let host = up.addr().to_string();
    for check in &seen {
        assert_eq!(check.method, "GET");
        assert_eq!(check.uri, "/healthz?deep=1");
        assert_eq!(check.version, http::Version::HTTP_11);
        assert_eq!(header(&check.headers, "host"), Some(host.as_str()));
        assert_eq!(
            header(&check.headers, "user-agent"),
            Some("kaguard-health-check")
        );
        assert_eq!(header(&check.headers, "connection"), Some("close"));
        assert_eq!(check.request_on_connection, 1, "a new connection each time");
    }
    let mut connections: Vec<u64> = seen.iter().map(|s| s.connection).collect();
    connections.sort_unstable();
    connections.dedup();
    assert_eq!(connections.len(), seen.len());
}

#[tokio::test]
async fn first_check_goes_out_at_start_not_one_interval_later() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = checked(&[up.addr()]);
    let check = cfg.upstreams[0].health_check.as_mut().expect("set above");
    // Far beyond the wait below: a check seen within it can only be the first one.
    check.interval = Duration::from_secs(600);
    let _kg = start(cfg).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while up.requests() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no check within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn checks_stop_once_kaguard_has_shut_down() {
    let up = upstream(Behaviour::default()).await;
    let mut kg = start(checked(&[up.addr()])).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while up.requests() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no checks");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kg.shutdown().await;
    // A check already under way ends within its 50 ms timeout.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_shutdown = up.requests();
    // Five intervals: checks still running would have sent about five more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(up.requests(), after_shutdown);
}

#[tokio::test]
async fn upstreams_lists_every_server_with_checks_off_when_the_group_has_none() {
    let ups = [
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
    ];
    let addrs = addrs_of(&ups);
    let kg = start(config(&addrs)).await;
    let view = upstreams(&kg).await;
    let expected = serde_json::json!([{
        "upstream": "default",
        "balance": "round_robin",
        "servers": [
            {"name": addrs[0].to_string(), "addr": addrs[0].to_string(), "draining": false,
             "weight": 1, "available": true, "in_flight": 0,
             "active_check": "off", "failures": 0},
            {"name": addrs[1].to_string(), "addr": addrs[1].to_string(), "draining": false,
             "weight": 1, "available": true, "in_flight": 0,
             "active_check": "off", "failures": 0},
        ],
    }]);
    assert_eq!(view, expected);
}
