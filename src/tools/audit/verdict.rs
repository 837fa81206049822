//! One adjacent pair of hops: inverted, fine, or unknown, with the fix worded for the systems
//! involved, and notes on request caps.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::presets::Knob;
use super::{AuditReport, Hop, Idle};
use crate::tools::probe::{entry, proxy_idle_below, secs, server_idle_above};

/// The verdict on one pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The hop before closes idle connections first (or one side never keeps them).
    Ok,
    /// The hop before keeps idle connections at least as long as the hop after: the race.
    Inversion,
    /// A value is missing, so the pair cannot be judged.
    Unknown,
}

/// The verdict on hop `from` and the hop after it, `to`.
#[derive(Clone, Debug, Serialize)]
pub struct PairReport {
    pub from: String,
    pub to: String,
    pub status: Status,
    /// `from`'s idle timeout toward `to`.
    pub client: Option<Idle>,
    /// `to`'s idle timeout toward `from`.
    pub server: Option<Idle>,
    /// How much sooner `from` drops an idle connection than `to` closes it (at least this much,
    /// against a probed bound).
    #[serde(rename = "margin_ms", serialize_with = "millis_opt")]
    pub margin: Option<Duration>,
    /// OK, but with less margin than 20 % (at least 50 ms) of `to`'s timeout.
    pub tight: bool,
    pub message: String,
    pub fix: Option<String>,
    pub notes: Vec<String>,
}

fn millis_opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => s.serialize_none(),
    }
}

/// `60 s`, `never`, `off`.
fn show(idle: Idle) -> String {
    match idle {
        Idle::After(d) => secs(d),
        Idle::Longer(d) => format!("longer than {}", secs(d)),
        other => other.to_string(),
    }
}

pub(super) fn judge(from: &Hop, to: &Hop) -> PairReport {
    let (f, t) = (from.name.as_str(), to.name.as_str());
    let mut report = PairReport {
        from: f.to_owned(),
        to: t.to_owned(),
        status: Status::Unknown,
        client: from.client,
        server: to.server,
        margin: None,
        tight: false,
        message: String::new(),
        fix: None,
        notes: Vec::new(),
    };
    let ok = |report: &mut PairReport, message: String| {
        report.status = Status::Ok;
        report.message = message;
    };
    match (from.client, to.server) {
        (None, _) => {
            report.message = match from.preset() {
                Some(p) if p.client.is_none() => format!(
                    "{f} ({}) keeps no upstream connections; is it in the right place? \
                     Else give {f}:client=...",
                    p.what
                ),
                _ => format!("{f}'s idle timeout toward {t} is unknown: give {f}:client=..."),
            }
        }
        (_, None) => {
            let why = to
                .preset()
                .map(|p| p.server_unknown)
                .filter(|why| !why.is_empty())
                .unwrap_or("it is unknown");
            report.message = format!(
                "{t}'s idle timeout toward {f}: {why}; give {t}:server=... or --probe {t}=URL"
            );
        }
        (Some(Idle::Off), _) => ok(
            &mut report,
            format!("{f} does not reuse connections to {t}"),
        ),
        (_, Some(Idle::Off)) => ok(
            &mut report,
            format!("{t} closes every connection after one response (keep-alive off)"),
        ),
        (_, Some(Idle::Never)) => {
            ok(&mut report, format!("{t} never closes idle connections"));
        }
        (Some(Idle::Longer(_)), _) => {
            report.message = format!("{f}'s client side cannot be a probed bound");
        }
        (Some(client), Some(Idle::Longer(bound))) => match client {
            Idle::After(c) if c < bound => {
                report.margin = Some(bound - c);
                ok(
                    &mut report,
                    format!(
                        "{f} keeps idle upstream connections {}, {t} kept them open longer \
                         than {}: over {} margin",
                        secs(c),
                        secs(bound),
                        secs(bound - c)
                    ),
                );
            }
            _ => {
                report.message = format!(
                    "{t} kept idle connections longer than {}, but {f} keeps them {}: probe \
                     again with a longer bound",
                    secs(bound),
                    show(client)
                );
            }
        },
        (Some(client), Some(Idle::After(s))) => match client {
            Idle::After(c) if c < s => {
                let margin = s - c;
                report.margin = Some(margin);
                report.tight = c > proxy_idle_below(s);
                let mut message = format!(
                    "{f} keeps idle upstream connections {}, {t} closes them after {}: {} margin",
                    secs(c),
                    secs(s),
                    secs(margin)
                );
                if report.tight {
                    let _ = write!(
                        message,
                        " (tight: keep {f} at {} or less, 20 % below)",
                        secs(proxy_idle_below(s))
                    );
                }
                ok(&mut report, message);
            }
            _ => {
                report.status = Status::Inversion;
                let kept = match client {
                    Idle::After(c) => secs(c),
                    _ => "with no time limit".to_owned(),
                };
                report.message = format!(
                    "{f} keeps idle upstream connections {kept} but {t} closes them after {}",
                    secs(s)
                );
                report.fix = Some(fix(from, to, client, s));
                if from.preset().is_some_and(|p| p.learns) {
                    report.notes.push(format!(
                        "{f} also learns {t}'s idle timeout from its first closes and resends \
                         requests that are safe to resend, so it recovers on its own; the \
                         setting removes even the first failures"
                    ));
                }
            }
        },
    }
    if !matches!(from.client, Some(Idle::Off)) {
        report.notes.extend(cap_note(from, to));
    }
    report
}

