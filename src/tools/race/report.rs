//! What a race counted: the tally kept while it runs, the JSON line and the human summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use indicatif::ProgressBar;
use serde::Serialize;

use super::RaceOptions;
use super::client::{Exchange, Outcome};

/// Samples kept before the latency vector has to grow: a default run (2000 requests) never
/// reallocates, and a huge `--requests` does not reserve memory it may never use.
const LATENCY_CAPACITY: u64 = 1 << 16;

/// What one race counted; serialises to the `--json` line.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RaceReport {
    /// The target URL as given.
    pub target: String,
    /// `GET`, `POST` or `MIX`.
    pub method: String,
    /// Requests sent: responses of any status plus transport errors.
    pub requests: u64,
    pub ok_2xx: u64,
    /// Count of every status outside 2xx, keyed by the status code.
    pub statuses: BTreeMap<String, u64>,
    /// Requests that got no complete response.
    pub transport_errors: u64,
    pub transport_error_kinds: TransportErrorKinds,
    /// Over complete responses only, from the request being handed to the connection to the
    /// last body byte.
    pub latency_ms: Latency,
    /// TCP connections the clients opened, the first K included.
    pub connections_opened: u64,
    pub duration_s: f64,
}

impl RaceReport {
    /// Non-2xx responses plus transport errors.
    pub fn errors(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.transport_errors
    }

    /// The `--json` line: one object, no newline.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("string keys and plain numbers always serialise")
    }

    /// The human summary: what was run, the counts, latency, connections.
    pub fn summary(&self, opts: &RaceOptions) -> String {
        let (longest, shortest) = opts.pause_range();
        let mut text = format!(
            "kaguard race: {} requests over {} connections to {} ({}, pause {}..{}, {})\n",
            self.requests,
            opts.connections,
            self.target,
            self.method,
            humantime::format_duration(longest),
            humantime::format_duration(shortest),
            if opts.sync { "sync" } else { "no-sync" },
        );
        // Writing to a String cannot fail.
        let _ = write!(text, "  2xx: {}", self.ok_2xx);
        for (status, count) in &self.statuses {
            let _ = write!(text, "   {status}: {count}");
        }
        let _ = write!(text, "   transport errors: {}", self.transport_errors);
        let kinds = self.transport_error_kinds;
        let parts: Vec<String> = [
            ("reset", kinds.reset),
            ("eof", kinds.eof),
            ("timeout", kinds.timeout),
            ("other", kinds.other),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
        if !parts.is_empty() {
            let _ = write!(text, " ({})", parts.join(", "));
        }
        if self.requests > self.transport_errors {
            let _ = write!(
                text,
                "\n  latency p50 {}  p99 {}",
                millis(self.latency_ms.p50),
                millis(self.latency_ms.p99)
            );
        } else {
            text.push_str("\n  latency: no complete response");
        }
        let _ = write!(
            text,
            "\n  client connections opened: {}",
            self.connections_opened
        );
        text
    }
}

/// Transport errors by how the connection failed; every key is always present.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TransportErrorKinds {
    /// RST from the target, on read or on write.
    pub reset: u64,
    /// The target closed (FIN) before the response was complete.
    pub eof: u64,
    /// No complete response within the request timeout.
    pub timeout: u64,
    /// Anything else, e.g. a refused reconnect.
    pub other: u64,
}

/// Latency percentiles in milliseconds; 0 when there was no complete response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

/// The counts of a race in progress.
pub(super) struct Tally<'a> {
    progress: Option<&'a ProgressBar>,
    report: RaceReport,
    latencies: Vec<Duration>,
}

impl<'a> Tally<'a> {
    pub(super) fn new(
        opts: &RaceOptions,
        progress: Option<&'a ProgressBar>,
        opened: u64,
    ) -> Tally<'a> {
        Tally {
            progress,
            report: RaceReport {
                connections_opened: opened,
                ..RaceReport::default()
            },
            latencies: Vec::with_capacity(
                usize::try_from(opts.requests.min(LATENCY_CAPACITY)).unwrap_or(0),
            ),
        }
    }

    pub(super) fn record(&mut self, exchange: &Exchange) {
        let report = &mut self.report;
        report.requests += 1;
        report.connections_opened += exchange.opened;
        let before = report.errors();
        match exchange.outcome {
            Outcome::Response { status, latency } => {
                self.latencies.push(latency);
                if (200..300).contains(&status) {
                    report.ok_2xx += 1;
                } else {
                    *report.statuses.entry(status.to_string()).or_default() += 1;
                }
            }
            Outcome::Transport(kind) => {
                report.transport_errors += 1;
                kind.count(&mut report.transport_error_kinds);
            }
        }
        if let Some(progress) = self.progress {
            progress.inc(1);
            if report.errors() != before {
                progress.set_message(format!("errors {}", report.errors()));
            }
        }
    }

    pub(super) fn report(mut self, opts: &RaceOptions, elapsed: Duration) -> RaceReport {
        self.latencies.sort_unstable();
        let mut report = self.report;
        report.target = opts.target.to_string();
        report.method = opts.method.label().to_owned();
        report.latency_ms = Latency {
            p50: percentile_ms(&self.latencies, 50),
            p99: percentile_ms(&self.latencies, 99),
        };
        report.duration_s = round3(elapsed.as_secs_f64());
        report
    }
}

/// Nearest-rank percentile of sorted samples, in milliseconds; 0 for no samples.
fn percentile_ms(sorted: &[Duration], percent: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (sorted.len() * percent).div_ceil(100).max(1);
    round3(sorted[rank - 1].as_secs_f64() * 1000.0)
}

/// Three decimals: microseconds of a latency in ms, milliseconds of a duration in s. Finer
/// digits are timer noise and only make the JSON line longer.
fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// `1.2ms` below 100 ms, `250ms` above: a tenth of a millisecond matters only for short ones.
fn millis(ms: f64) -> String {
    if ms < 100.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.0}ms")
    }
}
