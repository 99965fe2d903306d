//! `ws1-sim run`: starts the services (each a child run through a link named after its role),
//! the users, injects faults, prints a summary line every `--report-every` and, after
//! `--duration` or on Ctrl-C/SIGTERM, stops them in call order (users first, so every request
//! in flight completes) and prints the exact counts:
//!
//! ```text
//! final service=risk side=server port=40123 requests=812 connects=10 refused=0 resets=0 handshakes=0 slow=0 failed=0
//! final-x service=memory-ops cpu_seconds=0.210 leaked_bytes=0 hog_cpu_seconds=0.000
//! ```
//!
//! The server side's port is the service's listening port, the client side's the remote port,
//! as in the agent's `port` label.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::stats::{Counts, Side};

/// The roles in the order they start; they stop in the reverse order (callers first).
pub const ROLES: [&str; 5] = ["risk", "memory-ops", "trading-engine", "agent-ops", "users"];

/// The link name (and so the command name) of each role; the load's is `sim-users`.
pub fn comm_of(role: &str) -> &str {
    if role == "users" { "sim-users" } else { role }
}

pub const FAULTS: [&str; 5] = ["latency", "leak", "cpu", "errors", "churn"];

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Requests per second from the users in all.
    #[arg(long, default_value_t = 100.0)]
    pub rps: f64,
    /// Concurrent users (connections to agent-ops, one thread each).
    #[arg(long, default_value_t = 10)]
    pub users: usize,
    /// How long to run, in seconds (0: until Ctrl-C or SIGTERM).
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// The DB: a loopback port of a PostgreSQL with the pgbench tables (see `pg-start`).
    #[arg(long)]
    pub db_port: Option<u16>,
    /// The DB: the directory of a cluster `pg-start` made (reads its port).
    #[arg(long, conflicts_with = "db_port")]
    pub db_dir: Option<PathBuf>,
    /// The trading engine's DB pool size.
    #[arg(long, default_value_t = 4)]
    pub db_conns: usize,
    /// Faults to switch on (repeatable): latency (risk: one request in ten 150 ms slower),
    /// leak (memory-ops keeps 256 KiB per request), cpu (trading-engine burns CPU), errors
    /// (trading-engine: one order in two first tries a risk replica that is down, refused;
    /// risk aborts one request in ten with a reset), churn (every client connects per
    /// request: no pooling).
    #[arg(long = "fault", value_parser = clap::builder::PossibleValuesParser::new(FAULTS))]
    pub faults: Vec<String>,
    /// Seconds after the start at which the faults switch on.
    #[arg(long, default_value_t = 0.0)]
    pub fault_after: f64,
    /// The cpu fault's threads (default: one per CPU).
    #[arg(long)]
    pub hog_threads: Option<usize>,
    /// The cpu fault's CPU seconds in all (default: until stop).
    #[arg(long)]
    pub hog_seconds: Option<f64>,
    /// The leak fault's bound, in MiB (it stops growing there).
    #[arg(long)]
    pub leak_max_mib: Option<u64>,
    /// Seconds between the services' start and the users' (time for an agent to decide the
    /// new processes before their first connection).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Seconds between summary lines.
    #[arg(long, default_value_t = 5.0)]
    pub report_every: f64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Relaxed);
}

/// The latest report of each role: endpoints and the extras line.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub endpoints: BTreeMap<(Side, u16), Counts>,
    pub extras: BTreeMap<String, f64>,
    pub last: bool,
}

