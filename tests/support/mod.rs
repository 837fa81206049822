//! Test support: kaguard and test upstreams in-process on 127.0.0.1 port 0, real clients.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use kaguard::config::{AccessLog, Config};
use kaguard::server::Running;
use kaguard::tools::upstream::{Behaviour, TestUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a connection of `group` to its first server, makes one exchange on it and returns
/// it to the pool; returns the connection's id.
pub async fn pool_one(group: &std::sync::Arc<kaguard::proxy::group::Group>) -> u64 {
    let mut lease = group
        .connect(0, group.server_addr(0))
        .await
        .expect("connects");
    lease.meta.requests += 1;
    let mut headers = http::HeaderMap::new();
    headers.insert("host", http::HeaderValue::from_static("t"));
    lease
        .conn_mut()
        .round_trip(
            &http::Method::GET,
            &http::Uri::from_static("/"),
            &headers,
            kaguard::proxy::body::RequestBody::empty(),
        )
        .await
        .expect("a whole response");
    let id = lease.meta.id;
    lease.release(true, true, std::time::Instant::now());
    id
}

/// Every wait in the tests is bounded by this; generous because CI has two busy cores.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub async fn upstream(behaviour: Behaviour) -> TestUpstream {
    TestUpstream::start("127.0.0.1:0".parse().unwrap(), behaviour)
        .await
        .expect("test upstream starts")
}

/// `n` test upstreams alike, as most tests with several servers need.
pub async fn several(n: usize, behaviour: Behaviour) -> Vec<TestUpstream> {
    let mut ups = Vec::with_capacity(n);
    for _ in 0..n {
        ups.push(upstream(behaviour.clone()).await);
    }
    ups
}

/// Their addresses, in order.
pub fn addrs_of(ups: &[TestUpstream]) -> Vec<SocketAddr> {
    ups.iter().map(TestUpstream::addr).collect()
}

/// A config with every default, one group "default" holding `servers`.
pub fn config(servers: &[SocketAddr]) -> Config {
    let servers: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
    Config::from_cli(&["127.0.0.1:0".to_string()], &servers).expect("valid config")
}

pub struct Kaguard {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    running: Option<Running>,
}

static LOG_SERIAL: AtomicU64 = AtomicU64::new(0);

/// Starts kaguard with `config`, an admin listener and an access log in a temp file.
pub async fn start(config: Config) -> Kaguard {
    start_with(config, std::sync::Arc::new(kaguard::resolve::System)).await
}

