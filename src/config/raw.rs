//! The file format exactly as written: every key optional, values still text.
//!
//! `validate` turns these into the typed config; `Config::to_toml` fills them from it, so one
//! set of structs defines both what is read and what is printed.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::units::{format_duration, format_size};
use super::{AccessLog, Config, Guards, OnUnretryable, RetryPolicy, servers};

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) listen: Option<Listen>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) workers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) drain_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) access_log: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) admin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) downstream: Option<RawDownstream>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) retry: Option<RawRetry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) upstream: Vec<RawUpstream>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) route: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDownstream {
    pub(crate) keepalive_timeout: Option<String>,
    pub(crate) keepalive_requests: Option<u64>,
    pub(crate) keepalive_time: Option<String>,
    pub(crate) client_header_timeout: Option<String>,
    pub(crate) client_body_timeout: Option<String>,
    pub(crate) send_timeout: Option<String>,
    pub(crate) max_header_size: Option<Size>,
    pub(crate) max_body_size: Option<Size>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub(crate) name: Option<String>,
    pub(crate) servers: Option<Vec<RawServer>>,
    pub(crate) balance: Option<String>,
    pub(crate) max_fails: Option<u32>,
    pub(crate) fail_timeout: Option<String>,
    pub(crate) keepalive: Option<usize>,
    pub(crate) keepalive_timeout: Option<String>,
    pub(crate) keepalive_requests: Option<u64>,
    pub(crate) keepalive_time: Option<String>,
    pub(crate) resolve_interval: Option<String>,
    pub(crate) connect_timeout: Option<String>,
    pub(crate) read_timeout: Option<String>,
    pub(crate) send_timeout: Option<String>,
    pub(crate) replay_buffer: Option<Size>,
    pub(crate) on_unretryable: Option<String>,
    pub(crate) guards: Option<RawGuards>,
    pub(crate) retry_budget: Option<RawRetryBudget>,
    pub(crate) health_check: Option<RawHealthCheck>,
}

/// `[upstream.health_check]`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthCheck {
    pub(crate) interval: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) expect_status: Option<String>,
    pub(crate) rises: Option<u32>,
    pub(crate) falls: Option<u32>,
    pub(crate) timeout: Option<String>,
}

/// One entry of `servers`: `"host:port"`, `"host:port weight=3 max_fails=2 fail_timeout=5s"`
/// (nginx's `server` parameters), or `{ addr = "host:port", weight = 3, ... }`.
#[derive(Debug)]
pub(crate) enum RawServer {
    Text(String),
    Table(RawServerTable),
}

/// An inline-table server entry. `to_toml` never writes one: it writes every server as its
/// string.
#[derive(Debug, Default, Serialize)]
pub(crate) struct RawServerTable {
    pub(crate) addr: Option<String>,
    pub(crate) weight: Option<u32>,
    pub(crate) max_fails: Option<u32>,
    pub(crate) fail_timeout: Option<String>,
    /// Keys that name no parameter, in file order. Collected rather than refused while
    /// parsing, so the error can name the group and the server, as for a string entry.
    #[serde(skip)]
    pub(crate) unknown: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetryBudget {
    pub(crate) percent: Option<u32>,
    pub(crate) min_concurrency: Option<u32>,
}

/// `[retry]` and `[route.retry]`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub(crate) retry_on: Option<Vec<String>>,
    pub(crate) retriable_status_codes: Option<Vec<u16>>,
    pub(crate) attempts: Option<u32>,
    pub(crate) per_try_timeout: Option<String>,
    pub(crate) backoff_base: Option<String>,
    pub(crate) backoff_max: Option<String>,
    pub(crate) retry_non_idempotent: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) host: Option<String>,
    pub(crate) path_prefix: Option<String>,
    pub(crate) upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) retry: Option<RawRetry>,
}

/// `guards = "on"` or `"off"`, or a `[upstream.guards]` table of switches.
#[derive(Debug)]
pub(crate) enum RawGuards {
    Switch(String),
    Table(RawGuardTable),
}

