//! Several workers: each listens on the same port (SO_REUSEPORT) on a runtime of its own, and
//! shutdown drains them all.

mod support;

use std::sync::Arc;
use std::time::Duration;

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