struct Proc {
    role: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    port: u16,
    report: Arc<Mutex<Report>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Makes `dir/<comm>` a hard link to this executable (a copy across filesystems), so the
/// child's command name is the role's and so is its `/proc/PID/exe` name (`exe` selectors).
/// Renaming after the exec (`prctl(PR_SET_NAME)`) would not do: the agent decides a process
/// at its exec, by the name the kernel gives it then (the executed file's), and a symlink
/// would leave `/proc/PID/exe` pointing at `ws1-sim`.
fn link(dir: &Path, comm: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let path = dir.join(comm);
    let _ = std::fs::remove_file(&path);
    if std::fs::hard_link(&exe, &path).is_err() {
        std::fs::copy(&exe, &path)
            .with_context(|| format!("cannot copy {} to {}", exe.display(), path.display()))?;
    }
    Ok(path)
}

fn spawn(dir: &Path, role: &'static str, args: &[String]) -> Result<Proc> {
    let path = link(dir, comm_of(role))?;
    let mut child = Command::new(&path)
        .arg("serve")
        .args(["--role", role])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // Its own process group: Ctrl-C in a terminal reaches only the supervisor, which stops
        // the services in order.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", path.display()))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    let port = match first.strip_prefix("listening ").map(str::parse::<u16>) {
        Some(Ok(port)) => port,
        _ => bail!("{role} did not start: it said {first:?}"),
    };
    let report = Arc::new(Mutex::new(Report::default()));
    let sink = Arc::clone(&report);
    let reader = std::thread::spawn(move || {
        let mut cur = Report::default();
        for line in lines {
            let Ok(line) = line else { break };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["report", ..] | ["final", ..] => {
                    cur = Report {
                        last: words[0] == "final",
                        ..Report::default()
                    };
                }
                ["ep", side, port, rest @ ..] => {
                    if let (Some(side), Ok(port)) = (Side::parse(side), port.parse()) {
                        cur.endpoints.insert((side, port), Counts::parse(rest));
                    }
                }
                ["x", rest @ ..] => {
                    for w in rest {
                        if let Some((k, v)) = w.split_once('=')
                            && let Ok(v) = v.parse()
                        {
                            cur.extras.insert(k.to_owned(), v);
                        }
                    }
                }
                ["end"] => *sink.lock().unwrap_or_else(|e| e.into_inner()) = cur.clone(),
                _ => {}
            }
        }
    });
    let stdin = child.stdin.take();
    Ok(Proc {
        role,
        child,
        stdin,
        port,
        report,
        reader: Some(reader),
    })
}

