//! What can be wrong with a config, each as one line that names where and what.

use std::path::PathBuf;

/// A config that cannot be used; its `Display` is one line naming the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{}: cannot read: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Anything wrong inside a file, prefixed with its path.
    // Not a `source`: the inner message is already part of this one, and error reporters that
    // print the chain would print it twice.
    #[error("{}: {inner}", path.display())]
    InFile {
        path: PathBuf,
        inner: Box<ConfigError>,
    },
    /// Not TOML, a key that does not exist, or a value of the wrong type.
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        /// toml's message, preceded by the key when the line names one.
        message: String,
    },
    /// Valid TOML that does not make a usable config.
    #[error("{at}: {problem}")]
    Invalid {
        /// Where, e.g. `upstream "app": keepalive_timeout` or `route 2`.
        at: String,
        problem: Problem,
    },
}

/// Why a value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("required but not given")]
    Missing,
    #[error("at least one is required")]
    Empty,
    #[error("invalid duration {0:?} (write a number and a unit, e.g. \"500ms\", \"5s\", \"1m\")")]
    InvalidDuration(String),
    #[error("must be greater than zero{hint}")]
    ZeroDuration { hint: &'static str },
    #[error("{0:?} is longer than the one-year limit")]
    DurationTooLong(String),
    #[error("invalid size {0:?} (write bytes, or a number and k, KiB, m, MiB, g or GiB)")]
    InvalidSize(String),
    #[error("{0:?} does not fit in 64 bits")]
    SizeTooLarge(String),
    #[error("must not be negative, got {0}")]
    Negative(i64),
    #[error("must be at least {min}, got {got}")]
    TooSmall { min: u64, got: u64 },
    #[error("must be at most {max}, got {got}")]
    TooLarge { max: u64, got: u64 },
    #[error("invalid address {0:?} (expected IP:port, e.g. \"127.0.0.1:8080\")")]
    InvalidAddress(String),
    #[error("{0:?} is listed twice")]
    DuplicateAddress(String),
    #[error("{0:?} has no port (expected host:port, e.g. \"app.internal:3000\")")]
    MissingPort(String),
    #[error("cannot resolve {name:?}: {reason}")]
    CannotResolve { name: String, reason: String },
    #[error("invalid name {0:?} (use letters, digits, '-', '_' and '.')")]
    InvalidName(String),
    #[error("{name:?} is already used by upstream {first}")]
    DuplicateName { name: String, first: usize },
    #[error("upstream {0:?} is not defined")]
    UndefinedUpstream(String),
    #[error("same host and path_prefix as route {0}")]
    DuplicateRoute(usize),
    #[error("invalid host {host:?}: {why}")]
    InvalidHost { host: String, why: &'static str },
    #[error("invalid path_prefix {prefix:?}: {why}")]
    InvalidPathPrefix { prefix: String, why: &'static str },
    #[error("none given, and with {0} upstream groups no request would find one")]
    NoRoutes(usize),
    #[error("must not be empty; write \"off\" to turn the access log off")]
    EmptyAccessLog,
    #[error("invalid value {value:?} (write {expected})")]
    InvalidChoice {
        value: String,
        /// The values allowed, as the file spells them.
        expected: &'static str,
    },
    #[error(
        "unknown key {0:?} (expected check_before_reuse, honor_hints, learn, close_first, \
         risk_aware_checkout or safe_retry)"
    )]
    UnknownGuard(String),
    #[error(
        "unknown condition {0:?} (expected \"connect-failure\", \"reset\", \"refused-stream\", \
         \"retriable-status-codes\" or \"timeout\")"
    )]
    UnknownRetryOn(String),
    #[error("{0} is not an HTTP status (100 to 599)")]
    InvalidStatus(u16),
    #[error("\"retriable-status-codes\" is in retry_on but retriable_status_codes is empty")]
    NoRetriableStatusCodes,
    #[error("backoff_base {base:?} is longer than backoff_max {max:?}")]
    BackoffOrder { base: String, max: String },
    #[error("unknown parameter {0:?} (expected weight, max_fails or fail_timeout)")]
    UnknownServerParameter(String),
    #[error("has no value (write it as name=value, e.g. weight=3)")]
    NoValue,
    #[error("given twice")]
    GivenTwice,
    #[error("invalid number {0:?}")]
    InvalidNumber(String),
    #[error(
        "invalid status range {0:?} (write a status, e.g. \"200\", or a range, e.g. \"200-399\")"
    )]
    InvalidStatusRange(String),
    #[error("invalid path {path:?}: {why}")]
    InvalidPath { path: String, why: &'static str },
    #[error("timeout {timeout:?} must be shorter than interval {interval:?}")]
    TimeoutNotBelowInterval { timeout: String, interval: String },
}

