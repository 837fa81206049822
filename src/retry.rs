//! Whether a failed attempt is tried again: one pure decision, read from the failure's type,
//! the request's facts and the route's policy. `docs/retries.md` explains each rule.
//!
//! Two kinds of retry exist. The race guard's: a request the upstream provably never received
//! (nothing written, or the connection found closed before the write) is sent again for any
//! method, and an idempotent request that failed on a reused connection before any response
//! byte is sent again, once, on a new connection; neither counts against `attempts`. And the
//! policy's, in Envoy's terms, bounded by `attempts`, the budget and backoff; a request that
//! is not idempotent is never retried by policy unless the route says so (RFC 9110 §9.2.2).

use http::Method;

use crate::config::{OnUnretryable, RetryPolicy};
use crate::error::Failure;

/// What an attempt ended with.
#[derive(Clone, Copy, Debug)]
pub enum Outcome<'a> {
    Failed(&'a Failure),
    /// A complete response head with this status.
    Status(u16),
}

/// What is known about the request when deciding.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    /// Safe to send twice: an idempotent method, or an `Idempotency-Key`.
    pub idempotent: bool,
    /// The whole body is held, so it can be sent again.
    pub replayable: bool,
    /// The failed attempt wrote nothing, and its streamed body came back untouched.
    pub returned: bool,
    /// Tries made so far that count against `attempts`.
    pub attempts: u32,
    /// The one free retry of the race guard was already used.
    pub free_retry_used: bool,
    /// The race guard `safe_retry` is on.
    pub safe_retry: bool,
    /// Requests on the client connection so far, this one included.
    pub client_requests: u64,
}

/// Why a request is sent again; a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The upstream never received it.
    NotSent,
    /// An idempotent request lost the keep-alive race on a reused connection.
    ReusedConnection,
    ConnectFailure,
    Reset,
    Timeout,
    Status,
    /// The request never reached a server (connect failed, or not sent) and goes to another.
    NextUpstream,
}

impl Cause {
    pub const ALL: [Cause; 7] = [
        Cause::NotSent,
        Cause::ReusedConnection,
        Cause::ConnectFailure,
        Cause::Reset,
        Cause::Timeout,
        Cause::Status,
        Cause::NextUpstream,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::NotSent => "not_sent",
            Cause::ReusedConnection => "reused_connection",
            Cause::ConnectFailure => "connect_failure",
            Cause::Reset => "reset",
            Cause::Timeout => "timeout",
            Cause::Status => "status",
            Cause::NextUpstream => "next_upstream",
        }
    }

    /// Free retries belong to the race guard and do not count against `attempts`.
    pub fn is_free(self) -> bool {
        matches!(
            self,
            Cause::NotSent | Cause::ReusedConnection | Cause::NextUpstream
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send it again on a new connection.
    Retry(Cause),
    /// Answer with the failure's status (or pass the response on).
    Give,
    /// Close the client connection without a response, so the client's own retry rules
    /// apply (HAProxy's answer to a lost race it may not replay).
    CloseClient,
}

/// Methods RFC 9110 §9.2.2 defines as idempotent, and any request whose client sent an
/// `Idempotency-Key` for the server to recognise it by.
pub fn is_idempotent(method: &Method, idempotency_key: bool) -> bool {
    matches!(
        method,
        &Method::GET
            | &Method::HEAD
            | &Method::OPTIONS
            | &Method::TRACE
            | &Method::PUT
            | &Method::DELETE
    ) || idempotency_key
}

pub fn decide(
    outcome: Outcome<'_>,
    facts: &Facts,
    policy: &RetryPolicy,
    on_unretryable: OnUnretryable,
) -> Decision {
    let can_send_again = facts.returned || facts.replayable;
    let policy_allows = |wanted: bool, needs_idempotent: bool| {
        wanted
            && can_send_again
            && facts.attempts < policy.attempts
            && (!needs_idempotent || facts.idempotent || policy.retry_non_idempotent)
    };
    let failure = match outcome {
        Outcome::Status(code) => {
            let listed = policy.retriable_status_codes.contains(&code);
            return if policy_allows(policy.retry_on.retriable_status_codes && listed, true) {
                Decision::Retry(Cause::Status)
            } else {
                Decision::Give
            };
        }
        Outcome::Failed(failure) => failure,
    };
    match failure {
        Failure::NotSent { .. } if can_send_again && !facts.free_retry_used => {
            return Decision::Retry(Cause::NotSent);
        }
        Failure::NoResponse { reused: true, .. }
            if facts.safe_retry
                && facts.idempotent
                && facts.replayable
                && !facts.free_retry_used =>
        {
            return Decision::Retry(Cause::ReusedConnection);
        }
        Failure::Connect(_) | Failure::ConnectTimeout(_)
            if policy_allows(policy.retry_on.connect_failure, false) =>
        {
            return Decision::Retry(Cause::ConnectFailure);
        }
        Failure::NoResponse { .. } if policy_allows(policy.retry_on.reset, true) => {
            return Decision::Retry(Cause::Reset);
        }
        Failure::ReadTimeout(_) | Failure::SendTimeout(_)
            if policy_allows(policy.retry_on.timeout, true) =>
        {
            return Decision::Retry(Cause::Timeout);
        }
        _ => {}
    }
    let lost_race = matches!(
        failure,
        Failure::NotSent { reused: true } | Failure::NoResponse { reused: true, .. }
    );
    if lost_race && on_unretryable == OnUnretryable::CloseClient && facts.client_requests > 1 {
        return Decision::CloseClient;
    }
    Decision::Give
}

#[cfg(test)]
mod tests;
