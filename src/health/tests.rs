use proptest::prelude::*;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(10);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn max_fails_failures_within_fail_timeout_take_the_server_out() {
    let t0 = Instant::now();
    let mut passive = Passive::new(3, TIMEOUT);
    assert!(!passive.failure(t0));
    assert!(!passive.failure(t0 + secs(4)));
    assert!(passive.available(t0 + secs(4)));
    assert!(passive.failure(t0 + secs(10)));
    assert!(!passive.available(t0 + secs(10)));
}

#[test]
fn failures_outside_the_window_restart_the_count() {
    let t0 = Instant::now();
    let mut passive = Passive::new(2, TIMEOUT);
    assert!(!passive.failure(t0));
    // 11 s after the first: a new window, counting 1.
    assert!(!passive.failure(t0 + secs(11)));
    assert!(passive.available(t0 + secs(11)));
    assert!(passive.failure(t0 + secs(12)));
}

#[test]
fn a_server_out_comes_back_after_fail_timeout_with_no_failures_counted() {
    let t0 = Instant::now();
    let mut passive = Passive::new(2, TIMEOUT);
    passive.failure(t0);
    assert!(passive.failure(t0 + secs(1)));
    assert!(!passive.available(t0 + secs(10)));
    // A late failure while out neither counts nor extends the time out.
    assert!(!passive.failure(t0 + secs(5)));
    assert!(passive.available(t0 + secs(11)));
    assert!(!passive.failure(t0 + secs(11)));
    assert!(passive.available(t0 + secs(11)));
}

#[test]
fn a_success_resets_the_count_but_does_not_bring_a_server_back() {
    let t0 = Instant::now();
    let mut passive = Passive::new(2, TIMEOUT);
    passive.failure(t0);
    passive.success(t0 + secs(1));
    assert!(!passive.failure(t0 + secs(2)));
    assert!(passive.failure(t0 + secs(3)));
    passive.success(t0 + secs(4));
    assert!(!passive.available(t0 + secs(4)));
}

#[test]
fn max_fails_0_never_takes_the_server_out() {
    let t0 = Instant::now();
    let mut passive = Passive::new(0, TIMEOUT);
    for i in 0..100 {
        assert!(!passive.failure(t0 + Duration::from_millis(i)));
    }
    assert!(passive.available(t0 + secs(1)));
}

#[test]
fn max_fails_1_takes_the_server_out_at_the_first_failure() {
    let t0 = Instant::now();
    let mut passive = Passive::new(1, TIMEOUT);
    assert!(passive.failure(t0));
    assert!(!passive.available(t0 + secs(9)));
    assert!(passive.available(t0 + TIMEOUT));
}

#[test]
fn active_starts_up_and_needs_falls_failures_in_a_row_to_go_down() {
    let mut active = Active::new(2, 3);
    assert!(active.up());
    assert_eq!(active.record(false), None);
    assert_eq!(active.record(false), None);
    assert_eq!(active.record(true), None, "a pass breaks the run");
    assert_eq!(active.record(false), None);
    assert_eq!(active.record(false), None);
    assert_eq!(active.record(false), Some(false));
    assert!(!active.up());
    assert_eq!(active.record(false), None);
}

#[test]
fn active_needs_rises_passes_in_a_row_to_come_back() {
    let mut active = Active::new(2, 1);
    assert_eq!(active.record(false), Some(false));
    assert_eq!(active.record(true), None);
    assert_eq!(active.record(false), None, "a failure breaks the run");
    assert_eq!(active.record(true), None);
    assert_eq!(active.record(true), Some(true));
    assert!(active.up());
    assert_eq!(active.record(true), None);
}

#[test]
fn active_zero_counts_as_one() {
    let mut active = Active::new(0, 0);
    assert_eq!(active.record(false), Some(false));
    assert_eq!(active.record(true), Some(true));
}

#[derive(Clone, Copy, Debug)]
enum Event {
    Failure,
    Success,
    Look,
}

fn event() -> impl Strategy<Value = (u64, Event)> {
    (
        0..40u64,
        prop_oneof![
            3 => Just(Event::Failure),
            1 => Just(Event::Success),
            1 => Just(Event::Look),
        ],
    )
}

proptest! {
    #[test]
    fn passive_is_out_only_after_max_fails_failures_in_one_fail_timeout(
        max_fails in 0..5u32,
        fail_timeout_ms in 1..100u64,
        events in proptest::collection::vec(event(), 1..200),
    ) {
        let fail_timeout = Duration::from_millis(fail_timeout_ms);
        let mut passive = Passive::new(max_fails, fail_timeout);
        let mut now = Instant::now();
        // Failures since the last success, the last time out, or the start.
        let mut failures: Vec<Instant> = Vec::new();
        let mut taken_out: Option<Instant> = None;
        for (step_ms, event) in events {
            now += Duration::from_millis(step_ms);
            let expected_out =
                taken_out.is_some_and(|at| now.duration_since(at) < fail_timeout);
            prop_assert_eq!(passive.available(now), !expected_out);
            match event {
                Event::Failure => {
                    if expected_out {
                        prop_assert!(!passive.failure(now));
                        continue;
                    }
                    failures.push(now);
                    if passive.failure(now) {
                        let in_window = failures
                            .iter()
                            .filter(|&&at| now.duration_since(at) <= fail_timeout)
                            .count();
                        prop_assert!(max_fails > 0);
                        prop_assert!(in_window >= max_fails as usize, "{} failures", in_window);
                        taken_out = Some(now);
                        failures.clear();
                    }
                }
                Event::Success => {
                    passive.success(now);
                    failures.clear();
                }
                Event::Look => {}
            }
        }
    }

    #[test]
    fn passive_takes_out_whenever_max_fails_come_within_the_window_of_the_first(
        max_fails in 1..5u32,
        gaps_ms in proptest::collection::vec(0..5u64, 0..4),
    ) {
        // All failures within 20 ms of the first, fail_timeout 20 ms: the last one takes it out.
        let mut passive = Passive::new(max_fails, Duration::from_millis(20));
        let mut now = Instant::now();
        let n = max_fails as usize;
        for i in 0..n {
            if i > 0 {
                now += Duration::from_millis(gaps_ms.get(i - 1).copied().unwrap_or(0));
            }
            prop_assert_eq!(passive.failure(now), i + 1 == n);
        }
    }
}
