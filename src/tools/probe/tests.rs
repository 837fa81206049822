//! The probe against the test upstream, whose idle timeout, request cap, close kind and hint
//! are set exactly: every measured value is checked against the configured one.

use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::tools::upstream::{Behaviour, TestUpstream};

async fn upstream(behaviour: Behaviour) -> TestUpstream {
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    TestUpstream::start(any_port, behaviour)
        .await
        .expect("bind 127.0.0.1:0")
}

fn url(upstream: &TestUpstream) -> http::Uri {
    format!("http://{}/probe", upstream.addr())
        .parse()
        .expect("valid URL")
}

/// The precision the probe promises: 5 % or 50 ms, whichever is larger.
fn assert_within_tolerance(measured: Option<Duration>, actual: Duration) {
    let measured = measured.expect("an idle timeout was measured");
    let tolerance = (actual / 20).max(Duration::from_millis(50));
    let error = measured.abs_diff(actual);
    eprintln!("idle timeout {actual:?}: measured {measured:?}, off by {error:?}");
    assert!(
        error <= tolerance,
        "{measured:?} is not within {tolerance:?} of {actual:?}"
    );
}

fn idle_only() -> ProbeOptions {
    ProbeOptions {
        measure_cap: false,
        ..ProbeOptions::default()
    }
}

fn cap_only() -> ProbeOptions {
    ProbeOptions {
        measure_idle: false,
        ..ProbeOptions::default()
    }
}

