use super::*;

/// The smallest valid file, used as a base for the error cases.
pub(super) const MINIMAL: &str = r#"
listen = "127.0.0.1:8080"
[[upstream]]
name = "app"
servers = ["127.0.0.1:3000"]
"#;

fn load(text: &str) -> Config {
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
        addr: addr("127.0.0.1:3000"),
    };
    assert_eq!(
        config.upstreams,
        [UpstreamGroupConfig {
            name: "app".to_owned(),
            servers: vec![server],
            keepalive: 32,
            keepalive_timeout: Duration::from_secs(1),
            keepalive_requests: 1000,
            keepalive_time: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
        }]
    );
}

#[test]
fn example_file_loads_and_states_the_defaults() {
    let example = include_str!("../../examples/kaguard.toml");
    let config = load(example);
    let minimal = load(MINIMAL);
    assert_eq!(config.admin, Some(addr("127.0.0.1:9901")));
    assert_eq!(config.downstream, minimal.downstream);
    assert_eq!(config.upstreams, minimal.upstreams);
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
        [[upstream]]
        name = "app"
        servers = ["localhost:3000", "127.0.0.1:3001"]
        keepalive_timeout = "750ms"
        [[upstream]]
        name = "static"
        servers = ["127.0.0.1:4000"]
        keepalive = 0
        [[route]]
        host = "static.example.com"
        upstream = "static"
        [[route]]
        path_prefix = "/assets/"
        upstream = "static"
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
        "keepalive_timeout = \"1s\"",
        "connect_timeout = \"5s\"",
        "# admin is off",
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
    assert_eq!(config.upstreams[0].servers[1].addr, addr("127.0.0.1:3001"));
    assert_eq!(
        config.upstreams[0].keepalive_timeout,
        Duration::from_secs(1)
    );
    assert_eq!(config.routes, []);
    assert_eq!(config.downstream, defaults.downstream);
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
