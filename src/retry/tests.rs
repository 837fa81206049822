use std::io;
use std::time::Duration;

use super::*;
use crate::config::RetryOn;
use crate::error::Transport;

fn policy() -> RetryPolicy {
    RetryPolicy::default()
}

fn facts() -> Facts {
    Facts {
        idempotent: true,
        replayable: true,
        returned: false,
        attempts: 1,
        free_retry_used: false,
        safe_retry: true,
        client_requests: 1,
    }
}

const RACE: Failure = Failure::NoResponse {
    reused: true,
    transport: Transport::Reset,
};
const FRESH_RESET: Failure = Failure::NoResponse {
    reused: false,
    transport: Transport::Reset,
};
const GIVE502: OnUnretryable = OnUnretryable::BadGateway;

#[test]
fn idempotent_request_that_lost_the_race_is_retried_once_for_free() {
    let d = decide(Outcome::Failed(&RACE), &facts(), &policy(), GIVE502);
    assert_eq!(d, Decision::Retry(Cause::ReusedConnection));
    assert!(Cause::ReusedConnection.is_free());
    let used = Facts {
        free_retry_used: true,
        attempts: 2,
        ..facts()
    };
    assert_eq!(
        decide(Outcome::Failed(&RACE), &used, &policy(), GIVE502),
        Decision::Give
    );
}

#[test]
fn post_with_sent_body_is_not_retried() {
    let post = Facts {
        idempotent: false,
        ..facts()
    };
    assert_eq!(
        decide(Outcome::Failed(&RACE), &post, &policy(), GIVE502),
        Decision::Give
    );
    assert_eq!(
        decide(Outcome::Failed(&FRESH_RESET), &post, &policy(), GIVE502),
        Decision::Give
    );
}

#[test]
fn request_never_sent_is_retried_whatever_its_method() {
    let post = Facts {
        idempotent: false,
        replayable: false,
        returned: true,
        ..facts()
    };
    let d = decide(
        Outcome::Failed(&Failure::NotSent { reused: true }),
        &post,
        &policy(),
        GIVE502,
    );
    assert_eq!(d, Decision::Retry(Cause::NotSent));
}

#[test]
fn unsent_request_whose_body_is_gone_is_not_retried() {
    let streamed = Facts {
        idempotent: false,
        replayable: false,
        returned: false,
        ..facts()
    };
    let d = decide(
        Outcome::Failed(&Failure::NotSent { reused: true }),
        &streamed,
        &policy(),
        GIVE502,
    );
    assert_eq!(d, Decision::Give);
}

#[test]
fn race_guard_off_leaves_only_the_policy() {
    let off = Facts {
        safe_retry: false,
        ..facts()
    };
    // The default policy retries resets of idempotent requests, counted against attempts.
    assert_eq!(
        decide(Outcome::Failed(&RACE), &off, &policy(), GIVE502),
        Decision::Retry(Cause::Reset)
    );
    let spent = Facts { attempts: 2, ..off };
    assert_eq!(
        decide(Outcome::Failed(&RACE), &spent, &policy(), GIVE502),
        Decision::Give
    );
}

#[test]
fn connect_failure_is_retried_for_any_method_within_attempts() {
    let post = Facts {
        idempotent: false,
        ..facts()
    };
    let refused = Failure::Connect(io::Error::from(io::ErrorKind::ConnectionRefused));
    assert_eq!(
        decide(Outcome::Failed(&refused), &post, &policy(), GIVE502),
        Decision::Retry(Cause::ConnectFailure)
    );
    let spent = Facts {
        attempts: 2,
        ..post
    };
    assert_eq!(
        decide(Outcome::Failed(&refused), &spent, &policy(), GIVE502),
        Decision::Give
    );
}

#[test]
fn status_codes_are_retried_only_when_listed_and_idempotent() {
    let mut p = policy();
    p.retry_on = RetryOn {
        retriable_status_codes: true,
        ..RetryOn::default()
    };
    p.retriable_status_codes = vec![503];
    assert_eq!(
        decide(Outcome::Status(503), &facts(), &p, GIVE502),
        Decision::Retry(Cause::Status)
    );
    assert_eq!(
        decide(Outcome::Status(500), &facts(), &p, GIVE502),
        Decision::Give
    );
    let post = Facts {
        idempotent: false,
        ..facts()
    };
    assert_eq!(
        decide(Outcome::Status(503), &post, &p, GIVE502),
        Decision::Give
    );
    p.retry_non_idempotent = true;
    assert_eq!(
        decide(Outcome::Status(503), &post, &p, GIVE502),
        Decision::Retry(Cause::Status)
    );
}

#[test]
fn timeout_is_retried_only_when_asked() {
    let t = Failure::ReadTimeout(Duration::from_secs(1));
    assert_eq!(
        decide(Outcome::Failed(&t), &facts(), &policy(), GIVE502),
        Decision::Give
    );
    let mut p = policy();
    p.retry_on.timeout = true;
    assert_eq!(
        decide(Outcome::Failed(&t), &facts(), &p, GIVE502),
        Decision::Retry(Cause::Timeout)
    );
}

#[test]
fn lost_race_that_may_not_be_replayed_closes_a_used_client_connection_when_asked() {
    let post = Facts {
        idempotent: false,
        client_requests: 2,
        ..facts()
    };
    let close = OnUnretryable::CloseClient;
    assert_eq!(
        decide(Outcome::Failed(&RACE), &post, &policy(), close),
        Decision::CloseClient
    );
    // A client connection's first request gets a 502: the client cannot tell a close from a
    // refusal there, so closing would teach it nothing.
    let first = Facts {
        client_requests: 1,
        ..post
    };
    assert_eq!(
        decide(Outcome::Failed(&RACE), &first, &policy(), close),
        Decision::Give
    );
    assert_eq!(
        decide(Outcome::Failed(&RACE), &post, &policy(), GIVE502),
        Decision::Give
    );
}

#[test]
fn idempotency_key_makes_a_post_idempotent() {
    assert!(!is_idempotent(&Method::POST, false));
    assert!(is_idempotent(&Method::POST, true));
    assert!(is_idempotent(&Method::DELETE, false));
    assert!(!is_idempotent(&Method::PATCH, false));
}
