//! `cargo xtask demo`: the WS1 workload simulator observed end to end. Starts a private
//! PostgreSQL, the agent with the example config (its services and SLOs, matched by the
//! simulator's command names; the DB dependency on the cluster's port), Debian's Alertmanager
//! with `deploy/alertmanager.yml` and Prometheus with the shipped rules and a generated config
//! (5 s scrape and evaluation), all on loopback, then `ws1-sim run`. Prints the URLs and, every
//! few seconds, a line per service from Prometheus plus the alerts pending or firing.
//! `--fault NAME` switches a fault on after `--fault-after` seconds. Ctrl-C (or `--duration`)
//! stops everything it started, in order, and removes its files.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{run, tools, util};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// A fault to switch on (repeatable): latency, leak, cpu, errors, churn.
    #[arg(long = "fault")]
    faults: Vec<String>,
    /// Seconds after the start at which the faults switch on.
    #[arg(long, default_value_t = 30.0)]
    fault_after: f64,
    /// Requests per second from the simulated users.
    #[arg(long, default_value_t = 100.0)]
    rps: f64,
    /// Simulated users (concurrent connections).
    #[arg(long, default_value_t = 10)]
    users: usize,
    /// Seconds to run (0: until Ctrl-C).
    #[arg(long, default_value_t = 0.0)]
    duration: f64,
    /// Seconds between summaries.
    #[arg(long, default_value_t = 5.0)]
    every: f64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Relaxed);
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process of the demo: stopped with SIGTERM (then SIGKILL after 10 s) on drop.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = file.try_clone()?;
        // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // The demo dies → so does everything it started.
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            // Its own process group: Ctrl-C reaches the demo only, which stops them in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name}: {}", util::display(cmd)))?;
        Ok(Proc { name, child })
    }

    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    eprintln!("demo: {} stopped", self.name);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            eprintln!("demo: {} killed (it did not stop on SIGTERM)", self.name);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An HTTP GET on loopback; the body.
fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

fn wait_ready(name: &str, port: u16, path: &str, proc: &mut Proc) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if http_get(port, path).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            bail!("{name} exited ({status}); see its log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{name} not ready on 127.0.0.1:{port} after 30 s; see its log")
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// An instant query: (labels, value) per series.
fn query(port: u16, q: &str) -> Vec<(serde_json::Map<String, serde_json::Value>, f64)> {
    let Ok(body) = http_get(port, &format!("/api/v1/query?query={}", urlencode(q))) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        return Vec::new();
    };
    let Some(results) = v["data"]["result"].as_array() else {
        return Vec::new();
    };
    results
        .iter()
        .filter_map(|r| {
            let labels = r["metric"].as_object()?.clone();
            let value = r["value"][1].as_str()?.parse().ok()?;
            Some((labels, value))
        })
        .collect()
}

fn by_service(port: u16, q: &str) -> std::collections::BTreeMap<String, f64> {
    query(port, q)
        .into_iter()
        .filter_map(|(l, v)| Some((l.get("service")?.as_str()?.to_owned(), v)))
        .collect()
}

