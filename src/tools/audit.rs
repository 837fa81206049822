//! `kaguard audit`: checks a chain of hops, from the edge to the app, for the timeout inversion
//! behind the keep-alive race.
//!
//! Each hop keeps idle connections from the hop before it for its *server* idle timeout, and
//! idle connections to the hop after it for its *client* idle timeout. When hop i keeps idle
//! connections at least as long as hop i+1 does (client_i ≥ server_i+1), hop i+1 closes
//! connections hop i still considers reusable, and every request hop i sends on one at that
//! moment fails: the sporadic 502. [`audit`] flags every such pair with the concrete fix, and
//! notes request caps the hop before cannot see coming.
//!
//! Hops come from presets with their real defaults ([`presets`]), overrides (`nginx:client=30s`),
//! custom values (`myapp:server=15s`), a TOML file, or a live [`crate::tools::probe`].
//!
//! Files: `presets` is the table of known systems; `verdict` judges one pair and words the fix;
//! `cli` is the subcommand.

mod cli;
mod presets;
#[cfg(test)]
mod tests;
mod verdict;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::tools::probe::{ProbeError, config_duration};

pub use cli::{AUDIT_EXAMPLES, AuditArgs, run};
pub use verdict::{PairReport, Status};

/// How long a hop keeps an idle connection on one side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// Closes (or drops from its pool) connections idle this long.
    After(Duration),
    /// Never closes idle connections on its own.
    Never,
    /// No keep-alive: closes after every response, or never reuses a connection.
    Off,
    /// Measured by a probe: kept connections at least this long and closed none.
    Longer(Duration),
}

/// `60s`, `never`, `off`, `>120s`: the form `parse_hop` reads back.
impl fmt::Display for Idle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Idle::After(d) => f.write_str(&config_duration(*d)),
            Idle::Never => f.write_str("never"),
            Idle::Off => f.write_str("off"),
            Idle::Longer(d) => write!(f, ">{}", config_duration(*d)),
        }
    }
}

impl Serialize for Idle {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One hop of the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hop {
    pub name: String,
    /// The preset its defaults and setting names come from.
    pub preset: Option<&'static str>,
    /// Idle timeout toward the previous hop; `None`: unknown.
    pub server: Option<Idle>,
    /// Idle timeout toward the next hop; `None`: unknown (or it is the app).
    pub client: Option<Idle>,
    /// Requests it serves per connection from the previous hop before closing it.
    pub requests: Option<u64>,
    /// Whether its last response on a connection says `Connection: close`.
    pub announced: bool,
    /// The URL its server side was probed at.
    pub probed: Option<String>,
}

impl Hop {
    /// A hop with nothing known but its name.
    pub fn named(name: impl Into<String>) -> Hop {
        Hop {
            name: name.into(),
            preset: None,
            server: None,
            client: None,
            requests: None,
            announced: true,
            probed: None,
        }
    }

    fn preset(&self) -> Option<&'static presets::Preset> {
        self.preset.and_then(presets::find)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A hop on the command line or in the file that cannot be read; `token` is as given.
    #[error("bad hop `{token}`: {reason}")]
    Hop { token: String, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {source}", path = path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}", path = path.display())]
    FileFormat { path: PathBuf, reason: String },
    #[error("probe of {hop}: {source}")]
    Probe {
        hop: String,
        #[source]
        source: ProbeError,
    },
    #[error("cannot write the report: {0}")]
    Output(#[source] io::Error),
}

/// What the audit found; serialises to the `--json` object.
#[derive(Clone, Debug, Serialize)]
pub struct AuditReport {
    pub hops: Vec<Hop>,
    /// One per adjacent pair, from the edge inwards.
    pub pairs: Vec<PairReport>,
    /// Pairs with [`Status::Inversion`].
    pub inversions: usize,
}

impl AuditReport {
    /// 1 when any inversion was flagged, else 0 (bad input is 2, from `main`).
    pub fn exit_code(&self) -> u8 {
        u8::from(self.inversions > 0)
    }

    /// The `--json` object: one line, no newline.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("plain fields and string keys always serialise")
    }

    /// One line per pair with its verdict, fix and notes, then the count.
    pub fn summary(&self) -> String {
        verdict::summary(self)
    }
}

