//! The race tool pointed straight at the test upstream, no proxy in between: the client itself
//! loses the race, which proves the tool provokes it. Counts are checked against the
//! upstream's own counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tokio::time::Instant;

use super::*;
use crate::tools::upstream::{Behaviour, TestUpstream};

async fn upstream(behaviour: Behaviour) -> TestUpstream {
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    TestUpstream::start(any_port, behaviour)
        .await
        .expect("bind 127.0.0.1:0")
}

fn idle(timeout: Option<Duration>) -> Behaviour {
    Behaviour {
        idle_timeout: timeout,
        ..Behaviour::default()
    }
}

/// A quick race against `upstream`: 10 ms sweep centre, 5 ms below, GET, sync.
fn quick(upstream: &TestUpstream, connections: usize, requests: u64) -> RaceOptions {
    let target = format!("http://{}/race", upstream.addr());
    RaceOptions {
        connections,
        requests,
        method: Method::Get,
        timeout: Duration::from_millis(10),
        below: Duration::from_millis(5),
        duration: Duration::from_secs(10),
        request_timeout: Duration::from_secs(2),
        ..RaceOptions::new(target.parse().expect("valid URL"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_around_the_idle_timeout_loses_the_race_without_a_proxy() {
    // Three sweep cycles (52 pauses each) per connection. Only the pauses at T lose the race,
    // about half the time each; with one cycle (200 requests), 2 runs in 10 on a 2-core machine
    // with two busy processes beside it saw no error at all.
    const REQUESTS: u64 = 4 * 156;
    let timeout = Duration::from_millis(100);
    let upstream = upstream(idle(Some(timeout))).await;
    let opts = RaceOptions {
        timeout,
        below: Duration::from_millis(50),
        duration: Duration::from_secs(60),
        ..quick(&upstream, 4, REQUESTS)
    };
    let report = race(&opts, None).await.expect("race runs");
    eprintln!("{}", report.summary(&opts));
    assert_eq!(report.requests, REQUESTS);
    assert!(report.transport_errors > 0, "{report:?}");
    assert!(report.statuses.is_empty(), "{report:?}");
    assert_eq!(report.ok_2xx + report.transport_errors, REQUESTS);
    assert_eq!(upstream.connections(), report.connections_opened);
    // A request that lost the race was never read by the upstream: nothing was retried.
    assert_eq!(upstream.requests(), report.ok_2xx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_without_idle_timeout_gives_no_errors_on_one_connection_each() {
    let upstream = upstream(idle(None)).await;
    for sync in [true, false] {
        let before = upstream.connections();
        let opts = RaceOptions {
            sync,
            ..quick(&upstream, 4, 40)
        };
        let report = race(&opts, None).await.expect("race runs");
        assert_eq!((report.requests, report.errors()), (40, 0), "{report:?}");
        assert_eq!(report.connections_opened, 4);
        assert_eq!(upstream.connections() - before, 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_response_means_a_new_connection_not_an_error() {
    let upstream = upstream(Behaviour {
        max_requests: Some(2),
        announce_last: true,
        ..idle(None)
    })
    .await;
    let report = race(&quick(&upstream, 2, 12), None)
        .await
        .expect("race runs");
    assert_eq!((report.requests, report.errors()), (12, 0), "{report:?}");
    assert_eq!(report.connections_opened, 6);
    assert_eq!(upstream.connections(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_count_bounds_the_race_exactly() {
    let upstream = upstream(idle(None)).await;
    for sync in [true, false] {
        let before = upstream.requests();
        let opts = RaceOptions {
            sync,
            ..quick(&upstream, 3, 7)
        };
        let report = race(&opts, None).await.expect("race runs");
        assert_eq!(report.requests, 7, "sync={sync}");
        assert_eq!(upstream.requests() - before, 7, "sync={sync}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_bounds_the_race() {
    let upstream = upstream(idle(None)).await;
    for sync in [true, false] {
        let opts = RaceOptions {
            sync,
            duration: Duration::from_millis(300),
            ..quick(&upstream, 2, 1_000_000)
        };
        let started = Instant::now();
        let report = race(&opts, None).await.expect("race runs");
        assert!(started.elapsed() < Duration::from_secs(2), "sync={sync}");
        // About 300 ms / 8 ms per request per connection; far from the request bound.
        assert!((10..1000).contains(&report.requests), "{report:?}");
        assert!(report.duration_s < 2.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_sends_a_32_byte_json_body_and_mix_alternates() {
    let upstream = upstream(idle(None)).await;
    let opts = RaceOptions {
        method: Method::Post,
        ..quick(&upstream, 2, 6)
    };
    let report = race(&opts, None).await.expect("race runs");
    assert_eq!(report.ok_2xx, 6);
    assert_eq!(report.method, "POST");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 6);
    for request in &seen {
        assert_eq!(request.method, "POST");
        assert_eq!(request.body_bytes, client::POST_BODY_LEN as u64);
        assert_eq!(request.uri, "/race");
        assert_eq!(request.headers["content-type"], "application/json");
        assert_eq!(request.headers["content-length"], "32");
    }

    let mixed = RaceOptions {
        method: Method::Mix,
        ..quick(&upstream, 2, 8)
    };
    race(&mixed, None).await.expect("race runs");
    let seen = upstream.seen();
    let posts = seen[6..].iter().filter(|r| r.method == "POST").count();
    assert_eq!((seen.len() - 6, posts), (8, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_bar_counts_requests_and_errors() {
    let upstream = upstream(Behaviour {
        status: 503,
        ..idle(None)
    })
    .await;
    let progress = ProgressBar::hidden();
    let report = race(&quick(&upstream, 2, 4), Some(&progress))
        .await
        .expect("race runs");
    assert_eq!(progress.position(), 4);
    assert_eq!(progress.message(), "errors 4");
    assert_eq!(report.statuses, BTreeMap::from([("503".to_owned(), 4)]));
    assert_eq!(report.errors(), 4);
}

#[tokio::test]
async fn unreachable_target_fails_before_sending() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    let opts = RaceOptions::new(format!("http://{addr}/").parse().expect("valid URL"));
    let error = race(&opts, None).await.expect_err("nothing listens");
    assert!(matches!(error, RaceError::Connect { .. }), "{error:?}");
}

#[tokio::test]
async fn bad_options_are_refused() {
    let base = RaceOptions::new("http://127.0.0.1:1/".parse().expect("valid URL"));
    for opts in [
        RaceOptions {
            connections: 0,
            ..base.clone()
        },
        RaceOptions {
            requests: 0,
            ..base.clone()
        },
        RaceOptions {
            target: "https://127.0.0.1:1/".parse().expect("valid URL"),
            ..base.clone()
        },
    ] {
        let error = race(&opts, None).await.expect_err("refused");
        assert!(
            matches!(error, RaceError::Options(_) | RaceError::Target { .. }),
            "{error:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_parses_flags_races_and_returns_the_report() {
    let upstream = upstream(idle(None)).await;
    let target = format!("http://{}/", upstream.addr());
    let args = parse(&[
        "--target",
        &target,
        "--connections",
        "2",
        "--requests",
        "4",
        "--timeout",
        "5ms",
        "--json",
        "--quiet",
    ])
    .expect("valid flags");
    let report = run(args).await.expect("race runs");
    assert_eq!((report.requests, report.ok_2xx), (4, 4));
    assert_eq!(report.method, "POST");
}

#[tokio::test]
async fn out_of_range_options_are_refused_before_connecting() {
    let base = RaceOptions::new("http://127.0.0.1:1/".parse().expect("valid URL"));
    for opts in [
        RaceOptions {
            connections: usize::MAX,
            ..base.clone()
        },
        RaceOptions {
            timeout: Duration::MAX,
            ..base.clone()
        },
        RaceOptions {
            duration: Duration::MAX,
            ..base.clone()
        },
    ] {
        let error = race(&opts, None).await.expect_err("refused");
        assert!(matches!(error, RaceError::Options(_)), "{error:?}");
    }
}

#[test]
fn json_report_field_names_are_pinned() {
    let report = RaceReport {
        statuses: BTreeMap::from([("502".to_owned(), 9)]),
        ..RaceReport::default()
    };
    let line = report.json();
    assert!(!line.contains('\n'));
    let value: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut keys: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(
        keys(&value),
        [
            "connections_opened",
            "duration_s",
            "latency_ms",
            "method",
            "ok_2xx",
            "requests",
            "statuses",
            "target",
            "transport_error_kinds",
            "transport_errors",
        ]
    );
    assert_eq!(
        keys(&value["transport_error_kinds"]),
        ["eof", "other", "reset", "timeout"]
    );
    assert_eq!(keys(&value["latency_ms"]), ["p50", "p99"]);
    assert_eq!(value["statuses"]["502"], 9);
}

#[test]
fn sweep_goes_from_one_step_above_down_to_below_then_restarts() {
    let opts = RaceOptions {
        timeout: Duration::from_millis(500),
        below: Duration::from_millis(50),
        ..RaceOptions::new("http://127.0.0.1:1/".parse().expect("valid URL"))
    };
    let ms = |gap| opts.pause(gap).as_millis();
    assert_eq!(
        (ms(0), ms(1), ms(51), ms(52), ms(53)),
        (501, 500, 450, 501, 500)
    );
    assert_eq!(
        opts.pause_range(),
        (Duration::from_millis(501), Duration::from_millis(450))
    );
    let short = RaceOptions {
        timeout: Duration::from_millis(10),
        ..opts.clone()
    };
    assert_eq!(short.pause(40), Duration::ZERO);
}

#[test]
fn summary_shows_counts_per_status_and_kind() {
    let opts = RaceOptions::new("http://127.0.0.1:8080/".parse().expect("valid URL"));
    let report = RaceReport {
        target: "http://127.0.0.1:8080/".to_owned(),
        method: "POST".to_owned(),
        requests: 2000,
        ok_2xx: 1989,
        statuses: BTreeMap::from([("502".to_owned(), 9)]),
        transport_errors: 2,
        transport_error_kinds: TransportErrorKinds {
            reset: 2,
            ..TransportErrorKinds::default()
        },
        latency_ms: Latency {
            p50: 1.23,
            p99: 3.4,
        },
        connections_opened: 22,
        duration_s: 12.0,
    };
    assert_eq!(
        report.summary(&opts),
        "kaguard race: 2000 requests over 20 connections to http://127.0.0.1:8080/ \
         (POST, pause 501ms..450ms, sync)\n  \
         2xx: 1989   502: 9   transport errors: 2 (reset 2)\n  \
         latency p50 1.2ms  p99 3.4ms\n  \
         client connections opened: 22"
    );
}

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    Race(RaceArgs),
}

fn parse(args: &[&str]) -> Result<RaceArgs, clap::Error> {
    let argv = ["kaguard", "race"].iter().chain(args);
    Cli::try_parse_from(argv).map(|cli| match cli.command {
        Command::Race(args) => args,
    })
}

#[test]
fn flags_map_to_options_with_sync_on_by_default() {
    let args = parse(&["--target", "127.0.0.1:8080"]).expect("valid flags");
    let opts = args.options();
    let defaults = RaceOptions::new("http://127.0.0.1:8080/".parse().expect("valid URL"));
    assert_eq!(opts.target, defaults.target);
    assert_eq!(
        (opts.connections, opts.method, opts.timeout, opts.below),
        (20, Method::Post, defaults.timeout, defaults.below)
    );
    assert_eq!((opts.sync, opts.requests), (true, 2000));
    assert_eq!(
        (opts.duration, opts.request_timeout),
        (Duration::from_secs(60), Duration::from_secs(10))
    );
    let args = parse(&[
        "--target",
        "http://h:1/p",
        "--no-sync",
        "--method",
        "mix",
        "--timeout",
        "2s",
        "--json",
    ])
    .expect("valid flags");
    let opts = args.options();
    assert_eq!((opts.sync, opts.method), (false, Method::Mix));
    assert_eq!(opts.timeout, Duration::from_secs(2));
    assert!(args.json);
    assert!(
        parse(&["--target", "h:1", "--no-sync", "--sync"])
            .expect("valid")
            .options()
            .sync
    );
}

#[test]
fn bad_flags_are_refused() {
    for bad in [
        &["--target", "https://h/"][..],
        &["--target", "http://"],
        &["--target", "h:1", "--connections", "0"],
        &["--target", "h:1", "--requests", "0"],
        &["--target", "h:1", "--duration", "0s"],
        &["--target", "h:1", "--method", "put"],
        &[],
    ] {
        assert!(parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn progress_template_is_valid() {
    // `progress_bar` expects its constant template to parse.
    assert_eq!(cli::progress_bar(5).length(), Some(5));
}
