//! `cargo xtask bench scale [-- --seconds N]`: how the agent's cost grows with its work.
//!
//! One table per dimension; each row starts a fresh agent with every collector and
//! `--bpf-stats`, starts the load, lets it settle, then measures for N seconds (default 10)
//! while scraping `/metrics` every 2 s as Prometheus would:
//!
//! - **targeted processes** (10, 100, 1,000): processes named `ws1-scale-work` (this xtask
//!   re-executed through a symlink of that name), each waking 10 times a second for one
//!   syscall, selected by `comm` in a config;
//! - **exec churn** (10, 50, 200 per second): `/bin/true` started at that rate, in host mode;
//! - **concurrent connections** (100, 1,000, 10,000): two targeted processes holding that
//!   many loopback connections (client and server ends), one 8-byte request and reply on each
//!   per second;
//! - **CPUs** (1, all): the 100-process row with the agent and the load pinned by `taskset`;
//! - **past a limit**: 1,000 processes with `--map-entries TARGETS=512` (the rest are counted
//!   as dropped, with one warning).
//!
//! Series (1k → 50k) are `cargo xtask bench scrape`'s dimension; each row here prints the
//! agent's own series count. Columns: the agent's CPU as % of one core (its process, then its
//! BPF programs' run time from BPF statistics) over the window, its RSS at the end, series,
//! events dropped and warnings logged since the row's agent started, and the client-side
//! requests it counted per second over the window. Only errors fail the run.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    bench_util::{Agent, rss_kib},
    run, util,
};

/// The command name of the targeted load processes (≤ 15 bytes: the kernel's `comm`).
const WORKER_COMM: &str = "ws1-scale-work";
const PROCESSES: [usize; 3] = [10, 100, 1_000];
const EXECS_PER_SEC: [u64; 3] = [10, 50, 200];
const CONNECTIONS: [usize; 3] = [100, 1_000, 10_000];
/// Time for a new load to reach the maps before measuring.
const SETTLE: Duration = Duration::from_secs(4);
const SCRAPE_EVERY: Duration = Duration::from_secs(2);

