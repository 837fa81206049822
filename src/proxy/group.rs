//! An upstream group at run time: its servers, its pool, the leases that lend pooled
//! connections to requests, and its retry budget.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};
use std::task::{Wake, Waker};

use std::time::{Duration, Instant};
use tokio::sync::Notify;

use super::servers::{Servers, Update};
use crate::config::{Guards, HealthCheckConfig, OnUnretryable, RetryBudget, UpstreamGroupConfig};
use crate::error::{Failure, Transport};
use crate::metrics::{Dropped, GroupMetrics, Metrics};
use crate::pool::learn::Change;
use crate::pool::{ConnMeta, Event, Limits, Liveness, Pool, PoolGuards, Reused, Risk};
use crate::reuse::{Reason, Returning};
use crate::upstream::{Peek, UpstreamConn};

/// Serial of upstream connections, unique in the process.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// The reaper never sleeps less than this between two sweeps, so a pool whose connections
/// expire one after another does not turn it into a busy loop; it is also how late past its
/// budget kaguard may close an idle connection, far inside the budget's own margin.
const REAPER_MIN_GAP: Duration = Duration::from_millis(5);

/// The reaper sweeps at least this often, to notice upstream closes of idle connections
/// (and learn from them) even when no budget is about to run out.
const REAPER_MAX_GAP: Duration = Duration::from_millis(250);

pub struct Group {
    pub name: Arc<str>,
    /// `keepalive > 0`, read on every request, so kept outside the pool's lock.
    reuse: bool,
    pub servers: Servers,
    /// One pool per worker thread, each holding the connections its worker drives: a request
    /// locks its own worker's pool, which no other worker waits on. One pool shared by two
    /// workers under load made them wait on each other in the kernel 24 to 30 times per 1000
    /// requests, with the check before reuse already outside the lock; one pool each, 12 to 15
    /// (all of them on the servers' lock). Their learners are taught every close any of them
    /// sees, so all know the same. `keepalive` caps each pool, as nginx's caps each worker.
    pools: Box<[Mutex<Pool<Conn>>]>,
    pub read_timeout: Duration,
    pub send_timeout: Duration,
    connect_timeout: Duration,
    pub guards: Guards,
    pub replay_buffer: usize,
    pub on_unretryable: OnUnretryable,
    /// How often servers given by name are resolved again; zero: never.
    pub resolve_interval: Duration,
    /// `[upstream.health_check]`, which the checkers of `proxy/check.rs` run.
    pub health_check: Option<HealthCheckConfig>,
    budget: RetryBudget,
    in_flight: AtomicU64,
    retries_in_flight: AtomicU64,
    pub metrics: GroupMetrics,
    /// When the reaper plans to wake, in nanoseconds since `epoch`.
    reaper_wake_ns: AtomicU64,
    /// Its own allocation, so the sleeping reaper holds it without holding the group.
    reaper: Arc<Notify>,
    /// Wakes the reaper: given to every idle connection's socket, so that an upstream's
    /// close of an idle connection is seen, and learned from, when it happens.
    idle_waker: Waker,
    epoch: Instant,
}

/// Wakes the reaper when an idle connection's socket turns readable.
struct WakeReaper(Arc<Notify>);

impl Wake for WakeReaper {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// Boxed: a connection moves in and out of the pool and the response body on every
/// request, and its state is a few hundred bytes.
type Conn = Box<UpstreamConn>;

type Closed = Vec<(Conn, ConnMeta, Reason)>;

impl Group {
    /// A group whose connections one thread drives.
    pub fn new(cfg: &UpstreamGroupConfig, metrics: &Metrics) -> Group {
        Group::with_workers(cfg, metrics, 1)
    }

