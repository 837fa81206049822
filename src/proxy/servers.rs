//! The servers of one upstream group at run time: which one takes the next request
//! (balancing), and which may take requests at all (passive and active health).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::balance::{Balance, Balancer, Candidate, EWMA_DECAY, PeakEwma};
use crate::config::UpstreamGroupConfig;
use crate::health::{Active, Passive};

struct State {
    balancer: Balancer,
    passive: Vec<Passive>,
    active: Vec<Option<Active>>,
    latency: Vec<PeakEwma>,
    /// Reused for every pick, so picking allocates nothing.
    scratch: Vec<Candidate>,
}

pub struct Servers {
    balance: Balance,
    addrs: Vec<SocketAddr>,
    weights: Vec<u32>,
    in_flight: Vec<AtomicU32>,
    state: Mutex<State>,
}

impl Servers {
    pub fn new(cfg: &UpstreamGroupConfig) -> Servers {
        let n = cfg.servers.len();
        // nginx ignores max_fails in a group of one: taking its only server out would turn
        // every request into a 502 with nothing gained.
        let passive = cfg
            .servers
            .iter()
            .map(|s| Passive::new(if n == 1 { 0 } else { s.max_fails }, s.fail_timeout))
            .collect();
        let active = cfg
            .servers
            .iter()
            .map(|_| {
                cfg.health_check
                    .as_ref()
                    .map(|h| Active::new(h.rises, h.falls))
            })
            .collect();
        Servers {
            balance: cfg.balance,
            addrs: cfg.servers.iter().map(|s| s.addr).collect(),
            weights: cfg.servers.iter().map(|s| s.weight).collect(),
            in_flight: cfg.servers.iter().map(|_| AtomicU32::new(0)).collect(),
            state: Mutex::new(State {
                balancer: Balancer::new(cfg.balance, n),
                passive,
                active,
                latency: vec![PeakEwma::new(EWMA_DECAY); n],
                scratch: Vec::with_capacity(n),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each method leaves the state consistent before it could panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    pub fn addr(&self, server: usize) -> SocketAddr {
        self.addrs[server]
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    pub fn weight(&self, server: usize) -> u32 {
        self.weights[server]
    }

    /// Requests on their way to `server` now.
    pub fn in_flight(&self, server: usize) -> u32 {
        self.in_flight[server].load(Ordering::Relaxed)
    }

    /// What the active checks say of `server`: `Some(true)` up, `None` when the group has none.
    pub fn active(&self, server: usize) -> Option<bool> {
        self.lock().active[server].as_ref().map(Active::up)
    }

    /// The server for the next attempt, other than `exclude` when another may take it;
    /// `None` when no server may take requests.
    pub fn pick(&self, exclude: Option<usize>, now: Instant) -> Option<usize> {
        let mut state = self.lock();
        let State {
            balancer,
            passive,
            active,
            latency,
            scratch,
        } = &mut *state;
        scratch.clear();
        for i in 0..self.addrs.len() {
            scratch.push(Candidate {
                weight: self.weights[i],
                in_flight: self.in_flight[i].load(Ordering::Relaxed),
                ewma: latency[i].get(now),
                available: passive[i].available(now) && active[i].as_ref().is_none_or(Active::up),
            });
        }
        balancer.pick(scratch, exclude, &mut |n| fastrand::usize(..n))
    }

    /// Whether `server` may take requests now.
    pub fn available(&self, server: usize, now: Instant) -> bool {
        let state = self.lock();
        state.passive[server].available(now) && state.active[server].as_ref().is_none_or(Active::up)
    }

    /// A request is on its way to `server`, until [`Servers::end`].
    pub fn begin(&self, server: usize) {
        self.in_flight[server].fetch_add(1, Ordering::Relaxed);
    }

    pub fn end(&self, server: usize) {
        self.in_flight[server].fetch_sub(1, Ordering::Relaxed);
    }

    /// `server` answered, `latency` after the attempt began.
    pub fn succeeded(&self, server: usize, latency: Duration, now: Instant) {
        let mut state = self.lock();
        state.passive[server].success(now);
        state.latency[server].observe(latency, now);
    }

    /// `server` failed a request; returns true when this took it out for `fail_timeout`.
    pub fn failed(&self, server: usize, now: Instant) -> bool {
        self.lock().passive[server].failure(now)
    }

    /// An active check of `server` passed or failed; returns the new state when it changed.
    pub fn checked(&self, server: usize, passed: bool) -> Option<bool> {
        self.lock().active[server]
            .as_mut()
            .and_then(|a| a.record(passed))
    }
}
