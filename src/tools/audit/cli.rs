//! The `kaguard audit` subcommand: hops from the command line or a file, optional live probes,
//! then the report.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{AuditError, AuditReport, Hop, Idle, audit, build_hop, parse_hop, presets};
use crate::tools::probe::{self, ProbeOptions, server_idle_above};

/// Shown after the flags in `kaguard audit --help`.
pub const AUDIT_EXAMPLES: &str = "\
Examples:
  # An ALB in front of nginx in front of a Node app, all at their defaults
  kaguard audit alb nginx node

  # Overrides and custom hops: NAME[:key=value,...], keys server, client, requests, announced
  kaguard audit alb:client=60s nginx:server=75s,client=60s app:server=5s

  # Take the app's server side from a live probe
  kaguard audit alb nginx app --probe app=http://127.0.0.1:3000/

  # The chain in a file: [[hop]] name = \"nginx\", client = \"30s\" (and preset, server,
  # requests, announced)
  kaguard audit --file chain.toml --json

A hop keeps idle connections from the hop before it for its server timeout and to the hop after
it for its client timeout. Each pair is an inversion when the client timeout of the first is at
least the server timeout of the second. Durations: 60s, 500ms, 2m, a bare number of seconds,
never (no idle timeout) or off (no keep-alive). `kaguard audit --presets` lists the presets.
Exit code 0 when no inversion, 1 when any, 2 on bad input.";

/// Check a chain of proxies and servers for the idle-timeout inversion behind the race.
#[derive(clap::Args, Debug)]
#[command(after_help = AUDIT_EXAMPLES)]
pub struct AuditArgs {
    /// Hops from the edge to the app: PRESET, PRESET:key=value,..., or NAME:key=value,...
    #[arg(value_name = "HOP", required_unless_present_any = ["file", "presets"])]
    pub hops: Vec<String>,

    /// Read the hops from a TOML file ([[hop]] tables) instead.
    #[arg(long, value_name = "FILE", conflicts_with = "hops")]
    pub file: Option<PathBuf>,

    /// Probe a hop's server side live: [HOP=]URL (the last hop when no name). Repeatable.
    #[arg(long, value_name = "[HOP=]URL")]
    pub probe: Vec<String>,

    /// Print the presets and their defaults, then exit.
    #[arg(long)]
    pub presets: bool,

    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,

    /// No progress line while probing.
    #[arg(long)]
    pub quiet: bool,
}

/// Reads the hops, runs the probes, audits, and prints the report (or the JSON object).
pub async fn run(args: AuditArgs) -> Result<AuditReport, AuditError> {
    if args.presets {
        println!("{}", presets::table());
        return Ok(audit(&[]));
    }
    let probes = args
        .probe
        .iter()
        .map(|spec| probe_spec(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let mut hops = match &args.file {
        Some(path) => read_file(path)?,
        None => parse_hops(&args.hops, &probes)?,
    };
    if hops.len() < 2 {
        return Err(AuditError::Usage(
            "give at least two hops, from the edge to the app".to_owned(),
        ));
    }
    for (name, url) in &probes {
        let index = match name {
            Some(name) => hops.iter().position(|h| &h.name == name).ok_or_else(|| {
                AuditError::Usage(format!("--probe {name}=...: no hop is called {name}"))
            })?,
            None => hops.len() - 1,
        };
        let before = index.checked_sub(1).and_then(|i| hops[i].client);
        let hop = &mut hops[index];
        probe_into(hop, url, before, args.quiet).await?;
    }
    let report = audit(&hops);
    let text = if args.json {
        report.json()
    } else {
        report.summary()
    };
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{}", text.trim_end())
        .and_then(|()| stdout.flush())
        .map_err(AuditError::Output)?;
    Ok(report)
}

/// `app=http://...` -> (Some("app"), URL); `http://...` -> (None, URL).
fn probe_spec(spec: &str) -> Result<(Option<String>, http::Uri), AuditError> {
    let (name, url) = match spec.split_once('=') {
        // A name has no ':' or '/', so `http://h/?a=b` stays a URL.
        Some((name, url)) if !name.contains([':', '/']) => (Some(name.to_owned()), url),
        _ => (None, spec),
    };
    let url =
        probe::parse_url(url).map_err(|reason| AuditError::Usage(format!("--probe {reason}")))?;
    Ok((name, url))
}

/// Parses the command-line hops; a bare unknown name is allowed when a probe fills it in.
fn parse_hops(
    tokens: &[String],
    probes: &[(Option<String>, http::Uri)],
) -> Result<Vec<Hop>, AuditError> {
    let last = tokens.len().saturating_sub(1);
    tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let probed = probes.iter().any(|(name, _)| match name {
                Some(name) => name == token,
                None => i == last,
            });
            match parse_hop(token) {
                Err(AuditError::Hop { .. }) if probed && is_plain_name(token) => {
                    Ok(Hop::named(token.as_str()))
                }
                other => other,
            }
        })
        .collect()
}

