//! Each race guard, shown to act: every test runs its scenario with the guard on and with it
//! off, and asserts the difference, so it fails if the guard stops doing its job.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kaguard::config::{Config, Guards, OnUnretryable, RetryOn};
use kaguard::metrics::Metrics;
use kaguard::pool::Risk;
use kaguard::proxy::group::Group;
use kaguard::tools::upstream::Behaviour;
use support::*;

fn with_guards(up: std::net::SocketAddr, guards: Guards) -> Config {
    let mut cfg = config(&[up]);
    cfg.upstreams[0].guards = guards;
    // Policy retries would blur what the guards alone do.
    cfg.retry.retry_on = RetryOn::default();
    cfg
}

fn closed_series(up: std::net::SocketAddr, reason: &str) -> String {
    format!(
        r#"kaguard_upstream_connections_closed_total{{upstream="default",server="{up}",reason="{reason}"}}"#
    )
}

/// The upstream closes an idle pooled connection while kaguard's thread is busy, so the
/// reaper, which the FIN wakes, has not yet run to see it. Only a look at the socket itself
/// can tell.
#[tokio::test(flavor = "current_thread")]
async fn check_before_reuse_sees_a_close_the_reaper_has_not_processed_yet() {
    let up = Isolated::start(Behaviour {
        idle_timeout: Some(Duration::from_millis(30)),
        ..Behaviour::default()
    });
    for (check, handed_out) in [(true, false), (false, true)] {
        let guards = Guards {
            check_before_reuse: check,
            ..Guards::OFF
        };
        let cfg = with_guards(up.up.addr(), guards);
        let group = Arc::new(Group::new(&cfg.upstreams[0], &Metrics::new()));
        pool_one(&group).await;
        // Block this (only) runtime thread: the FIN arrives, nobody can process it.
        std::thread::sleep(Duration::from_millis(150));
        let lease = group.checkout(0, Instant::now(), Risk::Retryable);
        assert_eq!(lease.is_some(), handed_out, "check_before_reuse = {check}");
    }
}

#[tokio::test]
async fn upstream_keep_alive_hint_caps_idle_reuse() {
    // The upstream closes after 1.5 s idle and announces `timeout=1` (whole seconds, rounded
    // down, as Node does); kaguard is configured to keep idle connections for 10 s.
    let up = upstream(Behaviour {
        idle_timeout: Some(Duration::from_millis(1500)),
        hint: true,
        ..Behaviour::default()
    })
    .await;
    for (hints, connections) in [(true, 2), (false, 1)] {
        let before = up.connections();
        let guards = Guards {
            honor_hints: hints,
            close_first: true,
            ..Guards::OFF
        };
        let mut cfg = with_guards(up.addr(), guards);
        cfg.upstreams[0].keepalive_timeout = Duration::from_secs(10);
        let kg = start(cfg).await;
        let mut client = Client::connect(kg.addr).await;
        assert_eq!(client.get("/").await.status(), 200);
        // Past the hint's budget (80 % of 1 s), still short of the real 1.5 s.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(client.get("/").await.status(), 200);
        assert_eq!(
            up.connections() - before,
            connections,
            "honor_hints = {hints}"
        );
    }
}

#[tokio::test]
async fn learned_idle_timeout_stops_reuse_before_the_upstream_closes() {
    for (learn, connections) in [(true, 3), (false, 2)] {
        let up = upstream(Behaviour {
            idle_timeout: Some(Duration::from_millis(100)),
            ..Behaviour::default()
        })
        .await;
        let guards = Guards {
            learn,
            check_before_reuse: true,
            ..Guards::OFF
        };
        let mut cfg = with_guards(up.addr(), guards);
        cfg.upstreams[0].keepalive_timeout = Duration::from_secs(10);
        let kg = start(cfg).await;
        let mut client = Client::connect(kg.addr).await;
        assert_eq!(client.get("/").await.status(), 200);
        // The upstream closes the idle connection at 100 ms; kaguard sees it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(client.get("/").await.status(), 200);
        // 90 ms idle: inside the upstream's 100 ms, past the learned budget of 80 ms.
        tokio::time::sleep(Duration::from_millis(90)).await;
        assert_eq!(client.get("/").await.status(), 200);
        assert_eq!(up.connections(), connections, "learn = {learn}");
        if learn {
            let budget =
                r#"kaguard_upstream_learned_idle_budget_seconds{upstream="default",server=""#;
            let text = kg.metrics().await;
            let line = text
                .lines()
                .find(|l| l.starts_with(budget))
                .expect("learned budget gauge");
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(value > 0.05 && value < 0.1, "{line}");
        }
    }
}