impl Proc {
    fn send(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    /// Stops the process (stop, then close its stdin) and waits for it (20 s, then SIGKILL).
    fn stop(&mut self) -> Result<()> {
        self.send("stop");
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(25);
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not stop within 25 s; killed", self.role);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The service name of a role (the users are the load, not a service).
fn service(role: &str) -> &str {
    comm_of(role)
}

pub fn run(args: RunArgs) -> Result<()> {
    let db_port = match (&args.db_port, &args.db_dir) {
        (Some(p), _) => Some(*p),
        (None, Some(dir)) => Some(crate::pg::port_of(dir)?),
        (None, None) => None,
    };
    let sig = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, sig);
        libc::signal(libc::SIGTERM, sig);
    }
    let dir = std::env::temp_dir().join(format!("ws1-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = supervise(&args, db_port, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn supervise(args: &RunArgs, db_port: Option<u16>, dir: &Path) -> Result<()> {
    // A loopback port nothing listens on: bound, read and closed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut procs: Vec<Proc> = Vec::new();
    let mut common = vec![
        "--report-ms".to_owned(),
        // Twice per summary line, so each line sees reports less than half a period old.
        ((args.report_every * 500.0) as u64)
            .clamp(100, 1000)
            .to_string(),
    ];
    if let Some(t) = args.hog_threads {
        common.extend(["--hog-threads".to_owned(), t.to_string()]);
    }
    if let Some(m) = args.leak_max_mib {
        common.extend(["--leak-max-mib".to_owned(), m.to_string()]);
    }
    if let Some(s) = args.hog_seconds {
        common.extend(["--hog-seconds".to_owned(), s.to_string()]);
    }
    for role in ROLES {
        let port_of = |r: &str| {
            procs
                .iter()
                .find(|p| p.role == r)
                .map(|p| p.port.to_string())
        };
        let mut a = common.clone();
        let mut up = |flag: &str, r: &str| {
            if let Some(p) = port_of(r) {
                a.extend([flag.to_owned(), p]);
            }
        };
        match role {
            "trading-engine" => up("--risk", "risk"),
            "agent-ops" => {
                up("--te", "trading-engine");
                up("--mo", "memory-ops");
            }
            "users" => up("--ao", "agent-ops"),
            _ => {}
        }
        if role == "trading-engine" {
            a.extend(["--dead".to_owned(), dead.to_string()]);
            if let Some(p) = db_port {
                a.extend(["--db-port".to_owned(), p.to_string()]);
                a.extend(["--db-conns".to_owned(), args.db_conns.to_string()]);
            }
        }
        if role == "users" {
            std::thread::sleep(Duration::from_secs_f64(args.warmup.max(0.0)));
            a.extend(["--rps".to_owned(), args.rps.to_string()]);
            a.extend(["--users".to_owned(), args.users.to_string()]);
        }
        procs.push(spawn(dir, role, &a)?);
    }
    let mut ports: Vec<String> = procs
        .iter()
        .filter(|p| p.role != "users")
        .map(|p| format!("{}={}", p.role, p.port))
        .collect();
    ports.push(format!("dead={dead}"));
    if let Some(p) = db_port {
        ports.push(format!("db={p}"));
    }
    let pids: Vec<String> = procs
        .iter()
        .map(|p| format!("{}={}", comm_of(p.role), p.child.id()))
        .collect();
    println!("ports {}", ports.join(" "));
    println!("pids {}", pids.join(" "));
    println!(
        "running rps={} users={} duration={}s faults={}",
        args.rps,
        args.users,
        args.duration,
        if args.faults.is_empty() {
            "none".to_owned()
        } else {
            args.faults.join(",")
        }
    );
    let _ = std::io::stdout().flush();

    let started = Instant::now();
    let every = Duration::from_secs_f64(args.report_every.max(0.1));
    let mut next = started + every;
    let mut faulted = args.faults.is_empty();
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    while !STOP.load(Relaxed)
        && (args.duration <= 0.0 || started.elapsed().as_secs_f64() < args.duration)
    {
        std::thread::sleep(Duration::from_millis(20));
        if !faulted && started.elapsed().as_secs_f64() >= args.fault_after {
            faulted = true;
            for f in &args.faults {
                for p in &mut procs {
                    p.send(&format!("fault {f}"));
                }
                println!("fault {f} on at {:.1}s", started.elapsed().as_secs_f64());
            }
        }
        if Instant::now() >= next {
            next += every;
            println!("{}", summary(&procs, started.elapsed(), every, &mut last));
            let _ = std::io::stdout().flush();
        }
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!("{} exited early ({status})", p.role);
            }
        }
    }
    // Callers first, so no request is left in flight.
    for p in procs.iter_mut().rev() {
        p.stop()?;
    }
    let mut out = std::io::stdout().lock();
    for p in &procs {
        let r = p.report.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !r.last {
            bail!("{} printed no final report", p.role);
        }
        for ((side, port), c) in &r.endpoints {
            writeln!(
                out,
                "final service={} side={} port={port} {}",
                service(p.role),
                side.label(),
                c.render()
            )?;
        }
        let x: Vec<String> = r.extras.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(out, "final-x service={} {}", service(p.role), x.join(" "))?;
    }
    out.flush()?;
    Ok(())
}

/// One line: per service, server requests (and the rate since the last line), CPU, and what
/// the faults did.
fn summary(
    procs: &[Proc],
    at: Duration,
    every: Duration,
    last: &mut BTreeMap<&'static str, u64>,
) -> String {
    let mut parts = vec![format!("[{:>5.0}s]", at.as_secs_f64())];
    for p in procs {
        let r = p.report.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let side = if p.role == "users" {
            Side::Client
        } else {
            Side::Server
        };
        let mut total = Counts::default();
        for ((s, _), c) in &r.endpoints {
            if *s == side {
                total.add(c);
            }
        }
        let prev = last.insert(p.role, total.requests).unwrap_or(0);
        let rate = (total.requests - prev.min(total.requests)) as f64 / every.as_secs_f64();
        // Client-side exchanges of the services (their calls to others and to the DB).
        let client: u64 = r
            .endpoints
            .iter()
            .filter(|((s, _), _)| p.role != "users" && *s == Side::Client)
            .map(|(_, c)| c.requests)
            .sum();
        let mut part = format!(
            "{} {} req {:.0}/s cpu {:.1}s",
            service(p.role),
            total.requests,
            rate,
            r.extras.get("cpu_seconds").copied().unwrap_or(0.0)
        );
        if client > 0 {
            part.push_str(&format!(" calls {client}"));
        }
        if total.slow > 0 {
            part.push_str(&format!(" slow {}", total.slow));
        }
        let mut errors = Counts::default();
        for c in r.endpoints.values() {
            errors.add(c);
        }
        if errors.refused + errors.resets + errors.failed > 0 {
            part.push_str(&format!(
                " refused {} resets {} failed {}",
                errors.refused, errors.resets, errors.failed
            ));
        }
        if let Some(b) = r.extras.get("leaked_bytes").filter(|b| **b > 0.0) {
            part.push_str(&format!(" leaked {:.0} MiB", b / 1048576.0));
        }
        if let Some(h) = r.extras.get("hog_cpu_seconds").filter(|h| **h > 0.0) {
            part.push_str(&format!(" hog {h:.2}s"));
        }
        if let Some(n) = r.extras.get("spiked").filter(|n| **n > 0.0) {
            part.push_str(&format!(" spiked {n}"));
        }
        parts.push(part);
    }
    parts.join(" | ")
}
