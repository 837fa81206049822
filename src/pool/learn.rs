//! Learns one upstream server's real idle timeout and request cap from how it closes pooled
//! connections, and turns them into a budget kaguard stays below. No I/O, no clock.
//!
//! Two kinds of close are told apart by the idle age at which they arrive: a close within
//! [`CAP_CLOSE_WINDOW`] of a response is the server ending the connection after that response
//! (a request cap, announced or not); a later one is its idle timeout. Each learned value is
//! forgotten after [`LEARN_TTL`] without a new observation, so a redeploy with longer timeouts
//! does not leave kaguard stuck on the old ones; if the server still closes early, the first
//! idle close after that teaches it again.
//!
//! A server that stops or restarts closes every idle connection at once, each at whatever
//! idle age and request count it had. Those closes say nothing about its timeout or its cap,
//! and one of them alone would teach a budget far too short. They are told apart by time:
//! closes within [`BURST_WINDOW`] of each other that disagree are one mass close, and what
//! the first of them taught is taken back.

use std::time::{Duration, Instant};

/// A close this soon after a response is the server ending the connection after that
/// response, not an idle timeout: servers close right after the response they decided was the
/// last, while no idle timeout in use is this short.
pub const CAP_CLOSE_WINDOW: Duration = Duration::from_millis(20);

/// Closes of one server's connections this close together are one event. An idle timeout
/// fires per connection, at that connection's own idle age, so two closes this close together
/// that disagree on the idle age (or the request count) are the server closing everything at
/// once; two that agree are connections that went idle together. Wide enough for a server to
/// walk through its connections and for kaguard to read each close; far below any idle
/// timeout in use.
pub const BURST_WINDOW: Duration = Duration::from_millis(5);

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

fn apart(a: Instant, b: Instant) -> Duration {
    a.max(b) - a.min(b)
}

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
    /// The server closed many idle connections at once (a restart or a stop): nothing is
    /// learned from it, and what the first of those closes taught is forgotten.
    MassClose,
}

/// What a close would teach: the idle age, or the request count of a close right after a
/// response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lesson {
    Idle(Duration),
    Cap(u64),
}

impl Lesson {
    fn of(idle_for: Duration, requests: u64) -> Lesson {
        if idle_for < CAP_CLOSE_WINDOW {
            Lesson::Cap(requests)
        } else {
            Lesson::Idle(idle_for)
        }
    }

    /// Whether two closes at about the same moment tell the same story.
    fn agrees(self, other: Lesson) -> bool {
        match (self, other) {
            (Lesson::Idle(a), Lesson::Idle(b)) => a.abs_diff(b) <= BURST_WINDOW,
            (Lesson::Cap(a), Lesson::Cap(b)) => a == b,
            _ => false,
        }
    }
}

/// The latest moment at which exact closes were seen, and what was known before it, so that
/// what they taught can be taken back if a close at the same moment disagrees.
#[derive(Clone, Copy, Debug)]
struct Latest {
    at: Instant,
    lesson: Lesson,
    before: (Option<Seen<Duration>>, Option<Seen<u64>>),
    /// It belongs to a mass close already taken back.
    mass: bool,
}

/// What has been learned about one upstream server.
#[derive(Clone, Debug, Default)]
pub struct Learner {
    idle_close: Option<Seen<Duration>>,
    request_cap: Option<Seen<u64>>,
    latest: Option<Latest>,
}

