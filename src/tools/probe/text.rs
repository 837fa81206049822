//! The human report of a probe: what was measured, then the settings for what sits in front.

use std::fmt::Write as _;
use std::time::Duration;

use super::advice::{config_duration, envoy_duration, secs, server_idle_above};
use super::{CloseKind, HintCheck, ProbeReport};

/// Load balancers whose idle timeout toward their targets is well known, and what can be done
/// about it (from their documentation; see research/anchors.md §2.11).
const LOAD_BALANCERS: [(&str, Duration, &str); 2] = [
    (
        "AWS ALB",
        Duration::from_secs(60),
        ", or lower the ALB's idle_timeout.timeout_seconds below the server's (it also cuts \
         the ALB's client side)",
    ),
    (
        "GCP LB",
        Duration::from_secs(600),
        " (GCP's backend keep-alive timeout cannot be changed)",
    ),
];

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
        entry(
            &mut t,
            "keep-alive     ",
            &format!("off: the server closes the connection after every response, {how}"),
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
                Some(CloseKind::Fin) => ", closed with FIN",
                Some(CloseKind::Rst) => ", closed with RST (abortive: unread data is lost)",
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
    entry(&mut t, "idle timeout   ", &idle);
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
    entry(&mut t, "request cap    ", &cap);
    match (r.hint_timeout, r.hint_max) {
        (None, None) => {
            entry(&mut t, "Keep-Alive hint", "none");
        }
        (timeout, max) => {
            if let Some(n) = timeout {
                let words = hint_words(r.hint_timeout_check);
                let text =
                    format!("timeout={n}: {words} (whole seconds, rounded down as Node does)");
                entry(&mut t, "Keep-Alive hint", &text);
            }
            if let Some(m) = max {
                let label = if timeout.is_some() {
                    "               "
                } else {
                    "Keep-Alive hint"
                };
                let words = hint_words(r.hint_max_check);
                let text =
                    format!("max={m}: {words} (Apache counts the requests left after this one)");
                entry(&mut t, label, &text);
            }
        }
    }
    for note in &r.notes {
        entry(&mut t, "note           ", note);
    }
    entry(&mut t, "took           ", &secs(r.elapsed));
    settings(&mut t, r);
    t
}

/// Width the report wraps its long lines at.
const WIDTH: usize = 100;

/// Writes `text` after `label`, wrapped at [`WIDTH`] with continuation lines indented under
/// the text.
pub(crate) fn entry(t: &mut String, label: &str, text: &str) {
    let indent = 2 + label.chars().count() + 2;
    let mut line = format!("  {label}  ");
    let mut empty = true;
    for word in text.split(' ') {
        // A unit stays with its number: "5 s", "80 %".
        let unit = matches!(word, "s" | "ms" | "%");
        if !empty && !unit && line.chars().count() + 1 + word.chars().count() > WIDTH {
            let _ = writeln!(t, "{}", line.trim_end());
            line = " ".repeat(indent);
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    let _ = writeln!(t, "{line}");
}

/// The settings block: proxies in front, then load balancers.
fn settings(t: &mut String, r: &ProbeReport) {
    let Some(idle) = r.recommended_idle else {
        return;
    };
    let basis = match r.idle_timeout {
        Some(m) => format!("80 % of {}, at least 50 ms below it", secs(m)),
        None => format!(
            "below the {} it was seen to keep connections",
            secs(r.idle_bound)
        ),
    };
    let _ = writeln!(
        t,
        "\nIn front of this server: idle timeout {} ({basis}), so that a proxy retires a\n\
         connection before the server's close can cross a new request on the wire.",
        config_duration(idle)
    );
    if idle.is_zero() {
        entry(
            t,
            "all    ",
            "the server's idle timeout is too short to reuse connections safely: turn reuse \
             off for it (kaguard `keepalive = 0`, Envoy `max_requests_per_connection: 1`, \
             HAProxy `http-reuse never`), or raise the server's idle timeout",
        );
        return;
    }
    let (d, e) = (config_duration(idle), envoy_duration(idle));
    let requests = r.recommended_requests;
    let silent = r.cap_announced == Some(false);
    let kaguard = match requests {
        Some(n) => format!("[[upstream]] keepalive_timeout = \"{d}\", keepalive_requests = {n}"),
        None => format!("[[upstream]] keepalive_timeout = \"{d}\""),
    };
    entry(t, "kaguard", &kaguard);
    let nginx = match requests {
        Some(n) => format!("upstream {{ keepalive_timeout {d}; keepalive_requests {n}; }}"),
        None => format!("upstream {{ keepalive_timeout {d}; }}"),
    };
    entry(t, "nginx  ", &nginx);
    let envoy_cap = requests
        .map(|n| format!(", max_requests_per_connection: {n}"))
        .unwrap_or_default();
    entry(
        t,
        "Envoy  ",
        &format!(
            "cluster typed_extension_protocol_options, HttpProtocolOptions: \
             common_http_protocol_options: {{ idle_timeout: {e}{envoy_cap} }}"
        ),
    );
    let haproxy_cap = requests
        .map(|n| {
            format!(
                "; `max-reuse {}` on the server line for the cap (HTTP/1 may not enforce it)",
                n.saturating_sub(1)
            )
        })
        .unwrap_or_default();
    entry(
        t,
        "HAProxy",
        &format!(
            "no idle timeout toward servers exists (`timeout http-keep-alive` is the client \
             side, `pool-purge-delay` only closes surplus idle connections): keep `http-reuse \
             safe` (the default: a lost race closes the client's connection so the client \
             retries), consider `retry-on conn-failure empty-response response-timeout`, or \
             raise the server's idle timeout{haproxy_cap}"
        ),
    );
    let no_knob = if silent {
        " (no request limit knob: it cannot see the silent cap coming)"
    } else {
        ""
    };
    entry(
        t,
        "Traefik",
        &format!("serversTransport forwardingTimeouts.idleConnTimeout: {d}{no_knob}"),
    );
    entry(
        t,
        "Caddy  ",
        &format!("reverse_proxy {{ transport http {{ keepalive {d} }} }}{no_knob}"),
    );
    let _ = writeln!(
        t,
        "Load balancers in front (the server must out-wait them):"
    );
    for (name, lb, alternative) in LOAD_BALANCERS {
        let verdict = match r.idle_timeout {
            Some(server) if server > lb => format!(
                "OK: it closes idle connections first ({} margin)",
                secs(server.saturating_sub(lb))
            ),
            Some(_) => format!(
                "would race this server: raise the server's idle timeout above {} \
                 (e.g. {}){alternative}",
                secs(lb),
                secs(server_idle_above(lb))
            ),
            None if r.idle_bound > lb => "OK: the server out-waited it".to_owned(),
            None => format!("unknown: rerun with --max-idle above {}", secs(lb)),
        };
        entry(
            t,
            &format!("{:<14}", format!("{name} ({})", secs(lb))),
            &verdict,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_and_wrapping() {
        assert_eq!(ordinal(1), "1st");
        assert_eq!(ordinal(12), "12th");
        assert_eq!(ordinal(22), "22nd");
        assert_eq!(ordinal(100), "100th");
        let mut t = String::new();
        let long = "word ".repeat(40);
        entry(&mut t, "label", &format!("{long}after 5 s"));
        assert!(t.lines().all(|l| l.chars().count() <= WIDTH), "{t}");
        assert!(t.lines().skip(1).all(|l| l.starts_with("         ")), "{t}");
        assert!(!t.lines().any(|l| l.trim() == "s"), "{t}");
    }
}
