//! Learns one upstream server's real idle timeout and request cap from how it closes pooled
//! connections, and turns them into a budget kaguard stays below. No I/O, no clock.
//!
//! Two kinds of close are told apart by the idle age at which they arrive: a close within
//! [`CAP_CLOSE_WINDOW`] of a response is the server ending the connection after that response
//! (a request cap, announced or not); a later one is its idle timeout. Each learned value is
//! forgotten after [`LEARN_TTL`] without a new observation, so a redeploy with longer timeouts
//! does not leave kaguard stuck on the old ones; if the server still closes early, the first
//! idle close after that teaches it again.

use std::time::{Duration, Instant};

/// A close this soon after a response is the server ending the connection after that
/// response, not an idle timeout: servers close right after the response they decided was the
/// last, while no idle timeout in use is this short.
pub const CAP_CLOSE_WINDOW: Duration = Duration::from_millis(20);

/// How long a learned value holds without being seen again.
pub const LEARN_TTL: Duration = Duration::from_secs(600);

/// Reuse stops this far below an idle timeout: a fifth of it, so the margin grows with the
/// timeout (timers on a loaded server fire late), and never less than [`MIN_IDLE_MARGIN`].
const IDLE_MARGIN_DIVISOR: u32 = 5;

/// A shorter close is reported as a change only when it is this much shorter (in percent)
/// than the one known: closes seen together differ by a millisecond or two, and each would
/// otherwise log its own line.
const REPORT_STEP_PERCENT: u32 = 5;

/// The least margin below an idle timeout: a FIN in flight on a busy host plus scheduling
/// delay on both ends.
pub const MIN_IDLE_MARGIN: Duration = Duration::from_millis(20);

/// How long kaguard may keep reusing a connection that a server closes after `timeout` idle.
pub fn idle_budget_below(timeout: Duration) -> Duration {
    let margin = (timeout / IDLE_MARGIN_DIVISOR).max(MIN_IDLE_MARGIN);
    timeout.saturating_sub(margin)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen<T> {
    value: T,
    at: Instant,
}

/// What a server was seen to do, and when a learned value changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The server closes idle connections after about `observed`; reuse now stops at `budget`.
    IdleTimeout {
        observed: Duration,
        budget: Duration,
    },
    /// The server closes connections after `observed` requests; at most `cap` go on one now.
    RequestCap { observed: u64, cap: u64 },
}

/// What has been learned about one upstream server.
#[derive(Clone, Debug, Default)]
pub struct Learner {
    idle_close: Option<Seen<Duration>>,
    request_cap: Option<Seen<u64>>,
}

impl Learner {
    /// The server closed a pooled connection `idle_for` after its last response, having
    /// served `requests` requests on it. Returns what changed, if anything.
    pub fn observe_close(
        &mut self,
        idle_for: Duration,
        requests: u64,
        now: Instant,
    ) -> Option<Change> {
        if idle_for < CAP_CLOSE_WINDOW {
            return self.observe_request_cap(requests, now);
        }
        let current = self.live_idle(now);
        match current {
            Some(seen) if seen.value <= idle_for => {
                // Consistent with what we know (closes are seen a little late): still true.
                self.idle_close = Some(Seen {
                    value: seen.value,
                    at: now,
                });
                None
            }
            Some(seen) if idle_for * 100 >= seen.value * (100 - REPORT_STEP_PERCENT) => {
                self.idle_close = Some(Seen {
                    value: idle_for,
                    at: now,
                });
                None
            }
            _ => {
                self.idle_close = Some(Seen {
                    value: idle_for,
                    at: now,
                });
                Some(Change::IdleTimeout {
                    observed: idle_for,
                    budget: idle_budget_below(idle_for),
                })
            }
        }
    }

    fn observe_request_cap(&mut self, requests: u64, now: Instant) -> Option<Change> {
        if requests == 0 {
            return None;
        }
        match self.live_cap(now) {
            Some(seen) if seen.value <= requests => {
                self.request_cap = Some(Seen {
                    value: seen.value,
                    at: now,
                });
                None
            }
            _ => {
                self.request_cap = Some(Seen {
                    value: requests,
                    at: now,
                });
                Some(Change::RequestCap {
                    observed: requests,
                    cap: requests,
                })
            }
        }
    }

    fn live_idle(&self, now: Instant) -> Option<Seen<Duration>> {
        self.idle_close
            .filter(|s| now.saturating_duration_since(s.at) < LEARN_TTL)
    }

