//! Wiring: binds the listeners, starts the proxy and the admin listener, and shuts down
//! gracefully.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::runtime::Handle;

use crate::access_log::{AccessLog, Writer};
use crate::config::{self, Config};
use crate::downstream::{Downstream, Shutdown};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::resolve::{Resolver, System};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listen {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("access_log {path}: {source}")]
    AccessLog { path: String, source: io::Error },
}

/// Pending connections the kernel queues per listener before accepting: Linux's default
/// `somaxconn` since 5.4, and what tokio's own `bind` asks for.
const BACKLOG: i32 = 1024;

/// A non-blocking listener on `addr`; with `shared`, others may bind the same address
/// (`SO_REUSEPORT`), one per worker.
fn bind(addr: SocketAddr, shared: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // As tokio's and std's own bind: a restart must not wait out TIME_WAIT.
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// How long shutdown waits for the access log to flush its last lines.
const LOG_FLUSH_WAIT: Duration = Duration::from_secs(2);

/// A started kaguard.
pub struct Running {
    /// The bound client listeners, in config order (port 0 resolved).
    pub listen: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub proxy: Arc<Proxy>,
    shutdown: Arc<Shutdown>,
    drain_timeout: Duration,
    log_writer: Writer,
}

/// Binds everything and starts serving; returns once every listener is bound.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    start_with(config, Arc::new(System)).await
}

/// [`start`], resolving servers given by name with `resolver` instead of the system's.
pub async fn start_with(config: &Config, resolver: Resolver) -> Result<Running, StartError> {
    start_on(config, resolver, &[]).await
}

/// [`start_with`], accepting clients on the runtime that calls it and on each of `workers`
/// too: every listen address is bound once per runtime with `SO_REUSEPORT`, so the kernel
/// spreads new connections over them, and each connection stays on the runtime that accepted
/// it. Background tasks (reapers, checks, DNS) run on the calling runtime.
pub async fn start_on(
    config: &Config,
    resolver: Resolver,
    workers: &[Handle],
) -> Result<Running, StartError> {
    let shared = !workers.is_empty();
    let mut listeners = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
        let bind_error = |source| StartError::Bind {
            addr: *addr,
            source,
        };
        let first = bind(*addr, shared).map_err(bind_error)?;
        // Port 0 picks a port once; every runtime's listener takes that one.
        let port = first.local_addr().map_err(bind_error)?.port();
        let mut others = Vec::with_capacity(workers.len());
        for _ in workers {
            others.push(bind(SocketAddr::new(addr.ip(), port), true).map_err(bind_error)?);
        }
        listeners.push((first, others));
    }
    let admin = match config.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let (log, log_writer) = match &config.access_log {
        config::AccessLog::Off => AccessLog::off(),
        config::AccessLog::Stdout => AccessLog::open(None, metrics.access_log_dropped.clone())
            .map_err(|source| StartError::AccessLog {
                path: "stdout".into(),
                source,
            })?,
        config::AccessLog::File(path) => {
            AccessLog::open(Some(path), metrics.access_log_dropped.clone()).map_err(|source| {
                StartError::AccessLog {
                    path: path.display().to_string(),
                    source,
                }
            })?
        }
    };
    let shutdown = Arc::new(Shutdown::default());
    let proxy = Arc::new(Proxy::new(config, log, metrics.clone()));
    proxy.spawn_tasks(&resolver);
    let downstream = Arc::new(Downstream::new(
        &config.downstream,
        proxy.clone(),
        shutdown.clone(),
    ));
    let mut listen = Vec::with_capacity(listeners.len());
    for (first, others) in listeners {
        let addr = first.local_addr().expect("a bound listener has an address");
        listen.push(addr);
        let first =
            TcpListener::from_std(first).map_err(|source| StartError::Bind { addr, source })?;
        tokio::spawn(downstream.clone().serve(first));
        for (listener, worker) in others.into_iter().zip(workers) {
            let downstream = downstream.clone();
            // Registered from inside the worker's runtime, whose reactor then watches it.
            worker.spawn(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => downstream.serve(listener).await,
                    Err(error) => tracing::error!(%addr, %error, "a worker cannot listen"),
                }
            });
        }
    }
    let admin_addr = admin
        .as_ref()
        .map(|l| l.local_addr().expect("a bound listener has an address"));
    if let Some(listener) = admin {
        tokio::spawn(crate::admin::serve(
            listener,
            proxy.clone(),
            shutdown.clone(),
        ));
    }
    Ok(Running {
        listen,
        admin: admin_addr,
        proxy,
        shutdown,
        drain_timeout: config.drain_timeout,
        log_writer,
    })
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), closes idle
    /// connections on both sides and flushes the access log. Returns whether every client
    /// connection closed in time.
    pub async fn shutdown(self) -> bool {
        self.shutdown.begin();
        let drained = tokio::time::timeout(self.drain_timeout, self.shutdown.all_closed())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                open = self.shutdown.open(),
                "drain timeout reached; closing remaining client connections"
            );
        }
        self.proxy.drain_pools();
        let Running {
            proxy, log_writer, ..
        } = self;
        // The proxy holds the last access log handle; the writer flushes once it is gone.
        drop(proxy);
        // Connections still open after the drain timeout keep handles too; don't wait on them.
        let flushed = tokio::task::spawn_blocking(move || log_writer.finish());
        let _ = tokio::time::timeout(LOG_FLUSH_WAIT, flushed).await;
        drained
    }
}

/// Runs until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run(config: &Config) -> Result<bool, StartError> {
    run_on(config, &[]).await
}

/// [`run`], with clients accepted on `workers` too (see [`start_on`]).
pub async fn run_on(config: &Config, workers: &[Handle]) -> Result<bool, StartError> {
    let running = start_on(config, Arc::new(System), workers).await?;
    for addr in &running.listen {
        tracing::info!("kaguard listening on {addr}");
    }
    if let Some(addr) = running.admin {
        tracing::info!("admin listening on {addr} (/metrics, /healthz, /upstreams)");
    }
    wait_for_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    Ok(running.shutdown().await)
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
