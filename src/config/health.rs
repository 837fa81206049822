//! `[upstream.health_check]`: active checks of every server of a group.

use super::raw::RawHealthCheck;
use super::units::{format_duration, parse_duration};
use super::{ConfigError, HealthCheckConfig, Problem};

/// The table, every key it omits at its default; `None` when the group has none. `at` names
/// it: `upstream "app": health_check`.
pub(super) fn health_check(
    at: &str,
    raw: Option<RawHealthCheck>,
) -> Result<Option<HealthCheckConfig>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let d = HealthCheckConfig::default();
    let key = |key: &str| format!("{at}: {key}");
    let duration = |name: &str, text: Option<String>, default| match text {
        None => Ok(default),
        Some(text) => {
            parse_duration(&text, Some("")).map_err(|p| ConfigError::invalid(key(name), p))
        }
    };
    let interval = duration("interval", raw.interval, d.interval)?;
    let timeout = duration("timeout", raw.timeout, d.timeout)?;
    if timeout >= interval {
        let problem = Problem::TimeoutNotBelowInterval {
            timeout: format_duration(timeout),
            interval: format_duration(interval),
        };
        return Err(ConfigError::invalid(at, problem));
    }
    let path = match raw.path {
        None => d.path,
        Some(path) => check_path(path).map_err(|p| ConfigError::invalid(key("path"), p))?,
    };
    let expect_status = match raw.expect_status {
        None => d.expect_status,
        Some(text) => {
            status_range(&text).map_err(|p| ConfigError::invalid(key("expect_status"), p))?
        }
    };
    let at_least_one = |name: &str, value: Option<u32>, default: u32| match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::invalid(
            key(name),
            Problem::TooSmall { min: 1, got: 0 },
        )),
        Some(n) => Ok(n),
    };
    Ok(Some(HealthCheckConfig {
        interval,
        path,
        expect_status,
        rises: at_least_one("rises", raw.rises, d.rises)?,
        falls: at_least_one("falls", raw.falls, d.falls)?,
        timeout,
    }))
}

/// The request target of a check: an origin-form path, query allowed.
fn check_path(path: String) -> Result<String, Problem> {
    let why = if !path.starts_with('/') {
        "must start with '/'"
    } else if path.contains('#') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "a request path has no fragment or spaces"
    } else {
        return Ok(path);
    };
    Err(Problem::InvalidPath { path, why })
}

/// `"200"` or `"200-399"`, both ends included.
fn status_range(text: &str) -> Result<(u16, u16), Problem> {
    let invalid = || Problem::InvalidStatusRange(text.to_owned());
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let status = |s: &str| s.trim().parse::<u16>().map_err(|_| invalid());
    let (low, high) = (status(low)?, status(high)?);
    if let Some(bad) = [low, high].into_iter().find(|s| !(100..=599).contains(s)) {
        return Err(Problem::InvalidStatus(bad));
    }
    if low > high {
        return Err(invalid());
    }
    Ok((low, high))
}

/// How the file writes `expect_status`.
fn status_range_text((low, high): (u16, u16)) -> String {
    if low == high {
        low.to_string()
    } else {
        format!("{low}-{high}")
    }
}

