//! Several workers: each listens on the same port (SO_REUSEPORT) on a runtime of its own, and
//! shutdown drains them all.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kaguard::metrics::Metrics;
use kaguard::pool::Risk;
use kaguard::proxy::group::Group;
use kaguard::resolve::System;
use kaguard::tools::upstream::Behaviour;
use support::*;

/// A second worker: a single-threaded runtime on its own thread, until `stop` is dropped.
fn second_worker() -> (tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let handle = rt.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        kaguard::worker::set(1);
        let _ = rt.block_on(stopped);
    });
    (handle, stop)
}

#[tokio::test]
async fn every_worker_serves_and_shutdown_drains_them_all() {
    let up = upstream(Behaviour {
        delay: Duration::from_millis(200),
        ..Behaviour::default()
    })
    .await;
    let (worker, _stop) = second_worker();
    let config = config(&[up.addr()]);
    let running = kaguard::server::start_on(&config, Arc::new(System), &[worker])
        .await
        .expect("kaguard starts");
    let addr = running.listen[0];
    // New connections from new ports spread over both listeners; every one is answered.
    let clients: Vec<_> = (0..40)
        .map(|_| tokio::spawn(async move { get(addr, "/").await.status() }))
        .collect();
    // Let them reach the upstream, then shut down while they are in flight.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while up.requests() < 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(running.shutdown().await, "drain did not finish");
    for client in clients {
        assert_eq!(client.await.unwrap(), 200);
    }
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "a worker still accepts after shutdown"
    );
}

/// Each worker has a pool of its own: a request is lent its own worker's connection first,
/// and another worker's when its own has none, and what one worker's pool learns from an
/// upstream's close, every pool knows.
#[tokio::test(flavor = "current_thread")]
async fn a_worker_lends_its_own_connections_first_and_the_others_when_it_has_none() {
    let up = upstream(Behaviour {
        idle_timeout: Some(Duration::from_secs(1)),
        ..Behaviour::default()
    })
    .await;
    let mut cfg = config(&[up.addr()]);
    // Far beyond the upstream's: only what is learned from its close can stop reuse sooner.
    cfg.upstreams[0].keepalive_timeout = Duration::from_secs(10);
    let group = Arc::new(Group::with_workers(&cfg.upstreams[0], &Metrics::new(), 2));
    // This test's one thread plays worker 0, then worker 1. The other worker's connection is
    // the most recently used, which a single pool would lend first.
    let mine = pool_one(&group).await;
    kaguard::worker::set(1);
    let theirs = pool_one(&group).await;
    kaguard::worker::set(0);
    let checkout = || group.checkout(0, Instant::now(), Risk::Retryable);
    let own = checkout().expect("its own connection");
    let borrowed = checkout().expect("the other worker's");
    assert_eq!((own.meta.id, borrowed.meta.id), (mine, theirs));
    assert!(checkout().is_none());
    drop((own, borrowed));

    // Worker 1's connection is closed by the upstream while idle; its pool learns the
    // upstream's idle timeout, and worker 0's pool stops lending connections idle as long.
    kaguard::worker::set(1);
    pool_one(&group).await;
    kaguard::worker::set(0);
    let reaper = tokio::spawn(kaguard::proxy::group::reap(Arc::downgrade(&group)));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    pool_one(&group).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        checkout().is_none(),
        "idle 900 ms, past the 800 ms budget learned from the other worker's close"
    );
    reaper.abort();
}
