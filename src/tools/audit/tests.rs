//! Known bad chains are flagged with their fix, good ones pass, and bad input names its token.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use super::*;
use crate::tools::upstream::{Behaviour, TestUpstream};

fn chain(tokens: &[&str]) -> AuditReport {
    let hops: Vec<Hop> = tokens
        .iter()
        .map(|t| parse_hop(t).expect("valid hop"))
        .collect();
    let report = audit(&hops);
    eprintln!("{}", report.summary());
    report
}

fn pair<'a>(report: &'a AuditReport, from: &str) -> &'a PairReport {
    report
        .pairs
        .iter()
        .find(|p| p.from == from)
        .expect("a pair starting at this hop")
}

fn fix(report: &AuditReport, from: &str) -> String {
    let pair = pair(report, from);
    assert_eq!(pair.status, Status::Inversion, "{}", pair.message);
    pair.fix.clone().expect("an inversion has a fix")
}

fn bad_token(token: &str) -> String {
    match parse_hop(token) {
        Err(AuditError::Hop {
            token: named,
            reason,
        }) => {
            assert_eq!(named, token);
            let text = parse_hop(token).expect_err("still bad").to_string();
            assert!(text.contains(token), "{text}");
            reason
        }
        other => panic!("{token}: expected a hop error, got {other:?}"),
    }
}

#[test]
fn nginx_in_front_of_node_is_flagged_with_both_fixes() {
    let report = chain(&["nginx", "node"]);
    assert_eq!(report.inversions, 1);
    assert_eq!(report.exit_code(), 1);
    let pair = pair(&report, "nginx");
    assert_eq!(
        pair.message,
        "nginx keeps idle upstream connections 60 s but node closes them after 5 s"
    );
    assert_eq!(
        fix(&report, "nginx"),
        "set `keepalive_timeout 4s;` in nginx's upstream block (below 5 s with margin), or \
         raise node's idle timeout above 60 s: `server.keepAliveTimeout = 65000` (ms; keep \
         `headersTimeout` above it)"
    );
}

#[test]
fn alb_in_front_of_node_is_flagged() {
    let report = chain(&["alb", "node"]);
    let fix = fix(&report, "alb");
    assert!(
        fix.starts_with(
            "set `idle_timeout.timeout_seconds = 4` on the ALB (below 5 s with margin; it also \
             cuts the ALB's client side), or"
        ),
        "{fix}"
    );
    assert!(
        fix.contains("raise node's idle timeout above 60 s"),
        "{fix}"
    );
}

#[test]
fn envoy_in_front_of_gunicorn_is_flagged() {
    let report = chain(&["envoy", "gunicorn"]);
    let fix = fix(&report, "envoy");
    assert!(
        fix.starts_with("set `common_http_protocol_options.idle_timeout: 1.6s` in the cluster's"),
        "{fix}"
    );
    assert!(
        fix.contains("raise gunicorn's idle timeout above 3600 s: `--keep-alive 3780`"),
        "{fix}"
    );
}

#[test]
fn gcp_in_front_of_nginx_is_flagged_and_only_nginx_can_move() {
    let report = chain(&["gcp", "nginx"]);
    assert_eq!(
        fix(&report, "gcp"),
        "GCP's backend keep-alive timeout (600 s) is fixed; raise nginx's idle timeout above \
         600 s: `keepalive_timeout 630s;` in nginx's http or server block"
    );
}

#[test]
fn alb_then_kaguard_then_node_passes_with_margins() {
    let report = chain(&["alb", "kaguard", "node"]);
    assert_eq!(report.inversions, 0);
    assert_eq!(report.exit_code(), 0);
    assert!(report.pairs.iter().all(|p| p.status == Status::Ok));
    assert_eq!(pair(&report, "alb").margin, Some(Duration::from_secs(560)));
    assert_eq!(
        pair(&report, "kaguard").margin,
        Some(Duration::from_secs(4))
    );
    assert!(report.summary().contains("No inversion"));
}

#[test]
fn the_brief_example_chain_flags_only_nginx_to_app() {
    let report = chain(&[
        "alb:client=60s",
        "nginx:server=75s,client=60s",
        "app:server=5s",
    ]);
    assert_eq!(pair(&report, "alb").status, Status::Ok);
    assert_eq!(
        fix(&report, "nginx"),
        "set `keepalive_timeout 4s;` in nginx's upstream block (below 5 s with margin), or \
         raise app's idle timeout above 60 s (e.g. 65 s)"
    );
}

#[test]
fn haproxy_never_drops_idle_server_connections_so_it_races_any_app() {
    let report = chain(&["nginx", "haproxy:server=30s", "uvicorn"]);
    assert_eq!(pair(&report, "nginx").status, Status::Inversion);
    let fix = fix(&report, "haproxy");
    assert!(
        fix.starts_with("HAProxy has no idle timeout toward servers"),
        "{fix}"
    );
    assert!(!fix.contains("raise"), "nothing out-waits `never`: {fix}");
}

