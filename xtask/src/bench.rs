//! `cargo xtask bench <what>`: benchmarks of the agent's overhead, run as root (main re-executes
//! xtask through sudo first) and after bootstrap.
//!
//! `syscalls`: what each kind of syscall hook adds to a cheap syscall (getppid), measured in one
//! run against one long-lived workload process: no probe, the floor (empty raw tracepoints on
//! sys_enter/sys_exit, `ws1-probe bench-floor`), the agent targeting the workload, the agent
//! targeting another process, and bpftrace building the same histogram. A baseline runs between
//! every two configurations so drift shows; each configuration's added cost is its median minus
//! the mean of the baselines around it. Goals are printed as PASS/MISS and never fail the run.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

use crate::{apt, run, util};

pub fn run(what: &str, args: &[String]) -> Result<()> {
    match what {
        "syscalls" => syscalls(&Opts::parse(args)?),
        _ => bail!("unknown benchmark {what}: available: syscalls"),
    }
}

/// `cargo xtask bench syscalls -- [--calls N] [--samples N]`.
struct Opts {
    calls: u64,
    samples: usize,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Self> {
        let mut opts = Opts {
            calls: 1_000_000,
            samples: 7,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--calls" => opts.calls = value?.parse().context("--calls: not a number")?,
                "--samples" => opts.samples = value?.parse().context("--samples: not a number")?,
                _ => bail!("unknown argument {flag}: expected --calls N or --samples N"),
            }
        }
        ensure!(
            opts.calls > 0 && opts.samples > 0,
            "--calls and --samples must be positive"
        );
        Ok(opts)
    }
}

/// Agent goals, in MiB and seconds.
const RSS_GOAL_MIB: f64 = 30.0;
const READY_GOAL: Duration = Duration::from_secs(1);

