//! Whether a server may take requests: passively, from how live requests end (nginx's
//! `max_fails` and `fail_timeout`), and actively, from checks (`[upstream.health_check]`).
//!
//! Pure: callers pass `now` and the outcome; nothing here reads a clock or a socket.

use std::time::{Duration, Instant};

/// nginx's max_fails / fail_timeout: `max_fails` failures within `fail_timeout` take a
/// server out for `fail_timeout`.
///
/// The window opens at the first failure counted; a failure more than `fail_timeout` after
/// it starts a new count. A success resets the count. A server that comes back starts with
/// no failures counted, so it is taken out again only by `max_fails` new ones.
#[derive(Clone, Debug)]
pub struct Passive {
    max_fails: u32,
    fail_timeout: Duration,
    /// Failures counted since `window_start`.
    fails: u32,
    /// The first failure counted; `None` when none is.
    window_start: Option<Instant>,
    /// When the server was last taken out.
    out_since: Option<Instant>,
}

impl Passive {
    /// `max_fails` 0 never takes the server out.
    pub fn new(max_fails: u32, fail_timeout: Duration) -> Passive {
        Passive {
            max_fails,
            fail_timeout,
            fails: 0,
            window_start: None,
            out_since: None,
        }
    }

    /// Counts a failed try; returns true when this failure took the server out.
    ///
    /// A failure while the server is out is not counted: it belongs to a request sent
    /// before, and counting it would take the server out again as soon as it is back.
    pub fn failure(&mut self, now: Instant) -> bool {
        if self.max_fails == 0 || !self.available(now) {
            return false;
        }
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) <= self.fail_timeout => {
                self.fails += 1;
            }
            _ => {
                self.window_start = Some(now);
                self.fails = 1;
            }
        }
        if self.fails < self.max_fails {
            return false;
        }
        self.out_since = Some(now);
        self.fails = 0;
        self.window_start = None;
        true
    }

    /// Resets the count, like nginx after a successful request. It does not bring back a
    /// server that is out: the request was sent before the failures that took it out.
    pub fn success(&mut self, _now: Instant) {
        self.fails = 0;
        self.window_start = None;
    }

    /// False for `fail_timeout` after the failure that took the server out.
    pub fn available(&self, now: Instant) -> bool {
        self.out_since
            .is_none_or(|since| now.saturating_duration_since(since) >= self.fail_timeout)
    }
}

/// Active check state: `rises` consecutive passes bring a server up, `falls` consecutive
/// failures take it down.
///
/// A server starts up, so that a fresh start, or a reload that adds servers, does not answer
/// 502 until the first `rises` checks have passed; one that is really down is taken out
/// after `falls` checks, and meanwhile passive health takes it out at its first failures.
#[derive(Clone, Debug)]
pub struct Active {
    rises: u32,
    falls: u32,
    up: bool,
    /// Consecutive results against the current state.
    streak: u32,
}

impl Active {
    /// `rises` and `falls` of 0 count as 1.
    pub fn new(rises: u32, falls: u32) -> Active {
        Active {
            rises: rises.max(1),
            falls: falls.max(1),
            up: true,
            streak: 0,
        }
    }

    /// Records a check; `Some(new_state)` when it changed the state, `Some(true)` for up.
    pub fn record(&mut self, passed: bool) -> Option<bool> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.falls } else { self.rises };
        if self.streak < needed {
            return None;
        }
        self.up = passed;
        self.streak = 0;
        Some(self.up)
    }

    pub fn up(&self) -> bool {
        self.up
    }
}

#[cfg(test)]
mod tests;