/// The example config with each service matched by the simulator's command name (the same
/// names, SLOs and alert settings, so the shipped rules apply) and the DB on `pg_port`.
pub fn demo_config(example: &str, pg_port: u16) -> String {
    let mut out = String::new();
    let mut service: Option<String> = None;
    for line in example.lines() {
        let t = line.trim_start();
        if t.starts_with("[[") {
            service = None;
        }
        if let Some(name) = t.strip_prefix("name = ") {
            service = Some(name.trim_matches('"').to_owned());
        }
        if t.starts_with("match = ")
            && let Some(name) = &service
        {
            let comm = if name == "db" {
                "postgres".to_owned()
            } else {
                name.clone()
            };
            let _ = writeln!(out, "match = {{ comm = \"^{comm}$\" }}");
            continue;
        }
        if t.starts_with("port = 5432") {
            let _ = writeln!(out, "port = {pg_port}");
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Puts `pid` in a new memory cgroup limited to `limit` bytes next to this process's own (v2
/// `memory.max`, or v1 `memory.limit_in_bytes`), so the leak can raise WS1ServiceHighMemory.
/// Returns the cgroup directory to remove at the end.
fn limit_memory(pid: u32, limit: u64) -> Result<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let v1 = own
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned()));
    // A v1 memory controller wins (hybrid hosts also list an empty unified `0::` line);
    // otherwise cgroup v2, where /sys/fs/cgroup itself must be the cgroup2 mount.
    let (dir, file) = if let Some(path) = v1 {
        let base = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        (base, "memory.limit_in_bytes")
    } else {
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no memory cgroup")?;
        if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            bail!("/sys/fs/cgroup is not a cgroup2 mount");
        }
        let base = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        (base, "memory.max")
    };
    if !base_is_cgroup(&dir) {
        bail!("{} is not a cgroup directory", dir.display());
    }
    let dir = dir.join(format!("ws1-demo-memory-ops-{}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join(file), limit.to_string())
        .with_context(|| format!("cannot write {}/{file}", dir.display()))?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
        .with_context(|| format!("cannot move memory-ops into {}", dir.display()))?;
    Ok(dir)
}

/// A cgroup directory has `cgroup.procs` (a plain directory on the tmpfs above does not).
fn base_is_cgroup(dir: &Path) -> bool {
    dir.join("cgroup.procs").is_file()
}

pub fn run(args: &DemoArgs) -> Result<()> {
    for f in &args.faults {
        if !["latency", "leak", "cpu", "errors", "churn"].contains(&f.as_str()) {
            bail!("unknown fault {f}: pick latency, leak, cpu, errors or churn");
        }
    }
    tools::ensure_postgres()?;
    tools::ensure_alerting()?;
    run::cargo_build_release(&["ws1-probe", "ws1-sim"])?;
    let release = util::target_dir().join("release");
    let root = util::workspace_root();
    let dir = util::target_dir().join(format!("demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let sig = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, sig);
        libc::signal(libc::SIGTERM, sig);
    }
    let pg = dir.join("pg");
    let result = demo(args, &release, &root, &dir, &pg);
    // The cluster last: the simulator's DB connections are closed by then.
    let _ = Command::new(release.join("ws1-sim"))
        .arg("pg-stop")
        .arg(&pg)
        .output();
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("demo: logs kept in {}", dir.display());
    }
    result
}

fn demo(args: &DemoArgs, release: &Path, root: &Path, dir: &Path, pg: &Path) -> Result<()> {
    let sim = release.join("ws1-sim");
    eprintln!("demo: starting PostgreSQL (initdb, pgbench tables) ...");
    let out = util::capture(Command::new(&sim).arg("pg-start").arg(pg))?;
    let pg_port: u16 = out
        .trim()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("pg-start said {out:?}"))?;

    let (agent_port, prom_port, am_port) = (free_port()?, free_port()?, free_port()?);
    let example = std::fs::read_to_string(root.join("config/ws1-services.example.toml"))
        .context("cannot read config/ws1-services.example.toml")?;
    let config = dir.join("ws1.toml");
    std::fs::write(&config, demo_config(&example, pg_port))?;

    let mut procs: Vec<Proc> = Vec::new();
    let mut agent = Proc::spawn(
        "agent",
        Command::new(release.join("ws1-probe"))
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{agent_port}")]),
        &dir.join("agent.log"),
    )?;
    wait_ready("agent", agent_port, "/readyz", &mut agent)?;
    procs.push(agent);

    let mut am = Proc::spawn(
        "alertmanager",
        Command::new("prometheus-alertmanager")
            .arg(format!(
                "--config.file={}",
                root.join("deploy/alertmanager.yml").display()
            ))
            .arg(format!(
                "--storage.path={}",
                dir.join("alertmanager").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
            .arg("--cluster.listen-address="),
        &dir.join("alertmanager.log"),
    )?;
    wait_ready("alertmanager", am_port, "/-/ready", &mut am)?;
    procs.push(am);

    let prom_yml = dir.join("prometheus.yml");
    std::fs::write(
        &prom_yml,
        format!(
            "global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\nrule_files:\n  - {}\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"127.0.0.1:{am_port}\"]\n\
             scrape_configs:\n  - job_name: ws1-probe\n    static_configs:\n      - targets: [\"127.0.0.1:{agent_port}\"]\n",
            root.join("deploy/ws1-probe-rules.yml").display()
        ),
    )?;
    let mut prom = Proc::spawn(
        "prometheus",
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_yml.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}")),
        &dir.join("prometheus.log"),
    )?;
    wait_ready("prometheus", prom_port, "/-/ready", &mut prom)?;
    procs.push(prom);

    let mut sim_cmd = Command::new(&sim);
    sim_cmd
        .arg("run")
        .args(["--db-port", &pg_port.to_string()])
        .args([
            "--rps",
            &args.rps.to_string(),
            "--users",
            &args.users.to_string(),
        ])
        .args(["--duration", "0", "--warmup", "1", "--report-every", "5"])
        .args(["--fault-after", &args.fault_after.to_string()])
        // Under memory-ops' 1 GiB limit the leak stops at ~93 %: over the alert's 90 %, short
        // of the OOM killer.
        .args(["--leak-max-mib", "940"])
        .env("TMPDIR", dir);
    for f in &args.faults {
        sim_cmd.args(["--fault", f]);
    }
    let sim_log = dir.join("sim.log");
    procs.push(Proc::spawn("simulator", &mut sim_cmd, &sim_log)?);

    println!("ws1-probe demo: the WS1 services under the agent");
    println!("  agent metrics  http://127.0.0.1:{agent_port}/metrics");
    println!("  prometheus     http://127.0.0.1:{prom_port}  (alerts: /alerts, rules: /rules)");
    println!("  alertmanager   http://127.0.0.1:{am_port}");
    println!("  postgresql     127.0.0.1:{pg_port}  (user postgres, pgbench tables)");
    println!("  logs           {}", dir.display());
    if args.faults.is_empty() {
        println!("  no fault (add --fault latency|leak|cpu|errors|churn)");
    } else {
        println!(
            "  fault {} at +{:.0}s",
            args.faults.join(", "),
            args.fault_after
        );
    }
    println!("Ctrl-C stops everything.");

    let started = Instant::now();
    let every = Duration::from_secs_f64(args.every.max(1.0));
    let mut next = started + every;
    let mut cgroup: Option<PathBuf> = None;
    let mut cgroup_tried = false;
    while !STOP.load(Relaxed)
        && (args.duration <= 0.0 || started.elapsed().as_secs_f64() < args.duration)
    {
        std::thread::sleep(Duration::from_millis(100));
        if !cgroup_tried && args.faults.iter().any(|f| f == "leak") {
            let pids = std::fs::read_to_string(&sim_log).unwrap_or_default();
            if let Some(pid) = pids
                .lines()
                .find_map(|l| l.strip_prefix("pids "))
                .and_then(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("memory-ops="))
                })
                .and_then(|p| p.parse::<u32>().ok())
            {
                cgroup_tried = true;
                match limit_memory(pid, 1 << 30) {
                    Ok(dir) => {
                        println!("  memory-ops limited to 1 GiB in {}", dir.display());
                        cgroup = Some(dir);
                    }
                    Err(e) => println!(
                        "  memory-ops has no memory limit ({e:#}): the leak shows in its resident memory and growth, and WS1ServiceHighMemory needs a cgroup limit"
                    ),
                }
            }
        }
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!(
                    "{} exited ({status}); see its log in {}",
                    p.name,
                    dir.display()
                );
            }
        }
        if Instant::now() >= next {
            next += every;
            summary(prom_port, am_port, started.elapsed());
        }
    }
    eprintln!("demo: stopping");
    // The load first (it stops its services in call order), then what watches it.
    while let Some(mut p) = procs.pop() {
        p.stop();
    }
    if let Some(c) = cgroup {
        let _ = std::fs::remove_dir(&c);
    }
    Ok(())
}

