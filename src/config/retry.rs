//! The keys that decide when a request is sent again: `[retry]`, `[route.retry]`, and an
//! upstream group's `guards`, `on_unretryable` and `[upstream.retry_budget]`.

use std::time::Duration;

use super::raw::{RawGuards, RawRetry, RawRetryBudget};
use super::units::{format_duration, parse_duration};
use super::{ConfigError, Guards, OnUnretryable, Problem, RetryBudget, RetryOn, RetryPolicy};

/// Most tries a policy may ask for. Each try may wait a full `read_timeout` (60 s by default),
/// so more than this holds a client for over ten minutes and multiplies the load on a group
/// that is already failing.
const MAX_ATTEMPTS: u32 = 10;

/// `retry_on` names, Envoy's spelling, in the order `to_toml` prints them.
const RETRY_ON: [&str; 5] = [
    "connect-failure",
    "reset",
    "refused-stream",
    "retriable-status-codes",
    "timeout",
];

fn retry_on_flag<'a>(on: &'a mut RetryOn, name: &str) -> Option<&'a mut bool> {
    match name {
        "connect-failure" => Some(&mut on.connect_failure),
        "reset" => Some(&mut on.reset),
        "refused-stream" => Some(&mut on.refused_stream),
        "retriable-status-codes" => Some(&mut on.retriable_status_codes),
        "timeout" => Some(&mut on.timeout),
        _ => None,
    }
}

/// The names of the conditions set in `on`, as the file writes them.
pub(super) fn retry_on_names(mut on: RetryOn) -> impl Iterator<Item = &'static str> {
    RETRY_ON
        .into_iter()
        .filter(move |name| retry_on_flag(&mut on, name).is_some_and(|set| *set))
}

/// `[retry]` (with `base` the built-in default) or `[route.retry]` (with `base` the file's
/// `[retry]`): every key the table omits is taken from `base`. `at` is "retry" or
/// "route N: retry".
pub(super) fn policy(
    at: &str,
    raw: RawRetry,
    base: &RetryPolicy,
) -> Result<RetryPolicy, ConfigError> {
    let key = |key: &str| format!("{at}: {key}");
    let retry_on = match raw.retry_on {
        None => base.retry_on,
        Some(names) => {
            let mut on = RetryOn::default();
            for name in names {
                match retry_on_flag(&mut on, &name) {
                    Some(flag) => *flag = true,
                    None => {
                        let problem = Problem::UnknownRetryOn(name);
                        return Err(ConfigError::invalid(key("retry_on"), problem));
                    }
                }
            }
            on
        }
    };
    let retriable_status_codes = match raw.retriable_status_codes {
        None => base.retriable_status_codes.clone(),
        Some(codes) => {
            if let Some(&bad) = codes.iter().find(|c| !(100..=599).contains(*c)) {
                return Err(ConfigError::invalid(
                    key("retriable_status_codes"),
                    Problem::InvalidStatus(bad),
                ));
            }
            codes
        }
    };
    let attempts = match raw.attempts {
        None => base.attempts,
        Some(0) => {
            let problem = Problem::TooSmall { min: 1, got: 0 };
            return Err(ConfigError::invalid(key("attempts"), problem));
        }
        Some(n) if n > MAX_ATTEMPTS => {
            let problem = Problem::TooLarge {
                max: MAX_ATTEMPTS.into(),
                got: n.into(),
            };
            return Err(ConfigError::invalid(key("attempts"), problem));
        }
        Some(n) => n,
    };
    let per_try_timeout = match raw.per_try_timeout {
        None => base.per_try_timeout,
        Some(text) => {
            let timeout = parse_duration(&text, None)
                .map_err(|p| ConfigError::invalid(key("per_try_timeout"), p))?;
            (!timeout.is_zero()).then_some(timeout)
        }
    };
    let duration = |name: &str, text: Option<String>, default: Duration| match text {
        None => Ok(default),
        Some(text) => parse_duration(&text, None).map_err(|p| ConfigError::invalid(key(name), p)),
    };
    let backoff_base = duration("backoff_base", raw.backoff_base, base.backoff_base)?;
    let backoff_max = duration("backoff_max", raw.backoff_max, base.backoff_max)?;
    if backoff_base > backoff_max {
        let problem = Problem::BackoffOrder {
            base: format_duration(backoff_base),
            max: format_duration(backoff_max),
        };
        return Err(ConfigError::invalid(at, problem));
    }
    if retry_on.retriable_status_codes && retriable_status_codes.is_empty() {
        return Err(ConfigError::invalid(at, Problem::NoRetriableStatusCodes));
    }
    Ok(RetryPolicy {
        retry_on,
        retriable_status_codes,
        attempts,
        per_try_timeout,
        backoff_base,
        backoff_max,
        retry_non_idempotent: raw
            .retry_non_idempotent
            .unwrap_or(base.retry_non_idempotent),
    })
}

/// `guards = "on"`, `"off"`, or a table in which every switch not given is on. `at` names
/// the key: `upstream "app": guards`.
pub(super) fn guards(at: &str, raw: Option<RawGuards>) -> Result<Guards, ConfigError> {
    let table = match raw {
        None => return Ok(Guards::default()),
        Some(RawGuards::Switch(text)) => {
            return match text.as_str() {
                "on" => Ok(Guards::ON),
                "off" => Ok(Guards::OFF),
                _ => Err(ConfigError::invalid(
                    at,
                    Problem::InvalidChoice {
                        value: text,
                        expected: "\"on\", \"off\", or a [upstream.guards] table",
                    },
                )),
            };
        }
        Some(RawGuards::Table(table)) => table,
    };
    if let Some(key) = table.unknown.into_iter().next() {
        return Err(ConfigError::invalid(at, Problem::UnknownGuard(key)));
    }
    let on = Guards::ON;
    Ok(Guards {
        check_before_reuse: table.check_before_reuse.unwrap_or(on.check_before_reuse),
        honor_hints: table.honor_hints.unwrap_or(on.honor_hints),
        learn: table.learn.unwrap_or(on.learn),
        close_first: table.close_first.unwrap_or(on.close_first),
        risk_aware_checkout: table.risk_aware_checkout.unwrap_or(on.risk_aware_checkout),
        safe_retry: table.safe_retry.unwrap_or(on.safe_retry),
    })
}

pub(super) fn on_unretryable(
    at: &str,
    text: Option<String>,
    default: OnUnretryable,
) -> Result<OnUnretryable, ConfigError> {
    let Some(text) = text else {
        return Ok(default);
    };
    match text.as_str() {
        "502" => Ok(OnUnretryable::BadGateway),
        "close" => Ok(OnUnretryable::CloseClient),
        _ => Err(ConfigError::invalid(
            at,
            Problem::InvalidChoice {
                value: text,
                expected: "\"502\" or \"close\"",
            },
        )),
    }
}

/// `at` names the table: `upstream "app": retry_budget`.
pub(super) fn retry_budget(
    at: &str,
    raw: Option<RawRetryBudget>,
) -> Result<RetryBudget, ConfigError> {
    let d = RetryBudget::default();
    let Some(raw) = raw else {
        return Ok(d);
    };
    let percent = raw.percent.unwrap_or(d.percent);
    if percent > 100 {
        let problem = Problem::TooLarge {
            max: 100,
            got: percent.into(),
        };
        return Err(ConfigError::invalid(format!("{at}: percent"), problem));
    }
    Ok(RetryBudget {
        percent,
        min_concurrency: raw.min_concurrency.unwrap_or(d.min_concurrency),
    })
}
