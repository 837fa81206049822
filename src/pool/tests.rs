use std::collections::HashSet;

use proptest::prelude::*;

use super::*;

const DONE: Returning = Returning {
    response_complete: true,
    upstream_keep_alive: true,
};

fn limits() -> Limits {
    Limits {
        keepalive: 3,
        idle_timeout: Duration::from_millis(100),
        max_requests: 5,
        max_lifetime: Duration::from_secs(2),
    }
}

fn meta(id: u64, server: usize, created: Instant) -> ConnMeta {
    ConnMeta {
        id,
        server,
        created,
        requests: 1,
    }
}

fn keep(_: u64, _: ConnMeta, reason: Reason) {
    panic!("unexpected close: {reason:?}");
}

#[test]
fn checkout_prefers_most_recently_used_of_that_server() {
    let t0 = Instant::now();
    let mut pool = Pool::new(limits());
    for (id, server) in [(1, 0), (2, 0), (3, 1)] {
        pool.checkin(
            id,
            meta(id, server, t0),
            DONE,
            t0 + Duration::from_millis(id),
            keep,
        );
    }
    let got = pool
        .checkout(0, t0 + Duration::from_millis(10), keep)
        .expect("two idle");
    assert_eq!(got.conn, 2);
    assert_eq!(got.idle_for, Duration::from_millis(8));
    assert_eq!(pool.idle(), 2);
}

#[test]
fn idle_list_never_holds_more_than_keepalive() {
    let t0 = Instant::now();
    let mut pool = Pool::new(limits());
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
    let mut pool = Pool::new(limits());
    pool.checkin(1, meta(1, 0, t0), DONE, t0, keep);
    let mut closed = vec![];
    let got = pool.checkout(0, t0 + Duration::from_millis(100), |c, _, r| {
        closed.push((c, r))
    });
    assert!(got.is_none());
    assert_eq!(closed, [(1, Reason::IdleTimeout)]);
}

#[test]
fn expire_closes_only_the_stale() {
    let t0 = Instant::now();
    let mut pool = Pool::new(limits());
    pool.checkin(1, meta(1, 0, t0), DONE, t0, keep);
    pool.checkin(
        2,
        meta(2, 0, t0),
        DONE,
        t0 + Duration::from_millis(60),
        keep,
    );
    assert_eq!(pool.next_expiry(), Some(t0 + Duration::from_millis(100)));
    let mut closed = vec![];
    pool.expire(t0 + Duration::from_millis(120), |c, _, r| {
        closed.push((c, r))
    });
    assert_eq!(closed, [(1, Reason::IdleTimeout)]);
    assert_eq!(pool.idle(), 1);
}

#[test]
fn keepalive_zero_pools_nothing() {
    let t0 = Instant::now();
    let mut pool = Pool::new(Limits {
        keepalive: 0,
        ..limits()
    });
    let mut closed = vec![];
    assert!(!pool.checkin(1, meta(1, 0, t0), DONE, t0, |c, _, r| closed.push((c, r))));
    assert_eq!(closed, [(1, Reason::ReuseDisabled)]);
}

#[derive(Clone, Debug)]
enum Op {
    /// Open a new connection to a server and send one request on it.
    Open(usize),
    /// Check out for a server; if a connection is handed out, send a request and return it.
    Reuse(usize, bool),
    /// Time passes.
    Tick(u64),
    /// The upstream closes a random idle connection.
    UpstreamClose(usize),
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2usize).prop_map(Op::Open),
        (0..2usize, any::<bool>()).prop_map(|(s, ka)| Op::Reuse(s, ka)),
        (0..150u64).prop_map(Op::Tick),
        (0..4usize).prop_map(Op::UpstreamClose),
        Just(Op::Expire),
    ]
}

proptest! {
    /// Whatever happens, the pool never hands out a connection past its budget, never holds
    /// more than `keepalive`, and every connection ends exactly once.
    #[test]
    fn pool_invariants_hold_for_any_sequence(ops in proptest::collection::vec(op(), 1..200)) {
        let l = limits();
        let t0 = Instant::now();
        let mut now = t0;
        let mut pool: Pool<u64> = Pool::new(l);
        let mut next_id = 0u64;
        let mut ended: HashSet<u64> = HashSet::new();
        let mut dead: HashSet<u64> = HashSet::new();
        let mut last_use: std::collections::HashMap<u64, Instant> = Default::default();
        for op in ops {
            let mut closed = |c: u64, _: ConnMeta, _: Reason| {
                assert!(ended.insert(c), "connection {c} ended twice");
            };
            match op {
                Op::Open(server) => {
                    next_id += 1;
                    last_use.insert(next_id, now);
                    pool.checkin(next_id, meta(next_id, server, now), DONE, now, &mut closed);
                }
                Op::Reuse(server, keep_alive) => {
                    if let Some(got) = pool.checkout(server, now, &mut closed) {
                        prop_assert_eq!(got.meta.server, server);
                        prop_assert!(got.idle_for < l.idle_timeout);
                        prop_assert!(now.duration_since(got.meta.created) < l.max_lifetime);
                        prop_assert!(got.meta.requests < l.max_requests);
                        prop_assert_eq!(got.idle_for, now.duration_since(last_use[&got.conn]));
                        let mut m = got.meta;
                        m.requests += 1;
                        last_use.insert(got.conn, now);
                        let r = Returning { response_complete: true, upstream_keep_alive: keep_alive };
                        if dead.contains(&got.conn) {
                            closed(got.conn, m, Reason::Error);
                        } else {
                            pool.checkin(got.conn, m, r, now, &mut closed);
                        }
                    }
                }
                Op::Tick(ms) => now += Duration::from_millis(ms),
                Op::UpstreamClose(nth) => {
                    if nth < pool.idle.len() {
                        dead.insert(pool.idle[nth].conn);
                    }
                    let dead_now = dead.clone();
                    pool.evict_dead(|c| dead_now.contains(c), &mut closed);
                }
                Op::Expire => pool.expire(now, &mut closed),
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
