//! The idle timeouts of common proxies, load balancers and app servers at their defaults, and
//! the setting that changes each one (sources: research/anchors.md and each project's docs).

use std::time::Duration;

use super::Idle;
use crate::tools::probe::{config_duration, entry, envoy_duration};

const fn secs(n: u64) -> Option<Idle> {
    Some(Idle::After(Duration::from_secs(n)))
}

/// How a system writes a duration in the setting a [`Knob`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Unit {
    /// `4s`, `1500ms` (nginx, HAProxy, Traefik, Caddy, kaguard).
    Text,
    /// `4s`, `1.5s` (Envoy's protobuf Duration).
    Envoy,
    /// `65 * time.Second`, `1500 * time.Millisecond` (Go source).
    Go,
    /// Whole seconds, a bare number.
    Secs,
    /// Whole milliseconds, a bare number.
    Millis,
}

impl Unit {
    /// `d` in this unit; `None` when the unit cannot express it (under 1 s in whole seconds).
    pub(super) fn format(self, d: Duration) -> Option<String> {
        let ms = d.as_millis();
        match self {
            Unit::Text => Some(config_duration(d)),
            Unit::Envoy => Some(envoy_duration(d)),
            Unit::Go if ms.is_multiple_of(1000) => Some(format!("{} * time.Second", ms / 1000)),
            Unit::Go => Some(format!("{ms} * time.Millisecond")),
            Unit::Secs if d.as_secs() == 0 => None,
            Unit::Secs => Some(d.as_secs().to_string()),
            Unit::Millis => Some(ms.to_string()),
        }
    }
}

