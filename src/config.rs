//! The TOML file and the command line -> a validated, typed [`Config`].
//!
//! Reading is two steps: serde fills `raw` structs that mirror the file (every key optional,
//! unknown keys rejected), then `validate` applies defaults, parses durations, sizes and
//! addresses, resolves upstream servers once, and rejects configs that cannot work. Every
//! default lives below with its reason; `docs/config.md` is the reference.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod error;
mod health;
mod raw;
mod retry;
mod servers;
mod units;
mod validate;

pub use error::{ConfigError, Problem};

/// A validated config: every default filled in, every address resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// At least one.
    pub listen: Vec<SocketAddr>,
    /// Runtime threads; the file's 0 is resolved to the number of cores at load.
    pub workers: usize,
    /// On graceful shutdown, how long in-flight requests may still finish.
    pub drain_timeout: Duration,
    pub downstream: DownstreamConfig,
    /// In file order; names unique; at least one.
    pub upstreams: Vec<UpstreamGroupConfig>,
    /// May be empty: then the only upstream group takes every request.
    pub routes: Vec<RouteConfig>,
    /// The file's `[retry]`: what requests get when there are no routes, and what every
    /// `[route.retry]` starts from.
    pub retry: RetryPolicy,
    pub access_log: AccessLog,
    /// Address of the admin listener; `None` means none.
    pub admin: Option<SocketAddr>,
}

/// The client side, with nginx's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownstreamConfig {
    /// Idle time announced in `Keep-Alive: timeout=N`; the proxy holds the connection a little
    /// longer so a client never races our close.
    pub keepalive_timeout: Duration,
    /// Requests served on one client connection before it is closed.
    pub keepalive_requests: u64,
    /// Longest lifetime of a client connection.
    pub keepalive_time: Duration,
    pub client_header_timeout: Duration,
    /// Between two successive reads of the request body.
    pub client_body_timeout: Duration,
    /// Between two successive writes to the client.
    pub send_timeout: Duration,
    /// Request line plus headers, in bytes; at least 8192.
    pub max_header_size: usize,
    /// Request body limit in bytes; 0 means unlimited.
    pub max_body_size: u64,
}

/// A named set of upstream servers sharing one pool policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamGroupConfig {
    pub name: String,
    /// At least one.
    pub servers: Vec<ServerConfig>,
    /// How a try picks one of `servers`.
    pub balance: Balance,
    /// The default of each server's `max_fails`: failures within `fail_timeout` that take a
    /// server out; 0 means a server is never taken out for failing.
    pub max_fails: u32,
    /// The default of each server's `fail_timeout`: the window that counts failures, and how
    /// long a server stays out; never zero.
    pub fail_timeout: Duration,
    /// Active checks; `None` means servers are judged by live traffic alone.
    pub health_check: Option<HealthCheckConfig>,
    /// Idle connections kept for the group; 0 means no reuse at all.
    pub keepalive: usize,
    /// How long a pooled connection may sit idle before we close it.
    pub keepalive_timeout: Duration,
    /// Requests sent on one upstream connection before it is closed.
    pub keepalive_requests: u64,
    /// Longest lifetime of an upstream connection.
    pub keepalive_time: Duration,
    /// How often servers given by name are resolved again (or the record's TTL, when the
    /// resolver gives one); zero resolves them only at start, as nginx does.
    pub resolve_interval: Duration,
    pub connect_timeout: Duration,
    /// Between two successive reads from the upstream.
    pub read_timeout: Duration,
    /// Between two successive writes to the upstream.
    pub send_timeout: Duration,
    /// The race guards, all on by default.
    pub guards: Guards,
    /// Request bodies up to this many bytes are held so the request can be sent again; a
    /// larger body that was already partly sent is never replayed.
    pub replay_buffer: usize,
    pub on_unretryable: OnUnretryable,
    pub retry_budget: RetryBudget,
}

/// The keep-alive race guards of an upstream group; each can be switched off for tests and
/// comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guards {
    /// Peek the socket for FIN, RST or stray bytes just before reuse.
    pub check_before_reuse: bool,
    /// Obey the upstream's `Keep-Alive: timeout=N, max=M`.
    pub honor_hints: bool,
    /// Learn the upstream's real idle timeout and request cap from its closes.
    pub learn: bool,
    /// Close idle connections before the effective budget runs out.
    pub close_first: bool,
    /// Requests that must not be retried take only settled, young-enough connections.
    pub risk_aware_checkout: bool,
    /// Resend a request that failed on a reused connection before any response byte, when safe.
    pub safe_retry: bool,
}

