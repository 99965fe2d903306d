//! What the benchmarks share: baseline-interleaved blocks and their statistics, child
//! processes that are reaped on every path, and an agent started for a benchmark.

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

use crate::util;

/// One block of samples (ns per operation) taken under one configuration.
pub(crate) struct Block {
    pub(crate) key: &'static str,
    pub(crate) ns: Vec<f64>,
}

/// Added ns of each block of `key`: its median minus the mean of the baseline (`a`) blocks
/// around it.
pub(crate) fn added(blocks: &[Block], key: &str) -> Vec<f64> {
    let base = |b: Option<&Block>| b.filter(|b| b.key == "a").map(|b| median(&b.ns));
    (0..blocks.len())
        .filter(|&i| blocks[i].key == key && i > 0)
        .filter_map(|i| {
            let before = base(blocks.get(i - 1))?;
            let after = base(blocks.get(i + 1)).unwrap_or(before);
            Some(median(&blocks[i].ns) - (before + after) / 2.0)
        })
        .collect()
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = |i: usize| v.get(i).copied().unwrap_or(f64::NAN);
    (mid(v.len().saturating_sub(1) / 2) + mid(v.len() / 2)) / 2.0
}

/// `[pid comm, ...]` of running ws1-probe/bpftrace processes (at baselines none is ours), or "".
pub(crate) fn other_tracers() -> String {
    let pids = fs::read_dir("/proc").into_iter().flatten().flatten();
    let pids = pids.filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    let found = pids.filter_map(|pid| {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let comm = comm.trim();
        matches!(comm, "ws1-probe" | "bpftrace").then(|| format!("{pid} {comm}"))
    });
    let found = found.collect::<Vec<_>>().join(", ");
    let text = format!("[{found}]");
    if found.is_empty() { found } else { text }
}

pub(crate) fn rss_kib(p: &mut Proc) -> Result<u64> {
    p.fail_if_exited()?;
    let path = format!("/proc/{}/status", p.pid());
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// A child process that is killed and reaped when dropped, so an error path leaves nothing
/// running. Its stdout lines arrive through a reader thread (so reads can time out), stdin is a
/// pipe kept open, and stderr goes to `<logs>/<name>.log`.
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub(crate) log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(name: &str, cmd: &mut Command, logs: &Path) -> Result<Proc> {
        let log = logs.join(format!("{name}.log"));
        let stderr =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let shown = util::display(cmd);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let child = cmd.stderr(stderr).spawn();
        let mut child = child.with_context(|| format!("could not start `{shown}`"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let name = name.to_owned();
        Ok(Proc {
            name,
            child,
            stdin,
            lines,
            log,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the stderr log, for errors.
    pub(crate) fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        format!("{tail} (log {})", self.log.display())
    }

    pub(crate) fn fail_if_exited(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("waitpid")? {
            bail!("{} exited early ({status}): {}", self.name, self.log_tail());
        }
        Ok(())
    }

    pub(crate) fn next_line(&mut self, timeout: Duration) -> Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(_) => {
                // Give a process that just closed its stdout a moment to be reapable.
                thread::sleep(Duration::from_millis(50));
                self.fail_if_exited()?;
                let (name, tail) = (&self.name, self.log_tail());
                bail!("{name}: no output line within {timeout:?}: {tail}")
            }
        }
    }

    /// Writes one command line to stdin and returns the reply line, which must start with "ok".
    pub(crate) fn request(&mut self, command: &str) -> Result<String> {
        let stdin = self.stdin.as_mut().context("stdin is closed")?;
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("cannot write to {}", self.name))?;
        let reply = self.next_line(Duration::from_secs(120))?;
        let name = &self.name;
        ensure!(reply.starts_with("ok"), "{name}: {command} -> {reply}");
        Ok(reply)
    }

    /// Reads stdout lines until one starts with `prefix`, for at most `secs` seconds.
    pub(crate) fn wait_for_line(&mut self, prefix: &str, secs: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.next_line(left)?.trim().starts_with(prefix) {
                return Ok(());
            }
        }
    }

    /// SIGTERM, then wait up to 10 s for the exit (SIGKILL and an error after that).
    pub(crate) fn stop(&mut self) -> Result<ExitStatus> {
        self.signal_and_wait("TERM")
    }

    /// SIGINT (Ctrl-C), then wait up to 10 s for the exit, like `stop`.
    pub(crate) fn interrupt(&mut self) -> Result<ExitStatus> {
        self.signal_and_wait("INT")
    }

    /// Waits up to `timeout` for the process to exit by itself (SIGKILL and an error after that).
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.poll_exit(timeout)? {
            Some(status) => Ok(status),
            None => bail!("{} did not exit within {timeout:?}", self.name),
        }
    }

    fn signal_and_wait(&mut self, signal: &str) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait().context("waitpid")? {
            return Ok(status);
        }
        util::capture(Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()]))?;
        match self.poll_exit(Duration::from_secs(10))? {
            Some(status) => Ok(status),
            None => bail!("{} did not exit within 10 s of SIG{signal}", self.name),
        }
    }

    fn poll_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("waitpid")? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
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

/// `ws1-probe agent --pid <pid>` on a free loopback port; ready once `/readyz` answers 200.
pub(crate) struct Agent {
    pub(crate) proc: Proc,
    port: u16,
    pub(crate) ready: Duration,
}

impl Agent {
    pub(crate) fn start(probe: &Path, pid: u32, logs: &Path, name: &str) -> Result<Agent> {
        Self::start_with(probe, &["--pid", &pid.to_string()], logs, name)
    }

    /// `ws1-probe agent ARGS` on a free loopback port, ready once `/readyz` answers 200.
    pub(crate) fn start_with(
        probe: &Path,
        args: &[&str],
        logs: &Path,
        name: &str,
    ) -> Result<Agent> {
        let port = (TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))
            .context("no free loopback port")?
            .port();
        let mut cmd = Command::new(probe);
        cmd.arg("agent")
            .args(args)
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

    /// The `/metrics` body.
    pub(crate) fn scrape(&self) -> Result<String> {
        let (status, body) = http_get(self.port, "/metrics").context("scraping /metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        Ok(body)
    }

    /// Sum of `ws1_probe_syscall_duration_seconds_count{..syscall="getppid"..}` over services.
    pub(crate) fn getppid_count(&self) -> Result<f64> {
        let (status, body) = http_get(self.port, "/metrics").context("scraping /metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        let count = "ws1_probe_syscall_duration_seconds_count{";
        let lines = body.lines().filter(|l| l.starts_with(count));
        let mut total = 0.0;
        for line in lines.filter(|l| l.contains("syscall=\"getppid\"")) {
            let value = line.rsplit(' ').next().unwrap_or_default();
            total += value
                .parse::<f64>()
                .with_context(|| format!("bad sample {line:?}"))?;
        }
        Ok(total)
    }
}

/// A GET over a raw TcpStream; returns (status, body).
pub(crate) fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = (text.split(' ').nth(1).and_then(|c| c.parse().ok()))
        .ok_or_else(|| anyhow!("GET {path}: no HTTP status in the answer"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    Ok((status, body.unwrap_or_default()))
}
