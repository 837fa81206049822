//! Idle connections of one upstream group: checkout, checkin, expire. No I/O, no clock.
//!
//! Callers pass `now`; connections the pool refuses go to a `closed` callback with the reason,
//! so the caller closes and counts them; whether a connection is still open is asked through
//! an `alive` callback, so the socket check stays outside. Idle connections form one list per
//! group, least recently used at the front, so the `keepalive` cap and LRU eviction are per
//! group (as in nginx) while checkout picks by server, and each server has its own learner.

pub mod learn;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::reuse::{self, Budget, Moment, Reason, Returning};
use learn::{Change, Learner};

/// A connection younger than this (idle since its last response) may still have its
/// upstream's FIN in flight: a server that closes after its N-th response without saying so
/// does it right after the write, and loopback or LAN deliver that FIN in well under this,
/// even on a loaded host. Requests that must not be retried wait until a connection settles.
pub const SETTLE: Duration = Duration::from_millis(5);

/// Requests that must not be retried take only connections idle for at most this share of
/// an unconfirmed budget (numerator, denominator): one that is only `keepalive_timeout`, with
/// nothing known of the upstream's own timeout. A budget lowered by a hint or by learning
/// already sits a margin below the upstream's real timeout and is used whole.
const SAFE_SHARE: (u32, u32) = (1, 2);

/// The keep-alive limits of one upstream group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Idle connections kept at most; 0 turns reuse off.
    pub keepalive: usize,
    pub idle_timeout: Duration,
    pub max_requests: u64,
    pub max_lifetime: Duration,
}

/// The guards the pool applies itself (the others live in the proxy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGuards {
    pub honor_hints: bool,
    pub learn: bool,
    /// The reaper closes at the lowered budget, not only at `keepalive_timeout`.
    pub close_first: bool,
    pub risk_aware_checkout: bool,
}

/// What the pool knows of a connection besides the connection itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnMeta {
    /// Unique per process, for logs and tests.
    pub id: u64,
    /// Index of the server in its group.
    pub server: usize,
    /// The worker thread whose runtime drives the connection.
    pub worker: usize,
    pub created: Instant,
    /// Requests sent on the connection so far, the current one included.
    pub requests: u64,
    /// From the upstream's `Keep-Alive: timeout=N`: the idle budget it allows, margin taken.
    pub hint_idle: Option<Duration>,
    /// From the upstream's `Keep-Alive: max=M`: the request count it allows in all.
    pub hint_requests: Option<u64>,
}

impl ConnMeta {
    pub fn new(id: u64, server: usize, created: Instant) -> ConnMeta {
        ConnMeta {
            id,
            server,
            worker: 0,
            created,
            requests: 0,
            hint_idle: None,
            hint_requests: None,
        }
    }
}

/// Whether a request may be sent again if it fails on a reused connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Risk {
    Retryable,
    MustNotRetry,
}

/// What the caller's liveness check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// The upstream closed it, at about this instant.
    Closed {
        at: Instant,
        /// `at` is when the connection's own reader saw the close; otherwise it is only when
        /// someone looked and found it closed.
        exact: bool,
    },
}

/// Something the caller may want to log or count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The upstream closed an idle connection this long after its last response.
    UpstreamClosedIdle {
        server: usize,
        idle_for: Duration,
    },
    Learned {
        server: usize,
        change: Change,
    },
    /// A close the learner was taught, for the caller to teach the learners of other pools
    /// of the same servers ([`Pool::replay_close`]), so that they all know the same.
    Observed(Observation),
}

/// A close of an idle connection, as a learner is taught it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    pub server: usize,
    /// Requests the connection had carried.
    pub requests: u64,
    pub idle_for: Duration,
    pub at: Instant,
    pub exact: bool,
}

/// A connection handed out by [`Pool::checkout`].
#[derive(Debug)]
pub struct Reused<C> {
    pub conn: C,
    pub meta: ConnMeta,
    /// When it was pooled, for [`Pool::learn_from_close`] if a later look finds it closed.
    pub since: Instant,
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
    guards: PoolGuards,
    idle: VecDeque<Entry<C>>,
    learners: Vec<Learner>,
    events: Vec<Event>,
}

