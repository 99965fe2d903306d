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

/// Every query of the shipped Grafana dashboard names only series that exist: recording rules
/// of the shipped rule file or families the agent exports (from the `metrics/` sources).
#[test]
fn dashboard_queries_name_only_existing_series() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/ws1-probe.json")).unwrap(),
    )
    .unwrap();
    let rules = std::fs::read_to_string(repo().join("deploy/ws1-probe-rules.yml")).unwrap();
    let mut exported = String::new();
    for entry in std::fs::read_dir(repo().join("ws1-probe/src/metrics")).unwrap() {
        exported += &std::fs::read_to_string(entry.unwrap().path()).unwrap();
    }
    let known = |name: &str| {
        if name.starts_with("service:") {
            return rules.contains(&format!("record: {name}\n"));
        }
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| exported.contains(&format!("\"{f}\"")))
            .unwrap_or(name);
        exported.contains(&format!("\"{family}\""))
    };
    let variable = dash["templating"]["list"][1]["definition"]
        .as_str()
        .unwrap();
    assert!(
        variable.contains("ws1_probe_targeted_processes"),
        "{variable}"
    );
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 12, "{} panels", panels.len());
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(
            !targets.is_empty(),
            "panel without a query: {}",
            panel["title"]
        );
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|w| w.starts_with("ws1_probe_") || w.starts_with("service:"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                assert!(
                    known(name),
                    "panel {}: unknown series {name}",
                    panel["title"]
                );
            }
        }
    }
}
