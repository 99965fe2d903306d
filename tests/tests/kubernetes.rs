//! The Kubernetes manifests under deploy/kubernetes: valid against the API schemas
//! (`kubernetes-validate --strict`, installed by xtask), consistent with each other (the
//! PodMonitor selects the DaemonSet's pods and scrapes a port they expose, the probes ask the
//! agent's health endpoints), and their embedded config loads in the real agent.

use std::{path::PathBuf, process::Command};

use serde_yaml_ng::Value;
use ws1_probe_tests::probe_bin;

fn manifests() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(manifests().join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// The checker, from xtask (`WS1_KUBE_VALIDATE_BIN`) or where xtask installs it.
fn validator() -> Option<PathBuf> {
    let path = std::env::var_os("WS1_KUBE_VALIDATE_BIN").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/tools/kubernetes-validate/bin/kubernetes-validate")
        },
        PathBuf::from,
    );
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "kubernetes-validate missing at {}: `cargo xtask test` installs it",
            path.display()
        );
    }
    eprintln!("skipping test - kubernetes-validate not installed (run `cargo xtask test`)");
    None
}

#[test]
fn manifests_pass_the_api_schemas() {
    let Some(validate) = validator() else { return };
    let out = Command::new(validate)
        .args(["--strict", "--no-warn"])
        .arg(manifests().join("ws1-probe.yaml"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for resource in [
        "namespace/ws1-probe",
        "serviceaccount/ws1-probe",
        "configmap/ws1-probe",
        "daemonset/ws1-probe",
    ] {
        assert!(
            text.contains(&format!("passed for resource {resource}")),
            "{resource}: {text}"
        );
    }
    // The checker does fail: a DaemonSet with a misspelt field is refused.
    let bad = std::env::temp_dir().join(format!("ws1-bad-ds-{}.yaml", std::process::id()));
    let original = std::fs::read_to_string(manifests().join("ws1-probe.yaml")).unwrap();
    std::fs::write(&bad, original.replace("hostPID: true", "hostPid: true")).unwrap();
    let refused = Command::new(validator().unwrap())
        .arg("--strict")
        .arg(&bad)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&bad);
    assert!(!refused.status.success(), "a misspelt field passed");
}

#[test]
fn daemonset_podmonitor_and_probes_agree() {
    let docs = documents("ws1-probe.yaml");
    let ds = kind(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"];
    assert_eq!(pod["spec"]["hostPID"].as_bool(), Some(true));
    let c = &pod["spec"]["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    let added: Vec<&str> = sc["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for cap in ["BPF", "PERFMON"] {
        assert!(added.contains(&cap), "{added:?}");
    }
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    let port = c["ports"][0]["name"].as_str().unwrap();
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["port"].as_str(), Some(port));
    assert!(c["resources"]["limits"]["memory"].as_str().is_some());
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for path in ["/sys/kernel/btf", "/sys/kernel/tracing", "/etc/ws1-probe"] {
        assert!(mounts.contains(&path), "{path} not mounted: {mounts:?}");
    }
    // The PodMonitor selects these pods and scrapes the port they name.
    let monitors = documents("podmonitor.yaml");
    let pm = kind(&monitors, "PodMonitor");
    let labels = pod["metadata"]["labels"].as_mapping().unwrap();
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(labels.get(k), Some(v), "PodMonitor selects {k:?}={v:?}");
    }
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["port"].as_str(),
        Some(port)
    );
    assert_eq!(pm["metadata"]["namespace"], ds["metadata"]["namespace"]);
}

#[test]
fn the_configmap_config_loads_in_the_agent() {
    let docs = documents("ws1-probe.yaml");
    let toml = kind(&docs, "ConfigMap")["data"]["ws1-probe.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    let file = std::env::temp_dir().join(format!("ws1-k8s-{}.toml", std::process::id()));
    std::fs::write(&file, &toml).unwrap();
    // `rules` parses and validates the whole config file and needs no privileges.
    let out = Command::new(probe_bin())
        .arg("rules")
        .arg("-c")
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Reachable by Prometheus from other nodes: the pod's address, not loopback.
    assert!(toml.contains("listen = \"0.0.0.0:9479\""), "{toml}");
}