    /// A group whose connections `workers` worker threads drive, with a pool each.
    pub fn with_workers(cfg: &UpstreamGroupConfig, metrics: &Metrics, workers: usize) -> Group {
        let servers = Servers::new(cfg);
        let reaper = Arc::new(Notify::new());
        let names: Vec<String> = (0..servers.len())
            .map(|i| servers.addr(i).to_string())
            .collect();
        let limits = Limits {
            keepalive: cfg.keepalive,
            idle_timeout: cfg.keepalive_timeout,
            max_requests: cfg.keepalive_requests,
            max_lifetime: cfg.keepalive_time,
        };
        let g = cfg.guards;
        let guards = PoolGuards {
            honor_hints: g.honor_hints,
            learn: g.learn,
            close_first: g.close_first,
            risk_aware_checkout: g.risk_aware_checkout,
        };
        Group {
            name: cfg.name.as_str().into(),
            reuse: cfg.keepalive > 0,
            pools: (0..workers.max(1))
                .map(|_| Mutex::new(Pool::new(limits, guards, servers.len())))
                .collect(),
            servers,
            read_timeout: cfg.read_timeout,
            send_timeout: cfg.send_timeout,
            connect_timeout: cfg.connect_timeout,
            guards: cfg.guards,
            replay_buffer: cfg.replay_buffer,
            on_unretryable: cfg.on_unretryable,
            resolve_interval: cfg.resolve_interval,
            health_check: cfg.health_check.clone(),
            budget: cfg.retry_budget,
            in_flight: AtomicU64::new(0),
            retries_in_flight: AtomicU64::new(0),
            metrics: metrics.group(&cfg.name, &names),
            reaper_wake_ns: AtomicU64::new(0),
            reaper: reaper.clone(),
            idle_waker: Waker::from(Arc::new(WakeReaper(reaper))),
            epoch: Instant::now(),
        }
    }

    /// Whether connections to this group are kept for reuse at all (`keepalive > 0`).
    pub fn reuse(&self) -> bool {
        self.reuse
    }

    /// The server for the next attempt (see [`Servers::pick`]).
    pub fn pick(&self, exclude: Option<usize>, now: Instant) -> Option<usize> {
        self.servers.pick(exclude, now)
    }

    pub fn server_addr(&self, server: usize) -> SocketAddr {
        self.servers.addr(server)
    }

    /// The server for a try after one on `server` failed: another if one may take it, else
    /// `server` again if it still may (a group of one), else any.
    pub fn next_server(&self, server: usize, now: Instant) -> usize {
        self.pick(Some(server), now)
            .or_else(|| self.pick(None, now))
            .unwrap_or(server)
    }

    /// `server` answered from `addr`: it counts as healthy again and its latency is noted.
    pub fn server_answered(
        &self,
        server: usize,
        addr: SocketAddr,
        latency: Duration,
        now: Instant,
    ) {
        self.servers.succeeded(server, addr, latency, now);
    }

    /// `server` failed at `addr` in a way that is its own fault (not a race kaguard absorbed,
    /// not the client's): it counts toward `max_fails`, unless the slot stands for another
    /// address by now.
    pub fn server_failed(&self, server: usize, addr: SocketAddr, now: Instant) {
        if self.servers.addr(server) != addr {
            return;
        }
        let m = &self.metrics.server(server);
        m.failures.inc();
        if self.servers.failed(server, addr, now) {
            m.available.set(0);
            tracing::warn!(upstream = %addr, "upstream server temporarily disabled");
        }
    }

    /// An active check of `addr` through slot `server` passed or failed: it is counted, and
    /// when it changed the server's state the `available` gauge follows. Returns the new state
    /// then, `true` for up. A check of an address the slot no longer stands for is dropped.
    pub fn server_checked(
        &self,
        server: usize,
        addr: SocketAddr,
        passed: bool,
        now: Instant,
    ) -> Option<bool> {
        if !self.servers.stands_for(server, addr) {
            return None;
        }
        let m = &self.metrics.server(server);
        m.check(passed).inc();
        let changed = self.servers.checked(server, addr, passed);
        if changed.is_some() {
            m.available
                .set(i64::from(self.servers.available(server, now)));
        }
        changed
    }