/// The switches of a `[upstream.guards]` table; a missing one is on.
#[derive(Debug, Default, Serialize)]
pub(crate) struct RawGuardTable {
    pub(crate) check_before_reuse: Option<bool>,
    pub(crate) honor_hints: Option<bool>,
    pub(crate) learn: Option<bool>,
    pub(crate) close_first: Option<bool>,
    pub(crate) risk_aware_checkout: Option<bool>,
    pub(crate) safe_retry: Option<bool>,
    /// Keys that name no guard, in file order. Collected rather than refused while parsing, so
    /// the error can name the upstream group ("upstream \"app\": guards: unknown key ...").
    #[serde(skip)]
    pub(crate) unknown: Vec<String>,
}

impl Serialize for RawGuards {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RawGuards::Switch(text) => serializer.serialize_str(text),
            RawGuards::Table(table) => table.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for RawGuards {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct GuardsVisitor;
        impl<'de> Visitor<'de> for GuardsVisitor {
            type Value = RawGuards;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"on\", \"off\" or a table")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawGuards, E> {
                Ok(RawGuards::Switch(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawGuards, A::Error> {
                let mut table = RawGuardTable::default();
                while let Some(key) = map.next_key::<String>()? {
                    let switch = match key.as_str() {
                        "check_before_reuse" => &mut table.check_before_reuse,
                        "honor_hints" => &mut table.honor_hints,
                        "learn" => &mut table.learn,
                        "close_first" => &mut table.close_first,
                        "risk_aware_checkout" => &mut table.risk_aware_checkout,
                        "safe_retry" => &mut table.safe_retry,
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                            table.unknown.push(key);
                            continue;
                        }
                    };
                    *switch = Some(map.next_value()?);
                }
                Ok(RawGuards::Table(table))
            }
        }
        deserializer.deserialize_any(GuardsVisitor)
    }
}

impl Serialize for RawServer {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RawServer::Text(text) => serializer.serialize_str(text),
            RawServer::Table(table) => table.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for RawServer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ServerVisitor;
        impl<'de> Visitor<'de> for ServerVisitor {
            type Value = RawServer;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"host:port\", optionally with parameters, or a table with addr")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawServer, E> {
                Ok(RawServer::Text(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawServer, A::Error> {
                let mut table = RawServerTable::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "addr" => table.addr = Some(map.next_value()?),
                        "weight" => table.weight = Some(map.next_value()?),
                        "max_fails" => table.max_fails = Some(map.next_value()?),
                        "fail_timeout" => table.fail_timeout = Some(map.next_value()?),
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                            table.unknown.push(key);
                        }
                    }
                }
                Ok(RawServer::Table(table))
            }
        }
        deserializer.deserialize_any(ServerVisitor)
    }
}

/// `listen = "addr"` or `listen = ["addr", ...]`.
#[derive(Debug)]
pub(crate) struct Listen(pub(crate) Vec<String>);