fn syscalls(opts: &Opts) -> Result<()> {
    apt::ensure_packages(&[("bpftrace", "bpftrace")])?;
    run::cargo_build_release(&["ws1-probe", "ws1-probe-tests"])?;
    let release = util::target_dir().join("release");
    let probe = release.join("ws1-probe");
    let workload_bin = release.join("ws1-workload");
    for bin in [&probe, &workload_bin] {
        ensure!(
            bin.is_file(),
            "{} is missing after the build",
            bin.display()
        );
    }
    let bpftrace = util::find_in_path("bpftrace").context("bpftrace is not on PATH")?;
    let logs = util::target_dir().join("bench");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;

    let mut w = Workload::spawn(&workload_bin)?;
    eprintln!(
        "bench: workload pid {}, {} samples of {} getppid calls per configuration (+1 warm-up)",
        w.pid, opts.samples, opts.calls
    );
    let mut rows = Vec::new();
    let baseline = |w: &mut Workload, rows: &mut Vec<Row>| -> Result<()> {
        let n = rows.iter().filter(|r| r.key == "a").count() + 1;
        rows.push(Row::new("a", format!("no probe (baseline #{n})"), w, opts)?);
        Ok(())
    };

    baseline(&mut w, &mut rows)?;
    let mut floor = Proc::spawn(
        "bench-floor",
        Command::new(&probe).arg("bench-floor"),
        &logs,
    )?;
    floor.wait_for_line(|l| l == "ready", Duration::from_secs(20))?;
    rows.push(Row::new(
        "b",
        "floor: empty raw_tp pair".into(),
        &mut w,
        opts,
    )?);
    floor.stop_expect_success()?;

    baseline(&mut w, &mut rows)?;
    let mut agent = Agent::start(&probe, w.pid, &logs, "agent-targeted")?;
    let rss_ready = agent.rss_kib()?;
    let calls_before = w.calls;
    rows.push(Row::new(
        "c",
        format!("agent --pid {} (bench)", w.pid),
        &mut w,
        opts,
    )?);
    let traced_calls = w.calls - calls_before;
    let rss_after = agent.rss_kib()?;
    let scraped = agent.getppid_count()?;
    let ready_c = agent.ready;
    agent.proc.stop_expect_success()?;

    baseline(&mut w, &mut rows)?;
    let mut idle = Proc::spawn("sleep", Command::new("sleep").arg("600"), &logs)?;
    let mut agent = Agent::start(&probe, idle.pid(), &logs, "agent-other")?;
    let label = format!("agent --pid {} (idle sleep)", idle.pid());
    rows.push(Row::new("d", label, &mut w, opts)?);
    let (rss_d, ready_d) = (agent.rss_kib()?, agent.ready);
    agent.proc.stop_expect_success()?;
    idle.stop()?;

    baseline(&mut w, &mut rows)?;
    let program = format!(
        "tracepoint:raw_syscalls:sys_enter /pid == {}/ {{ @s[tid] = nsecs; }} \
         tracepoint:raw_syscalls:sys_exit /@s[tid]/ \
         {{ @h[args->id] = hist(nsecs - @s[tid]); delete(@s[tid]); }}",
        w.pid
    );
    let mut bt = Proc::spawn(
        "bpftrace",
        Command::new(&bpftrace).arg("-e").arg(program),
        &logs,
    )?;
    bt.wait_for_line(|l| l.starts_with("Attaching"), Duration::from_secs(60))?;
    thread::sleep(Duration::from_secs(1));
    rows.push(Row::new(
        "e",
        "bpftrace hist, /pid == bench/".into(),
        &mut w,
        opts,
    )?);
    let bt_status = bt.stop()?;
    baseline(&mut w, &mut rows)?;
    w.exit()?;

    print_table(&rows);
    let added = |key: &str| -> Result<f64> {
        rows.iter()
            .position(|r| r.key == key)
            .and_then(|i| added_ns(&rows, i))
            .with_context(|| format!("no row for configuration ({key})"))
    };
    let (b, c, d, e) = (added("b")?, added("c")?, added("d")?, added("e")?);
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!();
    println!(
        "agent (c): VmRSS {:.1} MiB after ready, {:.1} MiB after the run; ready in {} ms",
        mib(rss_ready),
        mib(rss_after),
        ready_c.as_millis()
    );
    println!(
        "agent (d): VmRSS {:.1} MiB after the run; ready in {} ms",
        mib(rss_d),
        ready_d.as_millis()
    );
    let verdict = if scraped == traced_calls as f64 {
        "match"
    } else {
        "MISMATCH"
    };
    println!(
        "sanity (c): ws1_probe_syscall_duration_seconds_count{{syscall=\"getppid\"}} = {scraped} \
         vs {traced_calls} getppid calls made while targeted: {verdict}"
    );
    if !bt_status.success() {
        println!(
            "note: bpftrace exited with {bt_status} after SIGTERM (see {})",
            logs.display()
        );
    }

    println!();
    println!("goals (added ns per getppid):");
    goal(
        "(c) <= 2.5 x (b)",
        c,
        2.5 * b,
        format!("{c:.1} ns vs 2.5 x {b:.1} = {:.1} ns", 2.5 * b),
    );
    goal(
        "(c) <= 0.3 x (e)",
        c,
        0.3 * e,
        format!("{c:.1} ns vs 0.3 x {e:.1} = {:.1} ns", 0.3 * e),
    );
    goal(
        "(d) <= (b) + 25",
        d,
        b + 25.0,
        format!("{d:.1} ns vs {b:.1} + 25 = {:.1} ns", b + 25.0),
    );
    let rss = mib(rss_ready.max(rss_after));
    goal(
        "agent RSS <= 30 MiB",
        rss,
        RSS_GOAL_MIB,
        format!("{rss:.1} MiB (max of (c) readings)"),
    );
    let ready = ready_c.max(ready_d);
    let text = format!("{} ms (max of (c), (d))", ready.as_millis());
    goal(
        "ready <= 1 s",
        ready.as_secs_f64(),
        READY_GOAL.as_secs_f64(),
        text,
    );
    Ok(())
}

fn goal(name: &str, value: f64, limit: f64, detail: String) {
    let verdict = if value <= limit { "PASS" } else { "MISS" };
    println!("  {verdict}  {name:<22} {detail}");
}

