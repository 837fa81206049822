//! Several upstream servers: balancing modes distribute as documented (counted by each
//! upstream), failed servers are avoided, and races kaguard absorbed do not count as failures.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use kaguard::config::{Balance, Config, Guards, RetryOn};
use kaguard::tools::race::{self, Method, RaceOptions};
use kaguard::tools::upstream::{Behaviour, TestUpstream};
use support::*;

fn group(servers: &[SocketAddr], balance: Balance, weights: &[u32]) -> Config {
    let mut cfg = config(servers);
    cfg.upstreams[0].balance = balance;
    for (server, weight) in cfg.upstreams[0].servers.iter_mut().zip(weights) {
        server.weight = *weight;
    }
    cfg
}

fn slow() -> Behaviour {
    Behaviour {
        delay: Duration::from_millis(400),
        ..Behaviour::default()
    }
}

/// Fires `n` GETs, one every `gap`, each on its own client connection, and waits for all.
async fn staggered(addr: SocketAddr, n: usize, gap: Duration) {
    let mut tasks = vec![];
    for _ in 0..n {
        tasks.push(tokio::spawn(async move { get(addr, "/").await.status() }));
        tokio::time::sleep(gap).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn weighted_round_robin_distributes_in_proportion() {
    let ups = [
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
    ];
    let addrs: Vec<_> = ups.iter().map(TestUpstream::addr).collect();
    let kg = start(group(&addrs, Balance::RoundRobin, &[3, 1, 1])).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..50 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    let counts: Vec<u64> = ups.iter().map(TestUpstream::requests).collect();
    assert_eq!(counts, [30, 10, 10]);
}

#[tokio::test]
async fn least_conn_keeps_requests_away_from_a_busy_server() {
    for (balance, slow_gets_at_most, slow_gets_at_least) in
        [(Balance::LeastConn, 2, 1), (Balance::RoundRobin, 4, 4)]
    {
        let ups = [
            upstream(slow()).await,
            upstream(Behaviour::default()).await,
            upstream(Behaviour::default()).await,
        ];
        let addrs: Vec<_> = ups.iter().map(TestUpstream::addr).collect();
        let kg = start(group(&addrs, balance, &[1, 1, 1])).await;
        // 12 requests over about 300 ms: the slow server holds its first one for 400 ms.
        staggered(kg.addr, 12, Duration::from_millis(25)).await;
        let slow_got = ups[0].requests();
        assert!(
            (slow_gets_at_least..=slow_gets_at_most).contains(&slow_got),
            "{balance:?}: the slow server got {slow_got} of 12"
        );
    }
}

#[tokio::test]
async fn power_of_two_choices_by_load_avoids_a_busy_server() {
    let ups = [
        upstream(slow()).await,
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
    ];
    let addrs: Vec<_> = ups.iter().map(TestUpstream::addr).collect();
    let kg = start(group(&addrs, Balance::P2cLoad, &[1, 1, 1])).await;
    staggered(kg.addr, 12, Duration::from_millis(25)).await;
    assert!(
        ups[0].requests() <= 2,
        "the busy server got {} of 12",
        ups[0].requests()
    );
}

#[tokio::test]
async fn power_of_two_choices_by_latency_avoids_a_slow_server() {
    let slowish = Behaviour {
        delay: Duration::from_millis(50),
        ..Behaviour::default()
    };
    let ups = [
        upstream(slowish).await,
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
    ];
    let addrs: Vec<_> = ups.iter().map(TestUpstream::addr).collect();
    let kg = start(group(&addrs, Balance::P2cEwma, &[1, 1, 1])).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..40 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    // Until its first answer its latency is unknown; after it, any pair holds a faster server.
    assert!(
        ups[0].requests() <= 3,
        "the slow server got {} of 40",
        ups[0].requests()
    );
}

/// GETs from `clients` connections, `each` apiece, counting non-2xx answers.
async fn load(addr: SocketAddr, clients: usize, each: usize) -> usize {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                let mut errors = 0;
                for _ in 0..each {
                    if !client.get("/").await.status().is_success() {
                        errors += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                errors
            })
        })
        .collect();
    let mut errors = 0;
    for t in tasks {
        errors += t.await.unwrap();
    }
    errors
}

