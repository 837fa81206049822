//! One request's attempts upstream: checkout or connect, send, and send again when
//! [`retry::decide`] says so.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use http::{Method, Response, Uri};

use super::Client;
use super::body::RequestBody;
use super::group::{Group, Lease};
use crate::access_log::{self, Entry};
use crate::clock;
use crate::config::RetryPolicy;
use crate::error::Failure;
use crate::hop::Hop;
use crate::pool::Risk;
use crate::retry::{self, Cause, Decision, Facts, Outcome};
use crate::upstream::UpstreamConn;
use crate::wire::fields::Fields;

/// Sends the request upstream, on a pooled connection or a new one, and sends it again
/// when [`retry::decide`] says so. Every failed attempt leaves its flag in the log entry.
#[allow(clippy::too_many_arguments)]
pub(super) async fn exchange(
    group: &Arc<Group>,
    policy: &RetryPolicy,
    head: &Head,
    body: RequestBody,
    client: Client,
    entry: &mut Entry,
    retries: &mut Vec<Cause>,
) -> Result<(Response<Fields>, Hop, Lease, Instant), (Failure, Decision)> {
    let replay = body.replay();
    let idempotent = retry::is_idempotent(&head.method, head.idempotency_key);
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
    // Before the pick and the checkout, not between the checkout and the write: the check
    // before reuse stays next to the write it clears.
    crate::worker::give_way().await;
    let mut in_flight = group.begin_request();
    let mut body = Some(body);
    let Some(mut server) = group.pick(None, clock::now()) else {
        return Err((Failure::NoLiveUpstream, Decision::Give));
    };
    // Servers tried by next-upstream, so a request that reaches none ends.
    let mut servers_tried = 1;
    let mut fresh_only = false;
    loop {
        entry.attempts += 1;
        let attempt_start = clock::now();
        // The body this attempt sends: what the last attempt handed back unsent, or a replay
        // of a held body. Whatever this attempt does with it, it is not "returned" any more.
        facts.returned = false;
        let req = body
            .take()
            .or_else(|| replay.as_ref().and_then(RequestBody::replay))
            .unwrap_or_else(RequestBody::empty);
        let pooled = if fresh_only {
            None
        } else {
            group.checkout(server, attempt_start, risk)
        };
        // The address this try is about: the pooled connection's, or the slot's now for a new
        // one (a look under the servers' lock, saved when a connection is pooled). If DNS
        // moves the slot meanwhile, what this try finds is about this address, not the new one.
        let addr = pooled
            .as_ref()
            .map_or_else(|| group.server_addr(server), |lease| lease.conn().addr);
        let (failure, lease) = match pooled {
            Some(lease) => (None, Some(lease)),
            None => {
                entry.upstream_addr = Some(addr);
                // Boxed, as is the backoff: rare, and inline they would grow every request's state.
                match Box::pin(group.connect(server, addr)).await {
                    Ok(lease) => {
                        entry.upstream_connect_time = Some(access_log::seconds(
                            clock::now().saturating_duration_since(attempt_start),
                        ));
                        (None, Some(lease))
                    }
                    Err(failure) => (Some(failure), None),
                }
            }
        };
        let (failure, returned) = match (failure, lease) {
            (Some(failure), _) => (failure, Some(req)),
            (None, Some(mut lease)) => {
                entry.upstream_addr = Some(lease.conn().addr);
                entry.upstream_connection_reused = Some(lease.reused);
                entry.upstream_connection_idle_ms = Some(lease.idle_for.as_millis() as u64);
                entry.upstream_connection_requests = Some(lease.meta.requests + 1);
                lease.meta.requests += 1;
                let reused = lease.reused;
                let timeouts = Timeouts {
                    read: group.read_timeout,
                    send: group.send_timeout,
                    per_try: policy.per_try_timeout,
                };
                let outcome = send(lease.conn_mut(), head, req, timeouts, reused).await;
                match outcome {
                    Ok((resp, hop)) => {
                        let now = clock::now();
                        let latency = now.saturating_duration_since(attempt_start);
                        group.server_answered(server, addr, latency, now);
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
                                Box::pin(backoff(policy, facts.attempts)).await;
                                server = group.next_server(server, Instant::now());
                                continue;
                            }
                            _ => return Ok((resp, hop, lease, attempt_start)),
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
        let now = clock::now();
        if failure.is_server_fault() {
            group.server_failed(server, addr, now);
        }
        facts.returned = returned.is_some();
        if let Some(req) = returned {
            body = Some(req);
        }
        // Next upstream: a request no server has seen goes to another server at once, for
        // every method, until each server was tried.
        if failure.never_reached_upstream()
            && (facts.returned || facts.replayable)
            && servers_tried < group.servers.listed_count()
            && let Some(other) = group
                .pick(Some(server), now)
                .filter(|other| *other != server)
        {
            tracing::info!(
                upstream = %group.server_addr(server),
                request = %entry.request,
                "{failure}; trying the next upstream server {}",
                group.server_addr(other)
            );
            retries.push(Cause::NextUpstream);
            servers_tried += 1;
            server = other;
            fresh_only = false;
            continue;
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
            Box::pin(backoff(policy, facts.attempts)).await;
            server = group.next_server(server, Instant::now());
        }
    }
}

/// The parts of a request needed to send it again.
pub(super) struct Head {
    pub(super) method: Method,
    pub(super) uri: Uri,
    /// The client's lines that go upstream as it wrote them.
    pub(super) fields: Fields,
    /// Lines written after `fields`.
    pub(super) added: super::headers::Added,
    /// The client sent an `Idempotency-Key`.
    pub(super) idempotency_key: bool,
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

type Returned = Option<RequestBody>;

/// Sends the request on `conn`. While a streamed request body is still going out, the upstream
/// must take some of it every `send_timeout` (nginx's `proxy_send_timeout`); after that it must
/// send something every `read_timeout`; the whole attempt ends at `per_try` if set.
async fn send(
    conn: &mut UpstreamConn,
    head: &Head,
    body: RequestBody,
    timeouts: Timeouts,
    reused: bool,
) -> Result<(Response<Fields>, Hop), (Failure, Returned)> {
    let Timeouts {
        read,
        send: send_timeout,
        per_try,
    } = timeouts;
    let sent_at = clock::now();
    if conn.is_closed() {
        return Err((Failure::NotSent { reused }, Some(body)));
    }
    let mark = conn.mark();
    conn.start(&head.method, &head.uri, &head.fields, &head.added, body);
    let try_deadline = per_try.map(|t| sent_at + t);
    // The quiet limit that applies now: the sending's while some of the request is still
    // going out, the reading's after. Set anew at each wait, so the timer follows the
    // exchange from one to the other; a timer fired at one limit and checked against the
    // other was set again to the same past deadline, a busy loop.
    let quiet_deadline = |conn: &UpstreamConn| {
        let quiet = if conn.is_sending() {
            send_timeout
        } else {
            read
        };
        conn.last_progress().max(sent_at) + quiet
    };
    loop {
        let polled = poll_fn(|cx| match conn.poll_response(cx) {
            Poll::Ready(res) => Poll::Ready(Some(res)),
            Poll::Pending => {
                let idle = quiet_deadline(conn);
                let deadline = try_deadline.map_or(idle, |t| t.min(idle));
                conn.poll_deadline(cx, deadline).map(|()| None)
            }
        })
        .await;
        match polled {
            Some(Ok(resp)) => return Ok(resp),
            Some(Err(err)) => {
                let failure = conn.failure(err, mark, reused);
                let returned = match failure {
                    Failure::NotSent { .. } => conn.take_unsent_body(mark),
                    _ => None,
                };
                return Err((failure, returned));
            }
            None => {
                let now = Instant::now();
                if let Some(t) = try_deadline.filter(|t| *t <= now) {
                    return Err((Failure::ReadTimeout(t - sent_at), None));
                }
                if quiet_deadline(conn) <= now {
                    let failure = if conn.is_sending() {
                        Failure::SendTimeout(send_timeout)
                    } else {
                        Failure::ReadTimeout(read)
                    };
                    return Err((failure, None));
                }
            }
        }
    }
}

/// The timeouts of one attempt.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    read: Duration,
    send: Duration,
    per_try: Option<Duration>,
}