/// A setting, with `{}` where the value goes; or why there is none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Knob {
    Set(&'static str, Unit),
    Missing(&'static str),
}

/// One named system and its defaults.
#[derive(Debug)]
pub(super) struct Preset {
    pub(super) name: &'static str,
    pub(super) what: &'static str,
    /// How long it keeps idle connections from the previous hop; `None`: no built-in default.
    pub(super) server: Option<Idle>,
    /// How long it keeps idle connections to the next hop; `None`: not a proxy.
    pub(super) client: Option<Idle>,
    /// Requests it serves per client connection before closing it, and whether the last
    /// response says `Connection: close`.
    pub(super) requests: Option<(u64, bool)>,
    /// What the defaults above mean, where they are not plain.
    pub(super) note: &'static str,
    /// Why `server` is `None`.
    pub(super) server_unknown: &'static str,
    /// Sets its idle timeout toward the next hop.
    pub(super) lower_client: Knob,
    /// What else lowering it changes, appended to the fix.
    pub(super) lower_caveat: &'static str,
    /// Sets its idle timeout toward the previous hop.
    pub(super) raise_server: Knob,
    /// Limits the requests it sends on one upstream connection; the value is the request count,
    /// or one less for HAProxy's `max-reuse` (which counts reuses after the first request).
    pub(super) request_limit: Option<(&'static str, bool)>,
    /// It learns the next hop's idle timeout and request cap from observed closes.
    pub(super) learns: bool,
}

const NOT_A_PROXY: Knob = Knob::Missing("it is not a proxy");

const BASE: Preset = Preset {
    name: "",
    what: "",
    server: None,
    client: None,
    requests: None,
    note: "",
    server_unknown: "",
    lower_client: NOT_A_PROXY,
    lower_caveat: "",
    raise_server: Knob::Missing("no known setting"),
    request_limit: None,
    learns: false,
};

pub(super) const PRESETS: &[Preset] = &[
    Preset {
        name: "alb",
        what: "AWS Application Load Balancer",
        server: secs(60),
        client: secs(60),
        note: "one attribute, idle_timeout.timeout_seconds (1-4000 s), sets both sides",
        lower_client: Knob::Set("`idle_timeout.timeout_seconds = {}` on the ALB", Unit::Secs),
        lower_caveat: "; it also cuts the ALB's client side",
        raise_server: Knob::Set(
            "the attribute `idle_timeout.timeout_seconds = {}`",
            Unit::Secs,
        ),
        ..BASE
    },
    Preset {
        name: "gcp",
        what: "Google Cloud external Application Load Balancer",
        server: secs(610),
        client: secs(600),
        note: "backend keep-alive 600 s is fixed; client keep-alive 610 s (5-1200 s)",
        lower_client: Knob::Missing("GCP's backend keep-alive timeout (600 s) is fixed"),
        raise_server: Knob::Set(
            "the target proxy's `httpKeepAliveTimeoutSec = {}`",
            Unit::Secs,
        ),
        ..BASE
    },
    Preset {
        name: "nginx",
        what: "nginx",
        server: secs(75),
        client: secs(60),
        requests: Some((1000, true)),
        lower_client: Knob::Set(
            "`keepalive_timeout {};` in nginx's upstream block",
            Unit::Text,
        ),
        raise_server: Knob::Set(
            "`keepalive_timeout {};` in nginx's http or server block",
            Unit::Text,
        ),
        request_limit: Some(("`keepalive_requests {};` in the upstream block", false)),
        ..BASE
    },
    Preset {
        name: "envoy",
        what: "Envoy",
        server: secs(3600),
        client: secs(3600),
        lower_client: Knob::Set(
            "`common_http_protocol_options.idle_timeout: {}` in the cluster's HttpProtocolOptions",
            Unit::Envoy,
        ),
        raise_server: Knob::Set(
            "`common_http_protocol_options.idle_timeout: {}` in the HTTP connection manager",
            Unit::Envoy,
        ),
        request_limit: Some((
            "`common_http_protocol_options.max_requests_per_connection: {}` in the cluster",
            false,
        )),
        ..BASE
    },
    Preset {
        name: "traefik",
        what: "Traefik",
        server: secs(180),
        client: secs(90),
        lower_client: Knob::Set(
            "`serversTransport.forwardingTimeouts.idleConnTimeout: {}`",
            Unit::Text,
        ),
        raise_server: Knob::Set(
            "`entryPoints.<name>.transport.respondingTimeouts.idleTimeout: {}`",
            Unit::Text,
        ),
        ..BASE
    },
    Preset {
        name: "caddy",
        what: "Caddy",
        server: secs(300),
        client: secs(120),
        lower_client: Knob::Set(
            "`keepalive {}` in reverse_proxy's `transport http` block",
            Unit::Text,
        ),
        raise_server: Knob::Set(
            "`idle {}` in the global `servers { timeouts { ... } }` option",
            Unit::Text,
        ),
        ..BASE
    },
    Preset {
        name: "haproxy",
        what: "HAProxy",
        server: None,
        client: Some(Idle::Never),
        note: "no idle timer for server connections: they stay pooled until the server closes \
               them; pool-purge-delay (5 s) only closes surplus idle connections",
        server_unknown: "HAProxy has no built-in client-side idle timeout (`timeout \
                         http-keep-alive`, else `timeout http-request`, else `timeout client`)",
        lower_client: Knob::Missing(
            "HAProxy has no idle timeout toward servers: keep `http-reuse safe` (the default: \
             a lost race closes the client's connection so the client retries), add `retry-on \
             conn-failure empty-response response-timeout`, or turn reuse off with `http-reuse \
             never`",
        ),
        raise_server: Knob::Set("`timeout http-keep-alive {}`", Unit::Text),
        request_limit: Some((
            "`max-reuse {}` on the server line (HTTP/1 may not enforce it)",
            true,
        )),
        ..BASE
    },
    Preset {
        name: "kaguard",
        what: "kaguard",
        server: secs(620),
        client: secs(1),
        requests: Some((1000, true)),
        note: "client side 1 s, lowered further by what it learns from the upstream's closes",
        lower_client: Knob::Set(
            "`keepalive_timeout = \"{}\"` in its [[upstream]]",
            Unit::Text,
        ),
        raise_server: Knob::Set("`keepalive_timeout = \"{}\"` in [downstream]", Unit::Text),
        request_limit: Some(("`keepalive_requests = {}` in [[upstream]]", false)),
        learns: true,
        ..BASE
    },
    Preset {
        name: "node",
        what: "Node.js http.Server",
        server: secs(5),
        note: "announces Keep-Alive: timeout=5; newer releases hold the socket 1 s longer",
        raise_server: Knob::Set(
            "`server.keepAliveTimeout = {}` (ms; keep `headersTimeout` above it)",
            Unit::Millis,
        ),
        ..BASE
    },
    Preset {
        name: "gunicorn",
        what: "Gunicorn (async or gthread workers)",
        server: secs(2),
        raise_server: Knob::Set("`--keep-alive {}`", Unit::Secs),
        ..BASE
    },
    Preset {
        name: "tomcat",
        what: "Apache Tomcat",
        server: secs(20),
        requests: Some((100, true)),
        note: "the connector's own default is connectionTimeout 60 s; the server.xml shipped \
               with Tomcat sets 20 s",
        raise_server: Knob::Set("`keepAliveTimeout=\"{}\"` on the Connector", Unit::Millis),
        ..BASE
    },
    Preset {
        name: "go",
        what: "Go net/http",
        server: Some(Idle::Never),
        client: secs(90),
        note: "server: none by default (IdleTimeout falls back to ReadTimeout, itself unset); \
               client side: http.DefaultTransport's IdleConnTimeout, e.g. in \
               httputil.ReverseProxy",
        lower_client: Knob::Set("`Transport.IdleConnTimeout = {}`", Unit::Go),
        raise_server: Knob::Set("`http.Server{IdleTimeout: {}}`", Unit::Go),
        ..BASE
    },
    Preset {
        name: "uvicorn",
        what: "Uvicorn",
        server: secs(5),
        raise_server: Knob::Set("`--timeout-keep-alive {}`", Unit::Secs),
        ..BASE
    },
    Preset {
        name: "puma",
        what: "Puma",
        server: secs(20),
        raise_server: Knob::Set("`persistent_timeout {}`", Unit::Secs),
        ..BASE
    },
    Preset {
        name: "apache",
        what: "Apache httpd",
        server: secs(5),
        requests: Some((100, true)),
        note: "KeepAliveTimeout 5, MaxKeepAliveRequests 100",
        raise_server: Knob::Set("`KeepAliveTimeout {}`", Unit::Secs),
        ..BASE
    },
];

/// The preset called `name`, ignoring ASCII case.
pub(super) fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

/// `alb, gcp, nginx, ...` for error messages.
pub(super) fn names() -> String {
    PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `--presets` table.
pub(super) fn table() -> String {
    let show = |idle: Option<Idle>| idle.map_or_else(|| "-".to_owned(), |i| i.to_string());
    let mut text = format!(
        "  {:<8} {:>7} {:>7} {:>8}  what\n",
        "preset", "server", "client", "requests"
    );
    for p in PRESETS {
        let requests = p.requests.map_or_else(
            || "-".to_owned(),
            |(n, announced)| format!("{n}{}", if announced { "" } else { " silent" }),
        );
        let columns = format!(
            "{:<8} {:>7} {:>7} {:>8}",
            p.name,
            show(p.server),
            show(p.client),
            requests
        );
        let mut what = p.what.to_owned();
        for extra in [p.note, p.server_unknown] {
            if !extra.is_empty() {
                what.push_str("; ");
                what.push_str(extra);
            }
        }
        entry(&mut text, &columns, &what);
    }
    text.push_str(
        "\nserver: how long it keeps idle connections from the hop before it.\n\
         client: how long it keeps idle connections to the hop after it.\n\
         requests: per connection, announced with `Connection: close` unless marked silent.",
    );
    text
}