fn is_plain_name(token: &str) -> bool {
    !token.is_empty()
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Probes `url` and puts what it found into `hop`'s server side. `before` is the previous hop's
/// client idle timeout: the probe waits at least a little longer than that, so it can tell
/// whether the hop out-waits it.
async fn probe_into(
    hop: &mut Hop,
    url: &http::Uri,
    before: Option<Idle>,
    quiet: bool,
) -> Result<(), AuditError> {
    let defaults = ProbeOptions::default();
    let max_idle = match before {
        Some(Idle::After(c)) => defaults.max_idle.max(server_idle_above(c)),
        _ => defaults.max_idle,
    };
    let opts = ProbeOptions {
        max_idle,
        ..defaults
    };
    let progress = probe::spinner(quiet);
    progress.set_prefix(format!("{}:", hop.name));
    let probed = probe::probe(url, &opts, Some(&progress)).await;
    progress.finish_and_clear();
    let report = probed.map_err(|source| AuditError::Probe {
        hop: hop.name.clone(),
        source,
    })?;
    hop.server = Some(if !report.keep_alive {
        Idle::Off
    } else {
        match report.idle_timeout {
            Some(t) => Idle::After(t),
            None => Idle::Longer(report.idle_bound),
        }
    });
    if report.cap_measured {
        hop.requests = report.request_cap;
        hop.announced = report.cap_announced.unwrap_or(true);
    }
    hop.probed = Some(url.to_string());
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainFile {
    #[serde(default)]
    hop: Vec<FileHop>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHop {
    name: String,
    preset: Option<String>,
    server: Option<toml::Value>,
    client: Option<toml::Value>,
    requests: Option<toml::Value>,
    announced: Option<bool>,
}

/// Reads `[[hop]]` tables; values are checked exactly as on the command line.
fn read_file(path: &Path) -> Result<Vec<Hop>, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuditError::File {
        path: path.to_owned(),
        source,
    })?;
    parse_file(&text, &path.display().to_string()).map_err(|reason| AuditError::FileFormat {
        path: path.to_owned(),
        reason,
    })
}

pub(super) fn parse_file(text: &str, origin: &str) -> Result<Vec<Hop>, String> {
    let file: ChainFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut hops = Vec::with_capacity(file.hop.len());
    for (index, hop) in file.hop.into_iter().enumerate() {
        let token = format!("{origin} [[hop]] #{} ({})", index + 1, hop.name);
        let mut pairs = Vec::new();
        let mut push = |key: &str, value: Option<toml::Value>| -> Result<(), String> {
            let text = match value {
                None => return Ok(()),
                Some(toml::Value::String(s)) => s,
                Some(toml::Value::Integer(n)) => n.to_string(),
                Some(other) => {
                    return Err(format!(
                        "{token}: {key} = {other}: expected a string or a number"
                    ));
                }
            };
            pairs.push((key.to_owned(), text));
            Ok(())
        };
        push("preset", hop.preset.map(toml::Value::String))?;
        push("server", hop.server)?;
        push("client", hop.client)?;
        push("requests", hop.requests)?;
        push(
            "announced",
            hop.announced
                .map(|b| toml::Value::String(if b { "yes" } else { "no" }.into())),
        )?;
        hops.push(build_hop(&hop.name, &pairs, &token).map_err(|e| e.to_string())?);
    }
    Ok(hops)
}