/// How to remove the inversion: lower `from`'s client side below `s`, or raise `to`'s server
/// side above `from`'s.
fn fix(from: &Hop, to: &Hop, client: Idle, s: Duration) -> String {
    let (f, t) = (from.name.as_str(), to.name.as_str());
    let target = proxy_idle_below(s);
    let lower = if target.is_zero() {
        Ok(format!(
            "{} is too short for any safe reuse: turn off connection reuse in {f}",
            secs(s)
        ))
    } else {
        let caveat = from.preset().map_or("", |p| p.lower_caveat);
        let why = format!("below {} with margin{caveat}", secs(s));
        match from.preset().map(|p| p.lower_client) {
            Some(Knob::Set(template, unit)) => match unit.format(target) {
                Some(value) => Ok(format!("set {} ({why})", template.replace("{}", &value))),
                None => Err(format!(
                    "{f} cannot go below 1 s ({} takes whole seconds)",
                    template.replace("{}", "N")
                )),
            },
            Some(Knob::Missing(reason)) => Err(reason.to_owned()),
            None => Ok(format!(
                "lower {f}'s idle timeout toward {t} to {} ({why})",
                secs(target)
            )),
        }
    };
    let raise = match client {
        Idle::After(c) => {
            let target = server_idle_above(c);
            let how = match to.preset().map(|p| p.raise_server) {
                Some(Knob::Set(template, unit)) => unit
                    .format(target)
                    .map(|value| format!(": {}", template.replace("{}", &value))),
                _ => None,
            };
            Some(format!(
                "raise {t}'s idle timeout above {}{}",
                secs(c),
                how.unwrap_or_else(|| format!(" (e.g. {})", secs(target)))
            ))
        }
        _ => None,
    };
    match (lower, raise) {
        (Ok(lower), Some(raise)) => format!("{lower}, or {raise}"),
        (Ok(lower), None) => lower,
        (Err(reason), Some(raise)) => format!("{reason}; {raise}"),
        (Err(reason), None) => reason,
    }
}

