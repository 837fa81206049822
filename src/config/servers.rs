//! The keys that decide which server of a group takes a request: `servers` with nginx's
//! `weight`, `max_fails` and `fail_timeout` parameters, and `balance`.

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use super::raw::{RawServer, RawServerTable};
use super::units::{format_duration, parse_duration};
use super::{Balance, ConfigError, DEFAULT_WEIGHT, Problem, ServerConfig, UpstreamGroupConfig};

/// Largest server weight. Weights are ratios, and 1000 to 1 already sends a server 0.1 % of
/// the requests; a larger number is more likely a capacity in requests per second pasted in
/// than a ratio anyone means.
const MAX_WEIGHT: u32 = 1000;

/// `balance` names, in the order the docs list them.
const BALANCE: [(&str, Balance); 4] = [
    ("round_robin", Balance::RoundRobin),
    ("least_conn", Balance::LeastConn),
    ("p2c_load", Balance::P2cLoad),
    ("p2c_ewma", Balance::P2cEwma),
];

/// Tells the user what a zero `fail_timeout` was probably meant to do.
pub(super) const FAIL_TIMEOUT_ZERO: Option<&str> =
    Some(" (to never take a server out, set max_fails = 0)");

pub(super) fn balance(
    at: &str,
    text: Option<String>,
    default: Balance,
) -> Result<Balance, ConfigError> {
    let Some(text) = text else {
        return Ok(default);
    };
    match BALANCE.iter().find(|(name, _)| *name == text) {
        Some(&(_, balance)) => Ok(balance),
        None => Err(ConfigError::invalid(
            at,
            Problem::InvalidChoice {
                value: text,
                expected: "\"round_robin\", \"least_conn\", \"p2c_load\" or \"p2c_ewma\"",
            },
        )),
    }
}

/// The file's name for `balance`.
pub(super) fn balance_name(balance: Balance) -> &'static str {
    BALANCE
        .iter()
        .find(|(_, b)| *b == balance)
        .map(|(name, _)| *name)
        .expect("BALANCE names every variant")
}

/// A server's parameters before validation; `None` takes the default.
#[derive(Default)]
struct Params {
    weight: Option<u32>,
    max_fails: Option<u32>,
    fail_timeout: Option<String>,
}

/// Every entry of `servers`, resolved. `at` names the key (`upstream "app": servers`);
/// `max_fails` and `fail_timeout` are the group's, which servers without their own take.
pub(super) fn servers(
    at: &str,
    raw: Vec<RawServer>,
    max_fails: u32,
    fail_timeout: Duration,
) -> Result<Vec<ServerConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::invalid(at, Problem::Empty));
    }
    let mut servers = Vec::with_capacity(raw.len());
    for (i, entry) in raw.into_iter().enumerate() {
        let (name, here, params) = match entry {
            RawServer::Text(text) => {
                let here = format!("{at}: {:?}", text.trim());
                let (name, params) = parse_text(&here, &text)?;
                (name, here, params)
            }
            RawServer::Table(table) => table_params(at, i + 1, table)?,
        };
        let weight = params.weight.unwrap_or(DEFAULT_WEIGHT);
        if weight == 0 {
            let problem = Problem::TooSmall { min: 1, got: 0 };
            return Err(ConfigError::invalid(format!("{here}: weight"), problem));
        }
        if weight > MAX_WEIGHT {
            let problem = Problem::TooLarge {
                max: MAX_WEIGHT.into(),
                got: weight.into(),
            };
            return Err(ConfigError::invalid(format!("{here}: weight"), problem));
        }
        let fail_timeout = match params.fail_timeout {
            None => fail_timeout,
            Some(text) => parse_duration(&text, FAIL_TIMEOUT_ZERO)
                .map_err(|p| ConfigError::invalid(format!("{here}: fail_timeout"), p))?,
        };
        let addrs = resolve(&name).map_err(|p| ConfigError::invalid(at, p))?;
        servers.push(ServerConfig {
            name,
            addrs,
            weight,
            max_fails: params.max_fails.unwrap_or(max_fails),
            fail_timeout,
        });
    }
    Ok(servers)
}

