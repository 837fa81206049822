//! One reading of the clock per poll of a client connection's task.
//!
//! A request read the clock 16 times, 12 of them kaguard's: its start, the pick and the
//! checkout, the write, the response, its end, and the client connection's own stamps. Most
//! of them fall in one poll of its connection's task. On a virtual machine a reading costs
//! tens of nanoseconds; `perf` put 3 % of the proxy's CPU in the clock. Within one poll the
//! first reading is at most microseconds old, far below the timeouts and ages kaguard keeps
//! (milliseconds and up), so every reading in a poll shares it. A duration measured within
//! one poll reads as zero; the exchanges kaguard times (connect, upstream latency) span polls.
//!
//! Outside such a poll (reapers, health checks, tools, tests) [`now`] reads the clock each
//! time. Code that waits for the time to pass a deadline within one poll must read the clock
//! itself: here it does not move.

use std::cell::Cell;
use std::time::Instant;

#[derive(Clone, Copy)]
enum Reading {
    /// Not in a poll that shares a reading.
    Outside,
    /// In one, before anything asked for the time.
    Unread,
    /// In one, and this is its reading.
    Read(Instant),
}

thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading::Outside) };
}

/// The time: the first reading of the current poll of a client connection's task, or a
/// new reading outside one.
pub fn now() -> Instant {
    READING.with(|r| match r.get() {
        Reading::Outside => Instant::now(),
        Reading::Read(at) => at,
        Reading::Unread => {
            let at = Instant::now();
            r.set(Reading::Read(at));
            at
        }
    })
}

/// Runs `poll` (one poll of a client connection's task) with every [`now`] in it sharing
/// one reading of the clock.
pub fn one_poll<T>(poll: impl FnOnce() -> T) -> T {
    /// Puts back what was there before, even if `poll` panics.
    struct Restore(Reading);
    impl Drop for Restore {
        fn drop(&mut self) {
            READING.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(READING.with(|r| r.replace(Reading::Unread)));
    poll()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Long enough for any clock to move between two readings.
    const STEP: Duration = Duration::from_millis(2);

    #[test]
    fn outside_a_poll_each_reading_is_new() {
        let first = now();
        std::thread::sleep(STEP);
        assert!(now() >= first + STEP);
    }

    #[test]
    fn within_a_poll_every_reading_is_the_first() {
        let before = Instant::now();
        let (first, second) = one_poll(|| {
            let first = now();
            std::thread::sleep(STEP);
            (first, now())
        });
        assert_eq!(first, second);
        // Read when first asked for, not earlier.
        assert!(first >= before);
        // And the next poll reads again.
        std::thread::sleep(STEP);
        let next = one_poll(now);
        assert!(next >= first + 2 * STEP);
    }

    #[test]
    fn a_poll_inside_another_reads_anew_and_leaves_the_outer_reading() {
        one_poll(|| {
            let outer = now();
            std::thread::sleep(STEP);
            let inner = one_poll(now);
            assert!(inner >= outer + STEP);
            assert_eq!(now(), outer);
        });
        let first = now();
        std::thread::sleep(STEP);
        assert!(now() >= first + STEP, "outside again after the poll");
    }

    #[test]
    fn a_panicking_poll_leaves_readings_new() {
        let caught = std::panic::catch_unwind(|| one_poll(|| panic!("in the poll")));
        assert!(caught.is_err());
        let first = now();
        std::thread::sleep(STEP);
        assert!(now() >= first + STEP);
    }
}
