use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;

const DONE: Returning = Returning {
    response_complete: true,
    upstream_keep_alive: true,
    upstream_closed: false,
    server_removed: false,
};
const MS: Duration = Duration::from_millis(1);
const ALL: PoolGuards = PoolGuards {
    honor_hints: true,
    learn: true,
    close_first: true,
    risk_aware_checkout: true,
};
const NONE: PoolGuards = PoolGuards {
    honor_hints: false,
    learn: false,
    close_first: false,
    risk_aware_checkout: false,
};

fn limits() -> Limits {
    Limits {
        keepalive: 3,
        idle_timeout: 100 * MS,
        max_requests: 5,
        max_lifetime: Duration::from_secs(2),
    }
}

fn meta(id: u64, server: usize, created: Instant) -> ConnMeta {
    ConnMeta {
        requests: 1,
        ..ConnMeta::new(id, server, created)
    }
}

fn keep(_: u64, _: ConnMeta, reason: Reason) {
    panic!("unexpected close: {reason:?}");
}

fn alive(_: &u64) -> Liveness {
    Liveness::Alive
}

fn pool(guards: PoolGuards) -> Pool<u64> {
    Pool::new(limits(), guards, 2)
}

#[test]
fn checkout_prefers_most_recently_used_of_that_server() {
    let t0 = Instant::now();
    let mut pool = pool(ALL);
    for (id, server) in [(1, 0), (2, 0), (3, 1)] {
        pool.checkin(id, meta(id, server, t0), DONE, t0 + MS * id as u32, keep);
    }
    let got = pool
        .checkout(0, t0 + 10 * MS, Risk::Retryable, alive, keep)
        .expect("two idle");
    assert_eq!(got.conn, 2);
    assert_eq!(got.idle_for, 8 * MS);
    assert_eq!(pool.idle(), 2);
}

#[test]
fn idle_list_never_holds_more_than_keepalive() {
    let t0 = Instant::now();
    let mut pool = pool(ALL);
    let mut evicted = vec![];
    for id in 1..=5 {
        pool.checkin(id, meta(id, 0, t0), DONE, t0, |c, _, r| {
            evicted.push((c, r))
        });
    }
    assert_eq!(pool.idle(), 3);
    assert_eq!(evicted, [(1, Reason::PoolFull), (2, Reason::PoolFull)]);
}

#[test]
fn connection_idle_past_timeout_is_closed_not_handed_out() {
    let t0 = Instant::now();
    let mut pool = pool(ALL);
    pool.checkin(1, meta(1, 0, t0), DONE, t0, keep);
    let mut closed = vec![];
    let got = pool.checkout(0, t0 + 100 * MS, Risk::Retryable, alive, |c, _, r| {
        closed.push((c, r))
    });
    assert!(got.is_none());
    assert_eq!(closed, [(1, Reason::IdleTimeout)]);
}

#[test]
fn connection_found_closed_at_checkout_is_skipped_and_teaches_the_idle_timeout() {
    let t0 = Instant::now();
    let mut pool = pool(ALL);
    pool.checkin(1, meta(1, 0, t0), DONE, t0, keep);
    pool.checkin(2, meta(2, 0, t0), DONE, t0 + MS, keep);
    let now = t0 + 60 * MS;
    let mut closed = vec![];
    let dead_two = |c: &u64| {
        if *c == 2 {
            Liveness::Closed {
                at: now,
                exact: false,
            }
        } else {
            Liveness::Alive
        }
    };
    let got = pool.checkout(0, now, Risk::Retryable, dead_two, |c, _, r| {
        closed.push((c, r))
    });
    // What conn 2 taught applies at once: conn 1, idle as long, is past the new budget.
    assert!(got.is_none());
    assert_eq!(
        closed,
        [(2, Reason::ClosedByUpstream), (1, Reason::IdleBudget)]
    );
    // The upstream closed after 59 ms idle: reuse now stops at 39 ms.
    assert_eq!(pool.learned(0, now), (Some(39 * MS), None));
    let events = pool.take_events();
    assert!(events.contains(&Event::UpstreamClosedIdle {
        server: 0,
        idle_for: 59 * MS
    }));
}