async fn probe_idle(behaviour: Behaviour, opts: &ProbeOptions) -> ProbeReport {
    let upstream = upstream(behaviour).await;
    let started = Instant::now();
    let report = probe(&url(&upstream), opts, None)
        .await
        .expect("probe runs");
    eprintln!("{}took {:?}", report.summary(), started.elapsed());
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_timeout_of_300ms_is_measured_within_50ms_and_fin_is_seen() {
    let behaviour = Behaviour {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Behaviour::default()
    };
    let report = probe_idle(behaviour, &idle_only()).await;
    assert_within_tolerance(report.idle_timeout, Duration::from_millis(300));
    assert_eq!(report.idle_close, Some(CloseKind::Fin));
    assert_eq!(report.version, "HTTP/1.1");
    assert!(report.keep_alive);
    assert!(
        report.elapsed < Duration::from_secs(5),
        "{:?}",
        report.elapsed
    );
    assert_eq!(
        report.recommended_idle,
        Some(proxy_idle_below(report.idle_timeout.unwrap_or_default()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_close_with_rst_is_reported_as_rst() {
    let behaviour = Behaviour {
        idle_timeout: Some(Duration::from_millis(300)),
        close_with_rst: true,
        ..Behaviour::default()
    };
    let report = probe_idle(behaviour, &idle_only()).await;
    assert_within_tolerance(report.idle_timeout, Duration::from_millis(300));
    assert_eq!(report.idle_close, Some(CloseKind::Rst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_timeout_of_2s_cap_of_100_and_their_hints_are_measured_and_checked() {
    let behaviour = Behaviour {
        idle_timeout: Some(Duration::from_secs(2)),
        max_requests: Some(100),
        announce_last: true,
        hint: true,
        ..Behaviour::default()
    };
    let report = probe_idle(behaviour, &ProbeOptions::default()).await;
    assert_within_tolerance(report.idle_timeout, Duration::from_secs(2));
    assert!(
        report.elapsed < Duration::from_secs(12),
        "{:?}",
        report.elapsed
    );
    assert_eq!(report.request_cap, Some(100));
    assert_eq!(report.cap_announced, Some(true));
    assert_eq!(report.hint_timeout, Some(2));
    assert_eq!(report.hint_timeout_check, Some(HintCheck::Truthful));
    // Apache counts: 99 more after the first.
    assert_eq!(report.hint_max, Some(99));
    assert_eq!(report.hint_max_check, Some(HintCheck::Truthful));
    assert_eq!(report.recommended_requests, Some(100));
    let text = report.summary();
    assert!(
        text.contains("closes after the 100th response, announced"),
        "{text}"
    );
    // 80 % of about 2 s, rounded down to 100 ms: 1.6 s, or 1.5 s if measured a hair short.
    let idle = report
        .recommended_idle
        .expect("an idle timeout to recommend");
    assert!([1500, 1600].contains(&idle.as_millis()), "{idle:?}");
    let nginx = format!(
        "keepalive_timeout {}; keepalive_requests 100;",
        config_duration(idle)
    );
    assert!(text.contains(&nginx), "{text}");
    assert!(
        text.contains("AWS ALB (60 s)  would race this server"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_caps_are_counted_exactly_with_the_announced_flag() {
    for (cap, announced) in [(7, true), (7, false), (100, true), (100, false)] {
        let behaviour = Behaviour {
            max_requests: Some(cap),
            announce_last: announced,
            ..Behaviour::default()
        };
        let report = probe_idle(behaviour, &cap_only()).await;
        assert_eq!(
            report.request_cap,
            Some(cap),
            "cap {cap} announced {announced}"
        );
        assert_eq!(report.cap_announced, Some(announced), "cap {cap}");
        assert_eq!(report.idle_timeout, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_cap_with_rst_is_still_counted_exactly() {
    let behaviour = Behaviour {
        max_requests: Some(7),
        announce_last: false,
        close_with_rst: true,
        ..Behaviour::default()
    };
    let report = probe_idle(behaviour, &cap_only()).await;
    assert_eq!(
        (report.request_cap, report.cap_announced),
        (Some(7), Some(false))
    );
    assert!(report.summary().contains("WITHOUT `Connection: close`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_hint_is_read_and_a_lying_timeout_hint_is_flagged_early() {
    let behaviour = Behaviour {
        idle_timeout: Some(Duration::from_millis(300)),
        max_requests: Some(7),
        hint: true,
        ..Behaviour::default()
    };
    let mut report = probe_idle(behaviour, &ProbeOptions::default()).await;
    // 300 ms rounds down to timeout=0; max counts the 6 left after the first.
    assert_eq!((report.hint_timeout, report.hint_max), (Some(0), Some(6)));
    assert_eq!(report.hint_timeout_check, Some(HintCheck::Truthful));
    assert_eq!(report.hint_max_check, Some(HintCheck::Truthful));
    // The same server announcing 5 s would be closing 4.7 s early.
    report.hint_timeout = Some(5);
    advice::complete(&mut report);
    assert_eq!(report.hint_timeout_check, Some(HintCheck::Early));
    assert!(report.summary().contains("UNTRUTHFUL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_without_hint_reports_none() {
    let behaviour = Behaviour {
        max_requests: Some(3),
        hint: false,
        ..Behaviour::default()
    };
    let report = probe_idle(behaviour, &cap_only()).await;
    assert_eq!((report.hint_timeout, report.hint_max), (None, None));
    assert_eq!(report.hint_timeout_check, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_that_outlasts_max_idle_is_reported_as_longer() {
    let behaviour = Behaviour {
        idle_timeout: None,
        ..Behaviour::default()
    };
    let opts = ProbeOptions {
        max_idle: Duration::from_millis(300),
        ..idle_only()
    };
    let report = probe_idle(behaviour, &opts).await;
    assert_eq!(report.idle_timeout, None);
    assert_eq!(report.idle_survived, Some(Duration::from_millis(300)));
    assert_eq!(report.rounds, 1);
    assert!(report.summary().contains("longer than 300 ms"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_that_closes_after_every_response_has_keep_alive_off() {
    for announced in [true, false] {
        let behaviour = Behaviour {
            max_requests: Some(1),
            announce_last: announced,
            ..Behaviour::default()
        };
        let report = probe_idle(behaviour, &ProbeOptions::default()).await;
        assert!(!report.keep_alive, "announced {announced}");
        assert_eq!(report.request_cap, Some(1));
        assert_eq!(report.cap_announced, Some(announced));
        assert_eq!(report.idle_timeout, None);
        assert_eq!(report.recommended_idle, None);
        assert!(report.summary().contains("Nothing to tune"));
    }
}

#[tokio::test]
async fn unreachable_server_and_bad_urls_fail_before_measuring() {
    // Bind then drop, so the port is (almost certainly) closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind");
    let uri: http::Uri = format!("http://{closed}/").parse().expect("valid URL");
    let error = probe(&uri, &ProbeOptions::default(), None).await;
    assert!(
        matches!(error, Err(ProbeError::Connect { .. })),
        "{error:?}"
    );
    let uri: http::Uri = "https://127.0.0.1/".parse().expect("valid URL");
    let error = probe(&uri, &ProbeOptions::default(), None).await;
    assert!(matches!(error, Err(ProbeError::Target { .. })), "{error:?}");
    let opts = ProbeOptions {
        connections: 0,
        ..ProbeOptions::default()
    };
    assert!(matches!(
        probe(&uri, &opts, None).await,
        Err(ProbeError::Options(_))
    ));
}

#[test]
fn rounds_narrow_the_interval_to_the_tolerance() {
    let secs = Duration::from_secs;
    let first = idle::first_waits(secs(120));
    assert_eq!(first.len(), 8);
    assert_eq!((first[0], first[7]), (secs(1), secs(120)));
    assert_eq!(
        idle::first_waits(Duration::from_millis(300)),
        [Duration::from_millis(300)]
    );
    let waits = idle::next_waits(secs(1), secs(2), 8);
    assert_eq!(waits.len(), 8);
    assert!(
        waits
            .iter()
            .all(|w| *w > Duration::from_millis(1800) && *w < secs(2))
    );
    assert!(idle::converged(Duration::from_millis(1950), secs(2)));
    assert!(!idle::converged(secs(1), secs(2)));
    assert!(idle::converged(
        Duration::from_millis(260),
        Duration::from_millis(300)
    ));
}

#[test]
fn report_serialises_durations_in_milliseconds() {
    let report = ProbeReport {
        target: "http://x/".into(),
        version: "HTTP/1.1".into(),
        status: 200,
        keep_alive: true,
        idle_measured: true,
        idle_timeout: Some(Duration::from_millis(5003)),
        idle_survived: None,
        idle_bound: Duration::from_secs(120),
        idle_close: Some(CloseKind::Rst),
        cap_measured: true,
        request_cap: None,
        cap_announced: None,
        cap_bound: 1000,
        hint_timeout: None,
        hint_max: None,
        hint_timeout_check: None,
        hint_max_check: None,
        recommended_idle: None,
        recommended_requests: None,
        rounds: 2,
        connections: 17,
        notes: Vec::new(),
        elapsed: Duration::from_millis(10_250),
    };
    let json: serde_json::Value = serde_json::from_str(&report.json()).expect("valid JSON");
    assert_eq!(json["idle_timeout_ms"], 5003);
    assert_eq!(json["idle_survived_ms"], serde_json::Value::Null);
    assert_eq!(json["idle_close"], "rst");
    assert_eq!(json["duration_s"], 10.25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_parses_its_flags_and_returns_the_report() {
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: ProbeArgs,
    }
    let upstream = upstream(Behaviour {
        max_requests: Some(5),
        ..Behaviour::default()
    })
    .await;
    let target = upstream.addr().to_string();
    let cli = Cli::try_parse_from(["probe", &target, "--no-idle", "--json", "--quiet"])
        .expect("valid flags");
    let report = run(cli.args).await.expect("probe runs");
    assert_eq!(
        (report.request_cap, report.cap_announced),
        (Some(5), Some(true))
    );
    assert!(!report.idle_measured);
}