impl Guards {
    /// Every guard on: the default, and the point of kaguard.
    pub const ON: Guards = Guards {
        check_before_reuse: true,
        honor_hints: true,
        learn: true,
        close_first: true,
        risk_aware_checkout: true,
        safe_retry: true,
    };
    /// Every guard off: a plain keep-alive pool, for tests and comparison.
    pub const OFF: Guards = Guards {
        check_before_reuse: false,
        honor_hints: false,
        learn: false,
        close_first: false,
        risk_aware_checkout: false,
        safe_retry: false,
    };
}

impl Default for Guards {
    fn default() -> Self {
        Guards::ON
    }
}

/// What a client gets when its request failed on a reused connection before any response byte
/// and may not be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnretryable {
    /// Answer 502 (file: `"502"`).
    BadGateway,
    /// Close the client connection without a response if it already carried a request, so the
    /// client's own retry rules apply, as HAProxy does; otherwise answer 502 (file: `"close"`).
    CloseClient,
}

/// Caps retries so that a failing group is not hit with a multiple of its load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudget {
    /// Retries in flight may be at most this share of the requests in flight in the group;
    /// 0..=100.
    pub percent: u32,
    /// Retries in flight allowed whatever the share, so a quiet group can still retry.
    pub min_concurrency: u32,
}

/// When a failed request is sent again, in Envoy's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    /// The statuses `retry_on.retriable_status_codes` retries; each 100..=599.
    pub retriable_status_codes: Vec<u16>,
    /// Tries in all, the first included; 1..=10.
    pub attempts: u32,
    /// Limit on each try until the response head; `None` means the group's `read_timeout`
    /// alone applies (the file's "0s").
    pub per_try_timeout: Option<Duration>,
    /// Wait before the first retry, jittered and doubled for each one after.
    pub backoff_base: Duration,
    /// Longest wait between tries; at least `backoff_base`.
    pub backoff_max: Duration,
    /// Whether requests that are not idempotent (POST, PATCH, ... without `Idempotency-Key`)
    /// may be retried on reset, timeout or status; RFC 9110 9.2.2 says a proxy must not.
    pub retry_non_idempotent: bool,
}

/// The failures a [`RetryPolicy`] retries; the file lists them by Envoy's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryOn {
    /// `connect-failure`: the connection could not be opened, so nothing was sent.
    pub connect_failure: bool,
    /// `reset`: the connection closed or reset before any response byte.
    pub reset: bool,
    /// `refused-stream`: the upstream refused the request unprocessed (HTTP/2 REFUSED_STREAM).
    pub refused_stream: bool,
    /// `retriable-status-codes`: the response status is in `retriable_status_codes`.
    pub retriable_status_codes: bool,
    /// `timeout`: a try timed out before the response head (`per_try_timeout`, or the group's
    /// `read_timeout` when there is none).
    pub timeout: bool,
}

/// How a try picks a server of its group; the file's names are nginx's and linkerd's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// `"round_robin"`: smooth weighted round robin, nginx's.
    RoundRobin,
    /// `"least_conn"`: fewest requests in flight relative to weight; ties go round robin.
    LeastConn,
    /// `"p2c_load"`: of two servers drawn at random, the one with fewer requests in flight
    /// relative to weight.
    P2cLoad,
    /// `"p2c_ewma"`: of two servers drawn at random, the one with the lower peak-EWMA latency
    /// times (requests in flight + 1), linkerd's.
    P2cEwma,
}

/// Active health checks of a group: a GET of `path` on every server each `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Between the starts of two checks of one server; longer than `timeout`.
    pub interval: Duration,
    /// Starts with '/'; no spaces, no fragment.
    pub path: String,
    /// Statuses that pass, inclusive; each 100..=599, the first not above the second.
    pub expect_status: (u16, u16),
    /// Consecutive passes that bring a server that is down back up; at least 1.
    pub rises: u32,
    /// Consecutive failures that take a server that is up down; at least 1.
    pub falls: u32,
    /// A check with no complete response head by then fails; shorter than `interval`, so
    /// checks of one server never overlap.
    pub timeout: Duration,
}

/// One upstream server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The address as written, e.g. "app.internal:3000", without parameters; what logs show.
    pub name: String,
    /// Every address the name resolved to at load, in the resolver's order, each once; never
    /// empty. A name that is not an IP address is resolved again every `resolve_interval`.
    pub addrs: Vec<SocketAddr>,
    /// Share of the group's requests relative to the other servers; 1..=1000.
    pub weight: u32,
    /// Failures within `fail_timeout` that take this server out; 0 means never.
    pub max_fails: u32,
    /// The window that counts failures, and how long the server then stays out; never zero.
    pub fail_timeout: Duration,
}