impl Serialize for Listen {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListenVisitor;
        impl<'de> Visitor<'de> for ListenVisitor {
            type Value = Listen;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address string or an array of address strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Listen, E> {
                Ok(Listen(vec![v.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Listen, A::Error> {
                let mut addrs = Vec::new();
                while let Some(addr) = seq.next_element::<String>()? {
                    addrs.push(addr);
                }
                Ok(Listen(addrs))
            }
        }
        deserializer.deserialize_any(ListenVisitor)
    }
}

/// A size as written: an integer of bytes or a string with a unit.
#[derive(Debug)]
pub(crate) enum Size {
    Bytes(i64),
    Text(String),
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Size::Bytes(n) => serializer.serialize_i64(*n),
            Size::Text(s) => serializer.serialize_str(s),
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: bytes as an integer, or a string such as \"64KiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                Ok(Size::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                // TOML integers are i64, so a larger one cannot come from a file.
                i64::try_from(v)
                    .map(Size::Bytes)
                    .map_err(|_| E::custom("size does not fit in 64 bits"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                Ok(Size::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

impl From<&Config> for RawConfig {
    fn from(config: &Config) -> Self {
        let d = &config.downstream;
        let duration = |d: Duration| Some(format_duration(d));
        // Exact multiples of 1024 read better with a unit; anything else stays an integer.
        let size = |bytes: u64| {
            let text = format_size(bytes);
            Some(text.parse().map_or(Size::Text(text), Size::Bytes))
        };
        RawConfig {
            listen: Some(Listen(
                config.listen.iter().map(ToString::to_string).collect(),
            )),
            workers: Some(config.workers),
            drain_timeout: duration(config.drain_timeout),
            access_log: Some(match &config.access_log {
                AccessLog::Off => "off".to_owned(),
                AccessLog::Stdout => "stdout".to_owned(),
                AccessLog::File(path) => path.to_string_lossy().into_owned(),
            }),
            admin: config.admin.map(|addr| addr.to_string()),
            downstream: Some(RawDownstream {
                keepalive_timeout: duration(d.keepalive_timeout),
                keepalive_requests: Some(d.keepalive_requests),
                keepalive_time: duration(d.keepalive_time),
                client_header_timeout: duration(d.client_header_timeout),
                client_body_timeout: duration(d.client_body_timeout),
                send_timeout: duration(d.send_timeout),
                max_header_size: size(d.max_header_size as u64),
                max_body_size: size(d.max_body_size),
            }),
            upstream: config
                .upstreams
                .iter()
                .map(|g| RawUpstream {
                    name: Some(g.name.clone()),
                    servers: Some(
                        g.servers
                            .iter()
                            .map(|s| RawServer::Text(servers::server_text(s, g)))
                            .collect(),
                    ),
                    balance: Some(servers::balance_name(g.balance).to_owned()),
                    max_fails: Some(g.max_fails),
                    fail_timeout: duration(g.fail_timeout),
                    keepalive: Some(g.keepalive),
                    keepalive_timeout: duration(g.keepalive_timeout),
                    keepalive_requests: Some(g.keepalive_requests),
                    keepalive_time: duration(g.keepalive_time),
                    resolve_interval: duration(g.resolve_interval),
                    connect_timeout: duration(g.connect_timeout),
                    read_timeout: duration(g.read_timeout),
                    send_timeout: duration(g.send_timeout),
                    replay_buffer: size(g.replay_buffer as u64),
                    on_unretryable: Some(
                        match g.on_unretryable {
                            OnUnretryable::BadGateway => "502",
                            OnUnretryable::CloseClient => "close",
                        }
                        .to_owned(),
                    ),
                    guards: Some(RawGuards::Table(RawGuardTable::from(g.guards))),
                    retry_budget: Some(RawRetryBudget {
                        percent: Some(g.retry_budget.percent),
                        min_concurrency: Some(g.retry_budget.min_concurrency),
                    }),
                    health_check: g.health_check.as_ref().map(RawHealthCheck::from),
                })
                .collect(),
            route: config
                .routes
                .iter()
                .map(|r| RawRoute {
                    host: r.host.clone(),
                    path_prefix: Some(r.path_prefix.clone()),
                    upstream: Some(r.upstream.clone()),
                    retry: Some(RawRetry::from(&r.retry)),
                })
                .collect(),
            retry: Some(RawRetry::from(&config.retry)),
        }
    }
}

impl From<Guards> for RawGuardTable {
    fn from(g: Guards) -> Self {
        RawGuardTable {
            check_before_reuse: Some(g.check_before_reuse),
            honor_hints: Some(g.honor_hints),
            learn: Some(g.learn),
            close_first: Some(g.close_first),
            risk_aware_checkout: Some(g.risk_aware_checkout),
            safe_retry: Some(g.safe_retry),
            unknown: Vec::new(),
        }
    }
}

impl From<&RetryPolicy> for RawRetry {
    fn from(p: &RetryPolicy) -> Self {
        RawRetry {
            retry_on: Some(
                super::retry::retry_on_names(p.retry_on)
                    .map(str::to_owned)
                    .collect(),
            ),
            retriable_status_codes: Some(p.retriable_status_codes.clone()),
            attempts: Some(p.attempts),
            // "0s" is how the file says "none".
            per_try_timeout: Some(format_duration(p.per_try_timeout.unwrap_or_default())),
            backoff_base: Some(format_duration(p.backoff_base)),
            backoff_max: Some(format_duration(p.backoff_max)),
            retry_non_idempotent: Some(p.retry_non_idempotent),
        }
    }
}
