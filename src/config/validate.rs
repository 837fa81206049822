//! Raw file values -> typed config: defaults applied, text parsed, names resolved, mistakes
//! rejected with the key that holds them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{RawConfig, RawDownstream, RawRoute, RawUpstream, Size};
use super::units::{parse_duration, parse_size};
use super::{
    AccessLog, Config, ConfigError, DEFAULT_DRAIN_TIMEOUT, DEFAULT_WORKERS, DownstreamConfig,
    Problem, RetryPolicy, RouteConfig, UpstreamGroupConfig,
};
use super::{health, retry, servers};

/// The smallest header limit accepted: nginx's default header buffer (8k); a smaller one
/// refuses heads that browsers send with ordinary cookies.
const MIN_HEADER_SIZE: u64 = 8192;

/// Zero hints: what to write instead of a zero duration, appended to the error.
const ZERO_ALLOWED: Option<&str> = None;
const NEVER_ZERO: Option<&str> = Some("");
const DOWNSTREAM_REUSE_OFF: Option<&str> =
    Some(" (to turn client keep-alive off, set keepalive_requests = 1)");
const UPSTREAM_REUSE_OFF: Option<&str> = Some(" (to turn connection reuse off, set keepalive = 0)");

pub(super) fn config(raw: RawConfig) -> Result<Config, ConfigError> {
    let listen = listen(raw.listen.map(|l| l.0).unwrap_or_default())?;
    let workers = match raw.workers.unwrap_or(DEFAULT_WORKERS) {
        // One thread is always safe when the OS cannot tell how many cores there are.
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let drain_timeout = duration(
        "drain_timeout",
        raw.drain_timeout,
        DEFAULT_DRAIN_TIMEOUT,
        ZERO_ALLOWED,
    )?;
    let access_log = access_log(raw.access_log)?;
    let admin = raw
        .admin
        .map(|text| socket_addr("admin", &text))
        .transpose()?;
    let downstream = downstream(raw.downstream.unwrap_or_default())?;
    let retry = retry::policy(
        "retry",
        raw.retry.unwrap_or_default(),
        &RetryPolicy::default(),
    )?;
    if raw.upstream.is_empty() {
        return Err(ConfigError::invalid("upstream", Problem::Empty));
    }
    let mut upstreams = Vec::with_capacity(raw.upstream.len());
    for (i, group) in raw.upstream.into_iter().enumerate() {
        let group = upstream(i + 1, group)?;
        if let Some(first) = upstreams
            .iter()
            .position(|g: &UpstreamGroupConfig| g.name == group.name)
        {
            let problem = Problem::DuplicateName {
                name: group.name,
                first: first + 1,
            };
            return Err(ConfigError::invalid(
                format!("upstream {}: name", i + 1),
                problem,
            ));
        }
        upstreams.push(group);
    }
    let routes = routes(raw.route, &upstreams, &retry)?;
    Ok(Config {
        listen,
        workers,
        drain_timeout,
        downstream,
        upstreams,
        routes,
        retry,
        access_log,
        admin,
    })
}

fn listen(texts: Vec<String>) -> Result<Vec<SocketAddr>, ConfigError> {
    if texts.is_empty() {
        return Err(ConfigError::invalid("listen", Problem::Empty));
    }
    let mut addrs = Vec::with_capacity(texts.len());
    for text in texts {
        let addr = socket_addr("listen", &text)?;
        if addrs.contains(&addr) {
            return Err(ConfigError::invalid(
                "listen",
                Problem::DuplicateAddress(text),
            ));
        }
        addrs.push(addr);
    }
    Ok(addrs)
}

/// Listening addresses are IP literals: binding to a name that resolves differently on the next
/// start would be a surprise.
fn socket_addr(at: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim()
        .parse()
        .map_err(|_| ConfigError::invalid(at, Problem::InvalidAddress(text.to_owned())))
}

fn access_log(text: Option<String>) -> Result<AccessLog, ConfigError> {
    Ok(match text.as_deref().map(str::trim) {
        None | Some("stdout") => AccessLog::Stdout,
        Some("off") => AccessLog::Off,
        Some("") => return Err(ConfigError::invalid("access_log", Problem::EmptyAccessLog)),
        Some(path) => AccessLog::File(PathBuf::from(path)),
    })
}

fn downstream(raw: RawDownstream) -> Result<DownstreamConfig, ConfigError> {
    let d = DownstreamConfig::default();
    let at = |key: &str| format!("downstream: {key}");
    let max_header_size = match raw.max_header_size {
        None => d.max_header_size,
        Some(size) => {
            let got = size_bytes(&at("max_header_size"), size)?;
            if got < MIN_HEADER_SIZE {
                let problem = Problem::TooSmall {
                    min: MIN_HEADER_SIZE,
                    got,
                };
                return Err(ConfigError::invalid(at("max_header_size"), problem));
            }
            in_memory(&at("max_header_size"), got)?
        }
    };
    Ok(DownstreamConfig {
        keepalive_timeout: duration(
            &at("keepalive_timeout"),
            raw.keepalive_timeout,
            d.keepalive_timeout,
            DOWNSTREAM_REUSE_OFF,
        )?,
        keepalive_requests: at_least_one(
            &at("keepalive_requests"),
            raw.keepalive_requests,
            d.keepalive_requests,
        )?,
        keepalive_time: duration(
            &at("keepalive_time"),
            raw.keepalive_time,
            d.keepalive_time,
            DOWNSTREAM_REUSE_OFF,
        )?,
        client_header_timeout: duration(
            &at("client_header_timeout"),
            raw.client_header_timeout,
            d.client_header_timeout,
            NEVER_ZERO,
        )?,
        client_body_timeout: duration(
            &at("client_body_timeout"),
            raw.client_body_timeout,
            d.client_body_timeout,
            NEVER_ZERO,
        )?,
        send_timeout: duration(
            &at("send_timeout"),
            raw.send_timeout,
            d.send_timeout,
            NEVER_ZERO,
        )?,
        max_header_size,
        max_body_size: match raw.max_body_size {
            None => d.max_body_size,
            Some(size) => size_bytes(&at("max_body_size"), size)?,
        },
    })
}

/// `index` counts `[[upstream]]` tables from 1, for errors before the name is known.
fn upstream(index: usize, raw: RawUpstream) -> Result<UpstreamGroupConfig, ConfigError> {
    let name = match raw.name {
        None => {
            return Err(ConfigError::invalid(
                format!("upstream {index}: name"),
                Problem::Missing,
            ));
        }
        Some(name) if !valid_name(&name) => {
            return Err(ConfigError::invalid(
                format!("upstream {index}: name"),
                Problem::InvalidName(name),
            ));
        }
        Some(name) => name,
    };
    let at = |key: &str| format!("upstream {name:?}: {key}");
    let d = UpstreamGroupConfig::with_defaults(name.clone(), Vec::new());
    let max_fails = raw.max_fails.unwrap_or(d.max_fails);
    let fail_timeout = duration(
        &at("fail_timeout"),
        raw.fail_timeout,
        d.fail_timeout,
        servers::FAIL_TIMEOUT_ZERO,
    )?;
    let servers = servers::servers(
        &at("servers"),
        raw.servers.unwrap_or_default(),
        max_fails,
        fail_timeout,
    )?;
    Ok(UpstreamGroupConfig {
        balance: servers::balance(&at("balance"), raw.balance, d.balance)?,
        max_fails,
        fail_timeout,
        health_check: health::health_check(&at("health_check"), raw.health_check)?,
        keepalive: raw.keepalive.unwrap_or(d.keepalive),
        keepalive_timeout: duration(
            &at("keepalive_timeout"),
            raw.keepalive_timeout,
            d.keepalive_timeout,
            UPSTREAM_REUSE_OFF,
        )?,
        keepalive_requests: at_least_one(
            &at("keepalive_requests"),
            raw.keepalive_requests,
            d.keepalive_requests,
        )?,
        keepalive_time: duration(
            &at("keepalive_time"),
            raw.keepalive_time,
            d.keepalive_time,
            UPSTREAM_REUSE_OFF,
        )?,
        resolve_interval: duration(
            &at("resolve_interval"),
            raw.resolve_interval,
            d.resolve_interval,
            None,
        )?,
        connect_timeout: duration(
            &at("connect_timeout"),
            raw.connect_timeout,
            d.connect_timeout,
            NEVER_ZERO,
        )?,
        read_timeout: duration(
            &at("read_timeout"),
            raw.read_timeout,
            d.read_timeout,
            NEVER_ZERO,
        )?,
        send_timeout: duration(
            &at("send_timeout"),
            raw.send_timeout,
            d.send_timeout,
            NEVER_ZERO,
        )?,
        guards: retry::guards(&at("guards"), raw.guards)?,
        replay_buffer: match raw.replay_buffer {
            None => d.replay_buffer,
            Some(size) => in_memory(
                &at("replay_buffer"),
                size_bytes(&at("replay_buffer"), size)?,
            )?,
        },
        on_unretryable: retry::on_unretryable(
            &at("on_unretryable"),
            raw.on_unretryable,
            d.on_unretryable,
        )?,
        retry_budget: retry::retry_budget(&at("retry_budget"), raw.retry_budget)?,
        name,
        servers,
    })
}

/// Group names appear unquoted in log lines and metric labels.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `base_retry` is the file's `[retry]`, which each `[route.retry]` overrides key by key.
fn routes(
    raw: Vec<RawRoute>,
    upstreams: &[UpstreamGroupConfig],
    base_retry: &RetryPolicy,
) -> Result<Vec<RouteConfig>, ConfigError> {
    if raw.is_empty() && upstreams.len() > 1 {
        return Err(ConfigError::invalid(
            "route",
            Problem::NoRoutes(upstreams.len()),
        ));
    }
    let mut routes: Vec<RouteConfig> = Vec::with_capacity(raw.len());
    // (host, path_prefix) -> route number, to name the first of two identical routes.
    let mut seen: HashMap<(Option<String>, String), usize> = HashMap::new();
    for (i, r) in raw.into_iter().enumerate() {
        let at = format!("route {}", i + 1);
        let host = r
            .host
            .map(|h| host(&h))
            .transpose()
            .map_err(|p| ConfigError::invalid(format!("{at}: host"), p))?;
        let path_prefix = path_prefix(r.path_prefix)
            .map_err(|p| ConfigError::invalid(format!("{at}: path_prefix"), p))?;
        let upstream = r
            .upstream
            .ok_or_else(|| ConfigError::invalid(format!("{at}: upstream"), Problem::Missing))?;
        if !upstreams.iter().any(|g| g.name == upstream) {
            return Err(ConfigError::invalid(
                at,
                Problem::UndefinedUpstream(upstream),
            ));
        }
        if let Some(first) = seen.insert((host.clone(), path_prefix.clone()), i + 1) {
            return Err(ConfigError::invalid(at, Problem::DuplicateRoute(first)));
        }
        let retry = match r.retry {
            None => base_retry.clone(),
            Some(raw) => retry::policy(&format!("{at}: retry"), raw, base_retry)?,
        };
        routes.push(RouteConfig {
            host,
            path_prefix,
            upstream,
            retry,
        });
    }
    Ok(routes)
}

/// Lowercases and drops one trailing dot, as the router does with request hosts.
fn host(text: &str) -> Result<String, Problem> {
    let invalid = |why| Problem::InvalidHost {
        host: text.to_owned(),
        why,
    };
    let host = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if host.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if host.contains('*') {
        return Err(invalid("wildcards are not supported"));
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err(invalid("a host name has no spaces or '/'"));
    }
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.contains(':') && !bracketed {
        return Err(invalid("must not include a port (any port matches)"));
    }
    Ok(host)
}

fn path_prefix(text: Option<String>) -> Result<String, Problem> {
    let Some(prefix) = text else {
        return Ok("/".to_owned());
    };
    let invalid = |why| Problem::InvalidPathPrefix {
        prefix: prefix.clone(),
        why,
    };
    if !prefix.starts_with('/') {
        return Err(invalid("must start with '/'"));
    }
    if prefix.contains(['?', '#']) || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("a path has no query, fragment or spaces"));
    }
    Ok(prefix)
}

fn duration(
    at: &str,
    text: Option<String>,
    default: Duration,
    zero_hint: Option<&'static str>,
) -> Result<Duration, ConfigError> {
    match text {
        None => Ok(default),
        Some(text) => parse_duration(&text, zero_hint).map_err(|p| ConfigError::invalid(at, p)),
    }
}

/// 0 would forbid even the first request on a connection; 1 is how reuse is turned off.
fn at_least_one(at: &str, value: Option<u64>, default: u64) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::invalid(
            at,
            Problem::TooSmall { min: 1, got: 0 },
        )),
        Some(n) => Ok(n),
    }
}

/// A size held in memory must fit the address space.
fn in_memory(at: &str, bytes: u64) -> Result<usize, ConfigError> {
    usize::try_from(bytes)
        .map_err(|_| ConfigError::invalid(at, Problem::SizeTooLarge(bytes.to_string())))
}

fn size_bytes(at: &str, size: Size) -> Result<u64, ConfigError> {
    match size {
        Size::Bytes(n) => {
            u64::try_from(n).map_err(|_| ConfigError::invalid(at, Problem::Negative(n)))
        }
        Size::Text(text) => parse_size(&text).map_err(|p| ConfigError::invalid(at, p)),
    }
}