impl ServerConfig {
    /// A server at the built-in defaults: weight 1, `max_fails` 1, `fail_timeout` 10 s. In a
    /// group with its own `max_fails` or `fail_timeout`, set those too.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Self {
        Self {
            name: name.into(),
            addrs: vec![addr],
            weight: DEFAULT_WEIGHT,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
        }
    }
}

/// Sends requests for a host and path prefix to an upstream group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Lowercased, without port or trailing dot; `None` matches any host.
    pub host: Option<String>,
    /// Starts with '/'; matches on a path-segment boundary.
    pub path_prefix: String,
    /// Names one of `Config::upstreams`.
    pub upstream: String,
    /// The route's `[route.retry]` over the file's `[retry]`, every key resolved.
    pub retry: RetryPolicy,
}

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Stdout,
    File(PathBuf),
}

/// Default `workers`; 0 means one runtime thread per core, resolved at load.
const DEFAULT_WORKERS: usize = 0;
/// Long enough for typical requests to finish; what Kubernetes gives a pod
/// (`terminationGracePeriodSeconds`) before SIGKILL.
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// nginx's: every server an equal share.
const DEFAULT_WEIGHT: u32 = 1;
/// nginx's: one failed try takes a server out for `fail_timeout`, so the next requests go to
/// the others at once instead of each paying for a dead server first.
const DEFAULT_MAX_FAILS: u32 = 1;
/// nginx's: short enough that a restarted server gets traffic back within seconds, long
/// enough that a dead one costs one failed try per 10 s rather than one per request.
const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for DownstreamConfig {
    fn default() -> Self {
        Self {
            // Must outlive the idle timeout of any load balancer in front of us: AWS ALB 60 s,
            // GCP 600 s (fixed, backend side). A shorter one here makes *us* close under them.
            keepalive_timeout: Duration::from_secs(620),
            // nginx's default.
            keepalive_requests: 1000,
            // nginx's default.
            keepalive_time: Duration::from_secs(3600),
            // nginx's defaults.
            client_header_timeout: Duration::from_secs(60),
            client_body_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            // nginx's `large_client_header_buffers 4 8k`.
            max_header_size: 32 * 1024,
            // Unlimited: bodies are streamed, not buffered, and nginx's 1m default is a top
            // cause of surprise 413s.
            max_body_size: 0,
        }
    }
}

impl UpstreamGroupConfig {
    /// A group with every pool and timeout setting at its default.
    pub fn with_defaults(name: impl Into<String>, servers: Vec<ServerConfig>) -> Self {
        Self {
            name: name.into(),
            servers,
            // nginx's default: predictable, and even when the servers are alike, as most
            // groups' are; the other modes are for servers or requests that differ.
            balance: Balance::RoundRobin,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            // Checks are requests the operator must allow for (a path that is cheap and
            // needs no auth); until asked for, live traffic judges servers (`max_fails`).
            health_check: None,
            // nginx's default.
            keepalive: 32,
            // Below Gunicorn's 2 s, the shortest keep-alive among common app servers (Node 5 s,
            // uvicorn 5 s, Apache 5 s, Tomcat 20 s, Jetty 30 s), with room for a FIN in flight.
            // Busy connections are never idle this long, so reuse stays high under load.
            // Proxies default far higher (nginx 60 s, Go 90 s, Caddy 2 min, Envoy 1 h), and that
            // inversion is the race this project exists to remove.
            keepalive_timeout: Duration::from_secs(1),
            // nginx's default; lets reuse reach 99.9 %.
            keepalive_requests: 1000,
            // nginx's default.
            keepalive_time: Duration::from_secs(3600),
            // Envoy's `dns_refresh_rate`: a moved server gets traffic within seconds, and a
            // resolver answers one name every few seconds without strain.
            resolve_interval: Duration::from_secs(5),
            // Envoy's default; nginx's 60 s makes a dead server hang clients for a minute.
            connect_timeout: Duration::from_secs(5),
            // nginx's `proxy_read_timeout` and `proxy_send_timeout`.
            read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            // The guards are what kaguard is for; switching them off is for tests and for
            // measuring what they are worth.
            guards: Guards::ON,
            // Pingora's retry buffer: holds the bodies of typical API calls and forms, while a
            // request in flight never holds more than this for replay.
            replay_buffer: 64 * 1024,
            // What nginx, Envoy and Go answer, and what monitoring expects; closing the client
            // connection relies on the client to retry, which browsers do and many API
            // clients do not.
            on_unretryable: OnUnretryable::BadGateway,
            retry_budget: RetryBudget::default(),
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            // Envoy's: a struggling group sees at most 1.2 times its load, not `attempts`
            // times.
            percent: 20,
            // Envoy's: with few requests in flight a share of them rounds to no retry at all.
            min_concurrency: 3,
        }
    }
}

