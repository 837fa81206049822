//! From a probe report to verdicts on the `Keep-Alive` hint, the settings for a proxy in front
//! of the server, and the human report.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::ProbeReport;

/// A proxy keeps an idle connection at most this fraction below the server's idle timeout
/// (a fifth, i.e. 80 % of it): the server's timer starts up to a one-way delay before the
/// proxy's, its FIN takes that long again to arrive, and timers on a loaded host fire late.
/// The margin grows with the timeout because timer slack and sweep intervals do.
const IDLE_MARGIN_DIVISOR: u32 = 5;

/// The least margin: the probe's own precision (50 ms), which a shorter margin would eat.
const MIN_IDLE_MARGIN: Duration = Duration::from_millis(50);

/// A server behind a load balancer should out-wait it by at least this much, or a twentieth
/// of it if that is more: enough that the balancer's close always comes first even when the
/// server's timer fires early under load or the clocks tick at different moments.
const MIN_RAISE_MARGIN: Duration = Duration::from_secs(5);

/// Load balancers whose idle timeout toward their targets is well known, and what can be done
/// about it (from their documentation; see research/anchors.md §2.11).
const LOAD_BALANCERS: [(&str, Duration, &str); 2] = [
    (
        "AWS ALB",
        Duration::from_secs(60),
        "or lower the ALB's idle_timeout.timeout_seconds, which also cuts its client side",
    ),
    (
        "GCP load balancer",
        Duration::from_secs(600),
        "its backend keep-alive timeout is fixed",
    ),
];

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
    if ms % 1000 == 0 {
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
    } else if d < Duration::from_secs(100) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{} s", d.as_secs())
    }
}

/// `1st`, `2nd`, `100th`.
fn ordinal(n: u64) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
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

fn hint_words(check: Option<HintCheck>) -> &'static str {
    match check {
        Some(HintCheck::Truthful) => "truthful",
        Some(HintCheck::Conservative) => "conservative (the server allows more than it says)",
        Some(HintCheck::Early) => {
            "UNTRUTHFUL: the server closes sooner than it says, so clients that obey the hint \
             (Node's Agent, undici) can lose the race"
        }
        Some(HintCheck::Unknown) | None => "not checked",
    }
}

/// The human report.
pub(super) fn summary(r: &ProbeReport) -> String {
    let mut t = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(t, "kaguard probe {}: {} {}", r.target, r.version, r.status);
    if !r.keep_alive {
        let how = if r.cap_announced == Some(true) {
            "and says so (`Connection: close`)"
        } else {
            "without saying so"
        };
        let _ = writeln!(
            t,
            "  keep-alive       off: the server closes the connection after every response, {how}"
        );
        let _ = writeln!(
            t,
            "\nNothing to tune: a proxy cannot reuse connections to this server, so it cannot \
             lose the keep-alive race to it."
        );
        return t;
    }
    let idle = match (r.idle_measured, r.idle_timeout) {
        (false, _) => "not measured".to_owned(),
        (true, Some(timeout)) => {
            let close = match r.idle_close {
                Some(super::CloseKind::Fin) => ", closed with FIN",
                Some(super::CloseKind::Rst) => ", closed with RST (abortive: unread data is lost)",
                None => "",
            };
            let survived = r
                .idle_survived
                .map(|s| format!("; open after {} idle", secs(s)))
                .unwrap_or_default();
            format!(
                "{}{close} ({} rounds, {} connections{survived})",
                secs(timeout),
                r.rounds,
                r.connections
            )
        }
        (true, None) => format!(
            "longer than {} (no idle close seen; rerun with a larger --max-idle)",
            secs(r.idle_bound)
        ),
    };
    let _ = writeln!(t, "  idle timeout     {idle}");
    let cap = match (r.cap_measured, r.request_cap, r.cap_announced) {
        (false, ..) => "not measured".to_owned(),
        (true, Some(n), Some(true)) => format!(
            "closes after the {} response, announced with `Connection: close`",
            ordinal(n)
        ),
        (true, Some(n), _) => format!(
            "closes after the {} response WITHOUT `Connection: close` (silent: a proxy \
             must count requests to see it coming)",
            ordinal(n)
        ),
        (true, None, _) => format!("none within {} requests", r.cap_bound),
    };
    let _ = writeln!(t, "  request cap      {cap}");
    match (r.hint_timeout, r.hint_max) {
        (None, None) => {
            let _ = writeln!(t, "  Keep-Alive hint  none");
        }
        (timeout, max) => {
            if let Some(n) = timeout {
                let _ = writeln!(
                    t,
                    "  Keep-Alive hint  timeout={n}: {} (whole seconds, rounded down as Node does)",
                    hint_words(r.hint_timeout_check)
                );
            }
            if let Some(m) = max {
                let lead = if timeout.is_some() { "                 " } else { "  Keep-Alive hint  " };
                let _ = writeln!(
                    t,
                    "{lead}max={m}: {} (Apache counts the requests left after this one)",
                    hint_words(r.hint_max_check)
                );
            }
        }
    }
    for note in &r.notes {
        let _ = writeln!(t, "  note: {note}");
    }
    let _ = writeln!(t, "  took {}", secs(r.elapsed));
    settings(&mut t, r);
    t
}

