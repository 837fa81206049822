//! The idle-timeout measurement: rounds of connections that each send one request, sit idle
//! for a chosen wait, and report either the instant the server closed them or that they
//! survived the wait.
//!
//! Round 0 doubles the wait from 1 s up to `max_idle` (1, 2, 4 … 64, 120 s by default), all at
//! once. Because each connection measures its own close to the millisecond, any wait longer
//! than the server's timeout T reports T itself, and the longest surviving wait is a lower
//! bound: after round 0 the interval is [T/2, T] or better. Each later round spreads K waits
//! over the top tenth of the interval (or all of it, once it is narrower), so a server that
//! closes on time is pinned after one more round: about 2T in all. A server whose closes vary
//! (a periodic sweep) just narrows more slowly; the rounds stop at [`MAX_ROUNDS`] or when a
//! close is seen below a survival, and the earliest close is reported.

use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::task::JoinSet;

use super::advice::secs;
use super::wire::{Conn, Failure, Idle, Target};
use super::{CloseKind, ProbeOptions, describe};

/// First wait of round 0: shorter timeouts are caught by the longer waits closing early.
const FIRST_WAIT: Duration = Duration::from_secs(1);

/// Most connections in round 0, one per doubling: 1 s doubled 23 times exceeds the 24 h bound.
const MAX_FIRST_ROUND: usize = 24;

/// Rounds after which the probe stops and reports what it has: a server that closes on time
/// needs two, and each further round narrows the interval at least tenfold.
const MAX_ROUNDS: u32 = 8;

/// Precision goal, relative: the interval is narrow enough once hi − lo ≤ lo / 20 (5 %).
const TOLERANCE_DIVISOR: u32 = 20;

/// Precision goal, absolute: below this the network and both hosts' schedulers blur the
/// measurement anyway.
const TOLERANCE_FLOOR: Duration = Duration::from_millis(50);

/// The later rounds start their waits this fraction (1/10) below the earliest close.
const REFINE_DIVISOR: u32 = 10;

/// What the rounds found.
#[derive(Debug, Default)]
pub(super) struct IdleResult {
    pub(super) timeout: Option<Duration>,
    pub(super) survived: Option<Duration>,
    pub(super) close: Option<CloseKind>,
    pub(super) rounds: u32,
    pub(super) connections: u64,
    pub(super) notes: Vec<String>,
}

/// How one idle connection ended.
#[derive(Debug)]
enum Sample {
    /// The server closed it `after` the end of the first response.
    Closed {
        after: Duration,
        kind: Option<CloseKind>,
    },
    /// Still open after `wait`, and a second request on it succeeded.
    Survived {
        wait: Duration,
    },
    /// Still open after `wait`, but the second request met a close: the server closed it at
    /// about `wait`, at the very moment it was reused.
    Raced {
        wait: Duration,
    },
    /// The first response already said the connection would close.
    NoKeepAlive,
    Failed(String),
}

/// Whether [lo, hi] is narrow enough to report.
pub(super) fn converged(lo: Duration, hi: Duration) -> bool {
    hi.saturating_sub(lo) <= (lo / TOLERANCE_DIVISOR).max(TOLERANCE_FLOOR)
}

/// Waits of round 0: 1 s, 2 s, 4 s … below `max_idle`, then `max_idle` itself.
pub(super) fn first_waits(max_idle: Duration) -> Vec<Duration> {
    let mut waits = Vec::new();
    let mut wait = FIRST_WAIT;
    while wait < max_idle && waits.len() < MAX_FIRST_ROUND - 1 {
        waits.push(wait);
        wait *= 2;
    }
    waits.push(max_idle);
    waits
}

/// K waits strictly inside (a, hi), where a is the survival bound `lo` or a tenth below `hi`,
/// whichever is higher.
pub(super) fn next_waits(lo: Duration, hi: Duration, k: usize) -> Vec<Duration> {
    let start = lo.max(hi - hi / REFINE_DIVISOR);
    let parts = u32::try_from(k + 1).unwrap_or(u32::MAX);
    let step = (hi - start) / parts;
    (1..=parts - 1).map(|i| start + step * i).collect()
}

