//! Wiring: binds the listeners, starts the proxy and the admin listener, and shuts down
//! gracefully.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

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
    let mut listeners = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: *addr,
                source,
            })?;
        listeners.push(listener);
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
    for listener in listeners {
        listen.push(
            listener
                .local_addr()
                .expect("a bound listener has an address"),
        );
        tokio::spawn(downstream.clone().serve(listener));
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
    let running = start(config).await?;
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