/// What `to`'s request cap means for `from`.
fn cap_note(from: &Hop, to: &Hop) -> Option<String> {
    let (f, t) = (from.name.as_str(), to.name.as_str());
    let n = to.requests?;
    if to.announced {
        return Some(format!(
            "{t} closes each connection after {n} requests and says so (`Connection: close`): \
             {f} sees it coming"
        ));
    }
    let head = format!("{t} closes each connection after {n} requests without `Connection: close`");
    let preset = from.preset();
    let learns = if preset.is_some_and(|p| p.learns) {
        " (it also learns the cap from the closes)"
    } else {
        ""
    };
    Some(match preset.map(|p| p.request_limit) {
        Some(Some((template, counts_reuses))) => {
            let value = if counts_reuses { n - 1 } else { n };
            format!(
                "{head}: set {} so {f} retires connections first{learns}",
                template.replace("{}", &value.to_string())
            )
        }
        Some(None) => format!(
            "{head}, and {f} has no per-connection request limit, so it cannot see the close \
             coming and loses the race under back-to-back traffic: make {t} send `Connection: \
             close` on its last response, or lift the cap"
        ),
        None => format!(
            "{head}: {f} must stop at {n} requests per connection (nginx `keepalive_requests`, \
             Envoy `max_requests_per_connection`, HAProxy `max-reuse`, kaguard \
             `keepalive_requests`; Traefik, Caddy, Go and the cloud load balancers have no such \
             limit), or {t} must announce the close"
        ),
    })
}

pub(super) fn summary(report: &AuditReport) -> String {
    let mut t = String::new();
    let chain: Vec<&str> = report.hops.iter().map(|h| h.name.as_str()).collect();
    // Writing to a String cannot fail.
    let _ = writeln!(t, "kaguard audit: {}", chain.join(" -> "));
    let width = report.hops.iter().map(|h| h.name.len()).max().unwrap_or(0);
    for hop in &report.hops {
        let side = |idle: Option<Idle>| idle.map_or_else(|| "?".to_owned(), show);
        // An app server has no client side; "?" is for values the audit needed and lacked.
        let client = match (hop.client, hop.preset()) {
            (None, Some(p)) if p.client.is_none() => "-".to_owned(),
            (client, _) => side(client),
        };
        let mut line = format!("server {}, client {client}", side(hop.server));
        if let Some(n) = hop.requests {
            let how = if hop.announced { "announced" } else { "silent" };
            let _ = write!(line, ", {n} requests per connection ({how})");
        }
        if let Some(url) = &hop.probed {
            let _ = write!(line, " [probed at {url}]");
        } else if let Some(p) = hop
            .preset()
            .filter(|p| !p.what.eq_ignore_ascii_case(&hop.name))
        {
            let _ = write!(line, " [{}]", p.what);
        }
        entry(&mut t, &format!("{:<width$}", hop.name), &line);
    }
    let _ = writeln!(t);
    let pair_width = report
        .pairs
        .iter()
        .map(|p| p.from.len() + p.to.len() + 4)
        .max()
        .unwrap_or(0);
    for pair in &report.pairs {
        let status = match pair.status {
            Status::Ok => "OK",
            Status::Inversion => "INVERSION",
            Status::Unknown => "UNKNOWN",
        };
        let label = format!(
            "{:<pair_width$}  {status:<9}",
            format!("{} -> {}", pair.from, pair.to)
        );
        entry(&mut t, &label, &pair.message);
        let indent = " ".repeat(label.len());
        if let Some(fix) = &pair.fix {
            entry(&mut t, &indent, &format!("fix: {fix}"));
        }
        for note in &pair.notes {
            entry(&mut t, &indent, &format!("note: {note}"));
        }
    }
    let unknown = report
        .pairs
        .iter()
        .filter(|p| p.status == Status::Unknown)
        .count();
    let _ = match report.inversions {
        0 if unknown > 0 => writeln!(
            t,
            "\nNo inversion found, but {unknown} of {} pairs could not be judged: give the \
             missing values.",
            report.pairs.len()
        ),
        0 => writeln!(
            t,
            "\nNo inversion: every hop drops idle connections before the next closes them."
        ),
        1 => writeln!(
            t,
            "\n1 inversion: fix it, or that hop will keep losing the keep-alive race."
        ),
        n => writeln!(
            t,
            "\n{n} inversions: fix them, or those hops will keep losing the keep-alive race."
        ),
    };
    t
}
