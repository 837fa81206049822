//! One request: route -> checkout -> send -> stream back -> checkin or close.
//!
//! This is the only module that knows both sides. Policy lives in [`crate::reuse`] (may a
//! connection carry another request) and in the failure types of [`crate::error`].

pub mod body;
pub mod group;
pub mod headers;

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use crate::access_log::{self, AccessLog, Entry};
use crate::config::Config;
use crate::error::Failure;
use crate::metrics::Metrics;
use crate::route::Router;
use crate::upstream::{self, UpstreamConn};
use body::{End, OnEnd, RequestBody, ResponseBody};
use group::{Group, Lease};

/// Request body bytes read before the upstream is contacted: enough for nearly every API
/// request to be checked whole (framing, size) and replayable, small enough that a slow
/// upload is not held back noticeably.
const BODY_PREFETCH: usize = 64 * 1024;

/// What the downstream side knows about the client and this request's place on its connection.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    pub addr: SocketAddr,
    /// Serial of the client connection.
    pub connection: u64,
    /// Requests on the client connection, this one included.
    pub requests: u64,
    /// The raw request head carried both Content-Length and Transfer-Encoding.
    pub conflicting_framing: bool,
}

/// The proxy: routes, upstream groups with their pools, the access log and metrics.
pub struct Proxy {
    groups: Vec<Arc<Group>>,
    router: Router,
    log: AccessLog,
    metrics: Arc<Metrics>,
    max_body_size: u64,
    client_body_timeout: Duration,
}

impl Proxy {
    pub fn new(config: &Config, log: AccessLog, metrics: Arc<Metrics>) -> Proxy {
        let groups = config
            .upstreams
            .iter()
            .map(|g| Arc::new(Group::new(g, &metrics)))
            .collect();
        Proxy {
            groups,
            router: Router::new(&config.routes, &config.upstreams),
            log,
            metrics,
            max_body_size: config.downstream.max_body_size,
            client_body_timeout: config.downstream.client_body_timeout,
        }
    }

