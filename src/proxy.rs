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

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use crate::access_log::{self, AccessLog, Entry};
use crate::config::{Config, RetryPolicy};
use crate::error::Failure;
use crate::metrics::{Metrics, RetryOutcome};
use crate::pool::{Risk, learn};
use crate::retry::{self, Cause, Decision, Facts, Outcome};
use crate::route::Router;
use crate::upstream::{self, UpstreamConn};
use body::{End, OnEnd, RequestBody, ResponseBody};
use group::{Group, Lease};

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
            router: Router::new(config),
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

    /// Proxies one request. `Err(Abort)` asks the caller to close the client connection
    /// without a response (`on_unretryable = "close"`).
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: Client,
    ) -> Result<Response<ResponseBody>, Abort> {
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
            return Ok(self.local(StatusCode::BAD_REQUEST, None, entry, start, vec![]));
        }
        let host = request_host(&req);
        let Some(target) = self.router.find(host.as_deref(), req.uri().path()) else {
            entry.flag("NR");
            entry.response_details = "route_not_found".into();
            return Ok(self.local(StatusCode::NOT_FOUND, None, entry, start, vec![]));
        };
        let group = self.groups[target.group].clone();
        entry.upstream = Some(group.name.clone());

        let (mut parts, incoming) = req.into_parts();
        let fwd = headers::Forwarded {
            client_ip: client.addr.ip(),
            host: host.as_deref(),
        };
        let request_id = headers::to_upstream(&mut parts.headers, &fwd, group.reuse());
        entry.request_id = request_id.to_str().unwrap_or("").to_string();
        let head = Head {
            method: parts.method,
            uri: origin_form(&parts.uri),
            headers: parts.headers,
        };

        let body = match RequestBody::prefetch(
            incoming,
            group.replay_buffer,
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
                return Ok(self.local(err.status(), None, entry, start, vec![]));
            }
        };

        let mut retries = Vec::new();
        match self
            .exchange(
                &group,
                target.retry,
                head,
                body,
                client,
                &mut entry,
                &mut retries,
            )
            .await
        {
            Ok((resp, lease, sent_at)) => {
                Ok(self.respond(resp, lease, &group, entry, start, sent_at, retries))
            }
            Err((failure, decision)) => {
                tracing::error!(
                    client = %client.addr.ip(),
                    request = %entry.request,
                    upstream = entry.upstream_addr.as_deref().unwrap_or("-"),
                    "{failure}"
                );
                entry.response_details = failure.details().into();
                if decision == Decision::CloseClient {
                    entry
                        .response_details
                        .push_str("; client connection closed without a response");
                    // nginx's code for "closed without a response"; only the log shows it.
                    let closed = StatusCode::from_u16(444).expect("444 is in range");
                    drop(self.local(closed, Some(group), entry, start, retries));
                    return Err(Abort);
                }
                Ok(self.local(failure.status(), Some(group), entry, start, retries))
            }
        }
    }

    /// Sends the request upstream, on a pooled connection or a new one, and sends it again
    /// when [`retry::decide`] says so. Every failed attempt leaves its flag in the log entry.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        group: &Arc<Group>,
        policy: &RetryPolicy,
        head: Head,
        body: RequestBody,
        client: Client,
        entry: &mut Entry,
        retries: &mut Vec<Cause>,
    ) -> Result<(Response<Incoming>, Lease, Instant), (Failure, Decision)> {
        let replay = body.replay();
        let idempotent = retry::is_idempotent(&head.method, &head.headers);
        let mut facts = Facts {
            idempotent,
            replayable: replay.is_some(),
            returned: false,
            attempts: 1,
            free_retry_used: false,
            safe_retry: group.guards.safe_retry,
            client_requests: client.requests,
        };
        // A request kaguard may send again can take any pooled connection; one it may not
        // takes only those the pool judges safe (risk-aware checkout).
        let risk = if facts.safe_retry && idempotent && facts.replayable {
            Risk::Retryable
        } else {
            Risk::MustNotRetry
        };
        let mut in_flight = group.begin_request();
        let mut body = Some(body);
        let mut server = group.pick();
        let mut fresh_only = false;
        loop {
            entry.attempts += 1;
            let attempt_start = Instant::now();
            let req = head.request(
                body.take()
                    .or_else(|| replay.as_ref().and_then(RequestBody::replay)),
            );
            let pooled = if fresh_only {
                None
            } else {
                group.checkout(server, attempt_start, risk)
            };
            let (failure, lease) = match pooled {
                Some(lease) => (None, Some(lease)),
                None => {
                    entry.upstream_addr = Some(group.server_addr(server).to_string());
                    match group.connect(server).await {
                        Ok(lease) => {
                            entry.upstream_connect_time =
                                Some(access_log::seconds(attempt_start.elapsed()));
                            (None, Some(lease))
                        }
                        Err(failure) => (Some(failure), None),
                    }
                }
            };
            let (failure, returned) = match (failure, lease) {
                (Some(failure), _) => (failure, Some(req)),
                (None, Some(mut lease)) => {
                    entry.upstream_addr = Some(lease.conn().addr.to_string());
                    entry.upstream_connection_reused = Some(lease.reused);
                    entry.upstream_connection_idle_ms = Some(lease.idle_for.as_millis() as u64);
                    entry.upstream_connection_requests = Some(lease.meta.requests + 1);
                    lease.meta.requests += 1;
                    let reused = lease.reused;
                    let outcome = send(
                        lease.conn_mut(),
                        req,
                        group.read_timeout,
                        policy.per_try_timeout,
                        reused,
                    )
                    .await;
                    match outcome {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            match retry::decide(
                                Outcome::Status(status),
                                &facts,
                                policy,
                                group.on_unretryable,
                            ) {
                                Decision::Retry(cause) if in_flight.try_retry() => {
                                    retries.push(cause);
                                    facts.attempts += 1;
                                    backoff(policy, facts.attempts).await;
                                    server = group.pick();
                                    continue;
                                }
                                _ => return Ok((resp, lease, attempt_start)),
                            }
                        }
                        Err((failure, returned)) => {
                            // Nothing is learned from a failure after the request went out: an
                            // upstream that crashed on it looks the same as one that closed
                            // the idle connection, and learning a tiny budget from a crash
                            // would end reuse. Closes seen while idle teach instead.
                            lease.fail();
                            (failure, returned)
                        }
                    }
                }
                (None, None) => unreachable!("a lease or a failure"),
            };
            entry.flag(failure.flag());
            facts.returned = returned.is_some();
            if let Some(req) = returned {
                body = Some(req.into_body());
            }
            let decision = retry::decide(
                Outcome::Failed(&failure),
                &facts,
                policy,
                group.on_unretryable,
            );
            let Decision::Retry(cause) = decision else {
                if facts.attempts > 1 && facts.attempts >= policy.attempts {
                    entry.flag("URX");
                }
                return Err((failure, decision));
            };
            if !cause.is_free() && !in_flight.try_retry() {
                entry.flag("URX");
                return Err((failure, Decision::Give));
            }
            tracing::info!(
                upstream = %group.server_addr(server),
                request = %entry.request,
                cause = cause.as_str(),
                "{failure}; sending the request again on a new connection"
            );
            retries.push(cause);
            fresh_only = true;
            if cause.is_free() {
                facts.free_retry_used = true;
            } else {
                facts.attempts += 1;
                backoff(policy, facts.attempts).await;
                server = group.pick();
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn respond(
        &self,
        resp: Response<Incoming>,
        mut lease: Lease,
        group: &Arc<Group>,
        mut entry: Entry,
        start: Instant,
        sent_at: Instant,
        retries: Vec<Cause>,
    ) -> Response<ResponseBody> {
        let (mut parts, incoming) = resp.into_parts();
        let upstream_keep_alive = headers::wants_keep_alive(parts.version, &parts.headers);
        if group.guards.honor_hints {
            let (timeout, max) = headers::keep_alive_hint(&parts.headers);
            if let Some(secs) = timeout {
                lease.meta.hint_idle = Some(learn::idle_budget_below(Duration::from_secs(secs)));
            }
            if let Some(max) = max {
                lease.meta.hint_requests = Some(lease.meta.requests + max);
            }
        }
        headers::remove_hop_by_hop(&mut parts.headers);
        entry.status = parts.status.as_u16();
        entry.upstream_status = Some(entry.status);
        let finish = Finish {
            entry,
            start,
            sent_at: Some(sent_at),
            lease: Some((lease, upstream_keep_alive)),
            group: Some(group.clone()),
            retries,
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
        retries: Vec<Cause>,
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
            retries,
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

/// The client connection is to be closed without a response.
#[derive(Debug, thiserror::Error)]
#[error("closing the client connection without a response so the client may retry")]
pub struct Abort;

/// The parts of a request needed to send it again.
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Head {
    fn request(&self, body: Option<RequestBody>) -> Request<RequestBody> {
        let mut req = Request::new(body.unwrap_or_else(RequestBody::empty));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Waits before a policy retry: full jitter below `base * 2^(n-1)`, capped at `max`, so
/// clients that failed together do not come back together.
async fn backoff(policy: &RetryPolicy, attempt: u32) {
    let doubled = policy
        .backoff_base
        .saturating_mul(1u32 << attempt.saturating_sub(2).min(16));
    let ceiling = doubled.min(policy.backoff_max);
    let wait = ceiling.mul_f64(fastrand::f64());
    tokio::time::sleep(wait).await;
}

type Returned = Option<Request<RequestBody>>;

/// Sends `req` on `conn`, failing if no byte moves for `read_timeout` or the whole attempt
/// takes longer than `per_try`.
async fn send(
    conn: &mut UpstreamConn,
    req: Request<RequestBody>,
    read_timeout: Duration,
    per_try: Option<Duration>,
    reused: bool,
) -> Result<Response<Incoming>, (Failure, Returned)> {
    let sent_at = Instant::now();
    let ready = tokio::time::timeout(read_timeout, conn.ready()).await;
    if !matches!(ready, Ok(Ok(()))) {
        return Err((Failure::NotSent { reused }, Some(req)));
    }
    let mark = conn.mark();
    let try_deadline = per_try.map(|t| sent_at + t);
    let mut fut = pin!(conn.send(req));
    loop {
        let idle_deadline = conn.last_progress().max(sent_at) + read_timeout;
        let deadline = try_deadline.map_or(idle_deadline, |t| t.min(idle_deadline));
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
                let now = Instant::now();
                if let Some(t) = try_deadline.filter(|t| *t <= now) {
                    return Err((Failure::ReadTimeout(t - sent_at), None));
                }
                if conn.last_progress().max(sent_at) + read_timeout <= now {
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
    retries: Vec<Cause>,
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
            Some(group) => {
                group.metrics.request(entry.status);
                let outcome = if entry.upstream_status.is_some() && end != End::UpstreamFailed {
                    RetryOutcome::Answered
                } else {
                    RetryOutcome::Failed
                };
                for cause in &self.retries {
                    group.metrics.retry(*cause, outcome);
                }
            }
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