#[test]
fn kaguard_inversion_mentions_what_it_learns() {
    let report = chain(&["kaguard", "fast:server=500ms"]);
    let pair = pair(&report, "kaguard");
    assert_eq!(pair.status, Status::Inversion);
    assert!(pair.fix.as_deref().unwrap_or("").starts_with(
        "set `keepalive_timeout = \"400ms\"` in its [[upstream]] (below 500 ms with margin)"
    ));
    assert!(
        pair.notes
            .iter()
            .any(|n| n.contains("learns fast's idle timeout"))
    );
}

#[test]
fn tight_margin_is_ok_but_marked() {
    let report = chain(&["edge:client=4900ms", "node"]);
    let pair = pair(&report, "edge");
    assert_eq!(pair.status, Status::Ok);
    assert!(pair.tight);
    assert!(
        pair.message.contains("tight: keep edge at 4 s or less"),
        "{}",
        pair.message
    );
}

#[test]
fn request_caps_are_noted_by_who_can_see_them_coming() {
    let report = chain(&["nginx", "tomcat"]);
    assert_eq!(pair(&report, "nginx").status, Status::Inversion);
    assert!(pair(&report, "nginx").notes[0].contains("says so"));
    let silent = "app:server=30s,requests=100,announced=no";
    let report = chain(&["kaguard", silent]);
    let note = &pair(&report, "kaguard").notes[0];
    assert!(
        note.contains("set `keepalive_requests = 100` in [[upstream]]"),
        "{note}"
    );
    let report = chain(&["haproxy", silent]);
    assert!(pair(&report, "haproxy").notes[0].contains("`max-reuse 99`"));
    let report = chain(&["traefik", silent]);
    assert!(pair(&report, "traefik").notes[0].contains("cannot see the close coming"));
}

#[test]
fn missing_values_make_the_pair_unknown_not_an_inversion() {
    let report = chain(&["nginx", "mystery:client=1s", "haproxy"]);
    assert_eq!(pair(&report, "nginx").status, Status::Unknown);
    assert!(
        pair(&report, "mystery")
            .message
            .contains("no built-in client-side idle timeout")
    );
    assert_eq!(report.exit_code(), 0);
    let report = chain(&["node", "gunicorn"]);
    assert!(
        pair(&report, "node")
            .message
            .contains("keeps no upstream connections")
    );
}

#[test]
fn custom_values_and_overrides_parse() {
    let hop = parse_hop("nginx:client=30s").expect("valid");
    assert_eq!(hop.preset, Some("nginx"));
    assert_eq!(hop.client, Some(Idle::After(Duration::from_secs(30))));
    assert_eq!(hop.server, Some(Idle::After(Duration::from_secs(75))));
    let hop = parse_hop("myapp:server=15s").expect("valid");
    assert_eq!((hop.preset, hop.client), (None, None));
    assert_eq!(hop.server, Some(Idle::After(Duration::from_secs(15))));
    let hop = parse_hop("edge:preset=nginx,client=10").expect("valid");
    assert_eq!((hop.name.as_str(), hop.preset), ("edge", Some("nginx")));
    assert_eq!(hop.client, Some(Idle::After(Duration::from_secs(10))));
    let hop = parse_hop("app:server=5s,requests=100,announced=no").expect("valid");
    assert_eq!((hop.requests, hop.announced), (Some(100), false));
    assert_eq!(parse_hop("go").expect("valid").server, Some(Idle::Never));
    assert_eq!(
        parse_hop("x:server=0").expect("valid").server,
        Some(Idle::Off)
    );
    assert_eq!(
        parse_hop("x:client=never").expect("valid").client,
        Some(Idle::Never)
    );
    assert_eq!(parse_hop("NGINX").expect("valid").preset, Some("nginx"));
}

#[test]
fn bad_hops_name_their_token_and_say_why() {
    assert!(bad_token("nginx:client=abc").contains("client=abc"));
    assert!(bad_token("myapp").contains("unknown preset `myapp`"));
    assert!(bad_token("nginx:color=red").contains("unknown key `color`"));
    assert!(bad_token("nginx:client").contains("not key=value"));
    assert!(bad_token("nginx:").contains("nothing after ':'"));
    assert!(bad_token("tomcat:requests=0").contains("requests=0"));
    assert!(bad_token("a b:server=1s").contains("hop name"));
    assert!(bad_token("x:preset=squid").contains("unknown preset"));
    assert!(bad_token("x:announced=maybe").contains("yes or no"));
}