impl Learner {
    /// The server closed a pooled connection `idle_for` after its last response, having
    /// served `requests` requests on it, at `at`; `exact` says `at` is when the connection's
    /// reader saw the close rather than when kaguard happened to look. Returns what changed,
    /// if anything.
    pub fn observe_close(
        &mut self,
        idle_for: Duration,
        requests: u64,
        at: Instant,
        exact: bool,
    ) -> Option<Change> {
        let lesson = Lesson::of(idle_for, requests);
        if exact
            && let Some(latest) = self.latest.as_mut()
            && apart(at, latest.at) <= BURST_WINDOW
        {
            // Part of the same moment: what was known before that moment stays the state
            // to go back to, however many agreeing closes came first.
            latest.at = latest.at.max(at);
            if latest.mass {
                return None;
            }
            if latest.lesson.agrees(lesson) {
                return self.learn(lesson, requests, at);
            }
            latest.mass = true;
            (self.idle_close, self.request_cap) = latest.before;
            return Some(Change::MassClose);
        }
        if exact {
            self.latest = Some(Latest {
                at,
                lesson,
                before: (self.idle_close, self.request_cap),
                mass: false,
            });
        }
        self.learn(lesson, requests, at)
    }

    fn learn(&mut self, lesson: Lesson, requests: u64, now: Instant) -> Option<Change> {
        let Lesson::Idle(idle_for) = lesson else {
            return self.observe_request_cap(requests, now);
        };
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
        let change = l.observe_close(500 * MS, 3, t0, false);
        assert_eq!(
            change,
            Some(Change::IdleTimeout {
                observed: 500 * MS,
                budget: 400 * MS
            })
        );
        assert_eq!(l.idle_budget(t0), Some(400 * MS));
        // A later, longer observation (seen late) changes nothing; a shorter one wins.
        assert_eq!(l.observe_close(530 * MS, 1, t0 + MS, false), None);
        // Slightly shorter: taken, but not worth a log line.
        assert_eq!(l.observe_close(499 * MS, 1, t0 + MS, false), None);
        assert_eq!(l.idle_budget(t0 + MS), Some(idle_budget_below(499 * MS)));
        assert!(l.observe_close(300 * MS, 1, t0 + 2 * MS, false).is_some());
        assert_eq!(l.idle_budget(t0 + 2 * MS), Some(240 * MS));
    }

    #[test]
    fn close_right_after_a_response_teaches_the_request_cap() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        assert_eq!(
            l.observe_close(MS, 10, t0, false),
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
        l.observe_close(500 * MS, 3, t0, false);
        l.observe_close(MS, 7, t0, false);
        assert_eq!(l.idle_budget(t0 + LEARN_TTL - MS), Some(400 * MS));
        assert_eq!(l.idle_budget(t0 + LEARN_TTL), None);
        assert_eq!(l.request_cap(t0 + LEARN_TTL), None);
        // After a redeploy with a 2 s timeout, the next close teaches the longer one.
        let later = t0 + LEARN_TTL + MS;
        assert!(l.observe_close(2000 * MS, 1, later, false).is_some());
        assert_eq!(l.idle_budget(later), Some(1600 * MS));
    }

