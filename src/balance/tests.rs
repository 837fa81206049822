use proptest::prelude::*;

use super::*;

fn server(weight: u32) -> Candidate {
    Candidate {
        weight,
        in_flight: 0,
        ewma: Duration::ZERO,
        available: true,
    }
}

/// A `random` for modes that must not call it.
fn no_random(_: usize) -> usize {
    panic!("round robin and least_conn draw no random numbers")
}

fn picks(balancer: &mut Balancer, servers: &[Candidate], n: usize) -> Vec<usize> {
    (0..n)
        .map(|_| {
            balancer
                .pick(servers, None, &mut no_random)
                .expect("all available")
        })
        .collect()
}

#[test]
fn round_robin_spreads_weights_5_1_1_as_nginx_does() {
    let servers = [server(5), server(1), server(1)];
    let mut balancer = Balancer::new(Balance::RoundRobin, 3);
    let cycle = [0, 0, 1, 0, 2, 0, 0];
    assert_eq!(picks(&mut balancer, &servers, 7), cycle);
    assert_eq!(picks(&mut balancer, &servers, 7), cycle);
}

#[test]
fn round_robin_with_equal_weights_takes_turns() {
    let servers = [server(1), server(1), server(1)];
    let mut balancer = Balancer::new(Balance::RoundRobin, 3);
    assert_eq!(picks(&mut balancer, &servers, 6), [0, 1, 2, 0, 1, 2]);
}

#[test]
fn exclude_is_ignored_only_for_a_single_server() {
    let mut balancer = Balancer::new(Balance::RoundRobin, 1);
    assert_eq!(
        balancer.pick(&[server(1)], Some(0), &mut no_random),
        Some(0)
    );
    let down = Candidate {
        available: false,
        ..server(1)
    };
    let mut balancer = Balancer::new(Balance::RoundRobin, 2);
    assert_eq!(
        balancer.pick(&[server(1), down], Some(0), &mut no_random),
        None
    );
    assert_eq!(
        balancer.pick(&[server(1), server(1)], Some(0), &mut no_random),
        Some(1)
    );
}

#[test]
fn nothing_available_picks_nothing() {
    let down = Candidate {
        available: false,
        ..server(1)
    };
    for mode in MODES {
        let mut balancer = Balancer::new(mode, 2);
        assert_eq!(balancer.pick(&[down, down], None, &mut |_| 0), None);
        assert_eq!(balancer.pick(&[], None, &mut |_| 0), None);
    }
}

#[test]
fn least_conn_breaks_ties_round_robin() {
    let busy = Candidate {
        in_flight: 3,
        ..server(1)
    };
    let servers = [server(1), busy, server(1), server(1)];
    let mut balancer = Balancer::new(Balance::LeastConn, 4);
    assert_eq!(picks(&mut balancer, &servers, 6), [0, 2, 3, 0, 2, 3]);
}

#[test]
fn least_conn_weighs_in_flight_by_weight() {
    // 4 in flight on weight 4 is a lighter load than 2 on weight 1.
    let heavy = Candidate {
        in_flight: 4,
        ..server(4)
    };
    let light = Candidate {
        in_flight: 2,
        ..server(1)
    };
    let mut balancer = Balancer::new(Balance::LeastConn, 2);
    assert_eq!(picks(&mut balancer, &[light, heavy], 1), [1]);
}

#[test]
fn resize_keeps_the_state_of_existing_servers() {
    let mut balancer = Balancer::new(Balance::RoundRobin, 3);
    let three = [server(5), server(1), server(1)];
    assert_eq!(picks(&mut balancer, &three, 3), [0, 0, 1]);
    let before = balancer.current.clone();
    balancer.resize(4);
    assert_eq!(balancer.current[..3], before[..]);
    assert_eq!(balancer.current[3], 0);
}

#[test]
fn p2c_ewma_compares_latency_times_load() {
    let ms = Duration::from_millis;
    let fast_busy = Candidate {
        in_flight: 3,
        ewma: ms(10),
        ..server(1)
    };
    let slow_idle = Candidate {
        in_flight: 0,
        ewma: ms(30),
        ..server(1)
    };
    // 10 ms x 4 = 40 > 30 ms x 1.
    let mut balancer = Balancer::new(Balance::P2cEwma, 2);
    assert_eq!(
        balancer.pick(&[fast_busy, slow_idle], None, &mut |_| 0),
        Some(1)
    );
    // An unknown latency is not zero latency: compared by load, the idle one wins.
    let unknown_busy = Candidate {
        ewma: Duration::ZERO,
        ..fast_busy
    };
    assert_eq!(
        balancer.pick(&[slow_idle, unknown_busy], None, &mut |_| 1),
        Some(0)
    );
}

#[test]
fn p2c_ewma_gives_an_equally_loaded_unknown_server_the_pick() {
    let known_slow = Candidate {
        ewma: Duration::from_millis(200),
        ..server(1)
    };
    let unknown = server(1);
    let mut balancer = Balancer::new(Balance::P2cEwma, 2);
    // Whichever of the two is drawn first, the unknown one gets the request that teaches
    // its latency.
    for first in [0, 1] {
        let mut draws = [first, 0].into_iter();
        let mut random = |_: usize| draws.next().expect("two draws");
        assert_eq!(
            balancer.pick(&[known_slow, unknown], None, &mut random),
            Some(1),
            "drawn first: {first}"
        );
    }
}