pub fn run(args: &[String]) -> Result<()> {
    let seconds = parse_seconds(args)?;
    run::cargo_build_release(&["ws1-probe"])?;
    let probe = util::target_dir().join("release/ws1-probe");
    let logs = util::target_dir().join("bench-scale");
    let _ = fs::remove_dir_all(&logs);
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let worker = logs.join(WORKER_COMM);
    let xtask = std::env::current_exe().context("cannot find the xtask binary")?;
    std::os::unix::fs::symlink(&xtask, &worker)
        .with_context(|| format!("cannot link {}", worker.display()))?;
    let config = logs.join("scale.toml");
    fs::write(
        &config,
        format!("[[service]]\nname = \"scale\"\nmatch = {{ comm = \"^{WORKER_COMM}$\" }}\n"),
    )?;
    let b = Bench {
        probe,
        logs,
        worker,
        config,
        window: Duration::from_secs(seconds),
    };
    let all_cpus = thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "bench scale: {seconds} s per row, every collector, {all_cpus} CPUs; logs in {}",
        b.logs.display()
    );

    println!("targeted processes (each: 10 wake-ups/s, one syscall each)");
    Row::header("processes");
    for n in PROCESSES {
        let row = b.measure(&format!("procs-{n}"), &b.config_args(), None, |_| {
            b.workers(n, None)
        })?;
        row.print(&n.to_string());
    }

    // Past a limit: more processes than TARGETS holds. Counted drops and one warning, no crash.
    let mut small = b.config_args();
    small.extend(["--map-entries".into(), "TARGETS=512".into()]);
    let row = b.measure("procs-over-limit", &small, None, |_| b.workers(1_000, None))?;
    row.print("1000 (cap 512)");

    println!("\nexec churn (host mode, /bin/true)");
    Row::header("execs/s");
    for rate in EXECS_PER_SEC {
        let achieved = Arc::new(AtomicU64::new(0));
        let load_start = Instant::now();
        let row = b.measure(&format!("exec-{rate}"), &[], None, |stop| {
            let (stop, achieved) = (Arc::clone(stop), Arc::clone(&achieved));
            Ok(Load::Thread(thread::spawn(move || {
                churn(rate, &stop, &achieved)
            })))
        })?;
        // Over the whole time the churn ran (settling included).
        let got = achieved.load(Ordering::Relaxed) as f64 / load_start.elapsed().as_secs_f64();
        row.print(&format!("{rate} ({got:.0})"));
    }

    println!("\nconcurrent connections (client and server targeted; 1 request/s each)");
    Row::header("connections");
    for n in CONNECTIONS {
        let row = b.measure(&format!("conns-{n}"), &b.config_args(), None, |_| {
            let port = TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
                .to_string();
            let mut serve = Command::new(&b.worker);
            serve.args(["scale-worker", "serve", &n.to_string(), &port]);
            let ready = b.logs.join(format!("hold-{n}.ready"));
            let mut hold = Command::new(&b.worker);
            hold.args(["scale-worker", "hold", &n.to_string(), &port])
                .arg(&ready);
            let children = vec![spawn_quiet(&mut serve)?, spawn_quiet(&mut hold)?];
            // Connecting takes seconds at 10,000 on a busy machine: measure once all are open.
            let t = Instant::now();
            while !ready.exists() {
                if t.elapsed() > Duration::from_secs(120) {
                    stop_children(children);
                    bail!("{n} connections not open after 120 s");
                }
                thread::sleep(Duration::from_millis(50));
            }
            Ok(Load::Children(children))
        })?;
        row.print(&n.to_string());
    }

    println!("\nCPUs (100 targeted processes; agent and load pinned with taskset)");
    Row::header("CPUs");
    let mut cpu_counts = vec![1];
    if all_cpus > 1 {
        cpu_counts.push(all_cpus);
    }
    for cpus in cpu_counts {
        let list = format!("0-{}", cpus - 1);
        let row = b.measure(
            &format!("cpus-{cpus}"),
            &b.config_args(),
            Some(&list),
            |_| b.workers(100, Some(&list)),
        )?;
        row.print(&cpus.to_string());
    }
    println!(
        "\n(agent % = its process's user+system time; bpf % = its programs' run time \
         (kernel.bpf_stats_enabled); both as % of one core over the window)"
    );
    Ok(())
}

fn parse_seconds(args: &[String]) -> Result<u64> {
    match args {
        [] => Ok(10),
        [flag, n] if flag == "--seconds" => {
            let n: u64 = n
                .parse()
                .with_context(|| format!("--seconds takes a number of seconds, not {n:?}"))?;
            ensure!((1..=600).contains(&n), "--seconds must be 1 to 600");
            Ok(n)
        }
        _ => bail!("bench scale takes [--seconds N] (got {args:?})"),
    }
}

struct Bench {
    probe: PathBuf,
    logs: PathBuf,
    worker: PathBuf,
    config: PathBuf,
    window: Duration,
}

/// What a row started, stopped and reaped when the row ends (also on errors).
enum Load {
    Children(Vec<Child>),
    Thread(thread::JoinHandle<()>),
}

struct Row {
    agent_pct: f64,
    bpf_pct: f64,
    rss_mib: f64,
    series: usize,
    drops: f64,
    warnings: usize,
    /// Client-side requests the agent counted per second.
    requests: f64,
}

impl Row {
    fn header(what: &str) {
        println!(
            "  {what:>14}  agent %   bpf %  total %   RSS MiB   series   dropped   warnings   req/s"
        );
    }

    fn print(&self, point: &str) {
        println!(
            "  {point:>14}  {:>7.2}  {:>6.2}  {:>7.2}  {:>8.1}  {:>7}  {:>8.0}  {:>9}  {:>6.0}",
            self.agent_pct,
            self.bpf_pct,
            self.agent_pct + self.bpf_pct,
            self.rss_mib,
            self.series,
            self.drops,
            self.warnings,
            self.requests
        );
    }
}

