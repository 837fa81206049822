//! The servers of one upstream group at run time: which one takes the next request
//! (balancing), which may take requests at all (passive and active health), and which
//! addresses a server name stands for now (DNS).
//!
//! Each address is a slot, indexed from 0 as the config lists them. A name that resolves to
//! several addresses gets a slot per address, as nginx makes a server of each. When DNS drops
//! an address its slot stops taking requests and drains; a later new address takes a drained
//! slot with nothing in flight, or a new slot, so the slots stay as many as the addresses
//! seen at once.

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::balance::{Balance, Balancer, Candidate, EWMA_DECAY, PeakEwma};
use crate::config::{ServerConfig, UpstreamGroupConfig};
use crate::health::{Active, Passive};

/// One address of one configured server.
struct Slot {
    /// Index of the configured server (`servers` in the file) it came from.
    entry: usize,
    addr: SocketAddr,
    /// In the latest DNS answer; false once the address left it (the slot drains).
    listed: bool,
    /// Counts the addresses the slot has stood for, so that a health checker started for an
    /// earlier one knows to stop.
    generation: u64,
    in_flight: u32,
    passive: Passive,
    active: Option<Active>,
    latency: PeakEwma,
}

struct State {
    slots: Vec<Slot>,
    balancer: Balancer,
    /// Reused for every pick, so picking allocates nothing.
    scratch: Vec<Candidate>,
}

/// What [`Servers::update`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Slots that now stand for a new address.
    pub added: Vec<usize>,
    /// Slots whose address left the answer.
    pub removed: Vec<usize>,
}

pub struct Servers {
    balance: Balance,
    entries: Vec<ServerConfig>,
    /// Rises and falls of the active checks, when the group has them.
    checks: Option<(u32, u32)>,
    state: Mutex<State>,
}

impl Servers {
    pub fn new(cfg: &UpstreamGroupConfig) -> Servers {
        let servers = Servers {
            balance: cfg.balance,
            entries: cfg.servers.clone(),
            checks: cfg.health_check.as_ref().map(|h| (h.rises, h.falls)),
            state: Mutex::new(State {
                slots: Vec::new(),
                balancer: Balancer::new(cfg.balance, 0),
                scratch: Vec::new(),
            }),
        };
        {
            let mut state = servers.lock();
            for (entry, server) in cfg.servers.iter().enumerate() {
                for &addr in &server.addrs {
                    let slot = servers.slot(entry, addr, 0);
                    state.slots.push(slot);
                }
            }
        }
        servers
    }

    fn slot(&self, entry: usize, addr: SocketAddr, generation: u64) -> Slot {
        let server = &self.entries[entry];
        // nginx ignores max_fails in a group of one: taking its only server out would turn
        // every request into a 502 with nothing gained.
        let sole = self.entries.len() == 1 && server.addrs.len() == 1;
        Slot {
            entry,
            addr,
            listed: true,
            generation,
            in_flight: 0,
            passive: Passive::new(if sole { 0 } else { server.max_fails }, server.fail_timeout),
            active: self.checks.map(|(rises, falls)| Active::new(rises, falls)),
            latency: PeakEwma::new(EWMA_DECAY),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each method leaves the state consistent before it could panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Slots, drained ones included.
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn addr(&self, server: usize) -> SocketAddr {
        self.lock().slots[server].addr
    }

    /// The configured name the slot's address came from, e.g. "app.internal:3000".
    pub fn name(&self, server: usize) -> &str {
        let entry = self.lock().slots[server].entry;
        &self.entries[entry].name
    }

    /// Whether the slot's address is in its name's latest answer.
    pub fn listed(&self, server: usize) -> bool {
        self.lock().slots[server].listed
    }

    /// Changes each time the slot stands for a new address.
    pub fn generation(&self, server: usize) -> u64 {
        self.lock().slots[server].generation
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    pub fn weight(&self, server: usize) -> u32 {
        let entry = self.lock().slots[server].entry;
        self.entries[entry].weight
    }

    /// Requests on their way to `server` now.
    pub fn in_flight(&self, server: usize) -> u32 {
        self.lock().slots[server].in_flight
    }

    /// What the active checks say of `server`: `Some(true)` up, `None` when the group has none.
    pub fn active(&self, server: usize) -> Option<bool> {
        self.lock().slots[server].active.as_ref().map(Active::up)
    }

    /// Configured servers given by name, which DNS may move: (index, "host:port").
    pub fn names(&self) -> Vec<(usize, String)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, s)| s.name.parse::<SocketAddr>().is_err())
            .map(|(i, s)| (i, s.name.clone()))
            .collect()
    }

    /// The server for the next attempt, other than `exclude` when another may take it;
    /// `None` when no server may take requests.
    pub fn pick(&self, exclude: Option<usize>, now: Instant) -> Option<usize> {
        let mut state = self.lock();
        let State {
            slots,
            balancer,
            scratch,
        } = &mut *state;
        scratch.clear();
        for slot in slots.iter_mut() {
            scratch.push(Candidate {
                weight: self.entries[slot.entry].weight,
                in_flight: slot.in_flight,
                ewma: slot.latency.get(now),
                available: available(slot, now),
            });
        }
        balancer.pick(scratch, exclude, &mut |n| fastrand::usize(..n))
    }

