//! A slot that DNS moves to another address while something still refers to the old one: a
//! connect under way, a failure, a check, a request in flight. Each test pins one way the old
//! address could leak into the new one. 127.0.0.1 and port 0 only.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use kaguard::config::{Config, ServerConfig, UpstreamGroupConfig};
use kaguard::metrics::Metrics;
use kaguard::pool::Risk;
use kaguard::proxy::group::{self, Group};
use kaguard::tools::upstream::Behaviour;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const NAME: &str = DNS_NAME;

fn named(addrs: &[SocketAddr]) -> ServerConfig {
    let mut server = ServerConfig::new(NAME, addrs[0]);
    server.addrs = addrs.to_vec();
    server
}

fn group_of(servers: Vec<ServerConfig>) -> UpstreamGroupConfig {
    UpstreamGroupConfig::with_defaults("app", servers)
}

async fn listen() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Polls `fut` once; `None` if it is still pending.
async fn poll_once<F: Future>(fut: Pin<&mut F>) -> Option<F::Output> {
    let mut fut = Some(fut);
    std::future::poll_fn(|cx| match fut.take().unwrap().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// A listener whose accept queue is full (backlog 0, one connection queued and not
/// accepted): a connect to it hangs, its SYNs dropped, until `dummy` is accepted.
async fn stalled_listener() -> (TcpListener, SocketAddr, TcpStream) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(0).unwrap();
    let a = l.local_addr().unwrap();
    let dummy = TcpStream::connect(a).await.unwrap();
    let probe = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(a)).await;
    assert!(
        probe.is_err(),
        "the full-backlog trick does not stall connects here"
    );
    (l, a, dummy)
}

/// Answers every request head on `stream` with a keep-alive 200, counting them.
async fn serve_counting(mut stream: TcpStream, count: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..end);
        count.fetch_add(1, Ordering::SeqCst);
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nA")
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn upstreams_json(kg: &Kaguard) -> serde_json::Value {
    let resp = get(kg.admin, "/upstreams").await;
    serde_json::from_slice(resp.body()).unwrap()
}

/// The `/upstreams` entries of group 0.
async fn slots(kg: &Kaguard) -> Vec<serde_json::Value> {
    upstreams_json(kg).await[0]["servers"]
        .as_array()
        .unwrap()
        .clone()
}

