//! The servers of one upstream group at run time: which one takes the next request
//! (balancing), which may take requests at all (passive and active health), and which
//! addresses a server name stands for now (DNS).
//!
//! Each address is a slot, indexed from 0 as the config lists them. A name that resolves to
//! several addresses gets a slot per address, as nginx makes a server of each. When DNS drops
//! an address its slot stops taking requests and drains; an address that comes back takes its
//! drained slot again, and a new address takes a drained slot with nothing in flight, or a new
//! slot, so the slots stay as many as the addresses seen at once.
//!
//! Because a slot may stand for another address later, whatever outlives a moment (a
//! connection, a failure, a check result) names the address it is about along with the slot,
//! and is ignored or closed when the slot no longer stands for it.

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

/// What a new DNS answer changes, from [`Servers::plan`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Slots that will stand for a new address, and the address. An index at or past the
    /// slots there are is a new slot (they come in order).
    pub added: Vec<(usize, SocketAddr)>,
    /// Drained slots whose address is back in the answer.
    pub relisted: Vec<usize>,
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
        Slot {
            entry,
            addr,
            listed: true,
            generation,
            in_flight: 0,
            passive: Passive::new(server.max_fails, server.fail_timeout),
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

    /// The name of configured server `entry`, as written.
    pub fn entry_name(&self, entry: usize) -> &str {
        &self.entries[entry].name
    }

    /// Whether the slot's address is in its name's latest answer.
    pub fn listed(&self, server: usize) -> bool {
        self.lock().slots[server].listed
    }

    /// Whether slot `server` still stands for `addr` and takes requests for it: a connection
    /// to `addr` may go back to the pool under it.
    pub fn stands_for(&self, server: usize, addr: SocketAddr) -> bool {
        let state = self.lock();
        let slot = &state.slots[server];
        slot.listed && slot.addr == addr
    }

    /// Slots whose address is in the latest answers: the servers a request can try.
    pub fn listed_count(&self) -> usize {
        self.lock().slots.iter().filter(|s| s.listed).count()
    }

    /// Changes each time the slot stands for a new address.
    pub fn generation(&self, server: usize) -> u64 {
        self.lock().slots[server].generation
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    /// Only peak-EWMA balancing reads the latency estimate; keeping it costs an exponential
    /// at every pick and every answer.
    fn tracks_latency(&self) -> bool {
        self.balance == Balance::P2cEwma
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
        let sole = sole(slots);
        let latency = self.tracks_latency();
        for slot in slots.iter_mut() {
            scratch.push(Candidate {
                weight: self.entries[slot.entry].weight,
                in_flight: slot.in_flight,
                ewma: if latency {
                    slot.latency.get(now)
                } else {
                    Duration::ZERO
                },
                available: available(slot, now, sole),
            });
        }
        balancer.pick(scratch, exclude, &mut |n| fastrand::usize(..n))
    }

    /// Whether `server` may take requests now.
    pub fn available(&self, server: usize, now: Instant) -> bool {
        let state = self.lock();
        available(&state.slots[server], now, sole(&state.slots))
    }

    /// A request is on its way to `server`, until [`Servers::end`].
    pub fn begin(&self, server: usize) {
        self.lock().slots[server].in_flight += 1;
    }

    pub fn end(&self, server: usize) {
        let slot = &mut self.lock().slots[server];
        slot.in_flight = slot.in_flight.saturating_sub(1);
    }

    /// `server` answered from `addr`, `latency` after the attempt began. Nothing is noted if
    /// the slot stands for another address by now.
    pub fn succeeded(&self, server: usize, addr: SocketAddr, latency: Duration, now: Instant) {
        let tracks = self.tracks_latency();
        let slot = &mut self.lock().slots[server];
        if slot.addr == addr {
            slot.passive.success(now);
            if tracks {
                slot.latency.observe(latency, now);
            }
        }
    }

    /// `server` failed a request sent to `addr`; returns true when this took it out for
    /// `fail_timeout`. Not counted when the slot stands for another address by now, nor
    /// while it is the group's only server: nginx ignores `max_fails` in a group of one,
    /// since taking its only server out would turn every request into a 502 with nothing
    /// gained.
    pub fn failed(&self, server: usize, addr: SocketAddr, now: Instant) -> bool {
        let mut state = self.lock();
        let sole = sole(&state.slots);
        let slot = &mut state.slots[server];
        slot.addr == addr && slot.listed && !sole && slot.passive.failure(now)
    }

    /// An active check of `addr` through slot `server` passed or failed; returns the new
    /// state when it changed. Ignored when the slot stands for another address by now.
    pub fn checked(&self, server: usize, addr: SocketAddr, passed: bool) -> Option<bool> {
        let slot = &mut self.lock().slots[server];
        if slot.addr != addr || !slot.listed {
            return None;
        }
        slot.active.as_mut().and_then(|a| a.record(passed))
    }

    /// What it takes for the configured server `entry` to stand for `addrs` (never empty: an
    /// empty or failed answer keeps the addresses it had), without changing anything yet:
    /// the caller drains removed slots with [`Servers::apply_removed`], prepares the series
    /// and the pool for new slots, then makes them pickable with [`Servers::apply_added`].
    /// Only the group's resolver task changes the slots, so nothing else moves in between
    /// but requests in flight, which name their address.
    pub fn plan(&self, entry: usize, addrs: &[SocketAddr]) -> Update {
        let mut update = Update::default();
        let state = self.lock();
        for (i, slot) in state.slots.iter().enumerate() {
            if slot.entry == entry && slot.listed && !addrs.contains(&slot.addr) {
                update.removed.push(i);
            }
        }
        let mut next = state.slots.len();
        for &addr in addrs {
            let mine = |s: &Slot| s.entry == entry && s.addr == addr;
            if state.slots.iter().any(|s| mine(s) && s.listed)
                || update.added.iter().any(|&(_, a)| a == addr)
            {
                continue;
            }
            if let Some(i) = state.slots.iter().position(|s| mine(s) && !s.listed) {
                if !update.relisted.contains(&i) {
                    update.relisted.push(i);
                }
                continue;
            }
            // A slot drained earlier with nothing in flight; not one this very answer drains:
            // its idle connections still have to close, and its logs and series must still
            // name its old address.
            let free = state.slots.iter().enumerate().position(|(i, s)| {
                !s.listed
                    && s.in_flight == 0
                    && !update.removed.contains(&i)
                    && !update.added.iter().any(|&(j, _)| j == i)
            });
            let i = free.unwrap_or_else(|| {
                next += 1;
                next - 1
            });
            update.added.push((i, addr));
        }
        update
    }

    /// Drains the slots `update` removes.
    pub fn apply_removed(&self, update: &Update) {
        let mut state = self.lock();
        for &i in &update.removed {
            state.slots[i].listed = false;
        }
    }

    /// Makes the slots `update` adds or lists again pickable, for the configured server
    /// `entry`.
    pub fn apply_added(&self, entry: usize, update: &Update) {
        let mut state = self.lock();
        for &i in &update.relisted {
            let slot = &mut state.slots[i];
            slot.listed = true;
            // The checker of its earlier listing may still be running a round; it stops on
            // seeing a new generation, and the caller starts a fresh one.
            slot.generation += 1;
        }
        for &(i, addr) in &update.added {
            if i < state.slots.len() {
                let generation = state.slots[i].generation + 1;
                state.slots[i] = self.slot(entry, addr, generation);
                state.balancer.reset(i);
            } else {
                state.slots.push(self.slot(entry, addr, 0));
            }
        }
    }
}

/// nginx's group of one: the only server that can take requests is never taken out.
fn sole(slots: &[Slot]) -> bool {
    slots.iter().filter(|s| s.listed).count() == 1
}

fn available(slot: &Slot, now: Instant, sole: bool) -> bool {
    slot.listed
        && (sole || slot.passive.available(now))
        && slot.active.as_ref().is_none_or(Active::up)
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

    /// What the group's resolver task does, minus the series and the pool.
    fn update(servers: &Servers, entry: usize, addrs: &[SocketAddr]) -> Update {
        let update = servers.plan(entry, addrs);
        servers.apply_removed(&update);
        servers.apply_added(entry, &update);
        update
    }

    #[test]
    fn an_address_that_leaves_the_answer_drains_and_takes_no_new_request() {
        let servers = Servers::new(&group(&[1, 2]));
        let changed = update(&servers, 0, &[addr(2), addr(3)]);
        assert_eq!(
            changed,
            Update {
                added: vec![(3, addr(3))],
                relisted: vec![],
                removed: vec![0]
            }
        );
        assert!(!servers.listed(0));
        assert!(!servers.available(0, Instant::now()));
        assert!(!servers.stands_for(0, addr(1)));
        assert_eq!(picks(&servers, 9), [addr(2), addr(3), addr(9)]);
        // The same answer again, or with an address twice, changes nothing.
        assert_eq!(
            update(&servers, 0, &[addr(3), addr(2), addr(3)]),
            Update::default()
        );
        assert_eq!(servers.listed_count(), 3);
    }

    #[test]
    fn a_new_address_takes_a_drained_slot_only_once_nothing_is_in_flight_there() {
        let servers = Servers::new(&group(&[1]));
        servers.begin(0);
        update(&servers, 0, &[addr(2)]);
        assert_eq!(servers.len(), 3, "slot 0 still has a request out");
        servers.end(0);
        let changed = update(&servers, 0, &[addr(4)]);
        assert_eq!(changed.added, [(0, addr(4))]);
        assert_eq!(changed.removed, [2]);
        assert_eq!(servers.addr(0), addr(4));
        assert_eq!(servers.generation(0), 1);
        assert!(servers.listed(0));
        assert_eq!(servers.len(), 3);
    }

    #[test]
    fn an_address_back_in_the_answer_takes_its_drained_slot_again() {
        let servers = Servers::new(&group(&[1, 2]));
        servers.begin(1);
        update(&servers, 0, &[addr(3)]);
        let changed = update(&servers, 0, &[addr(3), addr(2)]);
        assert_eq!(changed.relisted, [1]);
        assert!(changed.added.is_empty());
        assert!(servers.stands_for(1, addr(2)));
        assert_eq!(
            servers.in_flight(1),
            1,
            "its request in flight is still counted"
        );
    }

    #[test]
    fn outcomes_for_an_address_a_slot_no_longer_stands_for_are_ignored() {
        let mut cfg = group(&[1]);
        cfg.health_check = Some(crate::config::HealthCheckConfig::default());
        let servers = Servers::new(&cfg);
        update(&servers, 0, &[addr(2)]);
        update(&servers, 0, &[addr(3)]);
        assert!(servers.stands_for(0, addr(3)), "slot 0 was free again");
        let now = Instant::now();
        assert!(!servers.failed(0, addr(1), now));
        assert!(servers.available(0, now));
        for _ in 0..10 {
            assert_eq!(servers.checked(0, addr(1), false), None);
        }
        assert_eq!(servers.active(0), Some(true));
        assert!(servers.failed(0, addr(3), now), "its own failure counts");
    }

    #[test]
    fn peak_ewma_balancing_learns_each_server_s_latency_from_its_answers() {
        let mut cfg = group(&[1]);
        cfg.balance = Balance::P2cEwma;
        let servers = Servers::new(&cfg);
        let now = Instant::now();
        servers.succeeded(0, addr(1), Duration::from_secs(1), now);
        servers.succeeded(1, addr(9), Duration::from_millis(1), now);
        // Of two servers, both are drawn each time: the faster one wins every pick.
        for _ in 0..20 {
            assert_eq!(servers.pick(None, now), Some(1));
        }
    }

    #[test]
    fn only_a_group_of_one_address_never_takes_it_out() {
        // One name, two addresses, then one: the one left is never taken out.
        let mut cfg = group(&[1, 2]);
        cfg.servers.truncate(1);
        let servers = Servers::new(&cfg);
        let now = Instant::now();
        assert!(
            servers.failed(0, addr(1), now),
            "two servers: max_fails applies"
        );
        update(&servers, 0, &[addr(2)]);
        assert!(!servers.failed(1, addr(2), now));
        assert!(servers.available(1, now));
        // Back to two: max_fails applies again.
        update(&servers, 0, &[addr(2), addr(5)]);
        assert!(servers.failed(1, addr(2), now));
        assert!(!servers.available(1, now));
    }
}