    /// Whether `server` may take requests now.
    pub fn available(&self, server: usize, now: Instant) -> bool {
        available(&self.lock().slots[server], now)
    }

    /// A request is on its way to `server`, until [`Servers::end`].
    pub fn begin(&self, server: usize) {
        self.lock().slots[server].in_flight += 1;
    }

    pub fn end(&self, server: usize) {
        let slot = &mut self.lock().slots[server];
        slot.in_flight = slot.in_flight.saturating_sub(1);
    }

    /// `server` answered, `latency` after the attempt began.
    pub fn succeeded(&self, server: usize, latency: Duration, now: Instant) {
        let slot = &mut self.lock().slots[server];
        slot.passive.success(now);
        slot.latency.observe(latency, now);
    }

    /// `server` failed a request; returns true when this took it out for `fail_timeout`.
    pub fn failed(&self, server: usize, now: Instant) -> bool {
        self.lock().slots[server].passive.failure(now)
    }

    /// An active check of `server` passed or failed; returns the new state when it changed.
    pub fn checked(&self, server: usize, passed: bool) -> Option<bool> {
        self.lock().slots[server]
            .active
            .as_mut()
            .and_then(|a| a.record(passed))
    }

    /// The configured server `entry` now resolves to `addrs` (never empty: an empty or
    /// failed answer keeps the addresses it had). Addresses that left drain; new ones take
    /// a slot drained earlier with nothing in flight, or a new slot.
    pub fn update(&self, entry: usize, addrs: &[SocketAddr]) -> Update {
        let mut update = Update::default();
        let mut state = self.lock();
        for (i, slot) in state.slots.iter_mut().enumerate() {
            if slot.entry == entry && slot.listed && !addrs.contains(&slot.addr) {
                slot.listed = false;
                update.removed.push(i);
            }
        }
        for &addr in addrs {
            let known = state
                .slots
                .iter()
                .any(|s| s.entry == entry && s.listed && s.addr == addr);
            if known {
                continue;
            }
            // Not a slot drained by this very answer: its idle connections still have to
            // close, and its logs and series must still name its old address.
            let free =
                state.slots.iter().enumerate().position(|(i, s)| {
                    !s.listed && s.in_flight == 0 && !update.removed.contains(&i)
                });
            let i = match free {
                Some(i) => {
                    let generation = state.slots[i].generation + 1;
                    state.slots[i] = self.slot(entry, addr, generation);
                    state.balancer.reset(i);
                    i
                }
                None => {
                    state.slots.push(self.slot(entry, addr, 0));
                    state.slots.len() - 1
                }
            };
            update.added.push(i);
        }
        update
    }
}

fn available(slot: &Slot, now: Instant) -> bool {
    slot.listed && slot.passive.available(now) && slot.active.as_ref().is_none_or(Active::up)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn group(addrs: &[u16]) -> UpstreamGroupConfig {
        let mut server = ServerConfig::new("app.test:80", addr(addrs[0]));
        server.addrs = addrs.iter().map(|&p| addr(p)).collect();
        let other = ServerConfig::new("127.0.0.1:9", addr(9));
        UpstreamGroupConfig::with_defaults("app", vec![server, other])
    }

    fn picks(servers: &Servers, n: usize) -> Vec<SocketAddr> {
        let now = Instant::now();
        let mut got: Vec<_> = (0..n)
            .map(|_| servers.addr(servers.pick(None, now).expect("a server")))
            .collect();
        got.sort();
        got.dedup();
        got
    }

    #[test]
    fn every_address_of_a_name_is_a_server() {
        let servers = Servers::new(&group(&[1, 2]));
        assert_eq!(servers.len(), 3);
        assert_eq!(servers.name(1), "app.test:80");
        assert_eq!(servers.names(), [(0, "app.test:80".to_string())]);
        assert_eq!(picks(&servers, 6), [addr(1), addr(2), addr(9)]);
    }

    #[test]
    fn an_address_that_leaves_the_answer_drains_and_takes_no_new_request() {
        let servers = Servers::new(&group(&[1, 2]));
        let update = servers.update(0, &[addr(2), addr(3)]);
        assert_eq!(
            update,
            Update {
                added: vec![3],
                removed: vec![0]
            }
        );
        assert!(!servers.listed(0));
        assert!(!servers.available(0, Instant::now()));
        assert_eq!(picks(&servers, 9), [addr(2), addr(3), addr(9)]);
        // The same answer again changes nothing.
        assert_eq!(servers.update(0, &[addr(3), addr(2)]), Update::default());
    }

    #[test]
    fn a_new_address_takes_a_drained_slot_only_once_nothing_is_in_flight_there() {
        let servers = Servers::new(&group(&[1]));
        servers.begin(0);
        servers.update(0, &[addr(2)]);
        assert_eq!(servers.len(), 3, "slot 0 still has a request out");
        servers.end(0);
        let update = servers.update(0, &[addr(4)]);
        assert_eq!(update.added, [0]);
        assert_eq!(update.removed, [2]);
        assert_eq!(servers.addr(0), addr(4));
        assert_eq!(servers.generation(0), 1);
        assert!(servers.listed(0));
        assert_eq!(servers.len(), 3);
    }
}
