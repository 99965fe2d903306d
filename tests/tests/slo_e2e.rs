//! From install to paged, for real: the agent observes two services this test runs, one that
//! breaks its latency SLO (every request takes 30 ms against 5 ms) and one within it (no
//! delay against 25 ms). Debian's Prometheus scrapes the agent every second and evaluates the
//! rules `ws1-probe rules` generates from the test's config; Debian's Alertmanager routes with
//! the shipped deploy/alertmanager.yml. The test checks that the breaking service's alerts
//! reach Alertmanager (and its pager receiver) with `service` and `severity`, that the other
//! service raises nothing, that `ws1-probe slo` tells them apart from Prometheus and from the
//! agent, and that every query of the shipped Grafana dashboard returns data.
//!
//! Everything listens on loopback on free ports; files live in a temporary directory that is
//! removed at the end. `cargo xtask test` installs the two packages; with `CI` set a missing one
//! fails the test.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use ws1_probe_tests::{
    Agent, Workload, allocload_bin, free_port, privileged, probe_bin, workload_bin,
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The services: name (also the command-name prefix of their processes), the server's delay
/// per request, the SLO latency.
const SLOW: &str = "slo-slow";
const FAST: &str = "slo-fast";

const CONFIG: &str = r#"
# Both services leak (precise mode) and run in a memory cgroup with a limit, so that every
# dashboard panel has data.
[[service]]
name = "slo-slow"
match = { comm = "^w-slo-slow" }
precise_alloc = true
slo = { latency = "5ms", target = 0.99 }

[[service]]
name = "slo-fast"
match = { comm = "^w-slo-fast" }
precise_alloc = true
slo = { latency = "25ms", target = 0.99 }

# No process matches: `ws1-probe slo` must say "no data", not 100 %.
[[service]]
name = "slo-idle"
match = { comm = "^w-slo-idle$" }
slo = { latency = "5ms", target = 0.99 }

[alerts]
# p99 over 25 ms pages: the slow service's 30 ms requests cross it, the fast one's do not.
latency = "25ms"
latency_for = "2s"
# Short `for`s so the test does not wait minutes; the thresholds are the workbook's.
slo_fast_for = "2s"
slo_slow_for = "2s"
"#;

/// True when `tool` runs; else skip (or fail in CI).
fn have(tool: &str) -> bool {
    match Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(err) => {
            if std::env::var_os("CI").is_some() {
                panic!("{tool} is missing in CI ({err}): `cargo xtask test` installs it");
            }
            eprintln!("skipping test - {tool} not installed ({err}); run `cargo xtask test`");
            false
        }
    }
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed when dropped, its output in a log file.
struct Daemon(Child);

