//! The file format exactly as written: every key optional, values still text.
//!
//! `validate` turns these into the typed config; `Config::to_toml` fills them from it, so one
//! set of structs defines both what is read and what is printed.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::units::{format_duration, format_size};
use super::{AccessLog, Config};

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
    pub(crate) servers: Option<Vec<String>>,
    pub(crate) keepalive: Option<usize>,
    pub(crate) keepalive_timeout: Option<String>,
    pub(crate) keepalive_requests: Option<u64>,
    pub(crate) keepalive_time: Option<String>,
    pub(crate) connect_timeout: Option<String>,
    pub(crate) read_timeout: Option<String>,
    pub(crate) send_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) host: Option<String>,
    pub(crate) path_prefix: Option<String>,
    pub(crate) upstream: Option<String>,
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
                    servers: Some(g.servers.iter().map(|s| s.name.clone()).collect()),
                    keepalive: Some(g.keepalive),
                    keepalive_timeout: duration(g.keepalive_timeout),
                    keepalive_requests: Some(g.keepalive_requests),
                    keepalive_time: duration(g.keepalive_time),
                    connect_timeout: duration(g.connect_timeout),
                    read_timeout: duration(g.read_timeout),
                    send_timeout: duration(g.send_timeout),
                })
                .collect(),
            route: config
                .routes
                .iter()
                .map(|r| RawRoute {
                    host: r.host.clone(),
                    path_prefix: Some(r.path_prefix.clone()),
                    upstream: Some(r.upstream.clone()),
                })
                .collect(),
        }
    }
}