impl From<&HealthCheckConfig> for RawHealthCheck {
    fn from(c: &HealthCheckConfig) -> Self {
        RawHealthCheck {
            interval: Some(format_duration(c.interval)),
            path: Some(c.path.clone()),
            expect_status: Some(status_range_text(c.expect_status)),
            rises: Some(c.rises),
            falls: Some(c.falls),
            timeout: Some(format_duration(c.timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{MINIMAL, error, load};
    use super::*;

    #[test]
    fn no_table_means_no_checks_and_an_empty_table_means_every_default() {
        assert_eq!(load(MINIMAL).upstreams[0].health_check, None);
        let config = load(&format!("{MINIMAL}[upstream.health_check]\n"));
        let expected = HealthCheckConfig {
            interval: Duration::from_secs(5),
            path: "/".to_owned(),
            expect_status: (200, 399),
            rises: 2,
            falls: 3,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(config.upstreams[0].health_check, Some(expected));
    }

    #[test]
    fn health_check_keys_replace_defaults_and_round_trip() {
        let config = load(&format!(
            "{MINIMAL}[upstream.health_check]\ninterval = \"2s\"\npath = \"/healthz?full=1\"\n\
             expect_status = \"204\"\nrises = 1\nfalls = 5\ntimeout = \"1500ms\"\n"
        ));
        let check = config.upstreams[0]
            .health_check
            .as_ref()
            .expect("the table is given");
        assert_eq!(check.interval, Duration::from_secs(2));
        assert_eq!(check.path, "/healthz?full=1");
        assert_eq!(check.expect_status, (204, 204));
        assert_eq!((check.rises, check.falls), (1, 5));
        assert_eq!(check.timeout, Duration::from_millis(1500));
        let printed = config.to_toml();
        assert!(
            printed.contains(
                "[upstream.health_check]\ninterval = \"2s\"\npath = \"/healthz?full=1\"\n\
                 expect_status = \"204\"\nrises = 1\nfalls = 5\ntimeout = \"1s 500ms\"\n"
            ),
            "{printed}"
        );
        assert_eq!(load(&printed), config, "{printed}");
    }

    #[test]
    fn status_ranges_read_one_status_or_two_ends() {
        assert_eq!(status_range("200-399"), Ok((200, 399)));
        assert_eq!(status_range("200 - 299"), Ok((200, 299)));
        assert_eq!(status_range("503"), Ok((503, 503)));
        assert_eq!(status_range_text((200, 399)), "200-399");
        assert_eq!(status_range_text((200, 200)), "200");
    }

    #[test]
    fn health_check_mistakes_name_the_group_and_the_key() {
        let with = |key: &str| format!("{MINIMAL}[upstream.health_check]\n{key}\n");
        for (text, expected) in [
            (
                with("path = \"healthz\""),
                r#"upstream "app": health_check: path: invalid path "healthz": must start with '/'"#,
            ),
            (
                with("path = \"/a b\""),
                r#"upstream "app": health_check: path: invalid path "/a b": a request path has no fragment or spaces"#,
            ),
            (
                with("expect_status = \"2xx\""),
                r#"upstream "app": health_check: expect_status: invalid status range "2xx" (write a status, e.g. "200", or a range, e.g. "200-399")"#,
            ),
            (
                with("expect_status = \"399-200\""),
                r#"upstream "app": health_check: expect_status: invalid status range "399-200" (write a status, e.g. "200", or a range, e.g. "200-399")"#,
            ),
            (
                with("expect_status = \"200-600\""),
                r#"upstream "app": health_check: expect_status: 600 is not an HTTP status (100 to 599)"#,
            ),
            (
                with("timeout = \"5s\""),
                r#"upstream "app": health_check: timeout "5s" must be shorter than interval "5s""#,
            ),
            (
                with("interval = \"0s\""),
                r#"upstream "app": health_check: interval: must be greater than zero"#,
            ),
            (
                with("rises = 0"),
                r#"upstream "app": health_check: rises: must be at least 1, got 0"#,
            ),
            (
                with("falls = 0"),
                r#"upstream "app": health_check: falls: must be at least 1, got 0"#,
            ),
            (
                with("expect_status = 200"),
                r#"line 7, column 17: expect_status: invalid type: integer `200`, expected a string"#,
            ),
            (
                with("uri = \"/\""),
                "line 7, column 1: unknown field `uri`, expected one of `interval`, `path`, \
                 `expect_status`, `rises`, `falls`, `timeout`",
            ),
        ] {
            assert_eq!(error(&text), expected, "\n{text}");
        }
    }
}