impl Bench {
    fn config_args(&self) -> Vec<String> {
        vec!["--config".into(), self.config.display().to_string()]
    }

    /// `n` worker processes, optionally pinned; started 50 at a time so a slow machine does
    /// not see a fork storm.
    fn workers(&self, n: usize, cpus: Option<&str>) -> Result<Load> {
        let mut children = Vec::with_capacity(n);
        for i in 0..n {
            let mut cmd = match cpus {
                Some(list) => {
                    let mut c = Command::new("taskset");
                    c.args(["-c", list]).arg(&self.worker);
                    c
                }
                None => Command::new(&self.worker),
            };
            cmd.args(["scale-worker", "work"]);
            children.push(spawn_quiet(&mut cmd)?);
            if i % 50 == 49 {
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(Load::Children(children))
    }

    /// Starts an agent, then the load, and measures one row.
    fn measure(
        &self,
        name: &str,
        args: &[String],
        pin: Option<&str>,
        load: impl FnOnce(&Arc<AtomicBool>) -> Result<Load>,
    ) -> Result<Row> {
        let mut agent_args: Vec<&str> = args.iter().map(String::as_str).collect();
        agent_args.push("--bpf-stats");
        let mut agent = match pin {
            Some(list) => {
                let wrapped = Pinned::new(&self.probe, list, &self.logs)?;
                Agent::start_with(&wrapped.0, &agent_args, &self.logs, name)?
            }
            None => Agent::start_with(&self.probe, &agent_args, &self.logs, name)?,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut started = Some(load(&stop)?);
        let result = (|| -> Result<Row> {
            thread::sleep(SETTLE);
            let pid = agent.proc.pid();
            let before = agent.scrape()?;
            let (cpu0, t0) = (cpu_seconds(pid)?, Instant::now());
            let mut last = before.clone();
            while t0.elapsed() < self.window {
                thread::sleep(SCRAPE_EVERY.min(self.window.saturating_sub(t0.elapsed())));
                last = agent.scrape()?;
            }
            let elapsed_s = t0.elapsed().as_secs_f64();
            let cpu1 = cpu_seconds(pid)?;
            let bpf = sum(&last, "ws1_probe_bpf_program_run_seconds_total")
                - sum(&before, "ws1_probe_bpf_program_run_seconds_total");
            Ok(Row {
                agent_pct: 100.0 * (cpu1 - cpu0) / elapsed_s,
                bpf_pct: 100.0 * bpf / elapsed_s,
                rss_mib: rss_kib(&mut agent.proc)? as f64 / 1024.0,
                series: last
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.is_empty())
                    .count(),
                // Since the agent started (a fresh one per row): start-up and settling included.
                drops: sum(&last, "ws1_probe_events_dropped_total"),
                warnings: warnings(&agent.proc.log),
                requests: (sum_where(&last, REQUESTS, CLIENT)
                    - sum_where(&before, REQUESTS, CLIENT))
                    / elapsed_s,
            })
        })();
        stop.store(true, Ordering::Relaxed);
        match started.take() {
            Some(Load::Children(children)) => stop_children(children),
            Some(Load::Thread(handle)) => {
                let _ = handle.join();
            }
            None => {}
        }
        let _ = agent.proc.interrupt();
        result
    }
}

/// A script that runs the agent under `taskset -c LIST`, so `Agent::start_with` can start it
/// (taskset execs the agent: the pid stays the agent's).
struct Pinned(PathBuf);

impl Pinned {
    fn new(probe: &Path, list: &str, logs: &Path) -> Result<Pinned> {
        let path = logs.join(format!("agent-pinned-{list}"));
        fs::write(
            &path,
            format!(
                "#!/bin/sh\nexec taskset -c {list} {} \"$@\"\n",
                probe.display()
            ),
        )?;
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        Ok(Pinned(path))
    }
}

fn spawn_quiet(cmd: &mut Command) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("could not start `{}`", util::display(cmd)))
}

