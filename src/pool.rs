//! Idle upstream connections of one upstream group: checkout, checkin, expire. No I/O.
//!
//! The pool never reads a clock or a socket: callers pass `now`, and connections it refuses
//! are handed to a `closed` callback with the reason, so the caller closes them and counts
//! them. Idle connections form one list per group, least recently used at the front, so the
//! `keepalive` cap and LRU eviction are per group (as in nginx) while checkout picks by server.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::reuse::{self, Moment, Reason, Returning};

/// The keep-alive limits of one upstream group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Idle connections kept at most; 0 turns reuse off.
    pub keepalive: usize,
    pub idle_timeout: Duration,
    pub max_requests: u64,
    pub max_lifetime: Duration,
}

/// What the pool knows of a connection besides the connection itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnMeta {
    /// Unique per process, for logs and tests.
    pub id: u64,
    /// Index of the server in its group.
    pub server: usize,
    pub created: Instant,
    /// Requests sent on the connection so far, the current one included.
    pub requests: u64,
}

/// A connection handed out by [`Pool::checkout`].
#[derive(Debug)]
pub struct Reused<C> {
    pub conn: C,
    pub meta: ConnMeta,
    /// How long it sat idle before this checkout.
    pub idle_for: Duration,
}

struct Entry<C> {
    conn: C,
    meta: ConnMeta,
    since: Instant,
}

/// The idle connections of one upstream group.
pub struct Pool<C> {
    limits: Limits,
    idle: VecDeque<Entry<C>>,
}

impl<C> Pool<C> {
    pub fn new(limits: Limits) -> Pool<C> {
        Pool {
            limits,
            idle: VecDeque::with_capacity(limits.keepalive),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    /// Takes the most recently used idle connection to `server`, closing the ones on the way
    /// that may no longer be reused.
    pub fn checkout(
        &mut self,
        server: usize,
        now: Instant,
        mut closed: impl FnMut(C, ConnMeta, Reason),
    ) -> Option<Reused<C>> {
        let mut at = self.idle.len();
        while at > 0 {
            at -= 1;
            if self.idle[at].meta.server != server {
                continue;
            }
            let entry = self.idle.remove(at).expect("index is below len");
            match reuse::decide(
                &entry.meta,
                Moment::Idle { since: entry.since },
                &self.limits,
                now,
            ) {
                Ok(()) => {
                    let idle_for = now.saturating_duration_since(entry.since);
                    return Some(Reused {
                        conn: entry.conn,
                        meta: entry.meta,
                        idle_for,
                    });
                }
                Err(reason) => closed(entry.conn, entry.meta, reason),
            }
        }
        None
    }

    /// Returns a connection after an exchange; it is pooled if [`reuse::decide`] allows, and
    /// the least recently used idle connection is closed if the list is then over the cap.
    /// Returns whether `conn` was pooled.
    pub fn checkin(
        &mut self,
        conn: C,
        meta: ConnMeta,
        returning: Returning,
        now: Instant,
        mut closed: impl FnMut(C, ConnMeta, Reason),
    ) -> bool {
        if let Err(reason) = reuse::decide(&meta, Moment::Checkin(returning), &self.limits, now) {
            closed(conn, meta, reason);
            return false;
        }
        self.idle.push_back(Entry {
            conn,
            meta,
            since: now,
        });
        while self.idle.len() > self.limits.keepalive {
            let oldest = self.idle.pop_front().expect("len is above the cap");
            closed(oldest.conn, oldest.meta, Reason::PoolFull);
        }
        true
    }

    /// Closes every idle connection that may no longer be reused at `now`.
    pub fn expire(&mut self, now: Instant, mut closed: impl FnMut(C, ConnMeta, Reason)) {
        let limits = self.limits;
        let mut kept = VecDeque::with_capacity(self.idle.len());
        for entry in self.idle.drain(..) {
            match reuse::decide(
                &entry.meta,
                Moment::Idle { since: entry.since },
                &limits,
                now,
            ) {
                Ok(()) => kept.push_back(entry),
                Err(reason) => closed(entry.conn, entry.meta, reason),
            }
        }
        self.idle = kept;
    }

    /// Closes the idle connections for which `is_dead` says the upstream already closed them.
    pub fn evict_dead(
        &mut self,
        mut is_dead: impl FnMut(&C) -> bool,
        mut closed: impl FnMut(C, ConnMeta, Reason),
    ) {
        let mut at = 0;
        while at < self.idle.len() {
            if is_dead(&self.idle[at].conn) {
                let entry = self.idle.remove(at).expect("index is below len");
                closed(entry.conn, entry.meta, Reason::ClosedByUpstream);
            } else {
                at += 1;
            }
        }
    }

    /// Closes every idle connection (shutdown).
    pub fn drain(&mut self, mut closed: impl FnMut(C, ConnMeta, Reason)) {
        for entry in self.idle.drain(..) {
            closed(entry.conn, entry.meta, Reason::Shutdown);
        }
    }

    /// The earliest instant at which an idle connection becomes unusable, for the reaper.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.idle
            .iter()
            .map(|e| {
                (e.since + self.limits.idle_timeout).min(e.meta.created + self.limits.max_lifetime)
            })
            .min()
    }
}

#[cfg(test)]
mod tests;
