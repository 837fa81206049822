//! The admin listener: Prometheus text at `/metrics`, liveness at `/healthz`, the upstream
//! servers and their health at `/upstreams` (JSON).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use serde::Serialize;

use crate::config::Balance;
use crate::downstream::Shutdown;
use crate::proxy::Proxy;
use crate::proxy::body::ResponseBody;
use crate::proxy::group::Group;

/// Serves admin requests until shutdown begins.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: Arc<Shutdown>) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.begun() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = answer(&req, &proxy, &shutdown);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(req: &Request<Incoming>, proxy: &Proxy, shutdown: &Shutdown) -> Response<ResponseBody> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            proxy.metrics().render(),
        ),
        "/healthz" if shutdown.is_begun() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".into(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/upstreams" => (
            StatusCode::OK,
            "application/json",
            upstreams(proxy.groups()),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    let mut resp = Response::new(ResponseBody::local(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// One upstream group in `/upstreams`. The field names are a contract, pinned by a test.
#[derive(Serialize)]
struct UpstreamView<'a> {
    upstream: &'a str,
    balance: &'static str,
    servers: Vec<ServerView<'a>>,
}

/// One server of a group in `/upstreams`.
#[derive(Serialize)]
struct ServerView<'a> {
    /// The server as the config names it; several addresses share a name that resolves to
    /// each of them.
    name: &'a str,
    addr: String,
    /// The address left its name's DNS answer: requests in flight finish, no new one comes.
    draining: bool,
    weight: u32,
    /// Whether it may take requests now: neither `max_fails` nor active checks have it out.
    available: bool,
    in_flight: u32,
    /// `"up"` or `"down"` by the active checks; `"off"` when the group has none.
    active_check: &'static str,
    /// Failures counted toward `max_fails` since start, as
    /// `kaguard_upstream_server_failures_total` counts them.
    failures: u64,
}

/// The groups and their servers as JSON, one line.
fn upstreams(groups: &[Arc<Group>]) -> String {
    let view: Vec<UpstreamView<'_>> = groups.iter().map(|g| group_view(g)).collect();
    let mut text = serde_json::to_string(&view).expect("the view serializes to JSON");
    text.push('\n');
    text
}

fn group_view(group: &Group) -> UpstreamView<'_> {
    let now = Instant::now();
    let servers = &group.servers;
    UpstreamView {
        upstream: &group.name,
        balance: balance_name(servers.balance()),
        servers: (0..servers.len())
            .map(|i| ServerView {
                name: servers.name(i),
                addr: servers.addr(i).to_string(),
                draining: !servers.listed(i),
                weight: servers.weight(i),
                available: servers.available(i, now),
                in_flight: servers.in_flight(i),
                active_check: match servers.active(i) {
                    None => "off",
                    Some(true) => "up",
                    Some(false) => "down",
                },
                failures: group.metrics.server(i).failures.get(),
            })
            .collect(),
    }
}

/// `balance` as the config file writes it.
fn balance_name(balance: Balance) -> &'static str {
    match balance {
        Balance::RoundRobin => "round_robin",
        Balance::LeastConn => "least_conn",
        Balance::P2cLoad => "p2c_load",
        Balance::P2cEwma => "p2c_ewma",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, HealthCheckConfig};
    use crate::metrics::Metrics;

    fn config() -> Config {
        Config::from_cli(
            &["127.0.0.1:0".to_string()],
            &["127.0.0.1:3000".to_string(), "127.0.0.1:3001".to_string()],
        )
        .expect("valid config")
    }

    #[test]
    fn upstreams_view_names_its_fields_as_documented() {
        let mut cfg = config();
        cfg.upstreams[0].health_check = Some(HealthCheckConfig::default());
        cfg.upstreams[0].servers[1].weight = 3;
        let metrics = Metrics::new();
        let group = Arc::new(Group::new(&cfg.upstreams[0], &metrics));
        for _ in 0..HealthCheckConfig::default().falls {
            group.server_checked(1, group.server_addr(1), false, Instant::now());
        }
        group.server_failed(1, group.server_addr(1), Instant::now());
        let expected = r#"[{"upstream":"default","balance":"round_robin","servers":[{"name":"127.0.0.1:3000","addr":"127.0.0.1:3000","draining":false,"weight":1,"available":true,"in_flight":0,"active_check":"up","failures":0},{"name":"127.0.0.1:3001","addr":"127.0.0.1:3001","draining":false,"weight":3,"available":false,"in_flight":0,"active_check":"down","failures":1}]}]"#;
        assert_eq!(upstreams(&[group]), format!("{expected}\n"));
    }

    #[test]
    fn active_check_is_off_without_a_health_check_table() {
        let cfg = config();
        let metrics = Metrics::new();
        let group = Arc::new(Group::new(&cfg.upstreams[0], &metrics));
        assert_eq!(group_view(&group).servers[0].active_check, "off");
    }

    #[test]
    fn balance_names_are_the_config_file_names() {
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::P2cLoad,
            Balance::P2cEwma,
        ] {
            let mut cfg = config();
            cfg.upstreams[0].balance = balance;
            let toml = cfg.to_toml();
            let line = format!("balance = \"{}\"", balance_name(balance));
            assert!(toml.contains(&line), "{line} not in\n{toml}");
        }
    }
}
