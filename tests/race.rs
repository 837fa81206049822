//! The keep-alive race, made to happen on purpose with `kaguard race`: a plain pool loses it,
//! the guarded pool does not, for GET and for POST, whatever way the upstream closes.
//!
//! The upstream closes idle connections after 100 ms (scaled down from Node's 5 s; the race
//! is the same), and the reproducer sweeps its pauses from 101 ms down to 50 ms.

mod support;

use std::time::Duration;

use kaguard::config::{Config, Guards, RetryOn};
use kaguard::tools::race::{self, Method, RaceOptions, RaceReport};
use kaguard::tools::upstream::Behaviour;
use support::*;

const UPSTREAM_IDLE: Duration = Duration::from_millis(100);

fn racing(behaviour: Behaviour) -> Behaviour {
    Behaviour {
        idle_timeout: Some(UPSTREAM_IDLE),
        ..behaviour
    }
}

/// kaguard in front of `up`; `guards` on or off. With the guards off, policy retries are off
/// too: a plain keep-alive pool, as most proxies have.
fn kaguard_config(up: &Isolated, guards: Guards) -> Config {
    let mut cfg = config(&[up.up.addr()]);
    cfg.upstreams[0].guards = guards;
    if guards == Guards::OFF {
        cfg.retry.retry_on = RetryOn::default();
    }
    cfg
}

async fn sweep(kg: &Kaguard, method: Method, requests: u64) -> RaceReport {
    let mut opts = RaceOptions::new(format!("http://{}/", kg.addr).parse().unwrap());
    opts.connections = 20;
    opts.method = method;
    opts.timeout = UPSTREAM_IDLE;
    opts.requests = requests;
    opts.duration = Duration::from_secs(60);
    race::race(&opts, None).await.expect("the reproducer runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_pool_loses_the_race() {
    let up = Isolated::start(racing(Behaviour::default()));
    let kg = start(kaguard_config(&up, Guards::OFF)).await;
    let get = sweep(&kg, Method::Get, 1000).await;
    let post = sweep(&kg, Method::Post, 1000).await;
    assert!(
        get.errors() + post.errors() > 0,
        "no error without the guards: the test proves nothing\n{get:?}\n{post:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_pool_wins_the_race_for_get() {
    let up = Isolated::start(racing(Behaviour::default()));
    let kg = start(kaguard_config(&up, Guards::ON)).await;
    let report = sweep(&kg, Method::Get, 3000).await;
    assert_eq!(report.requests, 3000);
    assert_eq!(report.errors(), 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_pool_wins_the_race_for_post() {
    let up = Isolated::start(racing(Behaviour::default()));
    let kg = start(kaguard_config(&up, Guards::ON)).await;
    let report = sweep(&kg, Method::Post, 3000).await;
    assert_eq!(report.requests, 3000);
    assert_eq!(report.errors(), 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_pool_wins_against_an_upstream_that_resets() {
    let up = Isolated::start(racing(Behaviour {
        close_with_rst: true,
        ..Behaviour::default()
    }));
    let kg = start(kaguard_config(&up, Guards::ON)).await;
    let report = sweep(&kg, Method::Mix, 1500).await;
    assert_eq!(report.errors(), 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_pool_wins_against_a_silent_request_cap() {
    let silent = Behaviour {
        max_requests: Some(10),
        announce_last: false,
        ..racing(Behaviour::default())
    };
    let up = Isolated::start(silent);
    let kg = start(kaguard_config(&up, Guards::ON)).await;
    let report = sweep(&kg, Method::Post, 1500).await;
    assert_eq!(report.errors(), 0, "{report:?}");
}

/// Safety is not bought by giving up reuse: under steady load nearly every request goes out on
/// a pooled connection (counted by the upstream's accepted connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_goes_out_on_reused_connections() {
    let up = Isolated::start(Behaviour::node());
    let kg = start(kaguard_config(&up, Guards::ON)).await;
    let mut opts = RaceOptions::new(format!("http://{}/", kg.addr).parse().unwrap());
    opts.connections = 10;
    opts.method = Method::Mix;
    opts.timeout = Duration::from_millis(10);
    opts.below = Duration::from_millis(5);
    opts.sync = false;
    opts.requests = 3000;
    let report = race::race(&opts, None).await.expect("the reproducer runs");
    assert_eq!(report.errors(), 0, "{report:?}");
    let reused = 1.0 - up.up.connections() as f64 / report.requests as f64;
    assert!(
        reused >= 0.99,
        "only {:.2} % reused ({} upstream connections)",
        reused * 100.0,
        up.up.connections()
    );
}
