//! The WS1 workload simulator (`ws1-sim`) under the agent, with a config like the example's
//! (the plan's five services, selected by command name; PostgreSQL as the `postgres`
//! dependency with libpq's two handshake exchanges):
//!
//! - every exchange the simulator counts, per service, side and port, is the agent's request
//!   count exactly, and so are connections, refused connects and handshake exchanges; the DB's
//!   server side (PostgreSQL's own processes) counts the trading engine's statements plus its
//!   handshakes;
//! - each fault shows in its metric: the latency spike moves one in ten of risk's requests past
//!   100 ms, the leak grows memory-ops' resident memory and its growth slope, the CPU hog lands
//!   in trading-engine's CPU seconds, refused connects and resets in the socket error counters,
//!   and churn makes connections per request exactly what the simulator did.
//!
//! The simulator's processes run through hard links named after their roles, so their command
//! names are the services' and no other test's processes match.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ws1_probe_tests::{Agent, Metrics, privileged, workload_bin};

const SERVICES: [&str; 4] = ["agent-ops", "trading-engine", "risk", "memory-ops"];
const REQUEST: &str = "ws1_probe_request_duration_seconds";

fn sim_bin() -> PathBuf {
    workload_bin().with_file_name("ws1-sim")
}

/// A private PostgreSQL cluster made by `ws1-sim pg-start`, stopped and removed on drop.
struct Pg {
    dir: PathBuf,
    port: u16,
}