/// The settings block: proxies in front, then load balancers.
fn settings(t: &mut String, r: &ProbeReport) {
    let Some(idle) = r.recommended_idle else {
        return;
    };
    let basis = match r.idle_timeout {
        Some(m) => format!("80 % of {}, at least 50 ms below it", secs(m)),
        None => format!("below the {} it was seen to keep connections", secs(r.idle_bound)),
    };
    let _ = writeln!(
        t,
        "\nIn front of this server (idle {} = {basis}, so a proxy retires a connection before \
         the server's close can cross a new request on the wire):",
        config_duration(idle)
    );
    if idle.is_zero() {
        let _ = writeln!(
            t,
            "  its idle timeout is too short to reuse connections safely: turn reuse off for \
             it (kaguard `keepalive = 0`, Envoy `max_requests_per_connection: 1`, HAProxy \
             `http-reuse never`), or raise the server's idle timeout"
        );
        return;
    }
    let (d, e) = (config_duration(idle), envoy_duration(idle));
    let (req_kg, req_ng, req_env, req_ha) = match r.recommended_requests {
        Some(n) => (
            format!(", keepalive_requests = {n}"),
            format!(" keepalive_requests {n};"),
            format!(", max_requests_per_connection: {n}"),
            format!(
                "; `max-reuse {}` on the server line (reuses after the first request; HTTP/1 \
                 may not enforce it)",
                n.saturating_sub(1)
            ),
        ),
        None => Default::default(),
    };
    let _ = writeln!(t, "  kaguard  [[upstream]] keepalive_timeout = \"{d}\"{req_kg}");
    let _ = writeln!(t, "  nginx    upstream {{ keepalive_timeout {d};{req_ng} }}");
    let _ = writeln!(
        t,
        "  Envoy    cluster typed_extension_protocol_options (HttpProtocolOptions) \
         common_http_protocol_options: {{ idle_timeout: {e}{req_env} }}"
    );
    let _ = writeln!(
        t,
        "  HAProxy  has no idle timeout for server connections (`timeout http-keep-alive` is the \
         client side; `pool-purge-delay` only closes surplus idle connections): keep \
         `http-reuse safe` (the default: a lost race closes the client's connection so the \
         client retries) and consider `retry-on conn-failure empty-response response-timeout`, \
         or raise the server's idle timeout{req_ha}"
    );
    let silent_cap = r.cap_announced == Some(false);
    let _ = writeln!(
        t,
        "  Traefik  serversTransport forwardingTimeouts.idleConnTimeout: {d}{}",
        if silent_cap {
            " (no request limit knob: it cannot see the silent cap coming)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        t,
        "  Caddy    reverse_proxy {{ transport http {{ keepalive {d} }} }}{}",
        if silent_cap {
            " (no request limit knob: it cannot see the silent cap coming)"
        } else {
            ""
        }
    );
    let _ = writeln!(t, "Load balancers in front (the server must out-wait them):");
    for (name, lb, alternative) in LOAD_BALANCERS {
        let line = match (r.idle_timeout, r.idle_survived) {
            (Some(server), _) if server > lb => format!(
                "OK: it closes first ({} margin)",
                secs(server.saturating_sub(lb))
            ),
            (Some(_), _) => format!(
                "would race this server: raise the server's idle timeout above {} (e.g. {}), \
                 {alternative}",
                secs(lb),
                config_duration(server_idle_above(lb))
            ),
            (None, _) if r.idle_bound > lb => "OK: the server out-waited it".to_owned(),
            (None, _) => format!("unknown: rerun with --max-idle above {}", secs(lb)),
        };
        let _ = writeln!(t, "  {name} ({}): {line}", secs(lb));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_idle_is_80_percent_and_at_least_50ms_below() {
        assert_eq!(proxy_idle_below(Duration::from_secs(5)), Duration::from_secs(4));
        assert_eq!(proxy_idle_below(Duration::from_secs(60)), Duration::from_secs(48));
        assert_eq!(proxy_idle_below(Duration::from_millis(300)), Duration::from_millis(240));
        assert_eq!(proxy_idle_below(Duration::from_millis(200)), Duration::from_millis(150));
        assert_eq!(proxy_idle_below(Duration::from_millis(40)), Duration::ZERO);
        // 2.003 s measured -> 1.6024 s -> 1.6 s.
        assert_eq!(
            proxy_idle_below(Duration::from_millis(2003)),
            Duration::from_millis(1600)
        );
    }

    #[test]
    fn server_idle_above_adds_five_seconds_or_five_percent() {
        assert_eq!(server_idle_above(Duration::from_secs(60)), Duration::from_secs(65));
        assert_eq!(server_idle_above(Duration::from_secs(600)), Duration::from_secs(630));
    }

    #[test]
    fn durations_print_in_each_config_syntax() {
        assert_eq!(config_duration(Duration::from_secs(4)), "4s");
        assert_eq!(config_duration(Duration::from_millis(1600)), "1600ms");
        assert_eq!(envoy_duration(Duration::from_millis(1600)), "1.6s");
        assert_eq!(envoy_duration(Duration::from_secs(48)), "48s");
        assert_eq!(ordinal(1), "1st");
        assert_eq!(ordinal(12), "12th");
        assert_eq!(ordinal(22), "22nd");
        assert_eq!(ordinal(100), "100th");
    }
}