    pub fn groups(&self) -> &[Arc<Group>] {
        &self.groups
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Starts the per-group tasks that close idle connections kaguard no longer trusts.
    pub fn spawn_reapers(&self) {
        for group in &self.groups {
            tokio::spawn(group::reap(Arc::downgrade(group)));
        }
    }

    /// Closes every idle upstream connection (shutdown).
    pub fn drain_pools(&self) {
        for group in &self.groups {
            group.drain();
        }
    }

    /// Proxies one request.
    pub async fn handle(&self, req: Request<Incoming>, client: Client) -> Response<ResponseBody> {
        let start = Instant::now();
        let mut entry = Entry {
            timestamp: Some(SystemTime::now()),
            remote_addr: client.addr.ip().to_string(),
            connection: client.connection,
            connection_requests: client.requests,
            request: format!("{} {} {:?}", req.method(), req.uri(), req.version()),
            http_user_agent: req
                .headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            ..Entry::default()
        };

        if client.conflicting_framing {
            entry.response_details = "conflicting_content_length_and_transfer_encoding".into();
            return self.local(StatusCode::BAD_REQUEST, None, entry, start);
        }
        let host = request_host(&req);
        let Some(index) = self.router.find(host.as_deref(), req.uri().path()) else {
            entry.flag("NR");
            entry.response_details = "route_not_found".into();
            return self.local(StatusCode::NOT_FOUND, None, entry, start);
        };
        let group = self.groups[index].clone();
        entry.upstream = Some(group.name.clone());

        let (mut parts, incoming) = req.into_parts();
        let fwd = headers::Forwarded {
            client_ip: client.addr.ip(),
            host: host.as_deref(),
        };
        let request_id = headers::to_upstream(&mut parts.headers, &fwd, group.reuse());
        entry.request_id = request_id.to_str().unwrap_or("").to_string();
        parts.uri = origin_form(&parts.uri);
        parts.version = Version::HTTP_11;

        let body = match RequestBody::prefetch(
            incoming,
            BODY_PREFETCH,
            self.max_body_size,
            self.client_body_timeout,
        )
        .await
        {
            Ok(body) => body,
            Err(err) => {
                tracing::info!(client = %client.addr.ip(), request = %entry.request, "{err}");
                entry.flag("DC");
                entry.response_details = "downstream_request_body_failed".into();
                return self.local(err.status(), None, entry, start);
            }
        };

        match self
            .exchange(&group, Request::from_parts(parts, body), &mut entry)
            .await
        {
            Ok((resp, lease, sent_at)) => self.respond(resp, lease, &group, entry, start, sent_at),
            Err(failure) => {
                tracing::error!(
                    client = %client.addr.ip(),
                    request = %entry.request,
                    upstream = entry.upstream_addr.as_deref().unwrap_or("-"),
                    "{failure}"
                );
                entry.flag(failure.flag());
                entry.response_details = failure.details().into();
                self.local(failure.status(), Some(group), entry, start)
            }
        }
    }

    /// Sends the request upstream, on a pooled connection or a new one. A request the
    /// upstream provably never received is sent again, once, on a new connection.
    async fn exchange(
        &self,
        group: &Arc<Group>,
        mut req: Request<RequestBody>,
        entry: &mut Entry,
    ) -> Result<(Response<Incoming>, Lease, Instant), Failure> {
        let server = group.pick();
        let mut fresh_only = false;
        loop {
            entry.attempts += 1;
            let attempt_start = Instant::now();
            let mut lease = if fresh_only {
                None
            } else {
                group.checkout(server, attempt_start)
            };
            if lease.is_none() {
                entry.upstream_addr = Some(group.server_addr(server).to_string());
                lease = Some(group.connect(server).await?);
                entry.upstream_connect_time = Some(access_log::seconds(attempt_start.elapsed()));
            }
            let mut lease = lease.expect("set above");
            entry.upstream_addr = Some(lease.conn().addr.to_string());
            entry.upstream_connection_reused = Some(lease.reused);
            entry.upstream_connection_idle_ms = Some(lease.idle_for.as_millis() as u64);
            entry.upstream_connection_requests = Some(lease.meta.requests + 1);
            let reused = lease.reused;
            let outcome = send(lease.conn_mut(), req, group.read_timeout, reused).await;
            lease.meta.requests += 1;
            match outcome {
                Ok(resp) => return Ok((resp, lease, attempt_start)),
                Err((failure, returned)) => {
                    lease.fail();
                    match returned {
                        Some(next) if !fresh_only => {
                            tracing::info!(upstream = %lease.conn().addr, "{failure}; sending again on a new connection");
                            entry.flag("URX");
                            fresh_only = true;
                            req = next;
                        }
                        _ => return Err(failure),
                    }
                }
            }
        }
    }

    fn respond(
        &self,
        resp: Response<Incoming>,
        lease: Lease,
        group: &Arc<Group>,
        mut entry: Entry,
        start: Instant,
        sent_at: Instant,
    ) -> Response<ResponseBody> {
        let (mut parts, incoming) = resp.into_parts();
        let upstream_keep_alive = headers::wants_keep_alive(parts.version, &parts.headers);
        headers::remove_hop_by_hop(&mut parts.headers);
        entry.status = parts.status.as_u16();
        entry.upstream_status = Some(entry.status);
        let finish = Finish {
            entry,
            start,
            sent_at: Some(sent_at),
            lease: Some((lease, upstream_keep_alive)),
            group: Some(group.clone()),
            log: self.log.clone(),
            metrics: self.metrics.clone(),
        };
        let body = ResponseBody::upstream(incoming, group.read_timeout).on_end(Box::new(finish));
        Response::from_parts(parts, body)
    }

    /// A response kaguard writes itself.
    fn local(
        &self,
        status: StatusCode,
        group: Option<Arc<Group>>,
        mut entry: Entry,
        start: Instant,
    ) -> Response<ResponseBody> {
        entry.status = status.as_u16();
        let text = format!(
            "{} {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        let finish = Finish {
            entry,
            start,
            sent_at: None,
            lease: None,
            group,
            log: self.log.clone(),
            metrics: self.metrics.clone(),
        };
        let mut resp = Response::new(ResponseBody::local(text).on_end(Box::new(finish)));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        resp
    }
}

type Returned = Option<Request<RequestBody>>;

/// Sends `req` on `conn`, failing if no byte moves for `read_timeout`.
async fn send(
    conn: &mut UpstreamConn,
    req: Request<RequestBody>,
    read_timeout: Duration,
    reused: bool,
) -> Result<Response<Incoming>, (Failure, Returned)> {
    let ready = tokio::time::timeout(read_timeout, conn.ready()).await;
    if !matches!(ready, Ok(Ok(()))) {
        return Err((Failure::NotSent { reused }, Some(req)));
    }
    let mark = conn.mark();
    let sent_at = Instant::now();
    let mut fut = pin!(conn.send(req));
    loop {
        let deadline = conn.last_progress().max(sent_at) + read_timeout;
        tokio::select! {
            res = &mut fut => {
                return match res {
                    Ok(resp) => Ok(resp),
                    Err(mut err) => {
                        let returned = err.take_message();
                        let failure = if returned.is_some() {
                            Failure::NotSent { reused }
                        } else {
                            upstream::classify(err.error(), conn, mark, reused)
                        };
                        Err((failure, returned))
                    }
                };
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                if conn.last_progress().max(sent_at) + read_timeout <= Instant::now() {
                    return Err((Failure::ReadTimeout(read_timeout), None));
                }
            }
        }
    }
}

/// Ends one request: returns the upstream connection or closes it, counts, logs.
struct Finish {
    entry: Entry,
    start: Instant,
    sent_at: Option<Instant>,
    lease: Option<(Lease, bool)>,
    group: Option<Arc<Group>>,
    log: AccessLog,
    metrics: Arc<Metrics>,
}

impl OnEnd for Finish {
    fn on_end(mut self: Box<Self>, end: End, body_bytes: u64) {
        let now = Instant::now();
        if let Some((lease, upstream_keep_alive)) = self.lease.take() {
            lease.release(end == End::Complete, upstream_keep_alive, now);
        }
        let mut entry = std::mem::take(&mut self.entry);
        match end {
            End::Complete => {}
            End::UpstreamFailed => {
                entry.flag("UC");
                entry.response_details =
                    "upstream_reset_after_response_started{connection_termination}".into();
            }
            End::Abandoned => {
                entry.flag("DC");
                entry.response_details = "downstream_remote_disconnect".into();
            }
        }
        entry.body_bytes_sent = body_bytes;
        entry.request_time = access_log::seconds(now - self.start);
        entry.upstream_response_time = self.sent_at.map(|t| access_log::seconds(now - t));
        match &self.group {
            Some(group) => group.metrics.request(entry.status),
            None => self.metrics.local.request(entry.status),
        }
        self.log.write(entry);
    }
}

/// The host the client asked for (port included), from an absolute-form target or the Host
/// header; the target wins, as RFC 9112 §3.2.2 requires of a proxy.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(authority) => authority.as_str(),
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    Some(raw.to_string())
}

/// The request target as an upstream expects it: path and query only.
fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    uri.path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"))
}