#[tokio::test]
async fn close_first_means_kaguard_not_the_upstream_ends_idle_connections() {
    for (close_first, upstream_closes) in [(true, 1.0), (false, 4.0)] {
        let up = upstream(Behaviour {
            idle_timeout: Some(Duration::from_millis(100)),
            ..Behaviour::default()
        })
        .await;
        let guards = Guards {
            learn: true,
            close_first,
            check_before_reuse: true,
            ..Guards::OFF
        };
        let mut cfg = with_guards(up.addr(), guards);
        cfg.upstreams[0].keepalive_timeout = Duration::from_secs(10);
        let kg = start(cfg).await;
        for _ in 0..4 {
            assert_eq!(get(kg.addr, "/").await.status(), 200);
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let by_upstream = kg
            .metric(&closed_series(up.addr(), "closed_by_upstream"))
            .await;
        assert_eq!(by_upstream, upstream_closes, "close_first = {close_first}");
        if close_first {
            assert_eq!(
                kg.metric(&closed_series(up.addr(), "idle_budget")).await,
                3.0
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn request_that_must_not_be_retried_waits_for_a_settled_connection() {
    let up = Isolated::start(Behaviour::default());
    for (risk_aware, handed_out) in [(true, false), (false, true)] {
        let guards = Guards {
            risk_aware_checkout: risk_aware,
            ..Guards::OFF
        };
        let cfg = with_guards(up.up.addr(), guards);
        let group = Arc::new(Group::new(&cfg.upstreams[0], &Metrics::new()));
        pool_one(&group).await;
        // Right after its response: a silent request cap's FIN could still be in flight.
        let lease = group.checkout(0, Instant::now(), Risk::MustNotRetry);
        assert_eq!(
            lease.is_some(),
            handed_out,
            "risk_aware_checkout = {risk_aware}"
        );
        drop(lease);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            group
                .checkout(0, Instant::now(), Risk::MustNotRetry)
                .is_some()
                || !risk_aware
        );
    }
}

#[tokio::test]
async fn get_that_lost_the_race_on_a_reused_connection_is_sent_again_on_a_new_one() {
    for (safe_retry, attempts, upstream_saw) in [(true, 2, 2), (false, 1, 1)] {
        let up = upstream(Behaviour::default()).await;
        let guards = Guards {
            safe_retry,
            ..Guards::OFF
        };
        let kg = start(with_guards(up.addr(), guards)).await;
        let mut client = Client::connect(kg.addr).await;
        assert_eq!(client.get("/").await.status(), 200);
        // The upstream reads the request on the pooled connection and closes without answering.
        assert_eq!(client.get("/?close=fin").await.status(), 502);
        let last = kg.log_lines(2).await.pop().unwrap();
        assert_eq!(
            last["attempts"], attempts,
            "safe_retry = {safe_retry}: {last}"
        );
        assert_eq!(up.requests() - 1, upstream_saw);
    }
}

#[tokio::test]
async fn post_that_lost_the_race_is_never_sent_twice_unless_it_has_an_idempotency_key() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(with_guards(up.addr(), Guards::ON)).await;
    let mut client = Client::connect(kg.addr).await;
    assert_eq!(client.get("/").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(client.post("/?close=fin", b"pay").await.status(), 502);
    assert_eq!(up.requests(), 2, "the POST reached the upstream twice");
    // Pool a connection again, let it settle, then lose the race with a keyed POST.
    assert_eq!(client.get("/").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let keyed = http::Request::post("/?close=fin")
        .header("host", "t")
        .header("idempotency-key", "k-1")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"pay")))
        .unwrap();
    assert_eq!(client.send(keyed).await.status(), 502);
    assert_eq!(
        up.requests(),
        5,
        "a POST with Idempotency-Key is safe to send again"
    );
}

#[tokio::test]
async fn unretryable_lost_race_can_close_the_client_connection_instead_of_502() {
    let up = upstream(Behaviour::default()).await;
    let mut cfg = with_guards(up.addr(), Guards::ON);
    cfg.upstreams[0].on_unretryable = OnUnretryable::CloseClient;
    let kg = start(cfg).await;
    let mut client = Client::connect(kg.addr).await;
    assert_eq!(client.get("/").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let req = http::Request::post("/?close=fin")
        .header("host", "t")
        .body(Default::default())
        .unwrap();
    let sent = tokio::time::timeout(PATIENCE, async {
        client.sender_ready().await;
        client.try_send(req).await
    })
    .await
    .expect("bounded");
    assert!(
        sent.is_err(),
        "expected the client connection closed without a response, got {sent:?}"
    );
    assert_eq!(up.requests(), 2);
    // The log says why the client got no response, not that the client went away.
    let lines = kg.log_lines(2).await;
    let closed = lines.last().expect("a line for the closed request");
    assert_eq!(closed["status"], 444, "{closed}");
    let flags = closed["response_flags"].as_str().unwrap_or_default();
    assert!(!flags.contains("DC"), "{closed}");
    let details = closed["response_details"].as_str().unwrap_or_default();
    assert!(
        details.starts_with("upstream_reset_before_response_started")
            && details.ends_with("; client connection closed without a response"),
        "{closed}"
    );
}

#[tokio::test]
async fn upstream_crashing_on_a_request_teaches_nothing_about_its_idle_timeout() {
    let up = upstream(Behaviour::default()).await;
    let kg = start(with_guards(up.addr(), Guards::ON)).await;
    let mut client = Client::connect(kg.addr).await;
    assert_eq!(client.get("/").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(client.post("/?close=fin", b"x").await.status(), 502);
    for _ in 0..3 {
        assert_eq!(client.get("/").await.status(), 200);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // One new connection after the crash, then reuse as before.
    assert_eq!(up.connections(), 2);
}

/// A response delimited by the close of its connection is no sign of a request cap: the
/// connection is not pooled, and nothing is learned.
#[tokio::test]
async fn close_delimited_response_teaches_no_request_cap() {
    let (addr, _accepted) = scripted_upstream(b"HTTP/1.1 200 OK\r\n\r\nread until the close").await;
    let kg = start(with_guards(addr, Guards::ON)).await;
    let resp = get(kg.addr, "/").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(&resp.body()[..], b"read until the close");
    // Give the reaper a sweep or two.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let cap =
        format!(r#"kaguard_upstream_learned_request_cap{{upstream="default",server="{addr}"}}"#);
    assert_eq!(
        kg.metric(&cap).await,
        0.0,
        "learned a cap from a close-delimited response"
    );
    assert_eq!(
        kg.metric(&closed_series(addr, "upstream_said_close")).await,
        1.0
    );
}