#[test]
fn a_close_replayed_into_another_pool_teaches_it_the_same_and_is_reported_once() {
    let t0 = Instant::now();
    let (mut seen, mut told) = (pool(ALL), pool(ALL));
    // Every close one pool sees, replayed into the other, leaves both knowing the same.
    for (id, idle) in [(1, 59 * MS), (2, 70 * MS), (3, 59 * MS)] {
        let at = t0 + 200 * MS * id as u32;
        seen.observe_close(&meta(id, 0, t0), idle, at, true);
        for event in seen.take_events() {
            if let Event::Observed(close) = event {
                told.replay_close(&close);
            }
        }
        let now = at + MS;
        assert_eq!(
            told.learned(0, now),
            seen.learned(0, now),
            "after close {id}"
        );
    }
    assert_eq!(
        told.learned(0, t0 + Duration::from_secs(1)).0,
        Some(39 * MS)
    );
    assert!(
        told.take_events().is_empty(),
        "the pool that saw it reports it"
    );
    // A pool that does not learn is taught nothing.
    let mut deaf = pool(NONE);
    let taught = deaf.replay_close(&Observation {
        server: 0,
        requests: 1,
        idle_for: 59 * MS,
        at: t0,
        exact: true,
    });
    assert!(!taught);
    assert_eq!(deaf.learned(0, t0 + MS), (None, None));
}

#[test]
fn removed_server_loses_its_idle_connections_and_a_new_one_in_its_slot_knows_nothing() {
    let t0 = Instant::now();
    let mut pool = pool(ALL);
    pool.observe_close(&meta(9, 1, t0), 50 * MS, t0, false);
    for (id, server) in [(1, 0), (2, 1), (3, 1)] {
        pool.checkin(id, meta(id, server, t0), DONE, t0, keep);
    }
    let mut closed = vec![];
    pool.remove_server(1, |c, _, r| closed.push((c, r)));
    assert_eq!(
        closed,
        [(2, Reason::ServerRemoved), (3, Reason::ServerRemoved)]
    );
    assert_eq!(pool.idle(), 1);
    assert!(pool.learned(1, t0).0.is_some());
    pool.new_server(1, keep);
    assert_eq!(pool.learned(1, t0), (None, None));
    // A slot past the ones the pool was made with.
    pool.new_server(4, keep);
    assert_eq!(pool.learned(4, t0), (None, None));
}

#[test]
fn learned_budget_closes_first_and_is_ignored_when_learning_is_off() {
    for (guards, expect) in [(ALL, Some(Reason::IdleBudget)), (NONE, None)] {
        let t0 = Instant::now();
        let mut pool = pool(guards);
        pool.observe_close(&meta(9, 0, t0), 50 * MS, t0, false);
        pool.checkin(1, meta(1, 0, t0), DONE, t0, keep);
        let mut closed = vec![];
        pool.expire(t0 + 40 * MS, alive, |_, _, r| closed.push(r));
        assert_eq!(closed.first().copied(), expect);
    }
}

#[test]
fn hints_lower_the_budget_of_their_connection() {
    let t0 = Instant::now();
    let mut pool = pool(ALL);
    let hinted = ConnMeta {
        hint_idle: Some(20 * MS),
        hint_requests: Some(2),
        ..meta(1, 0, t0)
    };
    pool.checkin(1, hinted, DONE, t0, keep);
    let mut closed = vec![];
    assert!(
        pool.checkout(0, t0 + 20 * MS, Risk::Retryable, alive, |_, _, r| closed
            .push(r))
            .is_none()
    );
    assert_eq!(closed, [Reason::IdleBudget]);
    let mut closed = vec![];
    let spent = ConnMeta {
        requests: 2,
        ..hinted
    };
    assert!(!pool.checkin(1, spent, DONE, t0, |_, _, r| closed.push(r)));
    assert_eq!(closed, [Reason::RequestBudget]);
}

#[test]
fn request_that_must_not_be_retried_waits_for_a_settled_connection() {
    let t0 = Instant::now();
    let mut pool = pool(ALL);
    pool.checkin(1, meta(1, 0, t0), DONE, t0, keep);
    let just_back = t0 + SETTLE / 2;
    assert!(
        pool.checkout(0, just_back, Risk::MustNotRetry, alive, keep)
            .is_none()
    );
    assert_eq!(pool.idle(), 1, "the young connection stays for others");
    assert!(
        pool.checkout(0, t0 + SETTLE, Risk::MustNotRetry, alive, keep)
            .is_some()
    );
}

#[test]
fn request_that_must_not_be_retried_skips_connections_near_their_budget() {
    let t0 = Instant::now();
    let mut pool = pool(ALL);
    pool.checkin(1, meta(1, 0, t0), DONE, t0, keep);
    assert!(
        pool.checkout(0, t0 + 60 * MS, Risk::MustNotRetry, alive, keep)
            .is_none()
    );
    assert_eq!(pool.idle(), 1);
    assert!(
        pool.checkout(0, t0 + 60 * MS, Risk::Retryable, alive, keep)
            .is_some()
    );
}

