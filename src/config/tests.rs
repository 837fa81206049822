use super::*;

/// The smallest valid file, used as a base for the error cases.
pub(super) const MINIMAL: &str = r#"
listen = "127.0.0.1:8080"
[[upstream]]
name = "app"
servers = ["127.0.0.1:3000"]
"#;

pub(super) fn load(text: &str) -> Config {
    Config::from_toml_str(text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
}

pub(super) fn error(text: &str) -> String {
    match Config::from_toml_str(text) {
        Ok(config) => panic!("loaded, expected an error:\n{text}\n---\n{config:?}"),
        Err(e) => e.to_string(),
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test addresses are literals")
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn minimal_file_gets_every_default() {
    let config = load(MINIMAL);
    assert_eq!(config.listen, [addr("127.0.0.1:8080")]);
    assert_eq!(config.workers, cores());
    assert_eq!(config.drain_timeout, Duration::from_secs(30));
    assert_eq!(config.access_log, AccessLog::Stdout);
    assert_eq!(config.admin, None);
    assert_eq!(config.routes, []);
    assert_eq!(
        config.retry,
        RetryPolicy {
            retry_on: RetryOn {
                connect_failure: true,
                reset: true,
                refused_stream: false,
                retriable_status_codes: false,
                timeout: false,
            },
            retriable_status_codes: Vec::new(),
            attempts: 2,
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            retry_non_idempotent: false,
        }
    );
    assert_eq!(config.retry, RetryPolicy::default());
    assert_eq!(
        config.downstream,
        DownstreamConfig {
            keepalive_timeout: Duration::from_secs(620),
            keepalive_requests: 1000,
            keepalive_time: Duration::from_secs(3600),
            client_header_timeout: Duration::from_secs(60),
            client_body_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            max_header_size: 32 * 1024,
            max_body_size: 0,
        }
    );
    let server = ServerConfig {
        name: "127.0.0.1:3000".to_owned(),
        addrs: vec![addr("127.0.0.1:3000")],
        weight: 1,
        max_fails: 1,
        fail_timeout: Duration::from_secs(10),
    };
    assert_eq!(server, ServerConfig::new("127.0.0.1:3000", server.addrs[0]));
    assert_eq!(
        config.upstreams,
        [UpstreamGroupConfig {
            name: "app".to_owned(),
            servers: vec![server],
            balance: Balance::RoundRobin,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            health_check: None,
            keepalive: 32,
            keepalive_timeout: Duration::from_secs(1),
            keepalive_requests: 1000,
            keepalive_time: Duration::from_secs(3600),
            resolve_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            guards: Guards {
                check_before_reuse: true,
                honor_hints: true,
                learn: true,
                close_first: true,
                risk_aware_checkout: true,
                safe_retry: true,
            },
            replay_buffer: 64 * 1024,
            on_unretryable: OnUnretryable::BadGateway,
            retry_budget: RetryBudget {
                percent: 20,
                min_concurrency: 3,
            },
        }]
    );
    assert_eq!(Guards::default(), Guards::ON);
}

#[test]
fn example_file_loads_and_states_the_defaults() {
    let example = include_str!("../../examples/kaguard.toml");
    let config = load(example);
    let minimal = load(MINIMAL);
    assert_eq!(config.admin, Some(addr("127.0.0.1:9901")));
    assert_eq!(config.downstream, minimal.downstream);
    assert_eq!(config.upstreams, minimal.upstreams);
    assert_eq!(config.retry, minimal.retry);
    assert!(!config.routes.is_empty(), "the example shows a route");
    for route in &config.routes {
        assert_eq!(route.retry, minimal.retry, "route {}", route.path_prefix);
    }
    assert_eq!(
        (config.workers, config.drain_timeout),
        (minimal.workers, minimal.drain_timeout)
    );
    let printed = minimal.to_toml();
    for line in printed
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(" = "))
    {
        let key = line
            .split(" = ")
            .next()
            .expect("split yields at least one item");
        let shown = example.lines().any(|l| l.starts_with(&format!("{key} = ")));
        assert!(shown, "examples/kaguard.toml does not show {key}");
    }
}

#[test]
fn values_in_the_file_replace_defaults() {
    let config = load(
        r#"
        listen = ["127.0.0.1:8080", "[::1]:8080"]
        workers = 3
        drain_timeout = "0s"
        access_log = "/var/log/kaguard.log"
        [downstream]
        keepalive_timeout = "75s"
        max_header_size = "16k"
        max_body_size = "10MB"
        [[upstream]]
        name = "app"
        servers = ["127.0.0.1:3000", "127.0.0.1:3001"]
        keepalive = 0
        keepalive_timeout = "1500ms"
        [[route]]
        host = "API.Example.com."
        upstream = "app"
        "#,
    );
    assert_eq!(config.listen, [addr("127.0.0.1:8080"), addr("[::1]:8080")]);
    assert_eq!(config.workers, 3);
    assert_eq!(config.drain_timeout, Duration::ZERO);
    assert_eq!(
        config.access_log,
        AccessLog::File("/var/log/kaguard.log".into())
    );
    assert_eq!(config.downstream.keepalive_timeout, Duration::from_secs(75));
    assert_eq!(config.downstream.max_header_size, 16 * 1024);
    assert_eq!(config.downstream.max_body_size, 10 * 1024 * 1024);
    assert_eq!(config.upstreams[0].servers.len(), 2);
    assert_eq!(config.upstreams[0].keepalive, 0);
    assert_eq!(
        config.upstreams[0].keepalive_timeout,
        Duration::from_millis(1500)
    );
    let route = RouteConfig {
        host: Some("api.example.com".to_owned()),
        path_prefix: "/".to_owned(),
        upstream: "app".to_owned(),
        retry: RetryPolicy::default(),
    };
    assert_eq!(config.routes, [route]);
}

#[test]
fn access_log_off_turns_it_off() {
    let config = load(&format!("access_log = \"off\"\n{MINIMAL}"));
    assert_eq!(config.access_log, AccessLog::Off);
}

#[test]
fn to_toml_loads_back_to_the_same_config() {
    let config = load(
        r#"
        listen = ["127.0.0.1:8080", "[::1]:8443"]
        workers = 4
        drain_timeout = "2m 5s"
        access_log = "/tmp/access log.json"
        admin = "127.0.0.1:9901"
        [downstream]
        keepalive_timeout = "58s"
        max_header_size = 10000
        max_body_size = "1GiB"
        [retry]
        retry_on = ["timeout", "retriable-status-codes", "connect-failure"]
        retriable_status_codes = [503, 429]
        per_try_timeout = "2s 500ms"
        backoff_max = "1s"
        [[upstream]]
        name = "app"
        servers = ["localhost:3000", "127.0.0.1:3001"]
        keepalive_timeout = "750ms"
        guards = "off"
        replay_buffer = 1000
        on_unretryable = "close"
        [upstream.retry_budget]
        percent = 0
        [[upstream]]
        name = "static"
        servers = ["127.0.0.1:4000"]
        keepalive = 0
        [upstream.guards]
        learn = false
        [[route]]
        host = "static.example.com"
        upstream = "static"
        [route.retry]
        retry_on = []
        [[route]]
        path_prefix = "/assets/"
        upstream = "static"
        [route.retry]
        attempts = 10
        retry_non_idempotent = true
        [[route]]
        upstream = "app"
        "#,
    );
    let printed = config.to_toml();
    assert_eq!(load(&printed), config, "{printed}");
    let minimal = load(MINIMAL).to_toml();
    for line in minimal
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
    {
        let key = line
            .split('=')
            .next()
            .expect("split yields at least one item");
        assert!(printed.contains(key), "{key} missing from:\n{printed}");
    }
}

#[test]
fn to_toml_writes_every_key_of_a_minimal_file() {
    let printed = load(MINIMAL).to_toml();
    for line in [
        "workers = ",
        "drain_timeout = \"30s\"",
        "access_log = \"stdout\"",
        "keepalive_timeout = \"10m 20s\"",
        "max_header_size = \"32KiB\"",
        "max_body_size = 0",
        "servers = [\"127.0.0.1:3000\"]\nbalance = \"round_robin\"\nmax_fails = 1\n\
         fail_timeout = \"10s\"\n",
        "keepalive_timeout = \"1s\"",
        "connect_timeout = \"5s\"",
        "replay_buffer = \"64KiB\"",
        "on_unretryable = \"502\"",
        "[upstream.guards]\ncheck_before_reuse = true\nhonor_hints = true\nlearn = true\n\
         close_first = true\nrisk_aware_checkout = true\nsafe_retry = true\n",
        "[upstream.retry_budget]\npercent = 20\nmin_concurrency = 3\n",
        "[retry]\nretry_on = [\"connect-failure\", \"reset\"]\nretriable_status_codes = []\n\
         attempts = 2\nper_try_timeout = \"0s\"\nbackoff_base = \"25ms\"\n\
         backoff_max = \"250ms\"\nretry_non_idempotent = false\n",
        "# admin is off",
        "# active health checks are off in upstream \"app\": add an [upstream.health_check] table",
    ] {
        assert!(printed.contains(line), "{line:?} missing from:\n{printed}");
    }
}

#[test]
fn from_cli_makes_one_default_group_and_no_routes() {
    let listen = ["127.0.0.1:8080".to_owned()];
    let upstreams = ["127.0.0.1:3000".to_owned(), "127.0.0.1:3001".to_owned()];
    let config = Config::from_cli(&listen, &upstreams).expect("valid literals");
    let defaults = load(MINIMAL);
    assert_eq!(config.listen, [addr("127.0.0.1:8080")]);
    assert_eq!(config.upstreams.len(), 1);
    assert_eq!(config.upstreams[0].name, "default");
    assert_eq!(
        config.upstreams[0].servers[1].addrs,
        [addr("127.0.0.1:3001")]
    );
    assert_eq!(
        config.upstreams[0].keepalive_timeout,
        Duration::from_secs(1)
    );
    assert_eq!(config.routes, []);
    assert_eq!(config.downstream, defaults.downstream);
    assert_eq!(config.retry, RetryPolicy::default());
    assert_eq!(config.upstreams[0].guards, Guards::ON);
}

#[test]
fn from_file_prefixes_errors_with_the_path() {
    let dir = std::env::temp_dir().join(format!("kaguard-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir is writable");
    let path = dir.join("kaguard.toml");
    std::fs::write(&path, "listen = []\n").expect("temp dir is writable");
    let err = Config::from_file(&path)
        .expect_err("no listener")
        .to_string();
    assert_eq!(
        err,
        format!("{}: listen: at least one is required", path.display())
    );

    let missing = dir.join("missing.toml");
    let err = Config::from_file(&missing)
        .expect_err("no file")
        .to_string();
    assert!(
        err.starts_with(&format!("{}: cannot read: ", missing.display())),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).expect("we created it");
}

#[test]
fn from_file_loads_the_example() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kaguard.toml");
    assert!(Config::from_file(&path).is_ok());
}

#[test]
fn guards_shorthand_switches_all_of_them() {
    let off = load(&format!("{MINIMAL}guards = \"off\"\n"));
    assert_eq!(off.upstreams[0].guards, Guards::OFF);
    let on = load(&format!("{MINIMAL}guards = \"on\"\n"));
    assert_eq!(on.upstreams[0].guards, Guards::ON);
}

#[test]
fn guards_table_turns_off_only_the_guards_it_names() {
    let config = load(&format!(
        "{MINIMAL}[upstream.guards]\nlearn = false\nsafe_retry = false\ncheck_before_reuse = true\n"
    ));
    assert_eq!(
        config.upstreams[0].guards,
        Guards {
            learn: false,
            safe_retry: false,
            ..Guards::ON
        }
    );
    let empty = load(&format!("{MINIMAL}[upstream.guards]\n"));
    assert_eq!(empty.upstreams[0].guards, Guards::ON);
}

#[test]
fn guards_errors_name_the_group_and_the_key() {
    assert_eq!(
        error(&format!("{MINIMAL}[upstream.guards]\nx = true\n")),
        r#"upstream "app": guards: unknown key "x" (expected check_before_reuse, honor_hints, learn, close_first, risk_aware_checkout or safe_retry)"#
    );
    assert_eq!(
        error(&format!("{MINIMAL}guards = \"none\"\n")),
        r#"upstream "app": guards: invalid value "none" (write "on", "off", or a [upstream.guards] table)"#
    );
    assert_eq!(
        error(&format!("{MINIMAL}[upstream.guards]\nlearn = \"no\"\n")),
        r#"line 7, column 9: learn: invalid type: string "no", expected a boolean"#
    );
    assert_eq!(
        error(&format!("{MINIMAL}guards = false\n")),
        r#"line 6, column 10: guards: invalid type: boolean `false`, expected "on", "off" or a table"#
    );
}

#[test]
fn upstream_recovery_keys_replace_defaults() {
    let config = load(&format!(
        "{MINIMAL}replay_buffer = \"1MiB\"\non_unretryable = \"close\"\n\
         [upstream.retry_budget]\npercent = 50\n"
    ));
    let group = &config.upstreams[0];
    assert_eq!(group.replay_buffer, 1 << 20);
    assert_eq!(group.on_unretryable, OnUnretryable::CloseClient);
    assert_eq!(
        group.retry_budget,
        RetryBudget {
            percent: 50,
            min_concurrency: 3
        }
    );
    let none = load(&format!("{MINIMAL}replay_buffer = 0\n"));
    assert_eq!(none.upstreams[0].replay_buffer, 0);
}

#[test]
fn retry_on_reads_envoy_names_in_any_order() {
    let config = load(&format!(
        "{MINIMAL}[retry]\nretry_on = [\"timeout\", \"refused-stream\", \"retriable-status-codes\", \
         \"reset\", \"connect-failure\", \"reset\"]\nretriable_status_codes = [503]\n"
    ));
    assert_eq!(
        config.retry.retry_on,
        RetryOn {
            connect_failure: true,
            reset: true,
            refused_stream: true,
            retriable_status_codes: true,
            timeout: true,
        }
    );
    assert_eq!(config.retry.retriable_status_codes, [503]);
    let none = load(&format!("{MINIMAL}[retry]\nretry_on = []\n"));
    assert_eq!(none.retry.retry_on, RetryOn::default());
}

#[test]
fn retry_on_with_an_unknown_name_is_an_error_naming_it() {
    assert_eq!(
        error(&format!(
            "{MINIMAL}[retry]\nretry_on = [\"reset\", \"5xx\"]\n"
        )),
        r#"retry: retry_on: unknown condition "5xx" (expected "connect-failure", "reset", "refused-stream", "retriable-status-codes" or "timeout")"#
    );
    assert_eq!(
        error(&format!(
            "{MINIMAL}[[route]]\nupstream = \"app\"\n[route.retry]\nretry_on = [\"connect_failure\"]\n"
        )),
        r#"route 1: retry: retry_on: unknown condition "connect_failure" (expected "connect-failure", "reset", "refused-stream", "retriable-status-codes" or "timeout")"#
    );
}

#[test]
fn route_retry_takes_omitted_keys_from_the_top_level_retry() {
    let config = load(&format!(
        r#"{MINIMAL}
        [retry]
        retry_on = ["connect-failure", "retriable-status-codes"]
        retriable_status_codes = [503]
        attempts = 4
        per_try_timeout = "3s"
        [[route]]
        path_prefix = "/api"
        upstream = "app"
        [route.retry]
        attempts = 1
        backoff_base = "5ms"
        [[route]]
        upstream = "app"
        "#
    ));
    let top = RetryPolicy {
        retry_on: RetryOn {
            connect_failure: true,
            retriable_status_codes: true,
            ..RetryOn::default()
        },
        retriable_status_codes: vec![503],
        attempts: 4,
        per_try_timeout: Some(Duration::from_secs(3)),
        ..RetryPolicy::default()
    };
    assert_eq!(config.retry, top);
    assert_eq!(
        config.routes[0].retry,
        RetryPolicy {
            attempts: 1,
            backoff_base: Duration::from_millis(5),
            ..top.clone()
        }
    );
    assert_eq!(config.routes[1].retry, top);
}

#[test]
fn per_try_timeout_of_zero_means_none() {
    let config = load(&format!("{MINIMAL}[retry]\nper_try_timeout = \"0s\"\n"));
    assert_eq!(config.retry.per_try_timeout, None);
    let config = load(&format!("{MINIMAL}[retry]\nper_try_timeout = \"750ms\"\n"));
    assert_eq!(
        config.retry.per_try_timeout,
        Some(Duration::from_millis(750))
    );
}