    fn live_cap(&self, now: Instant) -> Option<Seen<u64>> {
        self.request_cap
            .filter(|s| now.saturating_duration_since(s.at) < LEARN_TTL)
    }

    /// The idle time after which connections to this server must not be reused, if learned.
    pub fn idle_budget(&self, now: Instant) -> Option<Duration> {
        self.live_idle(now).map(|s| idle_budget_below(s.value))
    }

    /// The most requests one connection to this server may carry, if learned: the server
    /// closes after its `cap`-th response, so a connection that carried `cap` is done.
    pub fn request_cap(&self, now: Instant) -> Option<u64> {
        self.live_cap(now).map(|s| s.value)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn idle_budget_shrinks_after_upstream_close() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        assert_eq!(l.idle_budget(t0), None);
        let change = l.observe_close(500 * MS, 3, t0);
        assert_eq!(
            change,
            Some(Change::IdleTimeout {
                observed: 500 * MS,
                budget: 400 * MS
            })
        );
        assert_eq!(l.idle_budget(t0), Some(400 * MS));
        // A later, longer observation (seen late) changes nothing; a shorter one wins.
        assert_eq!(l.observe_close(530 * MS, 1, t0 + MS), None);
        // Slightly shorter: taken, but not worth a log line.
        assert_eq!(l.observe_close(499 * MS, 1, t0 + MS), None);
        assert_eq!(l.idle_budget(t0 + MS), Some(idle_budget_below(499 * MS)));
        assert!(l.observe_close(300 * MS, 1, t0 + 2 * MS).is_some());
        assert_eq!(l.idle_budget(t0 + 2 * MS), Some(240 * MS));
    }

    #[test]
    fn close_right_after_a_response_teaches_the_request_cap() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        assert_eq!(
            l.observe_close(MS, 10, t0),
            Some(Change::RequestCap {
                observed: 10,
                cap: 10
            })
        );
        assert_eq!(l.request_cap(t0), Some(10));
        assert_eq!(
            l.idle_budget(t0),
            None,
            "a cap close says nothing about the idle timeout"
        );
    }

    #[test]
    fn learned_values_are_forgotten_after_the_ttl() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        l.observe_close(500 * MS, 3, t0);
        l.observe_close(MS, 7, t0);
        assert_eq!(l.idle_budget(t0 + LEARN_TTL - MS), Some(400 * MS));
        assert_eq!(l.idle_budget(t0 + LEARN_TTL), None);
        assert_eq!(l.request_cap(t0 + LEARN_TTL), None);
        // After a redeploy with a 2 s timeout, the next close teaches the longer one.
        let later = t0 + LEARN_TTL + MS;
        assert!(l.observe_close(2000 * MS, 1, later).is_some());
        assert_eq!(l.idle_budget(later), Some(1600 * MS));
    }

    #[test]
    fn budget_keeps_a_minimum_margin() {
        assert_eq!(idle_budget_below(50 * MS), 30 * MS);
        assert_eq!(idle_budget_below(10 * MS), Duration::ZERO);
        assert_eq!(idle_budget_below(5000 * MS), 4000 * MS);
    }

    proptest! {
        /// Whatever the sequence of closes, the budget stays below every idle close seen
        /// within the TTL, and the cap never exceeds any cap close seen within it.
        #[test]
        fn budget_stays_below_every_recent_close(closes in proptest::collection::vec((0u64..2000, 1u64..50, 0u64..200_000), 1..60)) {
            let t0 = Instant::now();
            let mut l = Learner::default();
            let mut now = t0;
            let mut seen: Vec<(Instant, Duration, u64)> = vec![];
            for (idle_ms, requests, gap_ms) in closes {
                now += Duration::from_millis(gap_ms);
                let idle = Duration::from_millis(idle_ms);
                l.observe_close(idle, requests, now);
                seen.push((now, idle, requests));
                // The newest observation always counts, so it always binds.
                if idle >= CAP_CLOSE_WINDOW {
                    prop_assert!(l.idle_budget(now).expect("just learned") < idle.max(MS));
                } else {
                    prop_assert!(l.request_cap(now).expect("just learned") <= requests);
                }
                for (at, idle, requests) in &seen {
                    if now.duration_since(*at) >= LEARN_TTL {
                        continue;
                    }
                    if *idle >= CAP_CLOSE_WINDOW {
                        let budget = l.idle_budget(now).expect("a recent idle close is remembered");
                        prop_assert!(budget <= idle_budget_below(*idle));
                    } else {
                        prop_assert!(l.request_cap(now).expect("a recent cap close is remembered") <= *requests);
                    }
                }
            }
        }
    }
}
