//! Several upstream servers: balancing modes distribute as documented (counted by each
//! upstream), failed servers are avoided, and races kaguard absorbed do not count as failures.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use kaguard::config::{Balance, Config, Guards, RetryOn};
use kaguard::tools::race::{self, Method, RaceOptions};
use kaguard::tools::upstream::{Behaviour, Drained, TestUpstream};
use support::*;
use tokio::net::TcpStream;

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
    let ups = several(3, Behaviour::default()).await;
    let addrs = addrs_of(&ups);
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
        let addrs = addrs_of(&ups);
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
    let addrs = addrs_of(&ups);
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
    // Far slower than the others ever get on a loaded two-core machine, so that the pick
    // the test counts is the balancer's, not scheduling noise.
    let slowish = Behaviour {
        delay: Duration::from_millis(200),
        ..Behaviour::default()
    };
    let ups = [
        upstream(slowish).await,
        upstream(Behaviour::default()).await,
        upstream(Behaviour::default()).await,
    ];
    let addrs = addrs_of(&ups);
    let kg = start(group(&addrs, Balance::P2cEwma, &[1, 1, 1])).await;
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..40 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    // It can be picked once while every latency is unknown; after that, any pair it is in
    // holds a server that is faster or not yet known, and either wins.
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
    let mut ups = several(3, Behaviour::default()).await;
    let addrs = addrs_of(&ups);
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
    let mut ups = several(3, Behaviour::default()).await;
    let addrs = addrs_of(&ups);
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

/// Time each test upstream takes to answer during a graceful rolling restart: long enough that
/// most of the time some request is in flight on every server when it begins to drain, short
/// enough for a few hundred requests a second through three servers.
const GRACEFUL_DELAY: Duration = Duration::from_millis(20);

/// Client connections of the restart load: with 20 ms per request, about three requests in
/// flight on each server at any moment.
const RESTART_CLIENTS: usize = 9;

/// Requests per client at most: a bound on the load should the servers never all take
/// requests again (the test then fails on that, not on time). It normally stops far earlier.
const RESTART_REQUESTS_AT_MOST: usize = 1_000;

/// Requests each restarted server must have received before the load stops.
const RESTARTED_SERVER_TAKES: u64 = 10;

/// POST body: small enough to be held for replay, so only the method decides retries.
const POST_BODY: &[u8] = b"order=42";

#[derive(Clone, Copy, Debug)]
enum Verb {
    Get,
    Post,
}

/// What one client of the load saw, over all its connections.
#[derive(Default)]
struct Seen {
    sent: usize,
    /// One line per request that did not get a 2xx: the status, or the transport error.
    failures: Vec<String>,
}