/// `"host:port weight=3 max_fails=2 fail_timeout=5s"`: the address, then nginx's parameters
/// in any order. `here` names the entry in errors.
fn parse_text(here: &str, text: &str) -> Result<(String, Params), ConfigError> {
    let mut words = text.split_whitespace();
    // An empty entry goes on as an empty name, which `resolve` rejects as having no port.
    let name = words.next().unwrap_or_default().to_owned();
    let mut params = Params::default();
    for word in words {
        let (key, value) = match word.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (word, None),
        };
        let at = || format!("{here}: {key}");
        let number = |value: &str| {
            value
                .parse::<u32>()
                .map_err(|_| ConfigError::invalid(at(), Problem::InvalidNumber(value.to_owned())))
        };
        let given = match key {
            "weight" | "max_fails" | "fail_timeout" => {
                value.ok_or_else(|| ConfigError::invalid(at(), Problem::NoValue))?
            }
            _ => {
                let problem = Problem::UnknownServerParameter(key.to_owned());
                return Err(ConfigError::invalid(here, problem));
            }
        };
        let twice = match key {
            "weight" => params.weight.replace(number(given)?).is_some(),
            "max_fails" => params.max_fails.replace(number(given)?).is_some(),
            _ => params.fail_timeout.replace(given.to_owned()).is_some(),
        };
        if twice {
            return Err(ConfigError::invalid(at(), Problem::GivenTwice));
        }
    }
    Ok((name, params))
}

/// `{ addr = "host:port", weight = 3, ... }`; the entry is named by its `addr`, or by its
/// place in the list (from 1) when it has none.
fn table_params(
    at: &str,
    index: usize,
    table: RawServerTable,
) -> Result<(String, String, Params), ConfigError> {
    let Some(addr) = table.addr else {
        let at = format!("{at}: entry {index}: addr");
        return Err(ConfigError::invalid(at, Problem::Missing));
    };
    let name = addr.trim().to_owned();
    let here = format!("{at}: {name:?}");
    if let Some(key) = table.unknown.into_iter().next() {
        return Err(ConfigError::invalid(
            here,
            Problem::UnknownServerParameter(key),
        ));
    }
    let params = Params {
        weight: table.weight,
        max_fails: table.max_fails,
        fail_timeout: table.fail_timeout,
    };
    Ok((name, here, params))
}

/// Resolves "host:port" at load: every address, each once, in the resolver's order. nginx
/// too makes a server of each address a name has.
fn resolve(name: &str) -> Result<Vec<SocketAddr>, Problem> {
    if let Ok(addr) = name.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let has_port = name
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !has_port {
        return Err(Problem::MissingPort(name.to_owned()));
    }
    let cannot = |reason: String| Problem::CannotResolve {
        name: name.to_owned(),
        reason,
    };
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for addr in name.to_socket_addrs().map_err(|e| cannot(e.to_string()))? {
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(cannot("no addresses".to_owned()));
    }
    Ok(addrs)
}