/// [`start`], with server names resolved by `resolver`.
pub async fn start_with(mut config: Config, resolver: kaguard::resolve::Resolver) -> Kaguard {
    let log = std::env::temp_dir().join(format!(
        "kaguard-test-{}-{}.log",
        std::process::id(),
        LOG_SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&log);
    config.access_log = AccessLog::File(log.clone());
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    let running = kaguard::server::start_with(&config, resolver)
        .await
        .expect("kaguard starts");
    Kaguard {
        addr: running.listen[0],
        admin: running.admin.unwrap(),
        log,
        running: Some(running),
    }
}

impl Kaguard {
    pub async fn shutdown(&mut self) -> bool {
        self.running.take().expect("running").shutdown().await
    }

    /// The Prometheus text from the admin listener.
    pub async fn metrics(&self) -> String {
        let resp = get(self.admin, "/metrics").await;
        String::from_utf8(resp.body().to_vec()).unwrap()
    }

    /// The value of one series, 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    /// Waits, within [`PATIENCE`], until `series` reads `value`.
    pub async fn metric_reaches(&self, series: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.metric(series).await != value {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} never reached {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Access log lines written so far, parsed; waits (bounded) until at least `n` exist.
    pub async fn log_lines(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("each line is JSON"))
                .collect();
            if lines.len() >= n || tokio::time::Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Kaguard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A keep-alive client connection.
pub struct Client {
    sender: http1::SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Client { sender, task }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Response<Bytes> {
        tokio::time::timeout(PATIENCE, async {
            self.sender.ready().await.expect("connection ready");
            let resp = self.sender.send_request(req).await.expect("response");
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            Response::from_parts(parts, body)
        })
        .await
        .expect("request finishes in time")
    }

    pub async fn sender_ready(&mut self) {
        let _ = self.sender.ready().await;
    }

    /// Sends and returns the transport error instead of panicking on it.
    pub async fn try_send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<StatusCode, hyper::Error> {
        self.sender.send_request(req).await.map(|r| r.status())
    }

    pub async fn get(&mut self, path: &str) -> Response<Bytes> {
        self.send(
            Request::get(path)
                .header("host", "test")
                .body(Full::default())
                .unwrap(),
        )
        .await
    }

    pub async fn post(&mut self, path: &str, body: &'static [u8]) -> Response<Bytes> {
        let req = Request::post(path)
            .header("host", "test")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        self.send(req).await
    }

    /// Whether the server closed the connection, waiting up to `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            while !self.task.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_ok()
    }
}

/// One GET on a new connection.
pub async fn get(addr: SocketAddr, path: &str) -> Response<Bytes> {
    Client::connect(addr).await.get(path).await
}

/// Writes raw bytes on a new connection and returns everything read until the server
/// closes or goes quiet for a while.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_millis(1500), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn status_of(raw: &str) -> Option<u16> {
    raw.split(' ').nth(1)?.parse().ok()
}

pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub fn empty() -> Empty<Bytes> {
    Empty::new()
}

pub fn ok(status: StatusCode) -> bool {
    status.is_success()
}

/// An upstream that reads one request head per connection (no body), answers with exactly
/// `response`, whatever framing those bytes promise, and closes with FIN. For what the test
/// upstream cannot produce: a body cut short, arbitrary response headers. Returns its address
/// and the number of connections it accepted; it stops with the test's runtime.
pub async fn scripted_upstream(response: &'static [u8]) -> (SocketAddr, std::sync::Arc<AtomicU64>) {
    let (addr, accepted, _) = recording_upstream(response).await;
    (addr, accepted)
}

/// The head of every request a [`recording_upstream`] read, in the order read.
pub type Heads = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// A [`scripted_upstream`] that also keeps the bytes of each request head as they came.
pub async fn recording_upstream(
    response: &'static [u8],
) -> (SocketAddr, std::sync::Arc<AtomicU64>, Heads) {
    let heads = Heads::default();
    let kept = heads.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind scripted upstream");
    let addr = listener.local_addr().expect("bound address");
    let accepted = std::sync::Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 && head.len() < 64 * 1024 => {
                            head.extend_from_slice(&buf[..n])
                        }
                        _ => return,
                    }
                }
                let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
                kept.lock().unwrap().push(head[..end + 4].to_vec());
                let _ = stream.write_all(response).await;
                let _ = stream.shutdown().await;
                // Wait (bounded) for the peer to close, so nothing unread turns our close into RST.
                let _ = tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await;
            });
        }
    });
    (addr, accepted, heads)
}

/// A test upstream on its own runtime and threads, as a separate server process would be,
/// so its timers and the proxy's do not share a scheduler.
pub struct Isolated {
    pub up: TestUpstream,
    rt: Option<tokio::runtime::Runtime>,
}

impl Isolated {
    pub fn start(behaviour: Behaviour) -> Isolated {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let up = rt
                .block_on(TestUpstream::start(
                    "127.0.0.1:0".parse().unwrap(),
                    behaviour,
                ))
                .expect("test upstream starts");
            Isolated { up, rt: Some(rt) }
        })
        .join()
        .expect("upstream thread")
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The name the DNS tests give their one server.
pub const DNS_NAME: &str = "app.test:80";

/// A resolver answering `DNS_NAME` from a table the test changes (every address 127.0.0.1,
/// told apart by port); a name it lacks fails to resolve. Counts lookups.
#[derive(Default)]
pub struct DnsTable {
    answers: std::sync::Mutex<std::collections::HashMap<String, Vec<SocketAddr>>>,
    pub lookups: AtomicU64,
}

impl DnsTable {
    pub fn set(&self, addrs: &[SocketAddr]) {
        self.answers
            .lock()
            .unwrap()
            .insert(DNS_NAME.into(), addrs.to_vec());
    }

    pub fn fail(&self) {
        self.answers.lock().unwrap().remove(DNS_NAME);
    }
}

impl kaguard::resolve::Resolve for DnsTable {
    fn resolve<'a>(&'a self, name: &'a str) -> kaguard::resolve::Lookup<'a> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let addrs = self.answers.lock().unwrap().get(name).cloned();
        Box::pin(async move {
            let addrs = addrs.ok_or_else(|| std::io::Error::other("no such name"))?;
            Ok(kaguard::resolve::Answer { addrs, ttl: None })
        })
    }
}