#[tokio::test]
async fn killed_server_costs_no_get_and_is_taken_out() {
    let mut ups = vec![
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
    ];
    let addrs: Vec<_> = ups.iter().map(TestUpstream::addr).collect();
    let mut cfg = group(&addrs, Balance::RoundRobin, &[1, 1, 1]);
    cfg.upstreams[0].fail_timeout = Duration::from_secs(30);
    for server in &mut cfg.upstreams[0].servers {
        server.fail_timeout = Duration::from_secs(30);
    }
    // No policy retries: only next-upstream may move a refused request to a live server.
    cfg.retry.attempts = 1;
    let kg = start(cfg).await;
    let running = tokio::spawn(load(kg.addr, 3, 150));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let victim = ups.remove(1);
    let victim_addr = victim.addr();
    victim.shutdown().await;
    assert_eq!(
        running.await.unwrap(),
        0,
        "a GET failed while a server died"
    );
    let available = format!(
        r#"kaguard_upstream_server_available{{upstream="default",server="{victim_addr}"}}"#
    );
    assert_eq!(
        kg.metric(&available).await,
        0.0,
        "the dead server is still in rotation"
    );
    let failures = format!(
        r#"kaguard_upstream_server_failures_total{{upstream="default",server="{victim_addr}"}}"#
    );
    // max_fails = 1: one failure takes it out, and nothing is sent to it afterwards.
    assert!(kg.metric(&failures).await <= 3.0, "{}", kg.metrics().await);
}

#[tokio::test]
async fn rolling_restart_of_every_server_costs_no_get() {
    let mut ups = vec![
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
    ];
    let addrs: Vec<_> = ups.iter().map(TestUpstream::addr).collect();
    let mut cfg = group(&addrs, Balance::RoundRobin, &[1, 1, 1]);
    for server in &mut cfg.upstreams[0].servers {
        server.fail_timeout = Duration::from_millis(200);
    }
    let kg = start(cfg).await;
    let running = tokio::spawn(load(kg.addr, 3, 250));
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let old = ups.remove(i);
        let addr = old.addr();
        old.shutdown().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        ups.insert(
            i,
            TestUpstream::start(addr, Behaviour::default())
                .await
                .expect("restart on the same port"),
        );
    }
    assert_eq!(
        running.await.unwrap(),
        0,
        "a GET failed during the rolling restart"
    );
    assert!(ups.iter().all(|u| u.requests() > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn races_kaguard_absorbed_do_not_count_toward_max_fails() {
    let racing = Behaviour {
        idle_timeout: Some(Duration::from_millis(100)),
        ..Behaviour::default()
    };
    let a = Isolated::start(racing.clone());
    let b = Isolated::start(racing);
    let addrs = [a.up.addr(), b.up.addr()];
    let mut cfg = group(&addrs, Balance::RoundRobin, &[1, 1]);
    // Let the races happen (no learning, no socket check) so that safe_retry absorbs them.
    cfg.upstreams[0].guards = Guards {
        learn: false,
        check_before_reuse: false,
        ..Guards::ON
    };
    cfg.retry.retry_on = RetryOn::default();
    let kg = start(cfg).await;
    let mut opts = RaceOptions::new(format!("http://{}/", kg.addr).parse().unwrap());
    opts.method = Method::Get;
    opts.timeout = Duration::from_millis(100);
    opts.requests = 600;
    let report = race::race(&opts, None).await.expect("the reproducer runs");
    assert_eq!(report.errors(), 0, "{report:?}");
    let absorbed = kg.metric(r#"kaguard_upstream_retries_total{upstream="default",cause="reused_connection",outcome="answered"}"#).await;
    assert!(absorbed > 0.0, "no race happened: the test shows nothing");
    for addr in addrs {
        let failures = format!(
            r#"kaguard_upstream_server_failures_total{{upstream="default",server="{addr}"}}"#
        );
        assert_eq!(kg.metric(&failures).await, 0.0, "{addr}");
        let available =
            format!(r#"kaguard_upstream_server_available{{upstream="default",server="{addr}"}}"#);
        assert_eq!(kg.metric(&available).await, 1.0, "{addr}");
    }
}