    #[test]
    fn a_server_closing_everything_at_once_teaches_nothing() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        l.observe_close(500 * MS, 3, t0, true);
        assert_eq!(l.idle_budget(t0), Some(400 * MS));
        // A restart 10 s later closes three idle connections within 2 ms, at idle ages
        // 30 ms, 180 ms and 2 ms (the last right after its response, on its 4th request).
        let restart = t0 + Duration::from_secs(10);
        assert_eq!(
            l.observe_close(30 * MS, 2, restart, true),
            Some(Change::IdleTimeout {
                observed: 30 * MS,
                budget: 10 * MS
            })
        );
        assert_eq!(
            l.observe_close(180 * MS, 5, restart + MS, true),
            Some(Change::MassClose)
        );
        assert_eq!(l.observe_close(2 * MS, 4, restart + 2 * MS, true), None);
        assert_eq!(
            l.idle_budget(restart),
            Some(400 * MS),
            "the first close is taken back"
        );
        assert_eq!(l.request_cap(restart), None);
        // Later closes teach as before.
        let later = restart + Duration::from_secs(1);
        assert!(l.observe_close(300 * MS, 1, later, true).is_some());
        assert_eq!(l.idle_budget(later), Some(240 * MS));
    }

    #[test]
    fn closes_at_the_same_moment_that_agree_still_teach() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        // Two connections that went idle together reach the idle timeout together.
        assert!(l.observe_close(500 * MS, 3, t0, true).is_some());
        assert_eq!(l.observe_close(501 * MS, 9, t0 + MS, true), None);
        assert_eq!(l.idle_budget(t0 + MS), Some(400 * MS));
        // A close at the same moment that disagrees takes both back.
        assert_eq!(
            l.observe_close(200 * MS, 2, t0 + 2 * MS, true),
            Some(Change::MassClose)
        );
        assert_eq!(l.idle_budget(t0 + 2 * MS), None);
        // Two connections closed after the same number of requests, together.
        assert!(l.observe_close(MS, 10, t0 + 100 * MS, true).is_some());
        assert_eq!(l.observe_close(MS, 10, t0 + 101 * MS, true), None);
        assert_eq!(l.request_cap(t0 + 101 * MS), Some(10));
    }

    #[test]
    fn closes_found_by_looking_never_make_a_mass_close() {
        // A checkout that finds two closed connections by peeking sees both "now"; their true
        // close moments are unknown, so they teach as usual.
        let t0 = Instant::now();
        let mut l = Learner::default();
        l.observe_close(500 * MS, 3, t0, false);
        l.observe_close(300 * MS, 3, t0, false);
        assert_eq!(l.idle_budget(t0), Some(240 * MS));
    }

    #[test]
    fn budget_keeps_a_minimum_margin() {
        assert_eq!(idle_budget_below(50 * MS), 30 * MS);
        assert_eq!(idle_budget_below(10 * MS), Duration::ZERO);
        assert_eq!(idle_budget_below(5000 * MS), 4000 * MS);
    }

    proptest! {
        /// Closes further apart than the burst window are each taught as they come, exact
        /// moments or not: the newest always binds.
        #[test]
        fn spaced_closes_always_teach(closes in proptest::collection::vec((0u64..2000, 1u64..50, 6u64..200_000, any::<bool>()), 1..40)) {
            let mut l = Learner::default();
            let mut now = Instant::now();
            for (idle_ms, requests, gap_ms, exact) in closes {
                now += Duration::from_millis(gap_ms);
                let idle = Duration::from_millis(idle_ms);
                l.observe_close(idle, requests, now, exact);
                if idle >= CAP_CLOSE_WINDOW {
                    prop_assert!(l.idle_budget(now).expect("just learned") <= idle_budget_below(idle));
                } else {
                    prop_assert!(l.request_cap(now).expect("just learned") <= requests);
                }
            }
        }

        /// A burst of exact closes that do not all agree leaves what was known before it.
        #[test]
        fn a_disagreeing_burst_leaves_the_learner_as_it_was(
            before in proptest::option::of(20u64..2000),
            burst in proptest::collection::vec((0u64..2000, 1u64..50, 0u64..=2), 2..10),
        ) {
            let t0 = Instant::now();
            let mut l = Learner::default();
            if let Some(ms) = before {
                l.observe_close(Duration::from_millis(ms), 1, t0, true);
            }
            let known = (l.idle_budget(t0), l.request_cap(t0));
            let start = t0 + Duration::from_secs(1);
            let lessons: Vec<Lesson> = burst.iter().map(|&(ms, n, _)| Lesson::of(Duration::from_millis(ms), n)).collect();
            prop_assume!(lessons.iter().any(|l| !l.agrees(lessons[0])));
            // Each close at most a millisecond after the one before: one moment, however long
            // the chain.
            let mut at = start;
            for &(ms, n, gap) in &burst {
                at += Duration::from_millis(gap.min(1));
                l.observe_close(Duration::from_millis(ms), n, at, true);
            }
            prop_assert_eq!((l.idle_budget(at), l.request_cap(at)), known);
        }

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
                l.observe_close(idle, requests, now, false);
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
