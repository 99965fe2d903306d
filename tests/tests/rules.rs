//! The shipped alerting files, checked by Prometheus' and Alertmanager's own tools: the rules
//! load (`promtool check rules`), every alert fires after its `for` and resolves (`promtool test
//! rules`), the Prometheus config loads with them, and the Alertmanager routing is valid.
//! `cargo xtask test` installs Debian's prometheus and prometheus-alertmanager.

use std::{path::PathBuf, process::Command};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `tool args` in the repository; `None` (skip) when the tool is missing outside CI.
fn check(tool: &str, args: &[&str]) -> Option<String> {
    let out = match Command::new(tool).args(args).current_dir(repo()).output() {
        Ok(out) => out,
        Err(err) => {
            if std::env::var_os("CI").is_some() {
                panic!("{tool} is missing in CI ({err}): `cargo xtask test` installs it");
            }
            eprintln!("skipping test - {tool} not installed ({err}); run `cargo xtask test`");
            return None;
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
    Some(text)
}

#[test]
fn shipped_rules_load_and_every_alert_fires_and_resolves() {
    let Some(text) = check(
        "promtool",
        &["check", "rules", "deploy/ws1-probe-rules.yml"],
    ) else {
        return;
    };
    assert!(text.contains("SUCCESS"), "{text}");
    let Some(text) = check(
        "promtool",
        &["test", "rules", "deploy/tests/ws1-probe-rules.test.yml"],
    ) else {
        return;
    };
    assert!(text.contains("SUCCESS"), "{text}");
    // Every alert of the shipped file has a unit test.
    let rules = std::fs::read_to_string(repo().join("deploy/ws1-probe-rules.yml")).unwrap();
    let tests =
        std::fs::read_to_string(repo().join("deploy/tests/ws1-probe-rules.test.yml")).unwrap();
    let mut untested: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .filter(|name| !tests.contains(&format!("alertname: {name}\n")))
        .collect();
    untested.dedup();
    assert!(
        untested.is_empty(),
        "alerts without a promtool test: {untested:?}"
    );
}

#[test]
fn shipped_prometheus_and_alertmanager_configs_are_valid() {
    let Some(text) = check("promtool", &["check", "config", "deploy/prometheus.yml"]) else {
        return;
    };
    assert!(text.contains("SUCCESS: 1 rule files found"), "{text}");
    let Some(text) = check("amtool", &["check-config", "deploy/alertmanager.yml"]) else {
        return;
    };
    assert!(
        text.contains("1 inhibit rules") && text.contains("2 receivers"),
        "{text}"
    );
}