impl Daemon {
    fn start(program: &str, args: &[String], log: &Path) -> Daemon {
        let out = std::fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Daemon(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A v1 or v2 memory cgroup with a limit; processes go back to the root when dropped.
struct MemoryCgroup {
    dir: PathBuf,
    parent_procs: PathBuf,
}

impl MemoryCgroup {
    const LIMIT: u64 = 512 << 20;

    fn new(name: &str) -> MemoryCgroup {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let (base, file) = if v2 {
            (root.to_path_buf(), "memory.max")
        } else {
            (root.join("memory"), "memory.limit_in_bytes")
        };
        assert!(
            base.join("cgroup.procs").exists(),
            "no cgroup v2 with the memory controller and no v1 memory controller at {}",
            base.display()
        );
        let dir = base.join(name);
        let _ = std::fs::create_dir(&dir);
        if v2 {
            let _ = std::fs::write(base.join("cgroup.subtree_control"), "+memory");
        }
        std::fs::write(dir.join(file), Self::LIMIT.to_string()).unwrap();
        MemoryCgroup {
            parent_procs: base.join("cgroup.procs"),
            dir,
        }
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(&self.parent_procs, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET over HTTP/1.0 (no keep-alive, no chunking); the status and body, or the error.
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// Polls `check` every 250 ms until it gives `Some`, failing after `limit` with `what` and the
/// last state `check` described.
fn poll<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(state) => assert!(
                started.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}: {state}"
            ),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// An instant query's result vector.
fn query(prom: u16, q: &str) -> Result<Vec<Value>, String> {
    let (status, body) =
        get(prom, &format!("/api/v1/query?query={}", encode(q))).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{status} {body}: {e}"))?;
    assert_eq!(v["status"], "success", "query {q}: {body}");
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// One sample's value.
fn sample_value(s: &Value) -> f64 {
    s["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A dashboard query as Grafana sends it: `$service` is the one selected service (a single
/// value of a regex matcher is sent as is; ours have no regex metacharacters), and the interval
/// variables are what Grafana computes for a data source with a 1 s scrape interval over a
/// short range: `$__interval` is at least the scrape interval, `$__rate_interval` is
/// max(4 × scrape interval, `$__interval` + scrape interval).
fn grafana_expr(expr: &str, service: &str) -> String {
    expr.replace("$__rate_interval", "4s")
        .replace("${__rate_interval}", "4s")
        .replace("$__interval", "1s")
        .replace("${__interval}", "1s")
        .replace("${service}", service)
        .replace("$service", service)
}

/// A webhook receiver: records the path and body of every POST and answers 200.
struct Webhook {
    port: u16,
    received: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Webhook {
    fn start() -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        // Lives until the test process exits; Alertmanager is its only client.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream);
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_owned();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; length];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let mut stream = reader.into_inner();
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                if let Ok(v) = serde_json::from_slice(&body) {
                    sink.lock().unwrap().push((path, v));
                }
            }
        });
        Webhook { port, received }
    }
}

/// A service's processes: a request/response server with a client in one `ws1-netload`
/// (command name `w-<service>`) and a `ws1-allocload` that leaks (`w-<service>-al`). Threads
/// drive them until `stop`.
struct Service {
    stop: Arc<AtomicBool>,
    /// Requests completed (each one a server-side request the agent must count).
    requests: Arc<AtomicU64>,
    drivers: Vec<JoinHandle<Workload>>,
    /// The processes once the drivers stopped; alive until the service is dropped.
    idle: Vec<Workload>,
}

impl Service {
    /// Spawns the processes (not yet driven) and returns them with their pids.
    fn spawn(name: &str) -> (Workload, Workload) {
        let netload = workload_bin().with_file_name("ws1-netload");
        let net = Workload::spawn_program(&netload, &format!("w-{name}"));
        let alloc = Workload::spawn_program(&allocload_bin(), &format!("w-{name}-al"));
        (net, alloc)
    }

    /// Serves on a free loopback port and drives batches of 10 pooled requests of `delay_ms`
    /// each, 100 ms apart; leaks 10 blocks of 16 KiB every 2 s.
    fn drive(mut net: Workload, mut alloc: Workload, delay_ms: u32) -> Service {
        let reply = net.cmd("listen 127.0.0.1:0");
        let port: u16 = reply.trim_start_matches("ok ").parse().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (s, r) = (Arc::clone(&stop), Arc::clone(&requests));
        let load = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                net.cmd(&format!("pooled 127.0.0.1:{port} 10 {delay_ms}"));
                r.fetch_add(10, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
            net
        });
        let s = Arc::clone(&stop);
        let leak = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                alloc.cmd("leak-malloc 10 16384");
                for _ in 0..20 {
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            alloc
        });
        Service {
            stop,
            requests,
            drivers: vec![load, leak],
            idle: Vec::new(),
        }
    }

    /// Stops the drivers; returns the requests completed.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for d in self.drivers.drain(..) {
            self.idle.push(d.join().expect("a load driver failed"));
        }
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Kills the workloads' processes: when the test fails, the driver threads may still hold
/// them as the test process exits.
fn kill_workloads(pids: &[u32]) {
    for pid in pids {
        // SAFETY: signalling processes this test started.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
    }
}

fn alert_labels(a: &Value) -> (&str, &str, &str) {
    let l = &a["labels"];
    (
        l["alertname"].as_str().unwrap_or(""),
        l["service"].as_str().unwrap_or(""),
        l["severity"].as_str().unwrap_or(""),
    )
}

#[test]
fn slow_service_pages_fast_one_stays_quiet_and_every_panel_has_data() {
    if !privileged() || !have("prometheus") || !have("prometheus-alertmanager") {
        return;
    }
    let tmp = TempDir::new("ws1-slo-e2e");
    let dir = &tmp.0;
    let config = dir.join("ws1.toml");
    std::fs::write(&config, CONFIG).unwrap();

    // The rules, generated from the config as a user would.
    let rules = dir.join("rules.yml");
    let out = Command::new(probe_bin())
        .args(["rules", "-c"])
        .arg(&config)
        .arg("-o")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ws1-probe rules: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The services' processes, in memory cgroups with a limit, before the agent starts (its
    // /proc scan targets them and finds their listening sockets later through the hooks).
    let cgroups: Vec<MemoryCgroup> = [SLOW, FAST]
        .iter()
        .map(|s| MemoryCgroup::new(&format!("ws1-{s}-{}", std::process::id())))
        .collect();
    let (slow_net, slow_alloc) = Service::spawn(SLOW);
    let (fast_net, fast_alloc) = Service::spawn(FAST);
    let pids = [slow_net.pid, slow_alloc.pid, fast_net.pid, fast_alloc.pid];
    for (cg, p) in cgroups.iter().zip([[pids[0], pids[1]], [pids[2], pids[3]]]) {
        for pid in p {
            cg.add(pid);
        }
    }
    struct Killer([u32; 4]);
    impl Drop for Killer {
        fn drop(&mut self) {
            kill_workloads(&self.0);
        }
    }
    let _killer = Killer(pids);

    let agent = Agent::start(&[
        "-c",
        config.to_str().unwrap(),
        // The overhead panel's BPF program time.
        "--bpf-stats",
    ]);
    agent.wait_for("both services targeted", |m| {
        m.value("ws1_probe_targeted_processes", &[("service", SLOW)]) == 2.0
            && m.value("ws1_probe_targeted_processes", &[("service", FAST)]) == 2.0
    });
    let mut slow = Service::drive(slow_net, slow_alloc, 30);
    let mut fast = Service::drive(fast_net, fast_alloc, 0);

    // Alertmanager with the shipped routing; only the waits are shortened (so the test does
    // not wait 10-30 s per group) and the receivers' webhooks point at this test. Routes,
    // grouping and inhibition are the shipped file's.
    let webhook = Webhook::start();
    let shipped = std::fs::read_to_string(repo().join("deploy/alertmanager.yml")).unwrap();
    assert!(shipped.contains("http://127.0.0.1:9095/pager"), "{shipped}");
    let am_config: String = shipped
        .lines()
        .map(|l| {
            let key = l.trim_start();
            if key.starts_with("group_wait:") || key.starts_with("group_interval:") {
                let indent = &l[..l.len() - key.len()];
                let name = key.split(':').next().unwrap_or("");
                format!("{indent}{name}: 1s")
            } else {
                l.replace("127.0.0.1:9095", &format!("127.0.0.1:{}", webhook.port))
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("alertmanager.yml"), am_config).unwrap();
    let am_port = free_port();
    let _am = Daemon::start(
        "prometheus-alertmanager",
        &[
            format!("--config.file={}", dir.join("alertmanager.yml").display()),
            format!("--storage.path={}", dir.join("am").display()),
            format!("--web.listen-address=127.0.0.1:{am_port}"),
            // No cluster: a single instance needs no gossip port.
            "--cluster.listen-address=".to_owned(),
        ],
        &dir.join("alertmanager.log"),
    );

    let prom_port = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{rules}]\n\
             alerting:\n  alertmanagers:\n    - static_configs: [{{targets: [\"127.0.0.1:{am_port}\"]}}]\n\
             scrape_configs:\n  - job_name: ws1-probe\n    static_configs: [{{targets: [\"127.0.0.1:{agent}\"]}}]\n",
            rules = rules.display(),
            agent = agent.port,
        ),
    )
    .unwrap();
    let _prom = Daemon::start(
        "prometheus",
        &[
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("prom").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        &dir.join("prometheus.log"),
    );
    for (name, port) in [("alertmanager", am_port), ("prometheus", prom_port)] {
        poll(
            &format!("{name} ready"),
            Duration::from_secs(30),
            || match get(port, "/-/ready") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }

    let ready_at = Instant::now();
    // The slow service pages: its burn-rate and latency alerts reach Alertmanager as critical,
    // with the service label, and its slow-burn warning is inhibited by them.
    let alerts = poll(
        "the slow service's critical alerts in Alertmanager",
        Duration::from_secs(120),
        || {
            let (_, body) = get(am_port, "/api/v2/alerts").map_err(|e| e.to_string())?;
            let alerts: Vec<Value> = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let has = |name: &str, severity: &str, state: &str| {
                alerts.iter().any(|a| {
                    alert_labels(a) == (name, SLOW, severity) && a["status"]["state"] == state
                })
            };
            if has("WS1SLOErrorBudgetBurnFast", "critical", "active")
                && has("WS1ServiceHighLatency", "critical", "active")
                && has("WS1SLOErrorBudgetBurnSlow", "warning", "suppressed")
            {
                Ok(alerts)
            } else {
                let seen: Vec<_> = alerts
                    .iter()
                    .map(|a| (alert_labels(a), a["status"]["state"].clone()))
                    .collect();
                Err(format!("{seen:?}"))
            }
        },
    );
    let paged_after = ready_at.elapsed();
    for a in &alerts {
        let (name, service, severity) = alert_labels(a);
        assert!(
            matches!(severity, "warning" | "critical"),
            "{name} has severity {severity:?}"
        );
        assert_ne!(service, FAST, "the fast service raised {name}: {a}");
    }
    // Escalation: the pager receiver was notified of the slow service's critical alerts.
    poll(
        "a pager notification for the slow service",
        Duration::from_secs(30),
        || {
            let got = webhook.received.lock().unwrap().clone();
            let paged = got.iter().any(|(path, v)| {
                path == "/pager"
                    && v["alerts"].as_array().is_some_and(|a| {
                        a.iter().any(|a| {
                            a["labels"]["service"] == SLOW && a["labels"]["severity"] == "critical"
                        })
                    })
            });
            if paged {
                Ok(())
            } else {
                Err(format!(
                    "{:?}",
                    got.iter().map(|(p, _)| p).collect::<Vec<_>>()
                ))
            }
        },
    );

    // Every panel query of the shipped dashboard returns data, for each service where it names
    // one. The leak-suspect series needs blocks 30 s old at the agent's 30 s refresh, so this
    // can take a minute after the start.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/ws1-probe.json")).unwrap(),
    )
    .unwrap();
    let mut queries: Vec<(String, String)> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("").to_owned();
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            if expr.contains("$service") || expr.contains("${service}") {
                for s in [SLOW, FAST] {
                    queries.push((format!("{title} [{s}]"), grafana_expr(expr, s)));
                }
            } else {
                queries.push((title.clone(), grafana_expr(expr, "")));
            }
        }
    }
    assert!(queries.len() >= 2 * 17, "{} queries", queries.len());
    poll(
        "data for every dashboard query",
        Duration::from_secs(150),
        || {
            let empty: Vec<&str> = queries
                .iter()
                .filter(|(_, q)| {
                    !query(prom_port, q)
                        .unwrap_or_default()
                        .iter()
                        .any(|s| sample_value(s).is_finite())
                })
                .map(|(title, _)| title.as_str())
                .collect();
            if empty.is_empty() {
                Ok(())
            } else {
                Err(format!("no data yet for {empty:?}"))
            }
        },
    );
    let panels_after = ready_at.elapsed();
    // The dashboard's service variable lists both services.
    let variable = query(prom_port, "ws1_probe_targeted_processes").unwrap();
    for s in [SLOW, FAST] {
        assert!(
            variable.iter().any(|v| v["metric"]["service"] == s),
            "{s} missing from the service variable: {variable:?}"
        );
    }

    // `ws1-probe slo` from Prometheus: the slow service below its objective, the fast one at
    // or above it.
    let slo = |args: &[String]| -> Value {
        let out = Command::new(probe_bin())
            .arg("slo")
            .arg("-c")
            .arg(&config)
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ws1-probe slo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let row = |report: &Value, service: &str| -> Value {
        report["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["service"] == service)
            .cloned()
            .unwrap_or_else(|| panic!("{service} missing in {report}"))
    };
    let prometheus = format!("--prometheus=http://127.0.0.1:{prom_port}");
    let from_prom = slo(std::slice::from_ref(&prometheus));
    assert_eq!(from_prom["window_seconds"], 30.0 * 86400.0, "{from_prom}");
    for report in [
        &from_prom,
        &slo(&[prometheus.clone(), "--window=1h".to_owned()]),
    ] {
        let (s, f) = (row(report, SLOW), row(report, FAST));
        assert_eq!(s["meets_objective"], false, "{report}");
        assert!(s["attainment"].as_f64().unwrap() < 0.99, "{report}");
        assert!(s["burn_rate"].as_f64().unwrap() > 1.0, "{report}");
        assert!(s["error_budget_left"].as_f64().unwrap() < 0.0, "{report}");
        assert_eq!(f["meets_objective"], true, "{report}");
        assert!(f["attainment"].as_f64().unwrap() >= 0.99, "{report}");
        assert!(f["requests"].as_f64().unwrap() > 0.0, "{report}");
        let idle = row(report, "slo-idle");
        assert!(
            idle["attainment"].is_null() && idle["meets_objective"].is_null(),
            "{report}"
        );
    }
    // The table a user reads.
    let out = Command::new(probe_bin())
        .args(["slo", "-c"])
        .arg(&config)
        .arg(&prometheus)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |service: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{service} ")))
            .unwrap_or_else(|| panic!("no row for {service} in\n{table}"))
            .to_owned()
    };
    assert!(line(SLOW).ends_with("BELOW OBJECTIVE"), "{table}");
    assert!(line(FAST).ends_with(" ok"), "{table}");
    assert!(line("slo-idle").ends_with("no data"), "{table}");
    assert!(
        table.contains("slo-idle: Prometheus has no server-side request series of slo-idle"),
        "{table}"
    );

    // The fast service never raised an alert, not even a pending one, during the whole test.
    let fast_alerts = query(
        prom_port,
        &format!("count_over_time(ALERTS{{service=\"{FAST}\"}}[10m])"),
    )
    .unwrap();
    assert!(
        fast_alerts.is_empty(),
        "fast service alerts: {fast_alerts:?}"
    );
    let notified_fast = webhook
        .received
        .lock()
        .unwrap()
        .iter()
        .any(|(_, v)| v.to_string().contains(&format!("\"service\":\"{FAST}\"")));
    assert!(!notified_fast, "a receiver was notified about {FAST}");

    // `ws1-probe slo` from the agent alone, after the load stopped: the exact request counts
    // the drivers completed, and the same verdicts.
    let slow_requests = slow.stop();
    let fast_requests = fast.stop();
    let from_agent = slo(&[format!("--agent=127.0.0.1:{}", agent.port)]);
    let (s, f) = (row(&from_agent, SLOW), row(&from_agent, FAST));
    assert_eq!(
        s["requests"].as_f64(),
        Some(slow_requests as f64),
        "{from_agent}"
    );
    assert_eq!(
        f["requests"].as_f64(),
        Some(fast_requests as f64),
        "{from_agent}"
    );
    assert_eq!(s["attainment"].as_f64(), Some(0.0), "{from_agent}");
    assert_eq!(s["meets_objective"], false, "{from_agent}");
    assert_eq!(f["meets_objective"], true, "{from_agent}");
    assert!(
        row(&from_agent, "slo-idle")["attainment"].is_null(),
        "{from_agent}"
    );
    eprintln!(
        "critical alerts in Alertmanager {:.1}s after Prometheus was ready; all {} dashboard queries with data after {:.1}s\n{table}slo from Prometheus: {from_prom}\nslo from the agent: {from_agent}",
        paged_after.as_secs_f64(),
        queries.len(),
        panels_after.as_secs_f64(),
    );
}
