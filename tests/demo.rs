//! `kaguard demo --quick`: the plain pool loses the race, kaguard does not.

use kaguard::tools::demo::{self, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_demo_shows_errors_on_the_plain_pool_and_none_on_kaguard() {
    let report = demo::demo(&DemoOptions::quick(), false)
        .await
        .expect("the demo runs");
    assert!(
        report.errors(false) > 0,
        "the plain pool lost no request: the demo shows nothing\n{report:#?}"
    );
    assert_eq!(report.errors(true), 0, "{report:#?}");
    let text = demo::render(&report);
    assert!(
        text.contains("plain pool") && text.contains("kaguard") && text.contains("reused"),
        "{text}"
    );
    let steady = report
        .rows
        .iter()
        .find(|r| r.phase == "steady" && r.guards)
        .expect("a steady kaguard row");
    // The quick demo's upstream closes idle connections after 100 ms, so surplus connections
    // expire at the learned 80 ms and are replaced; the 99 % criterion is asserted against a
    // Node-like upstream in tests/race.rs. Here the four proxies, their upstreams and their
    // clients share the test's two threads in a debug build, and a busy thread makes the
    // risk-aware checkout turn POSTs to new connections more often. New connections per 3000
    // requests: 24 to 101 measured before kaguard drove its upstream connections itself,
    // 66 to 215 after (on a busier day, when the code before failed the old 98 % bound in
    // 7 of 10 runs too). A pool that did not reuse would open thousands.
    assert!(steady.reuse() >= 0.90, "{steady:?}");
}