/// One configuration's samples, in ns per call.
struct Row {
    key: &'static str,
    label: String,
    ns: Vec<f64>,
}

impl Row {
    /// Warms up with one untimed batch, then takes the samples.
    fn new(key: &'static str, label: String, w: &mut Workload, opts: &Opts) -> Result<Row> {
        eprintln!("bench: ({key}) {label} ...");
        w.time_getppid(opts.calls)?;
        let mut ns = Vec::with_capacity(opts.samples);
        for _ in 0..opts.samples {
            ns.push(w.time_getppid(opts.calls)?);
        }
        ns.sort_by(f64::total_cmp);
        Ok(Row { key, label, ns })
    }

    fn median(&self) -> f64 {
        let n = self.ns.len();
        if n % 2 == 1 {
            self.ns[n / 2]
        } else {
            (self.ns[n / 2 - 1] + self.ns[n / 2]) / 2.0
        }
    }
}

/// A configuration's median minus the mean of the baseline medians right before and after it.
fn added_ns(rows: &[Row], i: usize) -> Option<f64> {
    let before = rows[..i].iter().rev().find(|r| r.key == "a")?;
    let after = rows[i + 1..]
        .iter()
        .find(|r| r.key == "a")
        .unwrap_or(before);
    Some(rows[i].median() - (before.median() + after.median()) / 2.0)
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<40} {:>12} {:>21} {:>10}",
        "configuration", "median ns", "min..max ns", "added ns"
    );
    for (i, row) in rows.iter().enumerate() {
        let (min, max) = (row.ns[0], row.ns[row.ns.len() - 1]);
        let added = match (row.key, added_ns(rows, i)) {
            ("a", _) | (_, None) => "-".to_owned(),
            (_, Some(a)) => format!("{a:+.1}"),
        };
        let spread = format!("{min:.1}..{max:.1}");
        let label = format!("({}) {}", row.key, row.label);
        println!(
            "{label:<40} {:>12.1} {spread:>21} {added:>10}",
            row.median()
        );
    }
    let base: Vec<f64> = rows
        .iter()
        .filter(|r| r.key == "a")
        .map(Row::median)
        .collect();
    let lo = base.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = base.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    println!(
        "baseline drift over the run: medians {lo:.1}..{hi:.1} ns ({:.1} ns)",
        hi - lo
    );
}