/// Sends `verb` requests on one keep-alive client connection after another, with a 2 ms pause,
/// until `stop` is set or `at_most` were sent. A transport error (kaguard closed the client
/// connection without an answer) counts as a failure and the client reconnects.
async fn client_load(addr: SocketAddr, verb: Verb, at_most: usize, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut sender: Option<http1::SendRequest<Full<Bytes>>> = None;
    while seen.sent < at_most && !stop.load(Ordering::SeqCst) {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(addr).await.expect("connect to kaguard");
            let (s, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(async move {
                let _ = conn.await;
            });
            sender = Some(s);
        }
        let s = sender.as_mut().expect("connected above");
        let request = match verb {
            Verb::Get => Request::get("/")
                .header("host", "test")
                .body(Full::default()),
            Verb::Post => Request::post("/")
                .header("host", "test")
                .body(Full::new(Bytes::from_static(POST_BODY))),
        }
        .expect("valid request");
        seen.sent += 1;
        let outcome = tokio::time::timeout(PATIENCE, async {
            s.ready().await?;
            let response = s.send_request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        })
        .await
        .expect("an answer or an error in time");
        match outcome {
            Ok(status) if status.is_success() => {}
            Ok(status) => seen.failures.push(format!("status {status}")),
            Err(error) => {
                seen.failures.push(format!("transport: {error}"));
                sender = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    seen
}

/// What a graceful rolling restart cost the clients.
struct Restart {
    sent: usize,
    failures: Vec<String>,
    /// What each drain had to do, in restart order.
    drained: Vec<Drained>,
    /// Requests each restarted server received.
    after: Vec<u64>,
    /// The access log lines of the failed requests.
    failed_lines: Vec<serde_json::Value>,
    /// kaguard's retry counters that are not zero: what it absorbed.
    retries: Vec<String>,
}

impl Restart {
    /// Asserts what every graceful restart must show, whatever the method, and returns the
    /// report. The drains met requests in flight, which is what makes the restart graceful
    /// rather than a kill: each was answered with `Connection: close`, none was cut off; and
    /// every restarted server took requests again.
    fn checked(&self, verb: Verb) -> String {
        let report = self.report(verb);
        eprintln!("{report}");
        assert!(
            self.after.iter().all(|&n| n >= RESTARTED_SERVER_TAKES),
            "{report}"
        );
        let answered: u64 = self.drained.iter().map(|d| d.answered).sum();
        assert!(
            answered > 0,
            "no request was in flight at any drain: {report}"
        );
        assert!(self.drained.iter().all(|d| d.cut_off == 0), "{report}");
        report
    }

    fn report(&self, verb: Verb) -> String {
        let failed: Vec<String> = self
            .failed_lines
            .iter()
            .map(|l| {
                format!(
                    "{} {} {} reused={} idle_ms={} attempts={}",
                    l["status"],
                    l["response_flags"],
                    l["response_details"],
                    l["upstream_connection_reused"],
                    l["upstream_connection_idle_ms"],
                    l["attempts"]
                )
            })
            .collect();
        format!(
            "{} {verb:?} requests, failures {:?}, drains {:?}, restarted servers took {:?}, \
             retries {:?}, failed (access log) {failed:#?}",
            self.sent, self.failures, self.drained, self.after, self.retries
        )
    }
}

/// Three servers, each stopped gracefully in turn and started again on its port, under a load of
/// `verb` requests through kaguard that stops once every restarted server has taken requests.
async fn graceful_rolling_restart(verb: Verb) -> Restart {
    let behaviour = Behaviour {
        delay: GRACEFUL_DELAY,
        ..Behaviour::default()
    };
    let mut ups = several(3, behaviour.clone()).await;
    let addrs = addrs_of(&ups);
    let mut cfg = group(&addrs, Balance::RoundRobin, &[1, 1, 1]);
    // A refused connect takes a restarting server out; it is back soon after it is.
    for server in &mut cfg.upstreams[0].servers {
        server.fail_timeout = Duration::from_millis(200);
    }
    let kg = start(cfg).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..RESTART_CLIENTS)
        .map(|_| {
            tokio::spawn(client_load(
                kg.addr,
                verb,
                RESTART_REQUESTS_AT_MOST,
                stop.clone(),
            ))
        })
        .collect();
    let mut drained = vec![];
    for i in 0..3 {
        // Time for the pool to hold idle and busy connections to every server again.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let old = ups.remove(i);
        let addr = old.addr();
        // Stop while a request is in the server's hands, as a deploy meets a busy server.
        for _ in 0..2_000 {
            if old.handling() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drained.push(
            tokio::time::timeout(PATIENCE, old.drain())
                .await
                .expect("drain ends"),
        );
        // A new process takes a moment to start; connects are refused meanwhile.
        tokio::time::sleep(Duration::from_millis(100)).await;
        ups.insert(
            i,
            TestUpstream::start(addr, behaviour.clone())
                .await
                .expect("restart on the same port"),
        );
    }
    for _ in 0..500 {
        if ups.iter().all(|u| u.requests() >= RESTARTED_SERVER_TAKES) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut sent = 0;
    let mut failures = vec![];
    for client in clients {
        let seen = client.await.expect("client task");
        sent += seen.sent;
        failures.extend(seen.failures);
    }
    let after = ups.iter().map(TestUpstream::requests).collect();
    let retries = kg
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("kaguard_upstream_retries_total{") && !l.ends_with(" 0"))
        .map(str::to_owned)
        .collect();
    let failed_lines = if failures.is_empty() {
        vec![]
    } else {
        kg.log_lines(sent)
            .await
            .into_iter()
            .filter(|line| {
                line["status"]
                    .as_u64()
                    .is_none_or(|s| !(200..300).contains(&s))
            })
            .collect()
    };
    Restart {
        sent,
        failures,
        drained,
        after,
        failed_lines,
        retries,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_rolling_restart_of_every_server_costs_no_get() {
    let restart = graceful_rolling_restart(Verb::Get).await;
    let report = restart.checked(Verb::Get);
    assert!(restart.failures.is_empty(), "{report}");
}

/// Not zero errors, unlike GET. A graceful server stops with two races no proxy can see
/// coming: it closes its idle keep-alive connections the moment it stops, so a POST kaguard is
/// writing into one of them is reset or cut off unread; and closing its listener resets the
/// connections the kernel had completed but the server had not yet accepted, so a POST on a new
/// connection is reset too. kaguard cannot tell that the server never read the request, so it
/// must not send it again, and answers 502. (GETs meet the same races and are sent again.)
/// What is asserted is that these races are the only way a POST fails: a 502 for a reset before
/// any response byte, never a refused connect, a request in flight at the stop, or a client
/// connection closed without an answer. Measured counts are in docs/balancing.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_rolling_restart_loses_posts_only_to_the_close_races() {
    let restart = graceful_rolling_restart(Verb::Post).await;
    let report = restart.checked(Verb::Post);
    assert_eq!(
        restart.failed_lines.len(),
        restart.failures.len(),
        "{report}"
    );
    for line in &restart.failed_lines {
        assert_eq!(line["status"], 502, "{report}");
        assert_eq!(line["attempts"], 1, "{report}");
        let details = line["response_details"].as_str().unwrap_or_default();
        assert!(
            details.starts_with("upstream_reset_before_response_started"),
            "{report}"
        );
    }
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
    // A race is likely in one run, not certain: runs go on until one happened, at most ten
    // (five once ended without a race, with the whole suite running on two cores).
    let absorbed_series = r#"kaguard_upstream_retries_total{upstream="default",cause="reused_connection",outcome="answered"}"#;
    for _ in 0..10 {
        let report = race::race(&opts, None).await.expect("the reproducer runs");
        assert_eq!(report.errors(), 0, "{report:?}");
        if kg.metric(absorbed_series).await > 0.0 {
            break;
        }
    }
    let absorbed = kg.metric(absorbed_series).await;
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