impl Default for HealthCheckConfig {
    /// What `[upstream.health_check]` starts from; an empty table turns checks on with these.
    fn default() -> Self {
        Self {
            // NGINX Plus's `health_check interval=5`: a dead server is noticed within
            // `falls` x 5 s when no traffic does it sooner, at one request per 5 s per server.
            interval: Duration::from_secs(5),
            // NGINX Plus's and HAProxy's: the one path every HTTP server answers.
            path: "/".to_owned(),
            // NGINX Plus's default `match`: 2xx and 3xx pass; a redirect to a login page still
            // means the server is serving.
            expect_status: (200, 399),
            // HAProxy's `rise 2`: one lucky answer does not bring a flapping server back.
            rises: 2,
            // HAProxy's `fall 3`: one lost check (a GC pause, a dropped packet) does not take
            // a serving server out.
            falls: 3,
            // A trivial GET that takes over a second means the server is in trouble; it must
            // be below `interval` so checks never pile up.
            timeout: Duration::from_secs(1),
        }
    }
}

impl Default for RetryPolicy {
    /// The built-in policy: what the file's `[retry]` starts from.
    fn default() -> Self {
        Self {
            // nginx users expect `proxy_next_upstream error timeout`-like recovery from
            // connection errors; `reset` retries only idempotent requests (see
            // `retry_non_idempotent`), which RFC 9110 allows.
            retry_on: RetryOn {
                connect_failure: true,
                reset: true,
                ..RetryOn::default()
            },
            // Statuses are retried only when asked for: only the operator knows which of
            // them mean "not processed".
            retriable_status_codes: Vec::new(),
            // One retry, as Envoy's `num_retries: 1` once retries are on: it recovers from
            // one bad connection or server without multiplying load.
            attempts: 2,
            // Envoy's (none): the group's `read_timeout` already bounds a silent upstream.
            per_try_timeout: None,
            // Envoy's: long enough to let a restarting server's socket close, short enough
            // to add nothing a user notices.
            backoff_base: Duration::from_millis(25),
            // Envoy's 10 x base.
            backoff_max: Duration::from_millis(250),
            // RFC 9110 9.2.2: "A proxy MUST NOT automatically retry non-idempotent requests."
            retry_non_idempotent: false,
        }
    }
}

impl Config {
    /// Reads and validates a config file; errors start with the file's path.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_toml_str(&text).map_err(|inner| ConfigError::InFile {
            path: path.to_owned(),
            inner: Box::new(inner),
        })
    }

    /// Parses and validates a config in the file format.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(&e, text))?;
        validate::config(raw)
    }

    /// The config for listen addresses and upstream servers given on the command line: every
    /// default, one group named "default" holding all the servers, and no routes, so that
    /// group takes every request.
    pub fn from_cli(listen: &[String], upstreams: &[String]) -> Result<Config, ConfigError> {
        validate::config(raw::RawConfig {
            listen: Some(raw::Listen(listen.to_vec())),
            upstream: vec![raw::RawUpstream {
                name: Some("default".to_owned()),
                servers: Some(
                    upstreams
                        .iter()
                        .cloned()
                        .map(raw::RawServer::Text)
                        .collect(),
                ),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    /// The effective config in the file format, every default written out; loads back to an
    /// equal `Config` (servers are resolved again).
    pub fn to_toml(&self) -> String {
        // Only an integer above i64::MAX, which no file can hold, makes this fail.
        let body = toml::to_string(&raw::RawConfig::from(self))
            .unwrap_or_else(|e| format!("# cannot print this config: {e}\n"));
        let admin_off = match self.admin {
            None => "# admin is off: add `admin = \"127.0.0.1:9901\"` to turn it on.\n",
            Some(_) => "",
        };
        let unchecked: Vec<String> = self
            .upstreams
            .iter()
            .filter(|g| g.health_check.is_none())
            .map(|g| format!("{:?}", g.name))
            .collect();
        let checks_off = match unchecked.as_slice() {
            [] => String::new(),
            names => format!(
                "# active health checks are off in upstream {}: add an [upstream.health_check] \
                 table to turn them on.\n",
                names.join(", ")
            ),
        };
        format!(
            "# Effective kaguard config: every default written out.\n{admin_off}{checks_off}\n{body}"
        )
    }
}

#[cfg(test)]
mod tests;
