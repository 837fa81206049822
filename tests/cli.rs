//! The binary: `check`, exit codes, help.

mod support;

use std::process::Command;

fn kaguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kaguard"))
}

#[test]
fn every_example_config_passes_check_and_prints_the_effective_config() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = kaguard()
                .arg("check")
                .arg("--config")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let printed = String::from_utf8(out.stdout).unwrap();
            assert!(
                printed.contains("keepalive_timeout"),
                "defaults are filled in"
            );
            seen += 1;
        }
    }
    assert!(seen > 0);
}

#[test]
fn bad_config_exits_2_with_one_line_naming_key_and_value() {
    let path = std::env::temp_dir().join(format!("kaguard-bad-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "listen = [\"127.0.0.1:0\"]\n[[upstream]]\nname = \"app\"\nservers = [\"127.0.0.1:1\"]\nkeepalive_timeout = \"5x\"\n",
    )
    .unwrap();
    let out = kaguard()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(r#"upstream "app": keepalive_timeout: invalid duration "5x""#),
        "{err}"
    );
}

#[test]
fn port_in_use_exits_2_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = kaguard()
        .args(["run", "--listen", &addr, "--upstream", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains(&addr) && last.contains("in use"), "{err}");
}

#[test]
fn help_shows_examples_and_version_prints() {
    let help = kaguard().arg("--help").output().unwrap();
    assert!(
        String::from_utf8(help.stdout)
            .unwrap()
            .contains("kaguard run --listen")
    );
    let version = kaguard().arg("--version").output().unwrap();
    assert!(
        String::from_utf8(version.stdout)
            .unwrap()
            .starts_with("kaguard ")
    );
}

#[tokio::test]
async fn admin_serves_metrics_and_healthz() {
    let up = support::upstream(Default::default()).await;
    let kg = support::start(support::config(&[up.addr()])).await;
    assert_eq!(support::get(kg.admin, "/healthz").await.status(), 200);
    assert!(kg.metrics().await.contains("kaguard_requests_total"));
}