/// Runs the rounds against `target`.
pub(super) async fn measure(
    target: &Arc<Target>,
    opts: &ProbeOptions,
    progress: Option<&ProgressBar>,
) -> IdleResult {
    let mut result = IdleResult::default();
    let mut lo = Duration::ZERO;
    let mut hi: Option<Duration> = None;
    // The earliest close seen while idle: a raced second request meets the server's close
    // too, but then the RST is the kernel's answer to our request, not how the server closed.
    let mut earliest_close: Option<Duration> = None;
    let mut kinds_seen = (false, false);
    let mut no_keep_alive = 0u64;
    for round in 0..MAX_ROUNDS {
        let waits = match hi {
            None if round == 0 => first_waits(opts.max_idle),
            // Round 0 included `max_idle` itself and nothing closed: longer than the bound.
            None => break,
            Some(hi) => next_waits(lo, hi, opts.connections),
        };
        if let Some(bar) = progress {
            let longest = waits.last().copied().unwrap_or_default();
            let bounds = match hi {
                Some(hi) => format!("between {} and {}", secs(lo), secs(hi)),
                None => format!("up to {}", secs(opts.max_idle)),
            };
            bar.set_message(format!(
                "idle round {}: {} connections waiting up to {} (timeout {bounds})",
                round + 1,
                waits.len(),
                secs(longest),
            ));
        }
        result.rounds += 1;
        result.connections += waits.len() as u64;
        let mut samples = JoinSet::new();
        for wait in &waits {
            samples.spawn(sample(target.clone(), *wait, opts.clone()));
        }
        let mut failed = 0usize;
        while let Some(done) = samples.join_next().await {
            let sample = match done {
                Ok(sample) => sample,
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                Err(_cancelled) => continue,
            };
            match sample {
                Sample::Closed { after, kind } => {
                    hi = Some(hi.map_or(after, |hi| hi.min(after)));
                    if kind.is_some() && earliest_close.is_none_or(|e| after < e) {
                        earliest_close = Some(after);
                        result.close = kind;
                    }
                    note_kind(&mut kinds_seen, kind);
                }
                Sample::Survived { wait } => lo = lo.max(wait),
                Sample::Raced { wait } => hi = Some(hi.map_or(wait, |hi| hi.min(wait))),
                Sample::NoKeepAlive => no_keep_alive += 1,
                Sample::Failed(reason) => {
                    failed += 1;
                    if result.notes.len() < 5 {
                        result
                            .notes
                            .push(format!("idle probe connection failed: {reason}"));
                    }
                }
            }
        }
        if failed == waits.len() {
            result.notes.push(format!(
                "idle round {} lost every connection; stopped",
                round + 1
            ));
            break;
        }
        match hi {
            Some(hi) if hi <= lo => {
                result.notes.push(format!(
                    "the server closed one connection after {} idle but kept another open {}: \
                     its closes vary (a periodic sweep?); the earliest close is reported",
                    secs(hi),
                    secs(lo)
                ));
                break;
            }
            Some(hi) if converged(lo, hi) => break,
            _ => {}
        }
    }
    if no_keep_alive > 0 {
        result.notes.push(format!(
            "{no_keep_alive} idle probe connections were refused keep-alive \
             (a different server behind the same address?)"
        ));
    }
    if kinds_seen == (true, true) {
        result
            .notes
            .push("idle connections were closed sometimes with FIN, sometimes with RST".into());
    }
    result.timeout = hi;
    result.survived = (lo > Duration::ZERO).then_some(lo);
    result
}

fn note_kind(seen: &mut (bool, bool), kind: Option<CloseKind>) {
    match kind {
        Some(CloseKind::Fin) => seen.0 = true,
        Some(CloseKind::Rst) => seen.1 = true,
        None => {}
    }
}

/// One connection: a request, then idle until the server closes it or `wait` passes; if it is
/// still open, a second request proves it usable.
async fn sample(target: Arc<Target>, wait: Duration, opts: ProbeOptions) -> Sample {
    let mut conn = match Conn::open(&target, opts.connect_timeout).await {
        Ok(conn) => conn,
        Err(error) => return Sample::Failed(format!("connect: {error}")),
    };
    let first = match conn.exchange(&target, opts.request_timeout).await {
        Ok(response) => response,
        Err(failure) => return Sample::Failed(format!("first request: {}", describe(&failure))),
    };
    if first.close {
        return Sample::NoKeepAlive;
    }
    match conn.wait_idle(first.ended + wait).await {
        Idle::Closed { at, kind } => Sample::Closed {
            after: at.saturating_duration_since(first.ended),
            kind,
        },
        Idle::Open => match conn.exchange(&target, opts.request_timeout).await {
            Ok(_) => Sample::Survived { wait },
            Err(Failure::Closed(_)) => Sample::Raced { wait },
            Err(failure) => Sample::Failed(format!("second request: {}", describe(&failure))),
        },
    }
}