/// Checks every adjacent pair of `hops`, edge first. Pure: no I/O, no clock.
pub fn audit(hops: &[Hop]) -> AuditReport {
    let pairs: Vec<PairReport> = hops
        .windows(2)
        .map(|pair| verdict::judge(&pair[0], &pair[1]))
        .collect();
    let inversions = pairs
        .iter()
        .filter(|p| p.status == Status::Inversion)
        .count();
    AuditReport {
        hops: hops.to_vec(),
        pairs,
        inversions,
    }
}

/// Reads one hop: `NAME`, `NAME:key=value,...` with keys `server`, `client`, `requests`,
/// `announced` and `preset`. A preset name alone takes its defaults; a custom name needs at
/// least one value.
pub fn parse_hop(token: &str) -> Result<Hop, AuditError> {
    let (name, rest) = match token.split_once(':') {
        Some((name, rest)) => (name, Some(rest)),
        None => (token, None),
    };
    let mut pairs = Vec::new();
    if let Some(rest) = rest {
        if rest.trim().is_empty() {
            return Err(bad(token, "nothing after ':' (e.g. nginx:client=30s)"));
        }
        for part in rest.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(token, format!("`{part}` is not key=value")))?;
            pairs.push((key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    build_hop(name.trim(), &pairs, token)
}

fn bad(token: &str, reason: impl Into<String>) -> AuditError {
    AuditError::Hop {
        token: token.to_owned(),
        reason: reason.into(),
    }
}

/// A hop from its name and `key=value` pairs; `token` names it in errors.
fn build_hop(name: &str, pairs: &[(String, String)], token: &str) -> Result<Hop, AuditError> {
    let valid_name = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if name.is_empty() || !name.chars().all(valid_name) {
        return Err(bad(
            token,
            "a hop name is letters, digits, '-', '_' or '.' (e.g. nginx, my-app)",
        ));
    }
    let preset_name = pairs
        .iter()
        .find(|(key, _)| key == "preset")
        .map_or(name, |(_, value)| value.as_str());
    let preset = presets::find(preset_name);
    if preset.is_none() && preset_name != name {
        return Err(bad(
            token,
            format!(
                "preset={preset_name}: unknown preset (known: {})",
                presets::names()
            ),
        ));
    }
    let mut hop = Hop::named(name);
    if let Some(p) = preset {
        hop.preset = Some(p.name);
        hop.server = p.server;
        hop.client = p.client;
        hop.requests = p.requests.map(|(n, _)| n);
        hop.announced = p.requests.is_none_or(|(_, announced)| announced);
    }
    let mut values = 0;
    for (key, value) in pairs {
        let problem = |expected: &str| bad(token, format!("{key}={value}: {expected}"));
        match key.as_str() {
            "preset" => continue,
            "server" => hop.server = Some(parse_idle(value).map_err(problem)?),
            "client" => hop.client = Some(parse_idle(value).map_err(problem)?),
            "requests" => {
                hop.requests = match value.as_str() {
                    "none" => None,
                    n => Some(
                        n.parse::<u64>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| problem("expected a count of at least 1, or none"))?,
                    ),
                }
            }
            "announced" => {
                hop.announced = match value.to_ascii_lowercase().as_str() {
                    "yes" | "true" => true,
                    "no" | "false" => false,
                    _ => return Err(problem("expected yes or no")),
                }
            }
            _ => {
                return Err(bad(
                    token,
                    format!(
                        "unknown key `{key}` (keys: server, client, requests, announced, preset)"
                    ),
                ));
            }
        }
        values += 1;
    }
    if preset.is_none() && values == 0 {
        return Err(bad(
            token,
            format!(
                "unknown preset `{name}`: give its timeouts, e.g. {name}:server=15s (presets: {})",
                presets::names()
            ),
        ));
    }
    Ok(hop)
}

/// `60s`, `500ms`, `2m`, a bare number of seconds; `never`/`none`: no idle timeout; `off`/`0`:
/// no keep-alive at all.
fn parse_idle(value: &str) -> Result<Idle, &'static str> {
    const EXPECTED: &str = "expected a duration like 60s, 500ms or 2m, never, or off";
    match value.to_ascii_lowercase().as_str() {
        "never" | "none" => return Ok(Idle::Never),
        "off" => return Ok(Idle::Off),
        _ => {}
    }
    let duration = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(value).map_err(|_| EXPECTED)?,
    };
    if duration.is_zero() {
        return Ok(Idle::Off);
    }
    if duration > Duration::from_secs(366 * 24 * 60 * 60) {
        return Err("longer than a year: write never");
    }
    Ok(Idle::After(duration))
}