#[test]
fn keepalive_zero_pools_nothing() {
    let t0 = Instant::now();
    let mut pool: Pool<u64> = Pool::new(
        Limits {
            keepalive: 0,
            ..limits()
        },
        ALL,
        1,
    );
    let mut closed = vec![];
    assert!(!pool.checkin(1, meta(1, 0, t0), DONE, t0, |c, _, r| closed.push((c, r))));
    assert_eq!(closed, [(1, Reason::ReuseDisabled)]);
}

#[derive(Clone, Debug)]
enum Op {
    /// Open a new connection to a server and send one request on it.
    Open(usize),
    /// Check out for a server; if a connection is handed out, send a request and return it.
    Reuse(usize, bool, bool),
    /// Time passes.
    Tick(u64),
    /// The upstream closes the n-th idle connection now.
    UpstreamClose(usize),
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2usize).prop_map(Op::Open),
        (0..2usize, any::<bool>(), any::<bool>())
            .prop_map(|(s, ka, retry)| Op::Reuse(s, ka, retry)),
        (0..150u64).prop_map(Op::Tick),
        (0..4usize).prop_map(Op::UpstreamClose),
        Just(Op::Expire),
    ]
}

proptest! {
    /// Whatever happens, the pool never hands out a connection past its budget or one the
    /// upstream closed, never holds more than `keepalive`, hands requests that must not be
    /// retried only settled connections, and ends every connection exactly once.
    #[test]
    fn pool_invariants_hold_for_any_sequence(ops in proptest::collection::vec(op(), 1..200), all in any::<bool>()) {
        let l = limits();
        let t0 = Instant::now();
        let mut now = t0;
        let mut pool: Pool<u64> = Pool::new(l, if all { ALL } else { NONE }, 2);
        let mut next_id = 0u64;
        let mut ended: HashSet<u64> = HashSet::new();
        let mut dead: HashMap<u64, Instant> = HashMap::new();
        let mut last_use: HashMap<u64, Instant> = HashMap::new();
        for op in ops {
            let mut closed = |c: u64, _: ConnMeta, _: Reason| {
                assert!(ended.insert(c), "connection {c} ended twice");
            };
            let dead_now = dead.clone();
            let check = |c: &u64| match dead_now.get(c) {
                Some(at) => Liveness::Closed { at: *at, exact: false },
                None => Liveness::Alive,
            };
            match op {
                Op::Open(server) => {
                    next_id += 1;
                    last_use.insert(next_id, now);
                    pool.checkin(next_id, meta(next_id, server, now), DONE, now, &mut closed);
                }
                Op::Reuse(server, keep_alive, retryable) => {
                    let risk = if retryable { Risk::Retryable } else { Risk::MustNotRetry };
                    let budget_before: HashMap<u64, Budget> =
                        pool.idle.iter().map(|e| (e.conn, pool.budget(&e.meta, now))).collect();
                    if let Some(got) = pool.checkout(server, now, risk, check, &mut closed) {
                        let budget = budget_before[&got.conn];
                        prop_assert_eq!(got.meta.server, server);
                        prop_assert!(!dead.contains_key(&got.conn), "handed out a closed connection");
                        prop_assert!(got.idle_for < budget.idle);
                        prop_assert!(got.idle_for < l.idle_timeout);
                        prop_assert!(now.duration_since(got.meta.created) < l.max_lifetime);
                        prop_assert!(got.meta.requests < budget.max_requests);
                        if all && !retryable {
                            prop_assert!(got.idle_for >= SETTLE);
                            let safe = if budget.idle_lowered { budget.idle } else { budget.idle / 2 };
                            prop_assert!(got.idle_for <= safe);
                        }
                        prop_assert_eq!(got.idle_for, now.duration_since(last_use[&got.conn]));
                        let mut m = got.meta;
                        m.requests += 1;
                        last_use.insert(got.conn, now);
                        let r = Returning { upstream_keep_alive: keep_alive, ..DONE };
                        pool.checkin(got.conn, m, r, now, &mut closed);
                    }
                }
                Op::Tick(ms) => now += Duration::from_millis(ms),
                Op::UpstreamClose(nth) => {
                    if nth < pool.idle.len() {
                        dead.insert(pool.idle[nth].conn, now);
                    }
                }
                Op::Expire => pool.expire(now, check, &mut closed),
            }
            prop_assert!(pool.idle() <= l.keepalive);
            for entry in &pool.idle {
                prop_assert!(!ended.contains(&entry.conn), "closed connection still idle");
            }
        }
        let mut closed = |c: u64, _: ConnMeta, _: Reason| {
            assert!(ended.insert(c), "connection {c} ended twice");
        };
        pool.drain(&mut closed);
        prop_assert_eq!(ended.len() as u64, next_id, "every connection ends exactly once");
    }
}