async fn wait_for(kg: &Kaguard, what: &str, ok: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = slots(kg).await;
        if ok(&s) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn kg_config(servers: Vec<ServerConfig>) -> Config {
    let mut cfg = config(&[servers[0].addrs[0]]);
    cfg.upstreams[0].servers = servers;
    cfg.upstreams[0].resolve_interval = Duration::from_millis(30);
    cfg
}

/// Moves slot 0 from `a` to `b` through an intermediate answer `c` while a connect to `a` is
/// under way: `[c]` drains slot 0 (nothing counted in flight during a connect), `[b]` reuses it.
async fn move_slot_zero(
    kg: &Kaguard,
    table: &DnsTable,
    a: SocketAddr,
    b: SocketAddr,
    c: SocketAddr,
) {
    table.set(&[c]);
    wait_for(kg, "slot 0 drains", |s| {
        s[0]["addr"] == a.to_string() && s[0]["draining"] == true
    })
    .await;
    table.set(&[b]);
    wait_for(kg, "slot 0 is reused for b", |s| {
        s[0]["addr"] == b.to_string() && s[0]["draining"] == false
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// A connect under way to the old address of a slot that DNS gives a new one: the connection
// it yields is never pooled under the slot, and never reaches a request for the new address.

#[tokio::test]
async fn a_connection_to_the_old_address_is_not_pooled_under_the_reused_slot() {
    let (_la, a) = listen().await;
    let (_lb, b) = listen().await;
    let (_lc, c) = listen().await;
    let metrics = Metrics::new();
    let g = Arc::new(Group::new(&group_of(vec![named(&[a])]), &metrics));
    let i = g.pick(None, Instant::now()).unwrap();
    let mut connecting = Box::pin(g.connect(i, g.server_addr(i)));
    assert!(
        poll_once(connecting.as_mut()).await.is_none(),
        "connect to {a} under way"
    );
    g.resolved(0, &[c]);
    g.resolved(0, &[b]);
    assert_eq!(g.server_addr(i), b, "slot {i} now stands for b");
    let lease = connecting.await.expect("connected");
    assert_eq!(lease.conn().addr, a);
    lease.release(true, true, Instant::now());
    if let Some(reused) = g.checkout(i, Instant::now(), Risk::Retryable) {
        panic!(
            "slot {i} stands for {b}, but checkout lends a connection to {}",
            reused.conn().addr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_move_no_request_reaches_the_old_address_on_a_pooled_connection() {
    let (la, a, dummy) = stalled_listener().await;
    let b = upstream(Behaviour::default()).await;
    let c = upstream(Behaviour::default()).await;
    let table = Arc::new(DnsTable::default());
    table.set(&[a]);
    let mut cfg = kg_config(vec![named(&[a])]);
    cfg.upstreams[0].connect_timeout = Duration::from_secs(30);
    let kg = start_with(cfg, table.clone()).await;

    // R1 picks slot 0 (a); its connect hangs.
    let addr = kg.addr;
    let r1 = tokio::spawn(async move { get(addr, "/").await.status() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    move_slot_zero(&kg, &table, a, b.addr(), c.addr()).await;

    // Let the connect to a through, and answer R1 there.
    let a_count = Arc::new(AtomicUsize::new(0));
    drop(la.accept().await.unwrap());
    drop(dummy);
    let (conn, _) = tokio::time::timeout(PATIENCE, la.accept())
        .await
        .expect("kaguard's connect to a arrives")
        .unwrap();
    tokio::spawn(serve_counting(conn, a_count.clone()));
    assert_eq!(r1.await.unwrap(), 200);
    assert_eq!(a_count.load(Ordering::SeqCst), 1);

    // DNS says b only; every new request must go to b.
    let mut client = Client::connect(kg.addr).await;
    for _ in 0..3 {
        assert_eq!(client.get("/").await.status(), 200);
    }
    assert_eq!(
        (a_count.load(Ordering::SeqCst), b.requests()),
        (1, 3),
        "(requests at a, at b) after a left DNS"
    );
}

// ---------------------------------------------------------------------------------------
// A connect to the old address that fails is not counted against the new address in its
// slot.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connect_to_the_old_address_does_not_take_the_new_one_out() {
    let (la, a, dummy) = stalled_listener().await;
    let b = upstream(Behaviour::default()).await;
    let c = upstream(Behaviour::default()).await;
    let other = upstream(Behaviour::default()).await;
    let table = Arc::new(DnsTable::default());
    table.set(&[a]);
    let cfg = kg_config(vec![
        named(&[a]),
        ServerConfig::new(other.addr().to_string(), other.addr()),
    ]);
    let kg = start_with(cfg, table.clone()).await;

    let addr = kg.addr;
    let r1 = tokio::spawn(async move { get(addr, "/").await.status() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    move_slot_zero(&kg, &table, a, b.addr(), c.addr()).await;
    // a goes away: the connect's next SYN meets a RST.
    drop(la);
    drop(dummy);
    assert_eq!(r1.await.unwrap(), 200, "next upstream answers");

    let s = slots(&kg).await;
    assert_eq!(s[0]["addr"], b.addr().to_string());
    assert_eq!(
        (s[0]["available"].clone(), s[0]["failures"].clone()),
        (serde_json::json!(true), serde_json::json!(0)),
        "b never failed, yet: {s:?}"
    );
}

// ---------------------------------------------------------------------------------------
// nginx's group-of-one rule follows the addresses there are now, not those at load.

#[test]
fn a_name_down_to_one_address_in_a_group_of_one_is_never_taken_out() {
    let (a, b) = (
        SocketAddr::from(([127, 0, 0, 1], 1)),
        SocketAddr::from(([127, 0, 0, 1], 2)),
    );
    let metrics = Metrics::new();
    let g = Group::new(&group_of(vec![named(&[a, b])]), &metrics);
    g.resolved(0, &[a]);
    let now = Instant::now();
    g.server_failed(0, g.server_addr(0), now);
    assert!(
        g.pick(None, now).is_some(),
        "the group's only server is out: every request is a 502 for fail_timeout"
    );
}

#[test]
fn a_name_grown_from_one_address_applies_max_fails() {
    let (a, b) = (
        SocketAddr::from(([127, 0, 0, 1], 1)),
        SocketAddr::from(([127, 0, 0, 1], 2)),
    );
    let metrics = Metrics::new();
    let g = Group::new(&group_of(vec![named(&[a])]), &metrics);
    g.resolved(0, &[a, b]);
    let now = Instant::now();
    g.server_failed(0, g.server_addr(0), now);
    assert!(
        !g.servers.available(0, now),
        "two addresses now, but max_fails=1 does not take the failed one out"
    );
}

// ---------------------------------------------------------------------------------------
// A new slot becomes pickable only once its series and pool state exist: requests picking
// slots while DNS keeps adding them never panic.

#[test]
fn requests_picking_slots_while_dns_adds_them_never_panic() {
    const ROUNDS: usize = 300;
    let bg = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Listeners that accept and drop, so no accept queue fills.
    let addrs: Vec<SocketAddr> = (0..ROUNDS)
        .map(|_| {
            bg.block_on(async {
                let (l, a) = listen().await;
                tokio::spawn(async move {
                    while let Ok((s, _)) = l.accept().await {
                        drop(s);
                    }
                });
                a
            })
        })
        .collect();
    let metrics = Metrics::new();
    let g = Arc::new(Group::new(&group_of(vec![named(&[addrs[0]])]), &metrics));
    let stop = Arc::new(AtomicBool::new(false));
    let picker = {
        let (g, stop) = (g.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && n < 2_000_000 {
                n += 1;
                if let Some(i) = g.pick(None, Instant::now()) {
                    drop(rt.block_on(g.connect(i, g.server_addr(i))));
                }
            }
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Each round a request stays in flight on the current address, DNS moves the name to
    // the next one, and the next address takes a new slot (no drained slot is free).
    let mut held = Vec::new();
    for next in &addrs[1..] {
        let i = g.pick(None, Instant::now()).unwrap();
        held.push(
            rt.block_on(g.connect(i, g.server_addr(i)))
                .expect("connect"),
        );
        g.resolved(0, &[*next]);
        if picker.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let joined = picker.join();
    assert!(
        joined.is_ok(),
        "a request that picked a just-added slot panicked (see the panic above)"
    );
}

// ---------------------------------------------------------------------------------------
// An address back in DNS while its old slot still drains takes that slot again, so its
// series says it is available.

#[tokio::test]
async fn an_address_back_while_its_old_slot_drains_takes_that_slot_again() {
    let (_lx, x) = listen().await;
    let (_la, a) = listen().await;
    let (_ly, y) = listen().await;
    let metrics = Metrics::new();
    let g = Arc::new(Group::new(&group_of(vec![named(&[x, a])]), &metrics));
    assert_eq!(g.server_addr(1), a);
    let _in_flight = g.connect(1, g.server_addr(1)).await.expect("connect to a");
    g.resolved(0, &[y]);
    g.resolved(0, &[y, a]);
    assert!(g.servers.stands_for(1, a), "a takes its drained slot again");
    assert!(!g.servers.listed(0), "x stays drained");
    assert!(g.servers.available(1, Instant::now()), "a takes requests");
    tokio::spawn(group::reap(Arc::downgrade(&g)));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let series = format!(r#"kaguard_upstream_server_available{{upstream="app",server="{a}"}} "#);
    let text = metrics.render();
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .expect("series present");
    assert_eq!(
        value.trim(),
        "1",
        "{a} is available, its gauge says {value}"
    );
}