    /// The pool of the connections `worker` drives.
    fn shard_of(&self, worker: usize) -> usize {
        worker % self.pools.len()
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Pool<Conn>> {
        // Every pool method finishes its own bookkeeping before it calls out, so a panic in a
        // callback leaves the pool consistent and a poisoned lock still usable.
        self.pools[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pool `shard`'s lock if no one holds it now.
    fn try_lock(&self, shard: usize) -> Option<MutexGuard<'_, Pool<Conn>>> {
        match self.pools[shard].try_lock() {
            Ok(pool) => Some(pool),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Runs `f` on pool `shard`, then closes, counts and logs what it let go, outside the lock.
    fn with_shard<T>(&self, shard: usize, f: impl FnOnce(&mut Pool<Conn>, &mut Closed) -> T) -> T {
        let pool = self.lock(shard);
        self.with_locked(shard, pool, f)
    }

    /// [`Group::with_shard`] if pool `shard` is free now; `None` without waiting if not.
    fn try_with_shard<T>(
        &self,
        shard: usize,
        f: impl FnOnce(&mut Pool<Conn>, &mut Closed) -> T,
    ) -> Option<T> {
        let pool = self.try_lock(shard)?;
        Some(self.with_locked(shard, pool, f))
    }

    /// Runs `f` on every pool in turn.
    fn with_every_pool(&self, mut f: impl FnMut(&mut Pool<Conn>, &mut Closed)) {
        for shard in 0..self.pools.len() {
            self.with_shard(shard, &mut f);
        }
    }

    fn with_locked<T>(
        &self,
        shard: usize,
        mut pool: MutexGuard<'_, Pool<Conn>>,
        f: impl FnOnce(&mut Pool<Conn>, &mut Closed) -> T,
    ) -> T {
        let mut closed = Closed::new();
        let before = pool.idle();
        let out = f(&mut pool, &mut closed);
        let events = pool.take_events();
        // The gauge counts every pool's idle connections: each pool adds what it changed,
        // under its lock, so the sum is never off.
        self.metrics
            .pool_idle
            .inc_by(pool.idle() as i64 - before as i64);
        drop(pool);
        for (conn, meta, reason) in closed {
            self.count_close(&meta, reason);
            drop(conn);
        }
        for event in events {
            self.report(shard, event);
        }
        out
    }

    fn report(&self, shard: usize, event: Event) {
        if let Event::Observed(seen) = event {
            for other in (0..self.pools.len()).filter(|&s| s != shard) {
                if self.lock(other).replay_close(&seen) {
                    // As for a lesson of its own: a budget that shrank may have put idle
                    // connections past it.
                    self.reaper.notify_one();
                }
            }
            return;
        }
        if let Event::Learned { .. } = event {
            // A budget that just shrank may put idle connections past it now; the reaper
            // planned its sleep on the old one.
            self.reaper.notify_one();
        }
        match event {
            Event::UpstreamClosedIdle { server, idle_for } => {
                self.metrics
                    .server(server)
                    .closed_idle_age
                    .observe(idle_for.as_secs_f64());
            }
            Event::Learned {
                server,
                change: Change::IdleTimeout { observed, budget },
            } => {
                self.metrics
                    .server(server)
                    .learned_idle_budget
                    .set(budget.as_secs_f64());
                tracing::warn!(
                    upstream = %self.servers.addr(server),
                    "upstream {} closes idle connections after ~{}; reusing them for at most {}",
                    self.servers.addr(server),
                    humantime::format_duration(round_ms(observed)),
                    humantime::format_duration(round_ms(budget)),
                );
            }
            Event::Learned {
                server,
                change: Change::RequestCap { observed, cap },
            } => {
                self.metrics
                    .server(server)
                    .learned_request_cap
                    .set(cap as i64);
                tracing::warn!(
                    upstream = %self.servers.addr(server),
                    "upstream {} closes connections after {observed} requests; sending at most {cap} on each",
                    self.servers.addr(server),
                );
            }
            Event::Learned {
                server,
                change: Change::MassClose,
            } => {
                tracing::info!(
                    upstream = %self.servers.addr(server),
                    "upstream {} closed its idle connections all at once (a restart or a stop); nothing learned from it",
                    self.servers.addr(server),
                );
            }
            Event::Observed(_) => {}
        }
    }

    fn count_close(&self, meta: &ConnMeta, reason: Reason) {
        self.metrics.server(meta.server).closed(reason).inc();
        tracing::debug!(upstream = %self.servers.addr(meta.server), conn = meta.id, reason = reason.as_str(), "closing upstream connection");
    }

    /// Whether a pooled connection is still open: what its own reads saw always, and with
    /// the `check_before_reuse` guard a non-blocking look at the socket itself, which sees a
    /// FIN or RST the moment the kernel has it, before the reaper it wakes has run.
    fn liveness(&self, conn: &UpstreamConn, server: usize, now: Instant, peek: bool) -> Liveness {
        let metrics = &self.metrics.server(server);
        if conn.is_closed() {
            metrics.dropped(Dropped::Closed).inc();
            let closed_at = conn.closed_at();
            return Liveness::Closed {
                at: closed_at.unwrap_or(now),
                exact: closed_at.is_some(),
            };
        }
        if !peek {
            return Liveness::Alive;
        }
        match conn.peek() {
            Peek::Clean => Liveness::Alive,
            Peek::Closed(transport) => {
                let cause = if transport == Transport::Reset {
                    Dropped::Rst
                } else {
                    Dropped::Fin
                };
                metrics.dropped(cause).inc();
                // The close woke the reaper, which has not run yet: the wake-up's moment
                // is the close's.
                let woken = conn.woken_at();
                Liveness::Closed {
                    at: woken.unwrap_or(now),
                    exact: woken.is_some(),
                }
            }
            Peek::StrayBytes => {
                metrics.dropped(Dropped::StrayBytes).inc();
                Liveness::Closed {
                    at: now,
                    exact: false,
                }
            }
        }
    }

    /// Lends an idle connection to `server` fit for a request of this `risk`.
    ///
    /// The look at the socket is a system call, made after the pool's lock is released: the
    /// other workers wait on that lock, and with the look inside it, two workers under load
    /// waited on each other in the kernel about once every 30 requests. Each round takes a
    /// connection out of the pool, to lend or to close, so the loop ends.
    pub fn checkout(self: &Arc<Self>, server: usize, now: Instant, risk: Risk) -> Option<Lease> {
        let peek = self.guards.check_before_reuse;
        let own = self.shard_of(crate::worker::current());
        loop {
            let (shard, reused) = self.checkout_any(own, server, now, risk)?;
            if peek {
                let seen = self.liveness(&reused.conn, server, now, true);
                if let Liveness::Closed { .. } = seen {
                    self.with_shard(shard, |pool, closed| {
                        pool.learn_from_close(&reused.meta, reused.since, seen);
                        closed.push((reused.conn, reused.meta, Reason::ClosedByUpstream));
                    });
                    continue;
                }
            }
            self.metrics.server(server).reused.inc();
            return Some(self.lease(reused.conn, reused.meta, true, reused.idle_for));
        }
    }

    /// A connection from pool `own`, the calling worker's, or else from another worker's that
    /// no one holds now: a connection another thread drives costs a cross-thread wake-up at
    /// each step of the exchange, and waiting for another worker's lock would cost more.
    fn checkout_any(
        &self,
        own: usize,
        server: usize,
        now: Instant,
        risk: Risk,
    ) -> Option<(usize, Reused<Conn>)> {
        let take = |pool: &mut Pool<Conn>, closed: &mut Closed| {
            pool.checkout(
                server,
                now,
                risk,
                |c| self.liveness(c, server, now, false),
                |c, m, r| closed.push((c, m, r)),
            )
        };
        if let Some(reused) = self.with_shard(own, take) {
            return Some((own, reused));
        }
        (0..self.pools.len())
            .filter(|&shard| shard != own)
            .find_map(|shard| Some((shard, self.try_with_shard(shard, take).flatten()?)))
    }

    /// Opens a new connection to `addr`, the address of slot `server` when the try began.
    pub async fn connect(
        self: &Arc<Self>,
        server: usize,
        addr: SocketAddr,
    ) -> Result<Lease, Failure> {
        let metrics = &self.metrics.server(server);
        match UpstreamConn::connect(addr, self.connect_timeout, self.idle_waker.clone()).await {
            Ok(conn) => {
                let conn = Box::new(conn);
                metrics.opened.inc();
                let meta = ConnMeta {
                    worker: crate::worker::current(),
                    ..ConnMeta::new(
                        NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
                        server,
                        Instant::now(),
                    )
                };
                Ok(self.lease(conn, meta, false, Duration::ZERO))
            }
            Err(failure) => {
                metrics.connect_failed.inc();
                Err(failure)
            }
        }
    }

    fn lease(
        self: &Arc<Self>,
        conn: Conn,
        meta: ConnMeta,
        reused: bool,
        idle_for: Duration,
    ) -> Lease {
        self.servers.begin(meta.server);
        self.metrics.pool_in_use.inc();
        Lease {
            conn: Some(conn),
            meta,
            reused,
            idle_for,
            failed: false,
            group: self.clone(),
        }
    }

    /// The configured server `entry` resolved to `addrs` (see [`Servers::update`]): slots whose
    /// address left drain (idle connections close now, the others when their request ends),
    /// slots for new addresses start afresh. Returns what changed.
    ///
    /// In this order, so that no request meets a slot half made: removed slots stop taking
    /// requests, then their idle connections close (a connection returned in between is
    /// checked in under the pool lock only while its slot still stands for its address, so
    /// it is either refused or closed here); then new slots get their pool state and series,
    /// and only then become pickable.
    pub fn resolved(&self, entry: usize, addrs: &[SocketAddr]) -> Update {
        let update = self.servers.plan(entry, addrs);
        let name = &self.servers.entry_name(entry);
        self.servers.apply_removed(&update);
        for &server in &update.removed {
            self.metrics.server(server).available.set(0);
            let addr = self.servers.addr(server);
            tracing::warn!(upstream = %addr, "{name} no longer resolves to {addr}; draining it");
        }
        self.with_every_pool(|pool, closed| {
            for &server in &update.removed {
                pool.remove_server(server, |c, m, r| closed.push((c, m, r)));
            }
            for &(server, _) in &update.added {
                pool.new_server(server, |c, m, r| closed.push((c, m, r)));
            }
        });
        for &(server, addr) in &update.added {
            self.metrics.set_server(server, &addr.to_string());
        }
        self.servers.apply_added(entry, &update);
        for &server in &update.relisted {
            self.metrics.server(server).available.set(1);
        }
        for addr in update
            .added
            .iter()
            .map(|&(_, addr)| addr)
            .chain(update.relisted.iter().map(|&s| self.servers.addr(s)))
        {
            tracing::warn!(upstream = %addr, "{name} now resolves to {addr}");
        }
        update
    }

    /// Closes every idle connection.
    pub fn drain(&self) {
        self.with_every_pool(|pool, closed| pool.drain(|c, m, r| closed.push((c, m, r))));
    }

    /// Counts a request in flight for the retry budget until the guard drops.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            group: self.clone(),
            retries: 0,
        }
    }
}

/// A request in flight in its group, and the retries it holds from the budget.
pub struct InFlight {
    group: Arc<Group>,
    retries: u64,
}

impl InFlight {
    /// Takes one retry from the group's budget: retries in flight stay within `percent` of
    /// the requests in flight, or `min_concurrency`, whichever is more.
    pub fn try_retry(&mut self) -> bool {
        let g = &self.group;
        let in_flight = g.in_flight.load(Ordering::Relaxed);
        let allowed = (in_flight * u64::from(g.budget.percent) / 100)
            .max(u64::from(g.budget.min_concurrency));
        if g.retries_in_flight.fetch_add(1, Ordering::Relaxed) >= allowed {
            g.retries_in_flight.fetch_sub(1, Ordering::Relaxed);
            g.metrics.retry_budget_exhausted.inc();
            return false;
        }
        self.retries += 1;
        true
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.group.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.group
            .retries_in_flight
            .fetch_sub(self.retries, Ordering::Relaxed);
    }
}

impl Group {
    fn ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Wakes the reaper early if a connection just pooled expires before it planned to wake.
    fn reaper_needed_by(&self, expiry: Instant) {
        if self.ns(expiry) < self.reaper_wake_ns.load(Ordering::Relaxed) {
            self.reaper.notify_one();
        }
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Closes idle connections once they pass their budget or lifetime, or once the upstream
/// closed them (learning from it): one task per group, waking at the next expiry or every
/// [`REAPER_MAX_GAP`], never a timer per connection.
pub async fn reap(group: Weak<Group>) {
    loop {
        let (wake, notified) = {
            let Some(group) = group.upgrade() else { return };
            let now = Instant::now();
            let mut next = now + REAPER_MAX_GAP;
            group.with_every_pool(|pool, closed| {
                pool.expire(
                    now,
                    // An idle socket turning readable wakes the reaper and notes when: that
                    // is the close's moment. A close found without a wake-up (the watch
                    // lapsed) is only known to have happened by now.
                    |c| match c.watch_idle() {
                        (Peek::Clean, _) => Liveness::Alive,
                        (_, woken) => Liveness::Closed {
                            at: woken.unwrap_or(now),
                            exact: woken.is_some(),
                        },
                    },
                    |c, m, r| closed.push((c, m, r)),
                );
                next = next.min(pool.next_expiry(now).unwrap_or(next));
            });
            // Every pool's learner was taught the same closes: the first one speaks for all.
            group.with_shard(0, |pool, _| {
                for server in 0..group.servers.len() {
                    let available = group.servers.available(server, now);
                    let m = &group.metrics.server(server);
                    m.available.set(i64::from(available));
                    let (idle, cap) = pool.learned(server, now);
                    m.learned_idle_budget
                        .set(idle.map_or(0.0, |d| d.as_secs_f64()));
                    m.learned_request_cap.set(cap.map_or(0, |c| c as i64));
                }
            });
            let wake = next.clamp(now + REAPER_MIN_GAP, now + REAPER_MAX_GAP);
            group
                .reaper_wake_ns
                .store(group.ns(wake), Ordering::Relaxed);
            (wake, group.reaper.clone())
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = notified.notified() => {}
        }
    }
}

/// A connection lent to one request. It goes back to the pool only through [`Lease::release`];
/// dropped any other way, it is closed.
pub struct Lease {
    conn: Option<Conn>,
    pub meta: ConnMeta,
    pub reused: bool,
    pub idle_for: Duration,
    failed: bool,
    group: Arc<Group>,
}

impl Lease {
    pub fn conn(&self) -> &UpstreamConn {
        self.conn.as_ref().expect("present until release or drop")
    }

    pub fn conn_mut(&mut self) -> &mut UpstreamConn {
        self.conn.as_mut().expect("present until release or drop")
    }

    /// Marks the exchange as failed: the connection will be closed.
    pub fn fail(&mut self) {
        self.failed = true;
    }

    /// Ends the exchange; the pool keeps the connection if [`crate::reuse::decide`] allows.
    pub fn release(mut self, response_complete: bool, upstream_keep_alive: bool, now: Instant) {
        let Some(conn) = self.conn.take() else { return };
        // A request not sent whole (the upstream answered early) leaves the upstream
        // waiting for its rest, and bytes past the response belong to no request: either
        // way the connection is not at a message boundary. A response delimited by the
        // close ends it. The idle watch is set only on a connection that may be kept, as it
        // may cost a look at the socket.
        let mut returning = Returning {
            response_complete: response_complete && !self.failed && conn.ended_cleanly(),
            upstream_keep_alive: upstream_keep_alive && !conn.is_last(),
            upstream_closed: conn.closed_at().is_some(),
            server_removed: false,
        };
        if returning.response_complete && returning.upstream_keep_alive {
            match conn.watch_idle().0 {
                Peek::Clean => {}
                Peek::Closed(_) => returning.upstream_closed = true,
                Peek::StrayBytes => returning.response_complete = false,
            }
        }
        let meta = self.meta;
        let servers = &self.group.servers;
        let shard = self.group.shard_of(meta.worker);
        let expiry = self.group.with_shard(shard, |pool, closed| {
            // Under the pool lock: DNS drains a slot before it closes the slot's idle
            // connections under this lock, so a connection checked in here either sees the
            // drain or is closed by it.
            returning.server_removed = !servers.stands_for(meta.server, conn.addr);
            let pooled = pool.checkin(conn, meta, returning, now, |c, m, r| closed.push((c, m, r)));
            pooled.then(|| pool.expiry(&meta, now))
        });
        if let Some(expiry) = expiry {
            self.group.reaper_needed_by(expiry);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.group.metrics.pool_in_use.dec();
        self.group.servers.end(self.meta.server);
        if let Some(conn) = self.conn.take() {
            let reason = if self.failed {
                Reason::Error
            } else {
                Reason::ResponseIncomplete
            };
            self.group.count_close(&self.meta, reason);
            drop(conn);
        }
    }
}
