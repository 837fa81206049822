//! Which server of a group takes the next try: nginx's smooth weighted round robin and
//! `least_conn`, and power of two random choices by load or by peak-EWMA latency.
//!
//! Pure: the caller passes what it knows of each server at the moment of the pick, and a
//! source of random indices; nothing here reads a clock or a socket.

use std::cmp::Ordering;
use std::time::{Duration, Instant};

pub use crate::config::Balance;

/// How fast [`PeakEwma`] forgets, linkerd's and Finagle's default: long enough to remember
/// a slow server across the gaps of bursty traffic, short enough that a server that has
/// recovered gets its share back within tens of seconds.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);

/// What the balancer sees of one server at the moment of a pick.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    /// The configured weight; 0 counts as 1.
    pub weight: u32,
    /// Requests sent to the server and not yet answered.
    pub in_flight: u32,
    /// Peak-EWMA latency; `Duration::ZERO` if unknown.
    pub ewma: Duration,
    /// False while the server is out (passive or active health).
    pub available: bool,
}

/// Picks servers for one group; holds the round-robin state between picks.
#[derive(Clone, Debug)]
pub struct Balancer {
    mode: Balance,
    /// Smooth weighted round robin's running weight per server (nginx's `current_weight`);
    /// after every pick they sum to zero.
    current: Vec<i64>,
}

impl Balancer {
    pub fn new(mode: Balance, servers: usize) -> Balancer {
        Balancer {
            mode,
            current: vec![0; servers],
        }
    }

    /// Servers were added (DNS) or removed at the end; existing indices keep their state.
    pub fn resize(&mut self, servers: usize) {
        self.current.resize(servers, 0);
    }

    /// Slot `server` stands for a new address: it starts level, owing nothing.
    pub fn reset(&mut self, server: usize) {
        if let Some(current) = self.current.get_mut(server) {
            *current = 0;
        }
    }

    /// Picks an available server; `None` if none is.
    ///
    /// `exclude` asks for any server but that one (the one a failed try just used). It is
    /// ignored when the group has a single server: there is no other to ask for, and a new
    /// connection to the same server is what recovers from a connection closed under a
    /// request. With several servers and only the excluded one available, the answer is
    /// `None`. `random(n)` returns a uniform index below `n`; the p2c modes call it twice
    /// per pick, the others never.
    pub fn pick(
        &mut self,
        servers: &[Candidate],
        exclude: Option<usize>,
        random: &mut impl FnMut(usize) -> usize,
    ) -> Option<usize> {
        if servers.len() != self.current.len() {
            self.resize(servers.len());
        }
        let sole = servers.len() == 1;
        let eligible = |i: usize| servers[i].available && (sole || exclude != Some(i));
        match self.mode {
            Balance::RoundRobin => self.smooth_round_robin(servers, eligible),
            Balance::LeastConn => {
                let least = (0..servers.len())
                    .filter(|&i| eligible(i))
                    .min_by(|&a, &b| by_load(&servers[a], &servers[b]))?;
                // nginx's least_conn: ties go round robin among the tied, by weight.
                self.smooth_round_robin(servers, |i| {
                    eligible(i) && by_load(&servers[i], &servers[least]).is_eq()
                })
            }
            Balance::P2cLoad => two_choices(servers, eligible, random, by_load),
            Balance::P2cEwma => two_choices(servers, eligible, random, by_latency),
        }
    }

