//! An upstream group at run time: its servers, its pool, and the leases that lend pooled
//! connections to requests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::config::UpstreamGroupConfig;
use crate::error::Failure;
use crate::metrics::{GroupMetrics, Metrics};
use crate::pool::{ConnMeta, Limits, Pool};
use crate::reuse::{Reason, Returning};
use crate::upstream::UpstreamConn;

/// Serial of upstream connections, unique in the process.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// The reaper never sleeps less than this between two sweeps, so a pool whose connections
/// expire one after another does not turn it into a busy loop.
const REAPER_MIN_GAP: Duration = Duration::from_millis(10);

struct Server {
    addr: SocketAddr,
}

pub struct Group {
    pub name: String,
    servers: Vec<Server>,
    pool: Mutex<Pool<UpstreamConn>>,
    pub read_timeout: Duration,
    connect_timeout: Duration,
    next: AtomicUsize,
    pub metrics: GroupMetrics,
}

type Closed = Vec<(UpstreamConn, ConnMeta, Reason)>;

impl Group {
    pub fn new(cfg: &UpstreamGroupConfig, metrics: &Metrics) -> Group {
        let names: Vec<String> = cfg.servers.iter().map(|s| s.addr.to_string()).collect();
        let limits = Limits {
            keepalive: cfg.keepalive,
            idle_timeout: cfg.keepalive_timeout,
            max_requests: cfg.keepalive_requests,
            max_lifetime: cfg.keepalive_time,
        };
        Group {
            name: cfg.name.clone(),
            servers: cfg
                .servers
                .iter()
                .map(|s| Server { addr: s.addr })
                .collect(),
            pool: Mutex::new(Pool::new(limits)),
            read_timeout: cfg.read_timeout,
            connect_timeout: cfg.connect_timeout,
            next: AtomicUsize::new(0),
            metrics: metrics.group(&cfg.name, &names),
        }
    }

    /// Whether connections to this group are kept for reuse at all (`keepalive > 0`).
    pub fn reuse(&self) -> bool {
        self.lock().limits().keepalive > 0
    }

    /// The next server, round robin.
    pub fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.servers.len()
    }

    pub fn server_addr(&self, server: usize) -> SocketAddr {
        self.servers[server].addr
    }

    fn lock(&self) -> MutexGuard<'_, Pool<UpstreamConn>> {
        // A panic while holding the lock leaves the pool consistent (every method finishes
        // its own bookkeeping before calling out), so a poisoned lock is still usable.
        self.pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the pool, then closes and counts what it let go, outside the lock.
    fn with_pool<T>(&self, f: impl FnOnce(&mut Pool<UpstreamConn>, &mut Closed) -> T) -> T {
        let mut closed = Closed::new();
        let out = {
            let mut pool = self.lock();
            let out = f(&mut pool, &mut closed);
            self.metrics.pool_idle.set(pool.idle() as i64);
            out
        };
        for (conn, meta, reason) in closed {
            self.count_close(&meta, reason);
            drop(conn);
        }
        out
    }

    fn count_close(&self, meta: &ConnMeta, reason: Reason) {
        self.metrics.servers[meta.server].closed(reason).inc();
        tracing::debug!(upstream = %self.name, conn = meta.id, reason = reason.as_str(), "closing upstream connection");
    }

    /// Lends the most recently used idle connection to `server`, skipping any that hyper
    /// already knows to be closed.
    pub fn checkout(self: &Arc<Self>, server: usize, now: Instant) -> Option<Lease> {
        loop {
            let reused = self.with_pool(|pool, closed| {
                pool.checkout(server, now, |c, m, r| closed.push((c, m, r)))
            })?;
            if reused.conn.is_closed() {
                self.count_close(&reused.meta, Reason::ClosedByUpstream);
                continue;
            }
            self.metrics.servers[server].reused.inc();
            return Some(self.lease(reused.conn, reused.meta, true, reused.idle_for));
        }
    }

    /// Opens a new connection to `server`.
    pub async fn connect(self: &Arc<Self>, server: usize) -> Result<Lease, Failure> {
        let addr = self.servers[server].addr;
        let metrics = &self.metrics.servers[server];
        match UpstreamConn::connect(addr, self.connect_timeout).await {
            Ok(conn) => {
                metrics.opened.inc();
                let meta = ConnMeta {
                    id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
                    server,
                    created: Instant::now(),
                    requests: 0,
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
        conn: UpstreamConn,
        meta: ConnMeta,
        reused: bool,
        idle_for: Duration,
    ) -> Lease {
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

    /// Closes every idle connection.
    pub fn drain(&self) {
        self.with_pool(|pool, closed| pool.drain(|c, m, r| closed.push((c, m, r))));
    }
}

/// Closes idle connections once they pass their idle budget or lifetime, or once hyper sees
/// the upstream closed them: one task per group, waking at the next expiry, never a timer
/// per connection.
pub async fn reap(group: Weak<Group>) {
    loop {
        let wake = {
            let Some(group) = group.upgrade() else { return };
            let now = Instant::now();
            group.with_pool(|pool, closed| {
                pool.expire(now, |c, m, r| closed.push((c, m, r)));
                pool.evict_dead(UpstreamConn::is_closed, |c, m, r| closed.push((c, m, r)));
                let idle_timeout = pool.limits().idle_timeout;
                pool.next_expiry()
                    .unwrap_or(now + idle_timeout)
                    .max(now + REAPER_MIN_GAP)
            })
        };
        tokio::time::sleep_until(wake.into()).await;
    }
}

/// A connection lent to one request. It goes back to the pool only through [`Lease::release`];
/// dropped any other way, it is closed.
pub struct Lease {
    conn: Option<UpstreamConn>,
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
        let returning = Returning {
            response_complete: response_complete && !self.failed,
            upstream_keep_alive,
        };
        let meta = self.meta;
        self.group.with_pool(|pool, closed| {
            pool.checkin(conn, meta, returning, now, |c, m, r| closed.push((c, m, r)));
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.group.metrics.pool_in_use.dec();
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