impl<C> Pool<C> {
    pub fn new(limits: Limits, guards: PoolGuards, servers: usize) -> Pool<C> {
        Pool {
            limits,
            guards,
            // Bounded: a huge `keepalive` must not reserve memory it may never use.
            idle: VecDeque::with_capacity(limits.keepalive.min(1024)),
            learners: vec![Learner::default(); servers],
            events: Vec::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    /// Takes what happened since the last call, for logs and metrics.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The learned idle budget and request cap of `server`, for metrics.
    pub fn learned(&self, server: usize, now: Instant) -> (Option<Duration>, Option<u64>) {
        let l = &self.learners[server];
        (l.idle_budget(now), l.request_cap(now))
    }

    /// The limits for `meta` now: configured, lowered by hints and learning when those
    /// guards are on.
    pub fn budget(&self, meta: &ConnMeta, now: Instant) -> Budget {
        let mut b = Budget {
            reuse: self.limits.keepalive > 0,
            idle: self.limits.idle_timeout,
            idle_lowered: false,
            max_requests: self.limits.max_requests,
            requests_lowered: false,
            max_lifetime: self.limits.max_lifetime,
        };
        let learner = &self.learners[meta.server];
        let hints = if self.guards.honor_hints {
            (meta.hint_idle, meta.hint_requests)
        } else {
            (None, None)
        };
        let learned = if self.guards.learn {
            (learner.idle_budget(now), learner.request_cap(now))
        } else {
            (None, None)
        };
        for idle in [hints.0, learned.0].into_iter().flatten() {
            if idle < b.idle {
                b.idle = idle;
                b.idle_lowered = true;
            }
        }
        for cap in [hints.1, learned.1].into_iter().flatten() {
            if cap < b.max_requests {
                b.max_requests = cap;
                b.requests_lowered = true;
            }
        }
        b
    }

    /// The budget the reaper closes at: lowered only when kaguard is to close first.
    fn reaper_budget(&self, meta: &ConnMeta, now: Instant) -> Budget {
        let b = self.budget(meta, now);
        if self.guards.close_first {
            return b;
        }
        Budget {
            idle: self.limits.idle_timeout,
            idle_lowered: false,
            ..b
        }
    }

    /// Records that the upstream closed a connection `idle_for` after its last response, at
    /// `at` (`exact`: as its reader saw it, not as someone looking found it).
    pub fn observe_close(&mut self, meta: &ConnMeta, idle_for: Duration, at: Instant, exact: bool) {
        if idle_for >= learn::CAP_CLOSE_WINDOW {
            self.events.push(Event::UpstreamClosedIdle {
                server: meta.server,
                idle_for,
            });
        }
        if !self.guards.learn {
            return;
        }
        self.events.push(Event::Observed(Observation {
            server: meta.server,
            requests: meta.requests,
            idle_for,
            at,
            exact,
        }));
        if let Some(change) =
            self.learners[meta.server].observe_close(idle_for, meta.requests, at, exact)
        {
            self.events.push(Event::Learned {
                server: meta.server,
                change,
            });
        }
    }

    /// Teaches this pool's learner a close another pool of the same servers observed (an
    /// [`Event::Observed`]). What it learns is not reported again: the pool that saw the
    /// close reported it. Returns whether the learner changed, which can shrink a budget.
    pub fn replay_close(&mut self, seen: &Observation) -> bool {
        self.guards.learn
            && self.learners.get_mut(seen.server).is_some_and(|learner| {
                learner
                    .observe_close(seen.idle_for, seen.requests, seen.at, seen.exact)
                    .is_some()
            })
    }

    /// Learns from a close seen while a connection sat idle since `since`. A close from before
    /// it was pooled (its last response was delimited by the close) says nothing about
    /// the upstream's idle timeout or request cap.
    pub fn learn_from_close(&mut self, meta: &ConnMeta, since: Instant, closed: Liveness) {
        if let Liveness::Closed { at, exact } = closed
            && at > since
        {
            self.observe_close(meta, at - since, at, exact);
        }
    }

    /// Lends an idle connection to `server`: the most recently used one that is within its
    /// budget, that `alive` confirms, and, for a request that must not be retried, that has
    /// settled and is comfortably inside its idle budget. Connections found unusable on the
    /// way are closed; ones merely too young or too old for this request stay.
    pub fn checkout(
        &mut self,
        server: usize,
        now: Instant,
        risk: Risk,
        mut alive: impl FnMut(&C) -> Liveness,
        mut closed: impl FnMut(C, ConnMeta, Reason),
    ) -> Option<Reused<C>> {
        let careful = risk == Risk::MustNotRetry && self.guards.risk_aware_checkout;
        let mut at = self.idle.len();
        while at > 0 {
            at -= 1;
            let entry = &self.idle[at];
            if entry.meta.server != server {
                continue;
            }
            let budget = self.budget(&entry.meta, now);
            let idle_for = now.saturating_duration_since(entry.since);
            if let Err(reason) = reuse::decide(
                &entry.meta,
                Moment::Idle { since: entry.since },
                &budget,
                now,
            ) {
                let entry = self.idle.remove(at).expect("index is below len");
                closed(entry.conn, entry.meta, reason);
                continue;
            }
            let safe_idle = if budget.idle_lowered {
                budget.idle
            } else {
                budget.idle * SAFE_SHARE.0 / SAFE_SHARE.1
            };
            if careful && (idle_for < SETTLE || idle_for > safe_idle) {
                continue;
            }
            let entry = self.idle.remove(at).expect("index is below len");
            match alive(&entry.conn) {
                Liveness::Alive => {
                    return Some(Reused {
                        conn: entry.conn,
                        meta: entry.meta,
                        since: entry.since,
                        idle_for,
                    });
                }
                closed_now @ Liveness::Closed { .. } => {
                    self.learn_from_close(&entry.meta, entry.since, closed_now);
                    closed(entry.conn, entry.meta, Reason::ClosedByUpstream);
                }
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
        let budget = self.budget(&meta, now);
        if let Err(reason) = reuse::decide(&meta, Moment::Checkin(returning), &budget, now) {
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

    /// Closes every idle connection that may no longer be reused at `now`, and every one
    /// `alive` reports closed by the upstream.
    pub fn expire(
        &mut self,
        now: Instant,
        mut alive: impl FnMut(&C) -> Liveness,
        mut closed: impl FnMut(C, ConnMeta, Reason),
    ) {
        let mut kept = VecDeque::with_capacity(self.idle.len());
        let idle = std::mem::take(&mut self.idle);
        for entry in idle {
            let budget = self.reaper_budget(&entry.meta, now);
            if let closed_now @ Liveness::Closed { .. } = alive(&entry.conn) {
                self.learn_from_close(&entry.meta, entry.since, closed_now);
                closed(entry.conn, entry.meta, Reason::ClosedByUpstream);
                continue;
            }
            match reuse::decide(
                &entry.meta,
                Moment::Idle { since: entry.since },
                &budget,
                now,
            ) {
                Ok(()) => kept.push_back(entry),
                Err(reason) => closed(entry.conn, entry.meta, reason),
            }
        }
        self.idle = kept;
    }

    /// Slot `server` now stands for a new address (DNS): whatever was learned belongs to the
    /// server that had it before, or to nobody, and a connection still idle under it goes to
    /// that old address and is closed.
    pub fn new_server(&mut self, server: usize, closed: impl FnMut(C, ConnMeta, Reason)) {
        if server >= self.learners.len() {
            self.learners.resize(server + 1, Learner::default());
        } else {
            self.learners[server] = Learner::default();
            self.remove_server(server, closed);
        }
    }

    /// `server` left DNS: its idle connections close; connections lent out close on checkin
    /// (see [`Returning::server_removed`]).
    pub fn remove_server(&mut self, server: usize, mut closed: impl FnMut(C, ConnMeta, Reason)) {
        let (gone, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.idle)
            .into_iter()
            .partition(|e| e.meta.server == server);
        self.idle = kept;
        for entry in gone {
            closed(entry.conn, entry.meta, Reason::ServerRemoved);
        }
    }

    /// Closes every idle connection (shutdown).
    pub fn drain(&mut self, mut closed: impl FnMut(C, ConnMeta, Reason)) {
        for entry in self.idle.drain(..) {
            closed(entry.conn, entry.meta, Reason::Shutdown);
        }
    }

    /// When the reaper must close a connection checked in at `since`.
    pub fn expiry(&self, meta: &ConnMeta, since: Instant) -> Instant {
        let b = self.reaper_budget(meta, since);
        (since + b.idle).min(meta.created + b.max_lifetime)
    }

    /// The earliest instant at which an idle connection must be closed, for the reaper.
    pub fn next_expiry(&self, now: Instant) -> Option<Instant> {
        self.idle
            .iter()
            .map(|e| {
                let b = self.reaper_budget(&e.meta, now);
                (e.since + b.idle).min(e.meta.created + b.max_lifetime)
            })
            .min()
    }
}

#[cfg(test)]
mod tests;