#[test]
fn chain_file_reads_hops_with_the_same_rules() {
    let text = r#"
        [[hop]]
        name = "alb"
        [[hop]]
        name = "edge"
        preset = "nginx"
        client = 30
        [[hop]]
        name = "app"
        server = "5s"
        requests = 100
        announced = false
    "#;
    let hops = cli::parse_file(text, "chain.toml").expect("valid file");
    assert_eq!(hops.len(), 3);
    assert_eq!(hops[1].client, Some(Idle::After(Duration::from_secs(30))));
    assert_eq!((hops[2].requests, hops[2].announced), (Some(100), false));
    let error = cli::parse_file("[[hop]]\nname = \"app\"\nserver = \"soon\"\n", "chain.toml")
        .expect_err("bad duration");
    assert!(
        error.contains("chain.toml [[hop]] #1 (app)") && error.contains("server=soon"),
        "{error}"
    );
    assert!(cli::parse_file("[[hop]]\nname = \"x\"\ncolour = 1\n", "f").is_err());
}

#[test]
fn report_serialises_to_json() {
    let report = chain(&["nginx", "node"]);
    let json: serde_json::Value = serde_json::from_str(&report.json()).expect("valid JSON");
    assert_eq!(json["inversions"], 1);
    assert_eq!(json["pairs"][0]["status"], "inversion");
    assert_eq!(json["pairs"][0]["client"], "60s");
    assert_eq!(json["pairs"][0]["server"], "5s");
    assert_eq!(json["hops"][1]["server"], "5s");
}

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    args: AuditArgs,
}

#[test]
fn arguments_need_hops_or_a_file() {
    assert!(Cli::try_parse_from(["audit"]).is_err());
    assert!(Cli::try_parse_from(["audit", "--presets"]).is_ok());
    assert!(Cli::try_parse_from(["audit", "a", "--file", "x.toml"]).is_err());
    let cli = Cli::try_parse_from(["audit", "nginx", "app", "--probe", "app=http://h:1/?a=b"])
        .expect("valid");
    assert_eq!(cli.args.probe, ["app=http://h:1/?a=b"]);
    assert!(presets::table().contains("gunicorn"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_fills_in_the_app_hop_from_a_live_server() {
    let behaviour = Behaviour {
        idle_timeout: Some(Duration::from_millis(300)),
        max_requests: Some(7),
        announce_last: false,
        ..Behaviour::default()
    };
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let upstream = TestUpstream::start(any_port, behaviour)
        .await
        .expect("bind 127.0.0.1:0");
    let args = Cli::try_parse_from([
        "audit",
        "kaguard",
        "app",
        "--probe",
        &format!("app=http://{}/", upstream.addr()),
        "--json",
        "--quiet",
    ])
    .expect("valid")
    .args;
    let report = run(args).await.expect("audit runs");
    let app = &report.hops[1];
    let Some(Idle::After(idle)) = app.server else {
        panic!("probed idle timeout: {:?}", app.server);
    };
    assert!(
        idle.abs_diff(Duration::from_millis(300)) <= Duration::from_millis(50),
        "{idle:?}"
    );
    assert_eq!((app.requests, app.announced), (Some(7), false));
    // kaguard's 1 s client side outlives the app's 300 ms.
    assert_eq!(report.exit_code(), 1);
    let notes = &report.pairs[0].notes;
    assert!(
        notes.iter().any(|n| n.contains("keepalive_requests = 7")),
        "{notes:?}"
    );
}

#[tokio::test]
async fn probe_naming_a_missing_hop_is_bad_input() {
    let args = Cli::try_parse_from([
        "audit",
        "nginx",
        "node",
        "--probe",
        "app=http://127.0.0.1:1/",
    ])
    .expect("valid")
    .args;
    assert!(matches!(run(args).await, Err(AuditError::Usage(_))));
    let args = Cli::try_parse_from(["audit", "nginx"]).expect("valid").args;
    assert!(matches!(run(args).await, Err(AuditError::Usage(_))));
}

/// The shape `main.rs` gives them: both subcommands side by side, flags checked by clap.
#[test]
fn probe_and_audit_assemble_as_subcommands() {
    use clap::CommandFactory;

    #[derive(Parser, Debug)]
    struct Main {
        #[command(subcommand)]
        command: Sub,
    }
    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Probe(crate::tools::probe::ProbeArgs),
        Audit(AuditArgs),
    }
    Main::command().debug_assert();
    let parsed = Main::try_parse_from(["kaguard", "audit", "alb", "nginx", "node", "--json"]);
    assert!(matches!(
        parsed,
        Ok(Main {
            command: Sub::Audit(_)
        })
    ));
    let parsed = Main::try_parse_from(["kaguard", "probe", "http://127.0.0.1:3000/", "--quiet"]);
    assert!(matches!(
        parsed,
        Ok(Main {
            command: Sub::Probe(_)
        })
    ));
}