impl ConfigError {
    pub(crate) fn invalid(at: impl Into<String>, problem: Problem) -> Self {
        Self::Invalid {
            at: at.into(),
            problem,
        }
    }

    /// Turns toml's multi-line error into one line, naming the key when the line has one.
    pub(crate) fn from_toml(error: &toml::de::Error, source: &str) -> Self {
        let start = error.span().map_or(0, |span| span.start).min(source.len());
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = source[start..]
            .find('\n')
            .map_or(source.len(), |i| start + i);
        let line_text = &source[line_start..line_end];
        let message = error.message().trim().replace('\n', "; ");
        let message = match key_of(line_text) {
            Some(key) if !message.contains(key) => format!("{key}: {message}"),
            _ => message,
        };
        Self::Syntax {
            line: source[..line_start].matches('\n').count() + 1,
            column: source[line_start..start].chars().count() + 1,
            message,
        }
    }
}

/// The bare key a `key = value` or `[table]` line names, if it is one.
fn key_of(line: &str) -> Option<&str> {
    let line = line.trim();
    let key = match line.split_once('=') {
        Some((key, _)) => key.trim(),
        None => line.trim_start_matches('[').split(']').next()?.trim(),
    };
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    bare.then_some(key)
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::super::tests::{MINIMAL, error};

    #[test]
    fn from_cli_names_the_bad_argument() {
        let err = Config::from_cli(&["x:y".to_owned()], &["127.0.0.1:1".to_owned()]);
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err(
                r#"listen: invalid address "x:y" (expected IP:port, e.g. "127.0.0.1:8080")"#
                    .to_owned()
            )
        );
        let err = Config::from_cli(&["127.0.0.1:1".to_owned()], &[]);
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err(r#"upstream "default": servers: at least one is required"#.to_owned())
        );
    }

    #[test]
    fn invalid_values_are_reported_with_their_key() {
        let with_upstream = |key: &str| format!("{MINIMAL}{key}\n");
        let with_downstream = |key: &str| format!("{MINIMAL}[downstream]\n{key}\n");
        let with_retry = |key: &str| format!("{MINIMAL}[retry]\n{key}\n");
        for (text, expected) in [
            (
                with_upstream("keepalive_timeout = \"5x\""),
                r#"upstream "app": keepalive_timeout: invalid duration "5x" (write a number and a unit, e.g. "500ms", "5s", "1m")"#,
            ),
            (
                with_upstream("keepalive_timeout = \"0s\""),
                r#"upstream "app": keepalive_timeout: must be greater than zero (to turn connection reuse off, set keepalive = 0)"#,
            ),
            (
                with_upstream("connect_timeout = \"0ms\""),
                r#"upstream "app": connect_timeout: must be greater than zero"#,
            ),
            (
                with_upstream("keepalive_requests = 0"),
                r#"upstream "app": keepalive_requests: must be at least 1, got 0"#,
            ),
            (
                with_downstream("max_header_size = 100"),
                "downstream: max_header_size: must be at least 8192, got 100",
            ),
            (
                with_downstream("max_body_size = -1"),
                "downstream: max_body_size: must not be negative, got -1",
            ),
            (
                with_downstream("max_body_size = \"1.5MiB\""),
                r#"downstream: max_body_size: invalid size "1.5MiB" (write bytes, or a number and k, KiB, m, MiB, g or GiB)"#,
            ),
            (
                with_downstream("keepalive_timeout = \"0s\""),
                "downstream: keepalive_timeout: must be greater than zero (to turn client keep-alive off, set keepalive_requests = 1)",
            ),
            (
                with_downstream("send_timeout = \"2years\""),
                r#"downstream: send_timeout: "2years" is longer than the one-year limit"#,
            ),
            (
                MINIMAL.replace("127.0.0.1:8080", "x:y"),
                r#"listen: invalid address "x:y" (expected IP:port, e.g. "127.0.0.1:8080")"#,
            ),
            (
                format!("admin = \"localhost:9901\"\n{MINIMAL}"),
                r#"admin: invalid address "localhost:9901" (expected IP:port, e.g. "127.0.0.1:8080")"#,
            ),
            (
                format!("access_log = \"\"\n{MINIMAL}"),
                r#"access_log: must not be empty; write "off" to turn the access log off"#,
            ),
            (
                MINIMAL.replace("\"127.0.0.1:3000\"", "\"app.internal\""),
                r#"upstream "app": servers: "app.internal" has no port (expected host:port, e.g. "app.internal:3000")"#,
            ),
            (
                MINIMAL.replace("name = \"app\"", "name = \"my app\""),
                r#"upstream 1: name: invalid name "my app" (use letters, digits, '-', '_' and '.')"#,
            ),
            (
                MINIMAL.replace("name = \"app\"", ""),
                "upstream 1: name: required but not given",
            ),
            (
                with_upstream("replay_buffer = \"64KB!\""),
                r#"upstream "app": replay_buffer: invalid size "64KB!" (write bytes, or a number and k, KiB, m, MiB, g or GiB)"#,
            ),
            (
                with_upstream("on_unretryable = \"503\""),
                r#"upstream "app": on_unretryable: invalid value "503" (write "502" or "close")"#,
            ),
            (
                with_upstream("[upstream.retry_budget]\npercent = 101"),
                r#"upstream "app": retry_budget: percent: must be at most 100, got 101"#,
            ),
            (
                with_retry("attempts = 0"),
                "retry: attempts: must be at least 1, got 0",
            ),
            (
                with_retry("attempts = 11"),
                "retry: attempts: must be at most 10, got 11",
            ),
            (
                with_retry("retriable_status_codes = [503, 600]"),
                "retry: retriable_status_codes: 600 is not an HTTP status (100 to 599)",
            ),
            (
                with_retry("retry_on = [\"retriable-status-codes\"]"),
                r#"retry: "retriable-status-codes" is in retry_on but retriable_status_codes is empty"#,
            ),
            (
                with_retry("backoff_base = \"1s\""),
                r#"retry: backoff_base "1s" is longer than backoff_max "250ms""#,
            ),
            (
                with_retry("per_try_timeout = \"5\""),
                r#"retry: per_try_timeout: invalid duration "5" (write a number and a unit, e.g. "500ms", "5s", "1m")"#,
            ),
            (
                format!(
                    "{MINIMAL}[[route]]\nupstream = \"app\"\n[route.retry]\nbackoff_max = \"10ms\"\n"
                ),
                r#"route 1: retry: backoff_base "25ms" is longer than backoff_max "10ms""#,
            ),
        ] {
            assert_eq!(error(&text), expected, "\n{text}");
        }
    }

    #[test]
    fn structural_mistakes_are_rejected() {
        let two_groups =
            format!("{MINIMAL}[[upstream]]\nname = \"b\"\nservers = [\"127.0.0.1:4000\"]\n");
        for (text, expected) in [
            ("listen = []".to_owned(), "listen: at least one is required"),
            ("".to_owned(), "listen: at least one is required"),
            (
                "listen = \"127.0.0.1:1\"".to_owned(),
                "upstream: at least one is required",
            ),
            (
                "listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]".to_owned(),
                r#"listen: "127.0.0.1:1" is listed twice"#,
            ),
            (
                MINIMAL.replace("servers = [\"127.0.0.1:3000\"]", "servers = []"),
                r#"upstream "app": servers: at least one is required"#,
            ),
            (
                format!("{MINIMAL}[[upstream]]\nname = \"app\"\nservers = [\"127.0.0.1:4000\"]\n"),
                r#"upstream 2: name: "app" is already used by upstream 1"#,
            ),
            (
                format!("{MINIMAL}[[route]]\nupstream = \"app\"\n[[route]]\nupstream = \"nope\"\n"),
                r#"route 2: upstream "nope" is not defined"#,
            ),
            (
                format!("{MINIMAL}[[route]]\npath_prefix = \"/\"\n"),
                "route 1: upstream: required but not given",
            ),
            (
                format!(
                    "{MINIMAL}[[route]]\nhost = \"A.com\"\nupstream = \"app\"\n[[route]]\nhost = \"a.com\"\npath_prefix = \"/\"\nupstream = \"app\"\n"
                ),
                "route 2: same host and path_prefix as route 1",
            ),
            (
                format!("{MINIMAL}[[route]]\npath_prefix = \"api\"\nupstream = \"app\"\n"),
                r#"route 1: path_prefix: invalid path_prefix "api": must start with '/'"#,
            ),
            (
                format!("{MINIMAL}[[route]]\nhost = \"a.com:8080\"\nupstream = \"app\"\n"),
                r#"route 1: host: invalid host "a.com:8080": must not include a port (any port matches)"#,
            ),
            (
                format!("{MINIMAL}[[route]]\nhost = \"*.a.com\"\nupstream = \"app\"\n"),
                r#"route 1: host: invalid host "*.a.com": wildcards are not supported"#,
            ),
            (
                two_groups,
                "route: none given, and with 2 upstream groups no request would find one",
            ),
        ] {
            assert_eq!(error(&text), expected, "\n{text}");
        }
    }

    #[test]
    fn unresolvable_server_names_the_group_and_the_server() {
        let text = MINIMAL.replace("127.0.0.1:3000", "nohost.invalid:80");
        let err = error(&text);
        assert!(
            err.starts_with(r#"upstream "app": servers: cannot resolve "nohost.invalid:80": "#),
            "{err}"
        );
    }

    #[test]
    fn toml_mistakes_give_one_line_with_line_column_and_key() {
        for (text, expected) in [
            (
                format!("{MINIMAL}bogus = 1\n"),
                "line 6, column 1: unknown field `bogus`, expected one of `name`, `servers`, `balance`, \
                 `max_fails`, `fail_timeout`, `keepalive`, `keepalive_timeout`, `keepalive_requests`, \
                 `keepalive_time`, `resolve_interval`, `connect_timeout`, `read_timeout`, `send_timeout`, `replay_buffer`, \
                 `on_unretryable`, `guards`, `retry_budget`, `health_check`",
            ),
            (
                format!("{MINIMAL}[upstream.retry_budget]\nshare = 1\n"),
                "line 7, column 1: unknown field `share`, expected `percent` or `min_concurrency`",
            ),
            (
                format!("{MINIMAL}[retry]\ntries = 3\n"),
                "line 7, column 1: unknown field `tries`, expected one of `retry_on`, \
                 `retriable_status_codes`, `attempts`, `per_try_timeout`, `backoff_base`, \
                 `backoff_max`, `retry_non_idempotent`",
            ),
            (
                format!("{MINIMAL}[[route]]\nupstream = \"app\"\n[route.retry]\nattempts = -1\n"),
                "line 9, column 12: attempts: invalid value: integer `-1`, expected u32",
            ),
            (
                format!("{MINIMAL}keepalive = \"x\"\n"),
                r#"line 6, column 13: keepalive: invalid type: string "x", expected usize"#,
            ),
            (
                format!("{MINIMAL}connect_timeout = 5\n"),
                "line 6, column 19: connect_timeout: invalid type: integer `5`, expected a string",
            ),
            (
                "listen = 8080".to_owned(),
                "line 1, column 10: listen: invalid type: integer `8080`, expected an address string or an array of address strings",
            ),
            (
                "listen = \"127.0.0.1:1\"\n[upstream]\nname = \"a\"\n".to_owned(),
                "line 2, column 1: upstream: invalid type: map, expected a sequence",
            ),
        ] {
            assert_eq!(error(&text), expected, "\n{text}");
        }
        let err = error("listen = [\"127.0.0.1:1\"\n");
        assert!(err.starts_with("line 1, column "), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
