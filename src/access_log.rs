//! The JSON access log: one object per request. Field names are a contract, pinned by a test.
//!
//! Lines are serialized and written on a dedicated thread, so a slow disk or a blocked stdout
//! never stalls a request; when that thread falls behind, lines are dropped and counted.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Uri, Version};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

/// Lines queued for the writer at most; beyond this the writer is hopelessly behind and
/// dropping is better than growing memory without bound.
const QUEUE: usize = 65_536;

/// One request, as logged.
///
/// Fields hold what the request path already has (addresses, header values, the method and
/// target) rather than text: turning them into text is left to the writer thread, so a
/// request pays for no formatting, and nothing at all when the log is off.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Entry {
    #[serde(serialize_with = "iso8601")]
    pub timestamp: Option<SystemTime>,
    #[serde(serialize_with = "text_or_empty")]
    pub remote_addr: Option<IpAddr>,
    #[serde(serialize_with = "header_text")]
    pub request_id: Option<HeaderValue>,
    #[serde(serialize_with = "text_or_null")]
    pub upstream: Option<Arc<str>>,
    pub upstream_addr: Option<SocketAddr>,
    /// Serial of the client connection.
    pub connection: u64,
    /// Requests on the client connection, this one included.
    pub connection_requests: u64,
    /// Seconds, millisecond resolution, from the request head to the last byte sent.
    pub request_time: f64,
    pub upstream_connect_time: Option<f64>,
    pub upstream_response_time: Option<f64>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub body_bytes_sent: u64,
    pub request: RequestLine,
    #[serde(serialize_with = "header_text")]
    pub http_user_agent: Option<HeaderValue>,
    pub upstream_connection_reused: Option<bool>,
    pub upstream_connection_idle_ms: Option<u64>,
    pub upstream_connection_requests: Option<u64>,
    pub attempts: u32,
    /// Envoy's response flags (UF, UC, UT, URX, DC, NR), comma-separated; empty if none.
    pub response_flags: String,
    pub response_details: String,
}

fn iso8601<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    let t = t.unwrap_or_else(SystemTime::now);
    s.collect_str(&humantime::format_rfc3339_millis(t))
}

fn text_or_empty<S: serde::Serializer, T: fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_str(""),
    }
}

fn text_or_null<S: serde::Serializer, T: fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// A header value as text; "" when absent or not visible ASCII, as before it was stored.
fn header_text<S: serde::Serializer>(v: &Option<HeaderValue>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""))
}

/// The request line as nginx's `$request` shows it: "GET /path?q HTTP/1.1"; "" before the
/// request is known. The user information of a target's authority shows as `***`: it may
/// carry a password, no client should send it (RFC 9110 §4.2.4), and logs are read by more
/// people than those it was meant for. The error log writes the request line this way too.
#[derive(Clone, Debug, Default)]
pub struct RequestLine(pub Option<(Method, Uri, Version)>);

impl fmt::Display for RequestLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((method, uri, version)) = &self.0 else {
            return Ok(());
        };
        match uri.authority() {
            Some(authority) if authority.as_str().contains('@') => {
                let host = crate::wire::host_port(authority);
                let (scheme, sep) = uri.scheme().map_or(("", ""), |s| (s.as_str(), "://"));
                let rest = uri.path_and_query().map_or("", |p| p.as_str());
                write!(f, "{method} {scheme}{sep}***@{host}{rest} {version:?}")
            }
            _ => write!(f, "{method} {uri} {version:?}"),
        }
    }
}

impl Serialize for RequestLine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Seconds with millisecond resolution, as nginx prints times.
pub fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

impl Entry {
    pub fn flag(&mut self, flag: &str) {
        if !self.response_flags.is_empty() {
            self.response_flags.push(',');
        }
        self.response_flags.push_str(flag);
    }
}

/// A handle to the access log; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Entry>>,
    dropped: Counter,
}

/// Joins the writer thread after the last handle is gone, so every line is flushed.
pub struct Writer(Option<JoinHandle<()>>);

impl Writer {
    pub fn finish(mut self) {
        if let Some(handle) = self.0.take() {
            let _ = handle.join();
        }
    }
}

impl AccessLog {
    /// No log at all.
    pub fn off() -> (AccessLog, Writer) {
        (
            AccessLog {
                tx: None,
                dropped: Counter::default(),
            },
            Writer(None),
        )
    }

    /// Log to a file (appending) or to standard output when `path` is None.
    pub fn open(path: Option<&Path>, dropped: Counter) -> io::Result<(AccessLog, Writer)> {
        let out: Box<dyn Write + Send> = match path {
            Some(path) => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
            None => Box::new(io::stdout()),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let handle = std::thread::Builder::new()
            .name("kaguard-access-log".into())
            .spawn(move || write_lines(rx, out))?;
        Ok((
            AccessLog {
                tx: Some(tx),
                dropped,
            },
            Writer(Some(handle)),
        ))
    }

    /// Whether lines go anywhere; an entry need not be filled in when they do not.
    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    pub fn write(&self, entry: Entry) {
        if let Some(tx) = &self.tx
            && tx.try_send(entry).is_err()
        {
            self.dropped.inc();
        }
    }
}

fn write_lines(mut rx: mpsc::Receiver<Entry>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::new(out);
    let mut batch = Vec::with_capacity(256);
    while rx.blocking_recv_many(&mut batch, 256) > 0 {
        for entry in batch.drain(..) {
            if serde_json::to_writer(&mut out, &entry).is_ok() {
                let _ = out.write_all(b"\n");
            }
        }
        if rx.is_empty() {
            let _ = out.flush();
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_are_stable() {
        let value = serde_json::to_value(Entry::default()).expect("serializes");
        let mut keys: Vec<&str> = value
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "attempts",
                "body_bytes_sent",
                "connection",
                "connection_requests",
                "http_user_agent",
                "remote_addr",
                "request",
                "request_id",
                "request_time",
                "response_details",
                "response_flags",
                "status",
                "timestamp",
                "upstream",
                "upstream_addr",
                "upstream_connect_time",
                "upstream_connection_idle_ms",
                "upstream_connection_requests",
                "upstream_connection_reused",
                "upstream_response_time",
                "upstream_status",
            ]
        );
    }

    #[test]
    fn a_targets_user_information_is_masked() {
        let line = |target: &str| {
            let uri = target.parse().expect("a target");
            RequestLine(Some((Method::GET, uri, Version::HTTP_11))).to_string()
        };
        assert_eq!(
            line("http://user:secret@right.test:8080/p?q=1"),
            "GET http://***@right.test:8080/p?q=1 HTTP/1.1"
        );
        assert_eq!(line("http://u@h"), "GET http://***@h/ HTTP/1.1");
        assert_eq!(
            line("http://u@[::1]:8080/"),
            "GET http://***@[::1]:8080/ HTTP/1.1"
        );
        assert_eq!(line("u:p@h:80"), "GET ***@h:80 HTTP/1.1");
        assert_eq!(line("http://h/p"), "GET http://h/p HTTP/1.1");
        assert_eq!(line("/p?a@b"), "GET /p?a@b HTTP/1.1");
    }

    #[test]
    fn times_are_seconds_with_millisecond_resolution() {
        assert_eq!(seconds(Duration::from_micros(1_234_567)), 1.235);
    }
}