    /// nginx's smooth weighted round robin over the servers `eligible` lets in: each gains
    /// its weight, the highest (the first of equals) is picked and loses the total. Over
    /// every run of picks as long as the sum of the weights, with the same servers
    /// eligible, each server is picked exactly `weight` times, spread out (5, 1, 1 gives
    /// a a b a c a a).
    fn smooth_round_robin(
        &mut self,
        servers: &[Candidate],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut total = 0;
        let mut best: Option<usize> = None;
        for (i, server) in servers.iter().enumerate() {
            if !eligible(i) {
                continue;
            }
            let weight = i64::from(weight(server));
            self.current[i] += weight;
            total += weight;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        self.current[best] -= total;
        Some(best)
    }
}

fn weight(server: &Candidate) -> u32 {
    server.weight.max(1)
}

/// Compares requests in flight per unit of weight, without division.
fn by_load(a: &Candidate, b: &Candidate) -> Ordering {
    let a_load = u64::from(a.in_flight) * u64::from(weight(b));
    let b_load = u64::from(b.in_flight) * u64::from(weight(a));
    a_load.cmp(&b_load)
}

/// Compares linkerd's cost, latency x (in flight + 1), per unit of weight. A server whose
/// latency is not known yet is compared by load, and wins a tie so that it gets the request
/// that teaches its latency. Counting it as zero latency would instead send it every request
/// until its first answer; a coin toss on the tie would keep handing a known slow server
/// half of the picks it shares with a new one.
fn by_latency(a: &Candidate, b: &Candidate) -> Ordering {
    if a.ewma.is_zero() || b.ewma.is_zero() {
        return by_load(a, b).then_with(|| b.ewma.is_zero().cmp(&a.ewma.is_zero()));
    }
    let cost = |s: &Candidate, other: &Candidate| {
        s.ewma
            .as_nanos()
            .saturating_mul(u128::from(s.in_flight) + 1)
            .saturating_mul(u128::from(weight(other)))
    };
    cost(a, b).cmp(&cost(b, a))
}

/// Power of two random choices: two distinct eligible servers drawn uniformly, the one
/// `compare` ranks lower wins, the first drawn on a tie.
fn two_choices(
    servers: &[Candidate],
    eligible: impl Fn(usize) -> bool,
    random: &mut impl FnMut(usize) -> usize,
    compare: fn(&Candidate, &Candidate) -> Ordering,
) -> Option<usize> {
    let count = (0..servers.len()).filter(|&i| eligible(i)).count();
    let nth = |n: usize| (0..servers.len()).filter(|&i| eligible(i)).nth(n);
    if count < 2 {
        return nth(0);
    }
    // Clamped, so a faulty `random` skews the pick instead of panicking.
    let first = random(count).min(count - 1);
    let mut second = random(count - 1).min(count - 2);
    if second >= first {
        second += 1;
    }
    let (a, b) = (nth(first)?, nth(second)?);
    Some(if compare(&servers[b], &servers[a]).is_lt() {
        b
    } else {
        a
    })
}

/// Peak EWMA of a latency signal (linkerd's): a sample above the current value replaces it at
/// once; below, the value decays toward it with time constant `decay`.
///
/// Between samples [`PeakEwma::get`] decays the value toward zero with the same time
/// constant, as linkerd's and Finagle's do: a server that answered slowly once and then got
/// no traffic would otherwise keep that cost, never be picked, and never prove it recovered.
#[derive(Clone, Copy, Debug)]
pub struct PeakEwma {
    decay: Duration,
    /// The estimate in nanoseconds as of `stamp`.
    nanos: f64,
    /// When the last sample came; `None` before the first.
    stamp: Option<Instant>,
}

impl PeakEwma {
    /// No estimate yet: `get` returns zero until the first sample. A zero `decay` forgets
    /// everything but the last sample, and that as soon as time passes.
    pub fn new(decay: Duration) -> Self {
        PeakEwma {
            decay,
            nanos: 0.0,
            stamp: None,
        }
    }

    pub fn observe(&mut self, sample: Duration, now: Instant) {
        let sample = sample.as_nanos() as f64;
        self.nanos = match self.stamp {
            Some(stamp) if sample < self.nanos => {
                let kept = self.kept(stamp, now);
                self.nanos * kept + sample * (1.0 - kept)
            }
            _ => sample,
        };
        self.stamp = Some(now);
    }

    /// The estimate at `now`; `Duration::ZERO` before the first sample.
    pub fn get(&self, now: Instant) -> Duration {
        match self.stamp {
            None => Duration::ZERO,
            Some(stamp) => Duration::from_nanos((self.nanos * self.kept(stamp, now)) as u64),
        }
    }

    /// The share of the old value left after the time from `stamp` to `now`: e^(-t/decay).
    fn kept(&self, stamp: Instant, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(stamp).as_secs_f64();
        let decay = self.decay.as_secs_f64();
        match (elapsed == 0.0, decay == 0.0) {
            (true, _) => 1.0,
            (false, true) => 0.0,
            (false, false) => (-elapsed / decay).exp(),
        }
    }
}

#[cfg(test)]
mod tests;
