//! Prometheus metrics. Names and labels are a contract, pinned by a test.
//!
//! Every series a request touches is created at start-up and kept as a handle, so the
//! request path only increments atomics: no label lookup, no allocation.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use crate::retry::Cause;
use prometheus_client::registry::Registry;

use crate::reuse::Reason;

type Labels = Vec<(&'static str, String)>;

/// Why a pooled connection was dropped at checkout; a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The connection's own reads had already seen the close.
    Closed,
    /// The socket check found the upstream's FIN.
    Fin,
    /// The socket check found the upstream's RST.
    Rst,
    /// The socket check found bytes no request asked for.
    StrayBytes,
}

impl Dropped {
    const ALL: [Dropped; 4] = [
        Dropped::Closed,
        Dropped::Fin,
        Dropped::Rst,
        Dropped::StrayBytes,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Dropped::Closed => "closed",
            Dropped::Fin => "fin",
            Dropped::Rst => "rst",
            Dropped::StrayBytes => "stray_bytes",
        }
    }
}

/// Buckets of idle age at which upstreams close pooled connections: 10 ms to about 80 s,
/// which spans every app server default (Gunicorn 2 s .. Jetty 30 s) and tuned test setups.
fn idle_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.01, 2.0, 14)
}

/// Series of one upstream server.
#[derive(Clone, Debug)]
pub struct ServerMetrics {
    pub opened: Counter,
    pub connect_failed: Counter,
    pub reused: Counter,
    closed: Vec<Counter>,
    dropped: Vec<Counter>,
    /// Idle age at which the upstream closed pooled connections, in seconds.
    pub closed_idle_age: Histogram,
    /// The learned idle budget in seconds; 0 when nothing is learned.
    pub learned_idle_budget: Gauge<f64, AtomicU64>,
    /// The learned request cap; 0 when nothing is learned.
    pub learned_request_cap: Gauge,
    /// 1 while the server may take requests, 0 while passive or active health has it out.
    pub available: Gauge,
    /// Failures counted toward `max_fails`.
    pub failures: Counter,
    /// Active checks, failed and passed.
    checks: [Counter; 2],
}

impl ServerMetrics {
    pub fn closed(&self, reason: Reason) -> &Counter {
        &self.closed[reason.index()]
    }

    pub fn dropped(&self, cause: Dropped) -> &Counter {
        &self.dropped[Dropped::ALL
            .iter()
            .position(|c| *c == cause)
            .expect("ALL lists every cause")]
    }

    /// Active checks that `passed`, or failed.
    pub fn check(&self, passed: bool) -> &Counter {
        &self.checks[usize::from(passed)]
    }
}

/// The final outcome of a request that was retried; a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    /// A response came back in the end.
    Answered,
    /// The request failed in the end.
    Failed,
}

/// Series of one upstream group.
#[derive(Debug)]
pub struct GroupMetrics {
    name: String,
    /// `None` for the requests answered without a group, which have no servers.
    families: Option<ServerFamilies>,
    requests: [Counter; 5],
    pub pool_idle: Gauge,
    pub pool_in_use: Gauge,
    /// By server slot; a slot DNS gives a new address gets new series.
    servers: RwLock<Vec<Arc<ServerMetrics>>>,
    retries: Vec<Counter>,
    pub retry_budget_exhausted: Counter,
}

impl GroupMetrics {
    /// The series of server slot `server`.
    pub fn server(&self, server: usize) -> Arc<ServerMetrics> {
        read(&self.servers)[server].clone()
    }

    /// Gives slot `server` (an existing one, or the next) the series of the server `label`.
    pub fn set_server(&self, server: usize, label: &str) {
        let Some(families) = &self.families else {
            return;
        };
        let metrics = Arc::new(families.server(&self.name, label));
        let mut servers = self.servers.write().unwrap_or_else(PoisonError::into_inner);
        if server < servers.len() {
            servers[server] = metrics;
        } else {
            servers.push(metrics);
        }
    }

    /// Counts one retry by its cause and the request's final outcome.
    pub fn retry(&self, cause: Cause, outcome: RetryOutcome) {
        let at = Cause::ALL
            .iter()
            .position(|c| *c == cause)
            .expect("ALL lists every cause")
            * 2
            + usize::from(outcome == RetryOutcome::Failed);
        if let Some(counter) = self.retries.get(at) {
            counter.inc();
        }
    }

    /// Counts a finished request by status class (1xx..5xx).
    pub fn request(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class].inc();
    }
}

/// Nothing panics while holding the lock, and a poisoned list is still whole.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The families of the per-server series, kept by each group so that servers DNS adds later
/// get their series too.
#[derive(Clone, Debug)]
struct ServerFamilies {
    opened: Family<Labels, Counter>,
    connect_failed: Family<Labels, Counter>,
    reused: Family<Labels, Counter>,
    closed: Family<Labels, Counter>,
    dropped: Family<Labels, Counter>,
    closed_idle_age: Family<Labels, Histogram>,
    learned_idle: Family<Labels, Gauge<f64, AtomicU64>>,
    learned_cap: Family<Labels, Gauge>,
    available: Family<Labels, Gauge>,
    failures: Family<Labels, Counter>,
    health_checks: Family<Labels, Counter>,
}