impl Pg {
    fn start(name: &str) -> Option<Pg> {
        if !std::path::Path::new("/usr/lib/postgresql").is_dir() {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL is not installed: `cargo xtask test` installs Debian's postgresql package"
            );
            eprintln!(
                "skipping test - PostgreSQL is not installed (`cargo xtask test` installs it)"
            );
            return None;
        }
        let dir = std::env::temp_dir().join(format!("ws1-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut pg = Pg { dir, port: 0 };
        let out = Command::new(sim_bin())
            .arg("pg-start")
            .arg(&pg.dir)
            .output()
            .expect("run ws1-sim pg-start");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "pg-start failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = stdout
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("pg-start said {stdout:?}"));
        pg.port = port;
        Some(pg)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = Command::new(sim_bin())
            .arg("pg-stop")
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The example config's services and SLOs, matched by command name; `db` is PostgreSQL.
fn config(dir: &std::path::Path, pg_port: Option<u16>) -> String {
    let mut text = String::new();
    for (name, slo) in [
        ("agent-ops", "10ms"),
        ("trading-engine", "5ms"),
        ("risk", "10ms"),
        ("memory-ops", "1ms"),
    ] {
        text.push_str(&format!(
            "[[service]]\nname = \"{name}\"\nmatch = {{ comm = \"^{name}$\" }}\nslo = {{ latency = \"{slo}\", target = 0.99 }}\n"
        ));
        if name == "trading-engine" {
            text.push_str("remote_addresses = true\n");
        }
    }
    text.push_str(
        "[[service]]\nname = \"db\"\nmatch = { comm = \"^postgres$\" }\nslo = { latency = \"5ms\", target = 0.99 }\n",
    );
    if let Some(port) = pg_port {
        text.push_str(&format!(
            "[[dependency]]\nname = \"postgres\"\nport = {port}\nhandshake_exchanges = 2\n"
        ));
    }
    std::fs::create_dir_all(dir).expect("config dir");
    let path = dir.join("ws1-sim.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// `ws1-sim run`, its stdout collected line by line.
struct Sim {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Sim {
    fn start(args: &[&str]) -> Sim {
        let mut child = Command::new(sim_bin())
            .arg("run")
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start ws1-sim");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("sim: {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Sim {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Polls the output until `pred` finds what it wants, failing after `timeout`.
    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[String]) -> Option<T>,
    ) -> T {
        let started = Instant::now();
        loop {
            if let Some(t) = pred(&self.lines()) {
                return t;
            }
            assert!(
                started.elapsed() < timeout,
                "timed out waiting for {what}: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the run to end (SIGTERM first when `terminate`) and returns its final counts.
    fn finish(&mut self, terminate: bool) -> Finals {
        if terminate {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let status = self.child.wait().expect("wait for ws1-sim");
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        assert!(status.success(), "ws1-sim failed: {status}");
        Finals::parse(&self.lines())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGTERM stops the services in order; SIGKILL only if that does not work.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(3));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `final service=S side=D port=P k=v...` and `final-x service=S k=v...` lines.
#[derive(Debug, Default)]
struct Finals {
    endpoints: BTreeMap<(String, String, String), BTreeMap<String, u64>>,
    extras: BTreeMap<String, BTreeMap<String, f64>>,
}

fn kv(words: &[&str]) -> BTreeMap<String, String> {
    words
        .iter()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

impl Finals {
    fn parse(lines: &[String]) -> Finals {
        let mut f = Finals::default();
        for line in lines {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first() {
                Some(&"final") => {
                    let mut m = kv(&words[1..]);
                    let key = (
                        m.remove("service").unwrap(),
                        m.remove("side").unwrap(),
                        m.remove("port").unwrap(),
                    );
                    let counts = m
                        .into_iter()
                        .map(|(k, v)| (k, v.parse().unwrap()))
                        .collect();
                    f.endpoints.insert(key, counts);
                }
                Some(&"final-x") => {
                    let mut m = kv(&words[1..]);
                    let service = m.remove("service").unwrap();
                    let x = m
                        .into_iter()
                        .map(|(k, v)| (k, v.parse().unwrap()))
                        .collect();
                    f.extras.insert(service, x);
                }
                _ => {}
            }
        }
        assert!(!f.endpoints.is_empty(), "no final counts: {lines:?}");
        f
    }

    fn get(&self, service: &str, side: &str, port: u16, what: &str) -> u64 {
        self.endpoints
            .get(&(service.to_owned(), side.to_owned(), port.to_string()))
            .and_then(|c| c.get(what).copied())
            .unwrap_or(0)
    }
}

/// The `ports risk=P ...` line.
fn ports(lines: &[String]) -> Option<BTreeMap<String, u16>> {
    let line = lines.iter().find(|l| l.starts_with("ports "))?;
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    Some(
        kv(&words)
            .into_iter()
            .map(|(k, v)| (k, v.parse().unwrap()))
            .collect(),
    )
}

/// (what, simulator, agent) for every count the agent must have exactly.
fn expected(m: &Metrics, f: &Finals, pg_port: Option<u16>) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    for ((service, side, port), c) in &f.endpoints {
        if !SERVICES.contains(&service.as_str()) {
            continue;
        }
        let l = [
            ("service", service.as_str()),
            ("side", side.as_str()),
            ("port", port.as_str()),
        ];
        let name = format!("{service} {side} :{port}");
        out.push((
            format!("{name} requests"),
            c["requests"] as f64,
            m.value(&format!("{REQUEST}_count"), &l),
        ));
        out.push((
            format!("{name} connections"),
            c["connects"] as f64,
            m.value("ws1_probe_tcp_connections_total", &l),
        ));
        if side == "client" {
            out.push((
                format!("{name} refused connects"),
                c["refused"] as f64,
                m.value(
                    "ws1_probe_tcp_connect_failures_total",
                    &[("service", service.as_str()), ("port", port.as_str())],
                ),
            ));
        }
        if pg_port.is_some_and(|p| p.to_string() == *port) {
            out.push((
                format!("{name} handshake exchanges"),
                c["handshakes"] as f64,
                m.value("ws1_probe_connection_handshake_exchanges_total", &l),
            ));
            // PostgreSQL's side of the same connections: every exchange is a request there.
            let db = [
                ("service", "db"),
                ("side", "server"),
                ("port", port.as_str()),
            ];
            out.push((
                format!("db server :{port} requests"),
                (c["requests"] + c["handshakes"]) as f64,
                m.value(&format!("{REQUEST}_count"), &db),
            ));
            out.push((
                format!("db server :{port} connections"),
                c["connects"] as f64,
                m.value("ws1_probe_tcp_connections_total", &db),
            ));
        }
    }
    out
}

/// Waits until the agent has every count the simulator printed, then asserts them one by one.
fn assert_exact(agent: &Agent, f: &Finals, pg_port: Option<u16>) -> Metrics {
    let started = Instant::now();
    loop {
        let m = agent.metrics();
        let rows = expected(&m, f, pg_port);
        let done = rows.iter().all(|(_, want, got)| want == got);
        if done || started.elapsed() > Duration::from_secs(10) {
            for (what, want, got) in &rows {
                eprintln!("{what}: simulator {want}, agent {got}");
            }
            for (what, want, got) in &rows {
                assert_eq!(got, want, "{what}\n{}", m.text);
            }
            return m;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn simulator_request_counts_equal_the_agents_per_service_and_side() {
    if !privileged() {
        return;
    }
    let Some(pg) = Pg::start("sim-pg") else {
        return;
    };
    let cfg = config(&pg.dir.with_extension("cfg"), Some(pg.port));
    let agent = Agent::start(&["--config", &cfg]);
    let pg_port = pg.port.to_string();
    let mut sim = Sim::start(&[
        "--db-port",
        &pg_port,
        "--rps",
        "200",
        "--users",
        "10",
        "--duration",
        "6",
        "--report-every",
        "2",
        "--warmup",
        "1",
    ]);
    let f = sim.finish(false);
    let p = ports(&sim.lines()).expect("ports line");
    // The shape of the traffic: users → agent-ops → trading-engine → risk and PostgreSQL,
    // agent-ops → memory-ops; every order is pgbench's five-statement transaction on two
    // handshake exchanges per pooled DB connection.
    let orders = f.get("risk", "server", p["risk"], "requests");
    assert!(orders > 100, "{f:?}");
    assert_eq!(
        f.get("trading-engine", "client", pg.port, "requests"),
        5 * orders
    );
    assert_eq!(
        f.get("trading-engine", "client", pg.port, "handshakes"),
        2 * f.get("trading-engine", "client", pg.port, "connects")
    );
    let m = assert_exact(&agent, &f, Some(pg.port));
    // Pooled: a handful of connections for hundreds of requests.
    let ao_te = [
        ("service", "agent-ops"),
        ("side", "client"),
        ("port", &*p["trading-engine"].to_string()),
    ];
    let reuse = m.value("ws1_probe_connection_reuse_ratio", &ao_te);
    assert!(reuse > 0.9, "agent-ops → trading-engine reuse {reuse}");
    let _ = std::fs::remove_dir_all(pg.dir.with_extension("cfg"));
}

/// The summary's trading-engine part: `... hog 1.50s ...`.
fn hog_seconds(lines: &[String]) -> Option<f64> {
    let last = lines.iter().rev().find(|l| l.starts_with('['))?;
    let part = last
        .split(" | ")
        .find(|p| p.starts_with("trading-engine "))?;
    let rest = part.split(" hog ").nth(1)?;
    rest.split('s').next()?.parse().ok()
}

#[test]
fn each_fault_shows_in_its_metric() {
    if !privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ws1-sim-faults-{}", std::process::id()));
    let cfg = config(&dir, None);
    let agent = Agent::start(&["--config", &cfg]);
    const HOG: f64 = 1.5;
    let mut sim = Sim::start(&[
        "--rps",
        "100",
        "--users",
        "10",
        "--duration",
        "0",
        "--report-every",
        "1",
        "--warmup",
        "1",
        "--fault",
        "latency",
        "--fault",
        "leak",
        "--fault",
        "cpu",
        "--fault",
        "errors",
        "--fault",
        "churn",
        "--hog-threads",
        "1",
        "--hog-seconds",
        &HOG.to_string(),
    ]);
    let p = sim.wait("ports", Duration::from_secs(10), ports);
    let port = |r: &str| p[r].to_string();

    // CPU hog: once the hog has burnt its CPU seconds, trading-engine's CPU counter holds them
    // (procfs is sampled every 5 s) and a service without the hog stays far below.
    sim.wait("the hog's CPU seconds", Duration::from_secs(30), |l| {
        hog_seconds(l).filter(|h| *h >= HOG)
    });
    // User and system time are two series (`mode`).
    let cpu = |m: &Metrics, s: &str| -> f64 {
        m.samples
            .iter()
            .filter(|(n, l, _)| {
                n == "ws1_probe_service_cpu_seconds_total"
                    && l.iter().any(|(k, v)| k == "service" && v == s)
            })
            .map(|(_, _, v)| v)
            .sum()
    };
    let started = Instant::now();
    let m = loop {
        let m = agent.metrics();
        if cpu(&m, "trading-engine") >= HOG || started.elapsed() > Duration::from_secs(12) {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(cpu(&m, "trading-engine") >= HOG, "{}", m.text);
    assert!(
        cpu(&m, "risk") < HOG / 2.0,
        "risk used {} s",
        cpu(&m, "risk")
    );

    // Leak: memory-ops keeps 256 KiB per request (about 10 MiB/s here); its resident memory
    // and growth slope (three samples 5 s apart) show it, risk's stay flat.
    let resident =
        |m: &Metrics, s: &str| m.value("ws1_probe_resident_memory_bytes", &[("service", s)]);
    let slope = |m: &Metrics| {
        m.get(
            "ws1_probe_memory_growth_bytes_per_second",
            &[("service", "memory-ops")],
        )
    };
    let started = Instant::now();
    let m = loop {
        let m = agent.metrics();
        if slope(&m).is_some_and(|s| s > 0.0) || started.elapsed() > Duration::from_secs(25) {
            break m;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let growth = slope(&m).expect("memory-ops growth slope");
    assert!(growth > 1024.0 * 1024.0, "memory-ops grows {growth} B/s");
    assert!(resident(&m, "memory-ops") > 48.0 * 1048576.0, "{}", m.text);
    assert!(resident(&m, "risk") < 32.0 * 1048576.0, "{}", m.text);

    let f = sim.finish(true);
    let m = assert_exact(&agent, &f, None);

    // Latency spike: one in ten of risk's requests waits 150 ms, so at least that many of its
    // server-side requests are in buckets above 100 ms.
    let risk = [
        ("service", "risk"),
        ("side", "server"),
        ("port", &*port("risk")),
    ];
    let total = m.value(&format!("{REQUEST}_count"), &risk);
    let le = |b: &str| {
        let mut l = risk.to_vec();
        l.push(("le", b));
        m.value(&format!("{REQUEST}_bucket"), &l)
    };
    let spiked = f.extras["risk"]["spiked"];
    assert!(spiked >= 10.0, "{f:?}");
    let above = total - le("0.1");
    assert!(
        above >= spiked,
        "{above} of risk's requests above 100 ms, {spiked} spiked"
    );
    assert!(
        above <= spiked + total / 20.0,
        "{above} above 100 ms, {spiked} spiked of {total}"
    );

    // Errors: refused connects to the replica that is down are connect failures (and resets
    // received, the RST that refuses a SYN); risk's aborts are resets trading-engine receives.
    let refused = f.get("trading-engine", "client", p["dead"], "refused");
    assert!(refused > 0, "{f:?}");
    let te = |port: &str, dir: &str| {
        m.value(
            "ws1_probe_tcp_resets_total",
            &[
                ("service", "trading-engine"),
                ("port", port),
                ("direction", dir),
            ],
        )
    };
    assert_eq!(te(&port("dead"), "received"), refused as f64);
    let resets = f.get("trading-engine", "client", p["risk"], "resets");
    assert!(resets > 0, "{f:?}");
    assert_eq!(te(&port("risk"), "received"), resets as f64);
    eprintln!(
        "risk: {} aborted, resets sent {}",
        f.get("risk", "server", p["risk"], "resets"),
        m.value(
            "ws1_probe_tcp_resets_total",
            &[
                ("service", "risk"),
                ("port", &*port("risk")),
                ("direction", "sent")
            ]
        )
    );

    // Churn: connections per request is what the simulator did (one per request once the
    // fault is on; the users' first requests went out on pooled connections before).
    let ao_te = [
        ("service", "agent-ops"),
        ("side", "client"),
        ("port", &*port("trading-engine")),
    ];
    let conns = f.get("agent-ops", "client", p["trading-engine"], "connects") as f64;
    let reqs = f.get("agent-ops", "client", p["trading-engine"], "requests") as f64;
    assert!(
        conns / reqs > 0.9,
        "{conns} connections for {reqs} requests"
    );
    assert_eq!(
        m.get("ws1_probe_connections_per_request", &ao_te),
        Some(conns / reqs)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
