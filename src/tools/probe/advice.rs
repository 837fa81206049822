//! From a probe report to verdicts on the `Keep-Alive` hint and the settings for a proxy in
//! front of the server; the duration formats every config syntax reads.

use std::time::Duration;

use serde::Serialize;

use super::ProbeReport;

/// A proxy keeps an idle connection at most this fraction below the server's idle timeout
/// (a fifth, i.e. 80 % of it): the server's timer starts up to a one-way delay before the
/// proxy's, its FIN takes that long again to arrive, and timers on a loaded host fire late.
/// The margin grows with the timeout because timer slack and sweep intervals do.
const IDLE_MARGIN_DIVISOR: u32 = 5;

/// The least margin: the probe's own precision (50 ms), which a shorter margin would eat.
pub(super) const MIN_IDLE_MARGIN: Duration = Duration::from_millis(50);

/// A server behind a load balancer should out-wait it by at least this much, or a twentieth
/// of it if that is more: enough that the balancer's close always comes first even when the
/// server's timer fires early under load or the clocks tick at different moments.
const MIN_RAISE_MARGIN: Duration = Duration::from_secs(5);

/// How a `Keep-Alive` hint compares with what the server does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HintCheck {
    /// The server does what it announces.
    Truthful,
    /// The server keeps connections longer, or for more requests, than it announces: safe for
    /// clients that obey the hint.
    Conservative,
    /// The server closes sooner than it announces: a client that obeys the hint can lose the
    /// race.
    Early,
    /// The measurement does not settle it (skipped, or its bound is below the hint).
    Unknown,
}

/// The idle timeout a proxy should use in front of a server that closes idle connections after
/// `server`: 80 % of it and at least 50 ms below, rounded down to a readable value. Zero when
/// the server's timeout is too short to reuse connections safely at all.
pub fn proxy_idle_below(server: Duration) -> Duration {
    let margin = (server / IDLE_MARGIN_DIVISOR).max(MIN_IDLE_MARGIN);
    round_down(server.saturating_sub(margin))
}

/// An idle timeout for a server behind a client side that keeps idle connections `client`:
/// `client` plus 5 s (or 5 %, if more), rounded up to whole seconds.
pub fn server_idle_above(client: Duration) -> Duration {
    let raised = client + (client / 20).max(MIN_RAISE_MARGIN);
    let whole = raised.as_secs() + u64::from(raised.subsec_nanos() > 0);
    Duration::from_secs(whole)
}

/// Whole seconds from 10 s, tenths of a second from 1 s, hundredths below.
fn round_down(d: Duration) -> Duration {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let unit = match ms {
        10_000.. => 1000,
        1000.. => 100,
        _ => 10,
    };
    Duration::from_millis(ms / unit * unit)
}

/// `4s`, `1500ms`: a duration as nginx, HAProxy, Go (Traefik, Caddy) and kaguard all read it.
pub(crate) fn config_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `4s`, `1.5s`: a protobuf Duration as Envoy's YAML reads it.
pub(crate) fn envoy_duration(d: Duration) -> String {
    let text = format!("{:.3}", d.as_secs_f64());
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}s")
}

/// `5.00 s`, `300 ms`, `120 s`: a measured duration for people.
pub(crate) fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if d.subsec_nanos() == 0 || d >= Duration::from_secs(100) {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

fn check_timeout(report: &ProbeReport, hint: u64) -> HintCheck {
    if !report.idle_measured || !report.keep_alive {
        return HintCheck::Unknown;
    }
    let announced = Duration::from_secs(hint);
    match report.idle_timeout {
        Some(measured) => {
            let tolerance = (measured / 20).max(MIN_IDLE_MARGIN);
            if measured + tolerance < announced {
                HintCheck::Early
            } else if measured < announced + Duration::from_secs(1) + tolerance {
                // Whole seconds, rounded down (as Node does): N announces [N, N+1).
                HintCheck::Truthful
            } else {
                HintCheck::Conservative
            }
        }
        None if report.idle_bound > announced + Duration::from_secs(1) => HintCheck::Conservative,
        None => HintCheck::Unknown,
    }
}

fn check_max(report: &ProbeReport, hint: u64) -> HintCheck {
    if !report.cap_measured {
        return HintCheck::Unknown;
    }
    match report.request_cap {
        // Apache counts the requests left after this one (1 + max); some count the total.
        Some(cap) if cap == hint.saturating_add(1) || cap == hint => HintCheck::Truthful,
        Some(cap) if cap < hint => HintCheck::Early,
        Some(_) => HintCheck::Conservative,
        None if report.cap_bound > hint.saturating_add(1) => HintCheck::Conservative,
        None => HintCheck::Unknown,
    }
}

/// Fills in the hint verdicts and the recommended proxy settings.
pub(super) fn complete(report: &mut ProbeReport) {
    report.hint_timeout_check = report.hint_timeout.map(|hint| check_timeout(report, hint));
    report.hint_max_check = report.hint_max.map(|hint| check_max(report, hint));
    report.recommended_idle = if report.keep_alive {
        match report.idle_timeout {
            Some(t) => Some(proxy_idle_below(t)),
            // It kept connections for the whole bound: anything below that is safe.
            None if report.idle_measured => Some(proxy_idle_below(report.idle_bound)),
            None => None,
        }
    } else {
        None
    };
    report.recommended_requests = report.request_cap.filter(|_| report.keep_alive);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_idle_is_80_percent_and_at_least_50ms_below() {
        assert_eq!(
            proxy_idle_below(Duration::from_secs(5)),
            Duration::from_secs(4)
        );
        assert_eq!(
            proxy_idle_below(Duration::from_secs(60)),
            Duration::from_secs(48)
        );
        assert_eq!(
            proxy_idle_below(Duration::from_millis(300)),
            Duration::from_millis(240)
        );
        assert_eq!(
            proxy_idle_below(Duration::from_millis(200)),
            Duration::from_millis(150)
        );
        assert_eq!(proxy_idle_below(Duration::from_millis(40)), Duration::ZERO);
        // 2.003 s measured -> 1.6024 s -> 1.6 s.
        assert_eq!(
            proxy_idle_below(Duration::from_millis(2003)),
            Duration::from_millis(1600)
        );
    }

    #[test]
    fn server_idle_above_adds_five_seconds_or_five_percent() {
        assert_eq!(
            server_idle_above(Duration::from_secs(60)),
            Duration::from_secs(65)
        );
        assert_eq!(
            server_idle_above(Duration::from_secs(600)),
            Duration::from_secs(630)
        );
    }

    #[test]
    fn durations_print_in_each_config_syntax() {
        assert_eq!(config_duration(Duration::from_secs(4)), "4s");
        assert_eq!(config_duration(Duration::from_millis(1600)), "1600ms");
        assert_eq!(envoy_duration(Duration::from_millis(1600)), "1.6s");
        assert_eq!(envoy_duration(Duration::from_secs(48)), "48s");
    }
}