/// A child process that is killed and reaped when dropped, so an error path leaves nothing
/// running. Its stdout lines arrive through a reader thread; stderr goes to a log file.
struct Proc {
    name: String,
    child: Child,
    lines: Option<mpsc::Receiver<String>>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, logs: &Path) -> Result<Proc> {
        let log = logs.join(format!("{name}.log"));
        let stderr =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let shown = util::display(cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("could not start `{shown}`"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            lines: Some(line_reader(stdout)),
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the stderr log, for errors.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        format!("{} (log {})", tail, self.log.display())
    }

    fn fail_if_exited(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("waitpid")? {
            bail!("{} exited early ({status}): {}", self.name, self.log_tail());
        }
        Ok(())
    }

    fn wait_for_line(&mut self, want: impl Fn(&str) -> bool, timeout: Duration) -> Result<()> {
        let lines = self.lines.as_ref().context("no stdout reader")?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if want(line.trim()) => return Ok(()),
                Ok(_) => {}
                Err(_) => {
                    self.fail_if_exited()?;
                    bail!(
                        "{}: not ready within {timeout:?}: {}",
                        self.name,
                        self.log_tail()
                    );
                }
            }
        }
    }

    /// SIGTERM, then wait up to 10 s for the exit (SIGKILL and an error after that).
    fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait().context("waitpid")? {
            return Ok(status);
        }
        let pid = self.pid().to_string();
        util::capture(Command::new("kill").args(["-TERM", &pid]))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().context("waitpid")? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("{} did not exit within 10 s of SIGTERM", self.name)
    }

    fn stop_expect_success(&mut self) -> Result<()> {
        let status = self.stop()?;
        ensure!(
            status.success(),
            "{} exited with {status} after SIGTERM: {}",
            self.name,
            self.log_tail()
        );
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Forwards lines from `r` to a channel until EOF, so reads can have a deadline.
fn line_reader(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `ws1-workload`, driven over stdin/stdout like the integration tests do.
struct Workload {
    proc: Proc,
    stdin: ChildStdin,
    pid: u32,
    /// getppid calls made so far.
    calls: u64,
}

impl Workload {
    fn spawn(bin: &Path) -> Result<Workload> {
        let mut child = Command::new(bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("could not start {}", bin.display()))?;
        let stdin = child.stdin.take().context("workload stdin")?;
        let stdout = child.stdout.take().context("workload stdout")?;
        let mut w = Workload {
            pid: child.id(),
            proc: Proc {
                name: "ws1-workload".into(),
                child,
                lines: Some(line_reader(stdout)),
                log: PathBuf::from("/dev/null"),
            },
            stdin,
            calls: 0,
        };
        let ready = w.reply(Duration::from_secs(10))?;
        ensure!(ready.starts_with("ready "), "workload said {ready:?}");
        Ok(w)
    }

    fn reply(&mut self, timeout: Duration) -> Result<String> {
        let lines = self.proc.lines.as_ref().context("no workload reader")?;
        match lines.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(_) => {
                self.proc.fail_if_exited()?;
                bail!("workload: no reply within {timeout:?}")
            }
        }
    }

    fn cmd(&mut self, command: &str) -> Result<String> {
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .context("cannot write to the workload")?;
        let reply = self.reply(Duration::from_secs(120))?;
        ensure!(reply.starts_with("ok"), "workload: {command} -> {reply}");
        Ok(reply)
    }

    /// `n` timed getppid calls; returns ns per call.
    fn time_getppid(&mut self, n: u64) -> Result<f64> {
        let reply = self.cmd(&format!("time-getppid {n}"))?;
        self.calls += n;
        let total: u64 = reply
            .strip_prefix("ok ")
            .and_then(|ns| ns.trim().parse().ok())
            .with_context(|| format!("workload: time-getppid replied {reply:?}"))?;
        Ok(total as f64 / n as f64)
    }

    fn exit(&mut self) -> Result<()> {
        self.cmd("exit")?;
        self.proc.stop().map(drop)
    }
}

/// `ws1-probe agent --pid <pid>` on a free loopback port, ready once `/readyz` says 200.
struct Agent {
    proc: Proc,
    port: u16,
    ready: Duration,
}

impl Agent {
    fn start(probe: &Path, pid: u32, logs: &Path, name: &str) -> Result<Agent> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("no free loopback port")?
            .port();
        let mut cmd = Command::new(probe);
        cmd.args(["agent", "--pid", &pid.to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        let started = Instant::now();
        let mut proc = Proc::spawn(name, &mut cmd, logs)?;
        loop {
            if let Ok((200, _)) = http_get(port, "/readyz") {
                let ready = started.elapsed();
                return Ok(Agent { proc, port, ready });
            }
            proc.fail_if_exited()?;
            if started.elapsed() > Duration::from_secs(20) {
                bail!("{name}: /readyz not 200 after 20 s: {}", proc.log_tail());
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn rss_kib(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.proc.pid());
        let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmRSS in {path}"))
    }

    /// Sum of `ws1_probe_syscall_duration_seconds_count{..syscall="getppid"..}` over services.
    fn getppid_count(&self) -> Result<f64> {
        let (status, body) = http_get(self.port, "/metrics").context("scraping /metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        let mut total = 0.0;
        for line in body.lines() {
            let Some(rest) = line.strip_prefix("ws1_probe_syscall_duration_seconds_count{") else {
                continue;
            };
            if !rest.contains("syscall=\"getppid\"") {
                continue;
            }
            let value = line.rsplit(' ').next().unwrap_or_default();
            total += value
                .parse::<f64>()
                .with_context(|| format!("bad sample line {line:?}"))?;
        }
        Ok(total)
    }
}

/// A GET over a raw TcpStream; returns (status, body).
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: no HTTP status in the answer"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}