#[test]
fn peak_ewma_jumps_to_a_higher_sample_at_once() {
    let t0 = Instant::now();
    let mut ewma = PeakEwma::new(EWMA_DECAY);
    assert_eq!(ewma.get(t0), Duration::ZERO);
    ewma.observe(Duration::from_millis(10), t0);
    ewma.observe(Duration::from_millis(200), t0 + Duration::from_millis(1));
    assert_eq!(
        ewma.get(t0 + Duration::from_millis(1)),
        Duration::from_millis(200)
    );
}

#[test]
fn peak_ewma_decays_63_percent_per_decay_toward_a_lower_sample() {
    let t0 = Instant::now();
    let mut ewma = PeakEwma::new(EWMA_DECAY);
    ewma.observe(Duration::from_millis(100), t0);
    ewma.observe(Duration::from_millis(10), t0 + EWMA_DECAY);
    // 10 + 90 x e^-1 = 43.1 ms.
    let got = ewma.get(t0 + EWMA_DECAY).as_secs_f64() * 1000.0;
    assert!((got - 43.1).abs() < 0.1, "{got} ms");
}

#[test]
fn peak_ewma_decays_toward_zero_without_samples() {
    let t0 = Instant::now();
    let mut ewma = PeakEwma::new(EWMA_DECAY);
    ewma.observe(Duration::from_millis(100), t0);
    let got = ewma.get(t0 + EWMA_DECAY).as_secs_f64() * 1000.0;
    assert!((got - 36.8).abs() < 0.1, "{got} ms");
    assert_eq!(ewma.get(t0 + EWMA_DECAY * 2), ewma.get(t0 + EWMA_DECAY * 2));
    assert!(ewma.get(t0 + EWMA_DECAY * 50) < Duration::from_micros(1));
}

const MODES: [Balance; 4] = [
    Balance::RoundRobin,
    Balance::LeastConn,
    Balance::P2cLoad,
    Balance::P2cEwma,
];

fn candidate() -> impl Strategy<Value = Candidate> {
    (
        0..=5u32,
        0..=8u32,
        0..=100u64,
        proptest::bool::weighted(0.8),
    )
        .prop_map(|(weight, in_flight, ewma_ms, available)| Candidate {
            weight,
            in_flight,
            ewma: Duration::from_millis(ewma_ms),
            available,
        })
}

proptest! {
    #[test]
    fn round_robin_gives_each_server_its_weight_in_every_cycle(
        weights in proptest::collection::vec(1..=20u32, 1..=8),
        cycles in 1..=4usize,
    ) {
        let servers: Vec<_> = weights.iter().map(|&w| server(w)).collect();
        let total: u32 = weights.iter().sum();
        let mut balancer = Balancer::new(Balance::RoundRobin, servers.len());
        for _ in 0..cycles {
            let mut counts = vec![0u32; servers.len()];
            for i in picks(&mut balancer, &servers, total as usize) {
                counts[i] += 1;
            }
            prop_assert_eq!(&counts, &weights);
        }
    }

    #[test]
    fn every_mode_picks_an_available_server_other_than_the_excluded_one(
        mode in proptest::sample::select(MODES.to_vec()),
        rounds in proptest::collection::vec(
            (proptest::collection::vec(candidate(), 1..=6), proptest::option::of(0..6usize)),
            1..=30,
        ),
        seed in any::<u64>(),
    ) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut balancer = Balancer::new(mode, 0);
        for (servers, exclude) in rounds {
            let picked = balancer.pick(&servers, exclude, &mut |n| rng.usize(..n));
            let sole = servers.len() == 1;
            let eligible = |i: usize| servers[i].available && (sole || exclude != Some(i));
            match picked {
                Some(i) => prop_assert!(eligible(i), "picked {} of {:?}", i, servers),
                None => prop_assert!(!(0..servers.len()).any(eligible)),
            }
        }
    }

    #[test]
    fn least_conn_picks_a_least_loaded_server(
        servers in proptest::collection::vec(candidate(), 1..=8),
    ) {
        let mut balancer = Balancer::new(Balance::LeastConn, servers.len());
        if let Some(picked) = balancer.pick(&servers, None, &mut no_random) {
            for other in servers.iter().filter(|s| s.available) {
                prop_assert!(!by_load(other, &servers[picked]).is_lt());
            }
        }
    }

    #[test]
    fn p2c_never_picks_the_worse_of_its_two(
        mode in proptest::sample::select(vec![Balance::P2cLoad, Balance::P2cEwma]),
        servers in proptest::collection::vec(candidate(), 2..=8),
        seed in any::<u64>(),
    ) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut drawn = Vec::new();
        let mut random = |n: usize| {
            let i = rng.usize(..n);
            drawn.push(i);
            i
        };
        let mut balancer = Balancer::new(mode, servers.len());
        let picked = balancer.pick(&servers, None, &mut random);
        let available: Vec<usize> = (0..servers.len()).filter(|&i| servers[i].available).collect();
        if available.len() < 2 {
            prop_assert!(drawn.is_empty());
            prop_assert_eq!(picked, available.first().copied());
            return Ok(());
        }
        let first = drawn[0];
        let second = if drawn[1] >= first { drawn[1] + 1 } else { drawn[1] };
        let (a, b) = (available[first], available[second]);
        let compare = if mode == Balance::P2cLoad { by_load } else { by_latency };
        let picked = picked.expect("two are available");
        prop_assert!(picked == a || picked == b);
        let other = if picked == a { b } else { a };
        prop_assert!(!compare(&servers[other], &servers[picked]).is_lt());
    }
}