fn stop_children(children: Vec<Child>) {
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// `/bin/true` at `rate` per second until `stop`; counts the execs it started.
fn churn(rate: u64, stop: &AtomicBool, started: &AtomicU64) {
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut next = Instant::now();
    let mut running: Vec<Child> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(child) = Command::new("/bin/true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            running.push(child);
            started.fetch_add(1, Ordering::Relaxed);
        }
        running.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        next += period;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else {
            // Behind: do not burst to catch up.
            next = now;
        }
    }
    stop_children(running);
}

/// Lines the agent logged at WARN or above so far.
fn warnings(log: &Path) -> usize {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .count()
}

const REQUESTS: &str = "ws1_probe_request_duration_seconds_count";
const CLIENT: &str = "side=\"client\"";

/// Sum of every sample of `name` in a scrape.
fn sum(text: &str, name: &str) -> f64 {
    sum_where(text, name, "")
}

/// Sum of the samples of `name` whose line contains `needle`.
fn sum_where(text: &str, name: &str, needle: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
                && l.contains(needle)
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz.max(1.0))
}

/// The load processes' side (`ws1-scale-work scale-worker MODE`), run until killed:
/// `work` wakes 10 times a second for one `getppid`; `serve N PORT` accepts N connections on a
/// loopback port and answers each 8-byte request; `hold N PORT READY` opens N connections to it,
/// creates the file READY, and sends one request on each, in the same order, once a second. Two processes, so that 10,000
/// connections fit a 20,000-descriptor limit each.
pub fn worker(args: &[String]) -> Result<()> {
    match args {
        [mode] if mode == "work" => loop {
            // SAFETY: getppid has no preconditions.
            unsafe { libc::getppid() };
            thread::sleep(Duration::from_millis(100));
        },
        [mode, n, port, rest @ ..] if mode == "serve" || mode == "hold" => {
            let n: usize = n.parse().context("a connection count")?;
            let port: u16 = port.parse().context("a port")?;
            raise_fd_limit(n as u64 + 64)?;
            match rest {
                [] if mode == "serve" => serve(n, port),
                [ready] if mode == "hold" => hold(n, port, Path::new(ready)),
                _ => bail!("serve takes N PORT, hold takes N PORT READY_FILE"),
            }
        }
        _ => bail!(
            "scale-worker takes `work`, `serve N PORT` or `hold N PORT READY_FILE` (got {args:?})"
        ),
    }
}

/// Raises the soft open-file limit to `want`, within the hard limit.
fn raise_fd_limit(want: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit struct.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    ensure!(rc == 0, "getrlimit failed");
    ensure!(
        want <= lim.rlim_max,
        "{want} open files exceed the hard limit {}",
        lim.rlim_max
    );
    lim.rlim_cur = want;
    // SAFETY: setrlimit reads a valid rlimit struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    ensure!(
        rc == 0,
        "cannot raise the open-file limit to {want}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn serve(n: usize, port: u16) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("cannot bind 127.0.0.1:{port}"))?;
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let (c, _) = listener.accept().context("accept")?;
        c.set_nodelay(true)?;
        conns.push(c);
    }
    let mut buf = [0u8; 8];
    loop {
        // Accept order is connect order, and the client sends in that order.
        for c in &mut conns {
            c.read_exact(&mut buf)?;
            c.write_all(&buf)?;
        }
    }
}

fn hold(n: usize, port: u16, ready: &Path) -> Result<()> {
    // The agent decides a new command name a few ms after its exec, and the server needs a
    // moment to listen: connect after that.
    thread::sleep(Duration::from_secs(1));
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let c = TcpStream::connect(("127.0.0.1", port)).context("connect")?;
        c.set_nodelay(true)?;
        conns.push(c);
    }
    fs::write(ready, b"")?;
    let mut buf = [0u8; 8];
    loop {
        let round = Instant::now();
        for c in &mut conns {
            c.write_all(&[1; 8])?;
            c.read_exact(&mut buf)?;
        }
        thread::sleep(Duration::from_secs(1).saturating_sub(round.elapsed()));
    }
}