impl ServerFamilies {
    fn server(&self, group: &str, server: &str) -> ServerMetrics {
        let labels = || {
            vec![
                ("upstream", group.to_string()),
                ("server", server.to_string()),
            ]
        };
        ServerMetrics {
            opened: self.opened.get_or_create(&labels()).clone(),
            connect_failed: self.connect_failed.get_or_create(&labels()).clone(),
            reused: self.reused.get_or_create(&labels()).clone(),
            closed: Reason::ALL
                .iter()
                .map(|reason| {
                    let mut l = labels();
                    l.push(("reason", reason.as_str().to_string()));
                    self.closed.get_or_create(&l).clone()
                })
                .collect(),
            dropped: Dropped::ALL
                .iter()
                .map(|cause| {
                    let mut l = labels();
                    l.push(("cause", cause.as_str().to_string()));
                    self.dropped.get_or_create(&l).clone()
                })
                .collect(),
            closed_idle_age: self.closed_idle_age.get_or_create(&labels()).clone(),
            learned_idle_budget: self.learned_idle.get_or_create(&labels()).clone(),
            learned_request_cap: self.learned_cap.get_or_create(&labels()).clone(),
            available: {
                let gauge = self.available.get_or_create(&labels()).clone();
                gauge.set(1);
                gauge
            },
            failures: self.failures.get_or_create(&labels()).clone(),
            checks: ["fail", "pass"].map(|result| {
                let mut l = labels();
                l.push(("result", result.to_string()));
                self.health_checks.get_or_create(&l).clone()
            }),
        }
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    server: ServerFamilies,
    idle: Family<Labels, Gauge>,
    in_use: Family<Labels, Gauge>,
    retries: Family<Labels, Counter>,
    budget_exhausted: Family<Labels, Counter>,
    pub downstream_active: Gauge,
    pub downstream_accepted: Counter,
    pub downstream_parked: Gauge,
    pub access_log_dropped: Counter,
    /// Requests answered without an upstream (no route, bad request), by status class.
    pub local: GroupMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kaguard");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by upstream group and status class",
            requests.clone(),
        );
        let opened = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_connections_opened",
            "Upstream connections opened",
            opened.clone(),
        );
        let connect_failed = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_connect_failures",
            "Upstream connects that failed",
            connect_failed.clone(),
        );
        let reused = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_reuses",
            "Requests sent on a reused upstream connection",
            reused.clone(),
        );
        let closed = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_connections_closed",
            "Upstream connections closed, by reason",
            closed.clone(),
        );
        let idle = Family::<Labels, Gauge>::default();
        registry.register(
            "upstream_pool_idle",
            "Idle pooled upstream connections",
            idle.clone(),
        );
        let in_use = Family::<Labels, Gauge>::default();
        registry.register(
            "upstream_pool_in_use",
            "Upstream connections carrying a request",
            in_use.clone(),
        );
        let dropped = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_checkout_dropped",
            "Pooled connections found closed by the upstream at checkout, by cause",
            dropped.clone(),
        );
        let closed_idle_age = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(idle_buckets()) as Histogram
        });
        registry.register(
            "upstream_closed_idle_age_seconds",
            "Idle age at which the upstream closed pooled connections",
            closed_idle_age.clone(),
        );
        let learned_idle = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "upstream_learned_idle_budget_seconds",
            "Idle time after which kaguard stops reusing connections, learned from upstream closes; 0 if none",
            learned_idle.clone(),
        );
        let learned_cap = Family::<Labels, Gauge>::default();
        registry.register(
            "upstream_learned_request_cap",
            "Requests per connection learned from upstream closes; 0 if none",
            learned_cap.clone(),
        );
        let available = Family::<Labels, Gauge>::default();
        registry.register(
            "upstream_server_available",
            "1 while the server may take requests, 0 while health checks or max_fails have it out",
            available.clone(),
        );
        let failures = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_server_failures",
            "Failures counted toward max_fails",
            failures.clone(),
        );
        let health_checks = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_health_checks",
            "Active health checks, by result",
            health_checks.clone(),
        );
        let retries = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Requests sent again, by cause and final outcome",
            retries.clone(),
        );
        let budget_exhausted = Family::<Labels, Counter>::default();
        registry.register(
            "upstream_retry_budget_exhausted",
            "Retries refused because the group's retry budget was spent",
            budget_exhausted.clone(),
        );
        let downstream_active = Gauge::default();
        registry.register(
            "downstream_connections_active",
            "Open client connections",
            downstream_active.clone(),
        );
        let downstream_accepted = Counter::default();
        registry.register(
            "downstream_connections",
            "Client connections accepted",
            downstream_accepted.clone(),
        );
        let downstream_parked = Gauge::default();
        registry.register(
            "downstream_connections_parked",
            "Idle client connections holding only their socket, their HTTP state dropped until the client sends again",
            downstream_parked.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        let mut metrics = Metrics {
            registry,
            requests,
            server: ServerFamilies {
                opened,
                connect_failed,
                reused,
                closed,
                dropped,
                closed_idle_age,
                learned_idle,
                learned_cap,
                available,
                failures,
                health_checks,
            },
            idle,
            in_use,
            retries,
            budget_exhausted,
            downstream_active,
            downstream_accepted,
            downstream_parked,
            access_log_dropped,
            local: GroupMetrics {
                name: String::new(),
                families: None,
                requests: Default::default(),
                pool_idle: Gauge::default(),
                pool_in_use: Gauge::default(),
                servers: RwLock::default(),
                retries: vec![],
                retry_budget_exhausted: Counter::default(),
            },
        };
        metrics.local = metrics.group("-", &[]);
        metrics
    }

    /// Creates the series of one group and its servers.
    pub fn group(&self, group: &str, servers: &[String]) -> GroupMetrics {
        let g = || vec![("upstream", group.to_string())];
        let requests = CLASSES.map(|class| {
            let mut labels = g();
            labels.push(("status_class", class.to_string()));
            self.requests.get_or_create(&labels).clone()
        });
        let servers: Vec<Arc<ServerMetrics>> = servers
            .iter()
            .map(|server| Arc::new(self.server.server(group, server)))
            .collect();
        let mut retries = vec![];
        let mut retry_budget_exhausted = Counter::default();
        if !servers.is_empty() {
            for cause in Cause::ALL {
                for outcome in ["answered", "failed"] {
                    let mut l = g();
                    l.push(("cause", cause.as_str().to_string()));
                    l.push(("outcome", outcome.to_string()));
                    retries.push(self.retries.get_or_create(&l).clone());
                }
            }
            retry_budget_exhausted = self.budget_exhausted.get_or_create(&g()).clone();
        }
        let (pool_idle, pool_in_use) = if servers.is_empty() {
            (Gauge::default(), Gauge::default())
        } else {
            (
                self.idle.get_or_create(&g()).clone(),
                self.in_use.get_or_create(&g()).clone(),
            )
        };
        GroupMetrics {
            name: group.to_string(),
            families: Some(self.server.clone()),
            retries,
            retry_budget_exhausted,
            requests,
            pool_idle,
            pool_in_use,
            servers: RwLock::new(servers),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_stable() {
        let metrics = Metrics::new();
        let group = metrics.group("app", &["127.0.0.1:8000".to_string()]);
        group.request(200);
        group.server(0).opened.inc();
        group.server(0).closed(Reason::IdleTimeout).inc();
        group.server(0).check(true).inc();
        let text = metrics.render();
        for line in [
            r#"kaguard_requests_total{upstream="app",status_class="2xx"} 1"#,
            r#"kaguard_upstream_connections_opened_total{upstream="app",server="127.0.0.1:8000"} 1"#,
            r#"kaguard_upstream_connections_closed_total{upstream="app",server="127.0.0.1:8000",reason="idle_timeout"} 1"#,
            r#"kaguard_upstream_reuses_total{upstream="app",server="127.0.0.1:8000"} 0"#,
            r#"kaguard_upstream_connect_failures_total{upstream="app",server="127.0.0.1:8000"} 0"#,
            r#"kaguard_upstream_pool_idle{upstream="app"} 0"#,
            r#"kaguard_upstream_pool_in_use{upstream="app"} 0"#,
            "kaguard_downstream_connections_active 0",
            "kaguard_downstream_connections_total 0",
            "kaguard_downstream_connections_parked 0",
            "kaguard_access_log_dropped_total 0",
            r#"kaguard_upstream_checkout_dropped_total{upstream="app",server="127.0.0.1:8000",cause="fin"} 0"#,
            r#"kaguard_upstream_checkout_dropped_total{upstream="app",server="127.0.0.1:8000",cause="rst"} 0"#,
            r#"kaguard_upstream_closed_idle_age_seconds_count{upstream="app",server="127.0.0.1:8000"} 0"#,
            r#"kaguard_upstream_learned_idle_budget_seconds{upstream="app",server="127.0.0.1:8000"} 0"#,
            r#"kaguard_upstream_learned_request_cap{upstream="app",server="127.0.0.1:8000"} 0"#,
            r#"kaguard_upstream_retries_total{upstream="app",cause="reused_connection",outcome="answered"} 0"#,
            r#"kaguard_upstream_retry_budget_exhausted_total{upstream="app"} 0"#,
            r#"kaguard_upstream_server_available{upstream="app",server="127.0.0.1:8000"} 1"#,
            r#"kaguard_upstream_server_failures_total{upstream="app",server="127.0.0.1:8000"} 0"#,
            r#"kaguard_upstream_health_checks_total{upstream="app",server="127.0.0.1:8000",result="pass"} 1"#,
            r#"kaguard_upstream_health_checks_total{upstream="app",server="127.0.0.1:8000",result="fail"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