fn summary(prom: u16, am: u16, at: Duration) {
    let w = "30s";
    let rps = by_service(
        prom,
        &format!(
            "sum by (service) (rate(ws1_probe_request_duration_seconds_count{{side=\"server\"}}[{w}]))"
        ),
    );
    let p99 = by_service(
        prom,
        &format!(
            "histogram_quantile(0.99, sum by (service, le) (rate(ws1_probe_request_duration_seconds_bucket{{side=\"server\"}}[{w}])))"
        ),
    );
    let cpu = by_service(
        prom,
        &format!("sum by (service) (rate(ws1_probe_service_cpu_seconds_total[{w}]))"),
    );
    let rss = by_service(prom, "sum by (service) (ws1_probe_resident_memory_bytes)");
    let errors = by_service(prom, "service:ws1_probe_socket_errors:ratio_rate1m");
    let churn = by_service(
        prom,
        &format!(
            "sum by (service) (rate(ws1_probe_tcp_connections_total{{side=\"client\"}}[{w}])) / sum by (service) (rate(ws1_probe_request_duration_seconds_count{{side=\"client\"}}[{w}]))"
        ),
    );
    println!(
        "[{:>4.0}s] service          req/s     p99     cpu   resident  errors  conn/req",
        at.as_secs_f64()
    );
    for s in ["agent-ops", "trading-engine", "risk", "memory-ops", "db"] {
        let opt = |m: &std::collections::BTreeMap<String, f64>| {
            m.get(s).copied().filter(|v| v.is_finite())
        };
        println!(
            "        {s:<15} {:>6} {:>8} {:>6} {:>10} {:>7} {:>9}",
            opt(&rps).map_or("-".into(), |v| format!("{v:.0}")),
            opt(&p99).map_or("-".into(), |v| format!("{:.2}ms", v * 1e3)),
            opt(&cpu).map_or("-".into(), |v| format!("{:.0}%", v * 100.0)),
            opt(&rss).map_or("-".into(), |v| format!("{:.0} MiB", v / 1048576.0)),
            opt(&errors).map_or("-".into(), |v| format!("{:.1}%", v * 100.0)),
            opt(&churn).map_or("-".into(), |v| format!("{v:.2}")),
        );
    }
    let alerts: Vec<String> = query(prom, "ALERTS")
        .into_iter()
        .map(|(l, _)| {
            let get = |k: &str| l.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
            let service = get("service");
            let on = if service.is_empty() {
                String::new()
            } else {
                format!("{{{service}}}")
            };
            format!("{}{on} {}", get("alertname"), get("alertstate"))
        })
        .collect();
    println!(
        "        alerts: {}",
        if alerts.is_empty() {
            "none".to_owned()
        } else {
            alerts.join(", ")
        }
    );
    // What reached Alertmanager (and so its receivers: team for warnings, pager for critical).
    let received: Vec<String> = http_get(am, "/api/v2/alerts?active=true")
        .ok()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let l = &a["labels"];
            let s = |k: &str| l[k].as_str().unwrap_or("").to_owned();
            format!("{}{{{}}} {}", s("alertname"), s("service"), s("severity"))
        })
        .collect();
    println!(
        "        alertmanager: {}",
        if received.is_empty() {
            "none".to_owned()
        } else {
            received.join(", ")
        }
    );
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::demo_config;

    #[test]
    fn example_config_matched_by_comm() {
        let example = "[[service]]\nname = \"agent-ops\"\nmatch = { comm = \"^ws1-agent\" }\nslo = { latency = \"10ms\", target = 0.99 }\n\
                       [[service]]\nname = \"risk\"\nmatch = { cgroup = \"/x\" }\n[[service]]\nname = \"db\"\nmatch = { comm = \"^postgres$\" }\n\
                       [[dependency]]\nname = \"postgres\"\nport = 5432\n";
        let out = demo_config(example, 40000);
        assert!(out.contains("name = \"agent-ops\"\nmatch = { comm = \"^agent-ops$\" }\nslo"));
        assert!(out.contains("name = \"risk\"\nmatch = { comm = \"^risk$\" }\n"));
        assert!(out.contains("name = \"db\"\nmatch = { comm = \"^postgres$\" }\n"));
        assert!(out.contains("port = 40000\n"));
        assert!(!out.contains("5432"));
    }
}
