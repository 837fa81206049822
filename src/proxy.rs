//! One request: route -> checkout -> send -> stream back -> checkin or close.
//!
//! This is the only module that knows both sides. Policy lives in [`crate::reuse`] (may a
//! connection carry another request) and in the failure types of [`crate::error`].

pub mod body;
mod check;
mod dns;
mod exchange;
pub mod group;
pub mod headers;
mod servers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::downstream::{Incoming, Lines};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};

use crate::access_log::{self, AccessLog, Entry, RequestLine};
use crate::config::Config;
use crate::hop::Hop;
use crate::metrics::{Metrics, RetryOutcome};
use crate::pool::learn;
use crate::resolve::Resolver;
use crate::retry::{Cause, Decision};
use crate::route::Router;
use crate::wire::fields::Fields;
use body::{End, OnEnd, RequestBody, ResponseBody};
use exchange::Head;
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
        let groups: Vec<Arc<Group>> = config
            .upstreams
            .iter()
            .map(|g| Arc::new(Group::with_workers(g, &metrics, config.workers)))
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

    /// Starts the per-group tasks: the reaper that closes idle connections kaguard no longer
    /// trusts, with `[upstream.health_check]` a checker per server, and for servers given by
    /// name a task that resolves them again with `resolver`. Each ends when its group is gone.
    pub fn spawn_tasks(&self, resolver: &Resolver) {
        for group in &self.groups {
            tokio::spawn(group::reap(Arc::downgrade(group)));
            check::spawn(group);
            dns::spawn(group, resolver);
        }
    }

    /// Closes every idle upstream connection (shutdown).
    pub fn drain_pools(&self) {
        for group in &self.groups {
            group.drain();
        }
    }

    /// Routes one request and does every part of its handling that waits for nothing:
    /// answered here (400, 404), or made ready to go upstream with [`Proxy::forward`].
    pub fn route(&self, req: Request<Incoming>, lines: Lines, client: Client) -> Routed {
        let start = crate::clock::now();
        // What only the access log shows is not looked up when the log is off.
        let logged = self.log.is_on();
        let mut entry = Entry {
            timestamp: logged.then(SystemTime::now),
            remote_addr: Some(client.addr.ip()),
            connection: client.connection,
            connection_requests: client.requests,
            request: RequestLine(Some((
                req.method().clone(),
                req.uri().clone(),
                req.version(),
            ))),
            http_user_agent: logged
                .then(|| lines.user_agent.clone())
                .flatten()
                .and_then(|ua| HeaderValue::from_maybe_shared(ua).ok()),
            ..Entry::default()
        };

        if client.conflicting_framing {
            entry.response_details = "conflicting_content_length_and_transfer_encoding".into();
            let resp = self.local(StatusCode::BAD_REQUEST, None, entry, start, vec![]);
            return Routed::Answered(resp);
        }
        let host = request_host(&req, &lines);
        if req.uri().authority().is_some() && !host.as_deref().is_some_and(names_a_host) {
            entry.response_details = "absolute_form_target_without_host".into();
            let resp = self.local(StatusCode::BAD_REQUEST, None, entry, start, vec![]);
            return Routed::Answered(resp);
        }
        let Some(target) = self.router.find(host.as_deref(), req.uri().path()) else {
            entry.flag("NR");
            entry.response_details = "route_not_found".into();
            let resp = self.local(StatusCode::NOT_FOUND, None, entry, start, vec![]);
            return Routed::Answered(resp);
        };
        let group = self.groups[target.group].clone();
        entry.upstream = Some(group.name.clone());

        let (parts, incoming) = req.into_parts();
        let fwd = headers::Forwarded {
            client_ip: client.addr.ip(),
            host,
        };
        let (request_id, added) = headers::to_upstream(&lines, fwd, group.reuse(), logged);
        entry.request_id = request_id;
        let head = Head {
            method: parts.method,
            uri: origin_form(&parts.uri),
            idempotency_key: lines.idempotency_key,
            fields: lines.fields,
            added,
        };
        Routed::Forward(Forward {
            start,
            entry,
            group,
            target,
            head,
            incoming: Some(incoming),
            client,
        })
    }

    /// Sends a routed request upstream, and sends it again where the retry rules allow.
    /// `Err(Abort)` asks the caller to close the client connection without a response
    /// (`on_unretryable = "close"`). The request is lent, not given: the caller's future
    /// keeps it, and this one only refers to it.
    pub async fn forward(&self, f: &mut Forward) -> Result<Response<ResponseBody>, Abort> {
        let incoming = f.incoming.take().expect("a request is forwarded once");
        let body = match RequestBody::prefetch(
            incoming,
            f.group.replay_buffer,
            self.max_body_size,
            self.client_body_timeout,
        )
        .await
        {
            Ok(body) => body,
            Err(err) => {
                tracing::info!(client = %f.client.addr.ip(), request = %f.entry.request, "{err}");
                let mut entry = std::mem::take(&mut f.entry);
                entry.flag("DC");
                entry.response_details = err.details().into();
                return Ok(self.local(err.status(), None, entry, f.start, vec![]));
            }
        };

        let mut retries = Vec::new();
        let policy = self.router.policy(f.target);
        match exchange::exchange(
            &f.group,
            policy,
            &f.head,
            body,
            f.client,
            &mut f.entry,
            &mut retries,
        )
        .await
        {
            Ok((resp, hop, lease, sent_at)) => {
                let entry = std::mem::take(&mut f.entry);
                Ok(self.respond(resp, hop, lease, &f.group, entry, f.start, sent_at, retries))
            }
            Err((failure, decision)) => {
                let mut entry = std::mem::take(&mut f.entry);
                tracing::error!(
                    client = %f.client.addr.ip(),
                    request = %entry.request,
                    upstream = %entry.upstream_addr.map_or("-".to_string(), |a| a.to_string()),
                    "{failure}"
                );
                entry.response_details = failure.details().into();
                let group = Some(f.group.clone());
                if decision == Decision::CloseClient {
                    entry
                        .response_details
                        .push_str("; client connection closed without a response");
                    // nginx's code for "closed without a response"; only the log shows it.
                    entry.status = 444;
                    // No body is sent whose end would end the request: it ends here, with
                    // the failure's details, not those of a client that went away.
                    let finish = self.finish_local(group, entry, f.start, retries);
                    Box::new(finish).on_end(End::Complete, 0, None);
                    return Err(Abort);
                }
                Ok(self.local(failure.status(), group, entry, f.start, retries))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn respond(
        &self,
        resp: Response<Fields>,
        hop: Hop,
        mut lease: Lease,
        group: &Arc<Group>,
        mut entry: Entry,
        start: Instant,
        sent_at: Instant,
        retries: Vec<Cause>,
    ) -> Response<ResponseBody> {
        let (parts, fields) = resp.into_parts();
        let upstream_keep_alive = hop.keeps_alive(parts.version);
        if group.guards.honor_hints {
            if let Some(secs) = hop.timeout {
                lease.meta.hint_idle = Some(learn::idle_budget_below(Duration::from_secs(secs)));
            }
            if let Some(max) = hop.max {
                lease.meta.hint_requests = Some(lease.meta.requests.saturating_add(max));
            }
        }
        entry.status = parts.status.as_u16();
        entry.upstream_status = Some(entry.status);
        let finish = Finish {
            entry,
            start,
            sent_at: Some(sent_at),
            upstream_keep_alive,
            group: Some(group.clone()),
            retries,
            log: self.log.clone(),
            metrics: self.metrics.clone(),
        };
        let body =
            ResponseBody::upstream(lease, group.read_timeout, fields).on_end(Box::new(finish));
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
        let finish = self.finish_local(group, entry, start, retries);
        let mut resp = Response::new(ResponseBody::local(text).on_end(Box::new(finish)));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        resp
    }

    /// What ends a request no upstream answered.
    fn finish_local(
        &self,
        group: Option<Arc<Group>>,
        entry: Entry,
        start: Instant,
        retries: Vec<Cause>,
    ) -> Finish {
        Finish {
            entry,
            start,
            sent_at: None,
            upstream_keep_alive: false,
            group,
            retries,
            log: self.log.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// A request as [`Proxy::route`] leaves it.
// Boxing the larger variant would cost an allocation per request, to shrink a value that is
// made once and moved straight into the request's boxed future.
#[allow(clippy::large_enum_variant)]
pub enum Routed {
    /// Answered without the upstream.
    Answered(Response<ResponseBody>),
    /// To be sent upstream with [`Proxy::forward`].
    Forward(Forward),
}

/// A request on its way upstream: what [`Proxy::forward`] needs, made of the request before
/// its handling first waits. Its future then holds this alone, where it held the request's
/// parts, its header lines and what was made of them, each more than once.
pub struct Forward {
    start: Instant,
    entry: Entry,
    group: Arc<Group>,
    target: crate::route::Target,
    head: Head,
    /// The client's body, until the request is forwarded.
    incoming: Option<Incoming>,
    client: Client,
}

/// The client connection is to be closed without a response.
#[derive(Debug, thiserror::Error)]
#[error("closing the client connection without a response so the client may retry")]
pub struct Abort;

/// Ends one request: returns the upstream connection or closes it, counts, logs.
struct Finish {
    entry: Entry,
    start: Instant,
    sent_at: Option<Instant>,
    /// The upstream's response allows its connection to be kept.
    upstream_keep_alive: bool,
    group: Option<Arc<Group>>,
    retries: Vec<Cause>,
    log: AccessLog,
    metrics: Arc<Metrics>,
}

impl OnEnd for Finish {
    fn on_end(mut self: Box<Self>, end: End, body_bytes: u64, lease: Option<Lease>) {
        let now = crate::clock::now();
        if let Some(lease) = lease {
            lease.release(end == End::Complete, self.upstream_keep_alive, now);
        }
        let status = self.entry.status;
        match &self.group {
            Some(group) => {
                group.metrics.request(status);
                let answered = self.entry.upstream_status.is_some() && end != End::UpstreamFailed;
                let outcome = if answered {
                    RetryOutcome::Answered
                } else {
                    RetryOutcome::Failed
                };
                for cause in &self.retries {
                    group.metrics.retry(*cause, outcome);
                }
            }
            None => self.metrics.local.request(status),
        }
        // The rest is for the access log alone.
        if !self.log.is_on() {
            return;
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
        self.log.write(entry);
    }
}

/// The host the client asked for (port included), from an absolute-form target or the Host
/// header; the target wins, as RFC 9112 §3.2.2 requires of a proxy. A target's user
/// information is no part of the host: it routes nothing and goes to no `Host` line.
fn request_host<B>(req: &Request<B>, lines: &Lines) -> Option<Bytes> {
    match req.uri().authority() {
        Some(authority) => {
            let host = crate::wire::host_port(authority);
            Some(Bytes::copy_from_slice(host.as_bytes()))
        }
        None => lines.host.clone(),
    }
}

/// Whether the host of an absolute-form target, as [`request_host`] gives it, names one: a
/// recipient refuses an http URI whose host is empty (RFC 9110 §4.2.1), and a `]` with no
/// IP literal before it would go upstream as a `Host` no server can answer to.
fn names_a_host(host: &[u8]) -> bool {
    match host.strip_prefix(b"[") {
        // An IP literal: a closing bracket after something, then a port or nothing.
        Some(rest) => rest
            .iter()
            .position(|&b| b == b']')
            .is_some_and(|end| end > 0 && matches!(rest.get(end + 1), None | Some(b':'))),
        None => {
            let name = host.split(|&b| b == b':').next().unwrap_or_default();
            !name.is_empty() && !name.contains(&b']')
        }
    }
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