/// A server as `to_toml` writes it: its name, then the parameters that differ from the
/// defaults (weight 1, the group's `max_fails` and `fail_timeout`), so that it reads back
/// the same.
pub(super) fn server_text(server: &ServerConfig, group: &UpstreamGroupConfig) -> String {
    let mut text = server.name.clone();
    // Writing to a String cannot fail.
    if server.weight != DEFAULT_WEIGHT {
        let _ = write!(text, " weight={}", server.weight);
    }
    if server.max_fails != group.max_fails {
        let _ = write!(text, " max_fails={}", server.max_fails);
    }
    if server.fail_timeout != group.fail_timeout {
        // Parameters are split at spaces, and humantime reads "1m30s" as "1m 30s".
        let timeout = format_duration(server.fail_timeout).replace(' ', "");
        let _ = write!(text, " fail_timeout={timeout}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, error, load};
    use super::*;

    fn with_servers(servers: &str) -> String {
        MINIMAL.replace(r#"["127.0.0.1:3000"]"#, servers)
    }

    #[test]
    fn server_parameters_read_from_strings_and_tables_alike() {
        let config = load(&with_servers(
            r#"["127.0.0.1:3000", "127.0.0.1:3001  weight=3 fail_timeout=1m30s max_fails=0",
                { addr = "127.0.0.1:3002", weight = 2, max_fails = 5, fail_timeout = "5s" },
                { addr = " 127.0.0.1:3003 " }]"#,
        ));
        let group = &config.upstreams[0];
        let got: Vec<_> = group
            .servers
            .iter()
            .map(|s| (s.name.as_str(), s.weight, s.max_fails, s.fail_timeout))
            .collect();
        let secs = Duration::from_secs;
        assert_eq!(
            got,
            [
                ("127.0.0.1:3000", 1, 1, secs(10)),
                ("127.0.0.1:3001", 3, 0, secs(90)),
                ("127.0.0.1:3002", 2, 5, secs(5)),
                ("127.0.0.1:3003", 1, 1, secs(10)),
            ]
        );
        assert_eq!(
            group.servers[3].addrs,
            ["127.0.0.1:3003".parse().expect("literal")]
        );
    }

    #[test]
    fn servers_take_the_group_max_fails_and_fail_timeout_unless_they_set_their_own() {
        let config = load(&format!(
            "{}max_fails = 3\nfail_timeout = \"30s\"\n",
            with_servers(r#"["127.0.0.1:3000", "127.0.0.1:3001 max_fails=1"]"#)
        ));
        let group = &config.upstreams[0];
        assert_eq!(
            (group.max_fails, group.fail_timeout),
            (3, Duration::from_secs(30))
        );
        assert_eq!(group.servers[0].max_fails, 3);
        assert_eq!(group.servers[0].fail_timeout, Duration::from_secs(30));
        assert_eq!(group.servers[1].max_fails, 1);
    }

    #[test]
    fn to_toml_writes_only_parameters_that_differ_from_the_defaults() {
        let config = load(&format!(
            "{}max_fails = 2\n",
            with_servers(
                r#"["127.0.0.1:3000 weight=1 max_fails=2", "127.0.0.1:3001 weight=4 max_fails=1",
                    { addr = "127.0.0.1:3002", fail_timeout = "1m 0.5s" }]"#
            )
        ));
        let printed = config.to_toml();
        assert!(
            printed.contains(
                r#"servers = ["127.0.0.1:3000", "127.0.0.1:3001 weight=4 max_fails=1", "127.0.0.1:3002 fail_timeout=1m500ms"]"#
            ),
            "{printed}"
        );
        assert_eq!(load(&printed), config, "{printed}");
    }

    #[test]
    fn balance_reads_every_name_and_prints_it_back() {
        for (name, balance) in BALANCE {
            let config = load(&format!("{MINIMAL}balance = \"{name}\"\n"));
            assert_eq!(config.upstreams[0].balance, balance);
            assert_eq!(balance_name(balance), name);
            assert!(config.to_toml().contains(&format!("balance = \"{name}\"")));
        }
    }

    #[test]
    fn server_mistakes_name_the_group_the_server_and_the_parameter() {
        for (servers, expected) in [
            (
                r#"["10.0.0.1:3000 wieght=3"]"#,
                r#"upstream "app": servers: "10.0.0.1:3000 wieght=3": unknown parameter "wieght" (expected weight, max_fails or fail_timeout)"#,
            ),
            (
                r#"["10.0.0.1:3000 backup"]"#,
                r#"upstream "app": servers: "10.0.0.1:3000 backup": unknown parameter "backup" (expected weight, max_fails or fail_timeout)"#,
            ),
            (
                r#"["10.0.0.1:3000 weight"]"#,
                r#"upstream "app": servers: "10.0.0.1:3000 weight": weight: has no value (write it as name=value, e.g. weight=3)"#,
            ),
            (
                r#"["10.0.0.1:3000 weight=0"]"#,
                r#"upstream "app": servers: "10.0.0.1:3000 weight=0": weight: must be at least 1, got 0"#,
            ),
            (
                r#"["10.0.0.1:3000 weight=1001"]"#,
                r#"upstream "app": servers: "10.0.0.1:3000 weight=1001": weight: must be at most 1000, got 1001"#,
            ),
            (
                r#"["10.0.0.1:3000 max_fails=-1"]"#,
                r#"upstream "app": servers: "10.0.0.1:3000 max_fails=-1": max_fails: invalid number "-1""#,
            ),
            (
                r#"["10.0.0.1:3000 weight=2 weight=3"]"#,
                r#"upstream "app": servers: "10.0.0.1:3000 weight=2 weight=3": weight: given twice"#,
            ),
            (
                r#"["10.0.0.1:3000 fail_timeout=10"]"#,
                r#"upstream "app": servers: "10.0.0.1:3000 fail_timeout=10": fail_timeout: invalid duration "10" (write a number and a unit, e.g. "500ms", "5s", "1m")"#,
            ),
            (
                r#"["10.0.0.1:3000 fail_timeout=0s"]"#,
                r#"upstream "app": servers: "10.0.0.1:3000 fail_timeout=0s": fail_timeout: must be greater than zero (to never take a server out, set max_fails = 0)"#,
            ),
            (
                r#"["10.0.0.1 weight=2"]"#,
                r#"upstream "app": servers: "10.0.0.1" has no port (expected host:port, e.g. "app.internal:3000")"#,
            ),
            (
                r#"[""]"#,
                r#"upstream "app": servers: "" has no port (expected host:port, e.g. "app.internal:3000")"#,
            ),
            (
                r#"[{ addr = "10.0.0.1:3000", wieght = 3 }]"#,
                r#"upstream "app": servers: "10.0.0.1:3000": unknown parameter "wieght" (expected weight, max_fails or fail_timeout)"#,
            ),
            (
                r#"["127.0.0.1:1", { weight = 3 }]"#,
                r#"upstream "app": servers: entry 2: addr: required but not given"#,
            ),
            (
                r#"[{ addr = "10.0.0.1:3000", weight = 0 }]"#,
                r#"upstream "app": servers: "10.0.0.1:3000": weight: must be at least 1, got 0"#,
            ),
            (
                r#"[{ addr = "10.0.0.1:3000", fail_timeout = "5" }]"#,
                r#"upstream "app": servers: "10.0.0.1:3000": fail_timeout: invalid duration "5" (write a number and a unit, e.g. "500ms", "5s", "1m")"#,
            ),
        ] {
            assert_eq!(error(&with_servers(servers)), expected, "{servers}");
        }
    }

    #[test]
    fn group_balance_and_failure_keys_are_checked() {
        for (key, expected) in [
            (
                "balance = \"random\"",
                r#"upstream "app": balance: invalid value "random" (write "round_robin", "least_conn", "p2c_load" or "p2c_ewma")"#,
            ),
            (
                "fail_timeout = \"0s\"",
                r#"upstream "app": fail_timeout: must be greater than zero (to never take a server out, set max_fails = 0)"#,
            ),
            (
                "max_fails = -1",
                "line 6, column 13: max_fails: invalid value: integer `-1`, expected u32",
            ),
        ] {
            assert_eq!(error(&format!("{MINIMAL}{key}\n")), expected, "{key}");
        }
        assert_eq!(
            error(&with_servers(
                r#"[{ addr = "10.0.0.1:3000", weight = "3" }]"#
            )),
            r#"line 5, column 47: servers: invalid type: string "3", expected u32"#
        );
        assert_eq!(
            error(&with_servers("[3000]")),
            r#"line 5, column 12: servers: invalid type: integer `3000`, expected "host:port", optionally with parameters, or a table with addr"#
        );
    }
}
