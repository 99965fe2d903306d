//! Support for the privileged integration tests: start the real agent binary, drive the
//! workload, scrape and parse `/metrics`.
//!
//! The binaries come from `WS1_PROBE_BIN` and `WS1_WORKLOAD_BIN` (set by `cargo xtask test`),
//! defaulting to the release build in this workspace's target directory.

pub mod folded;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

fn bin(env: &str, name: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/release")
            .join(name)
    })
}

pub fn probe_bin() -> PathBuf {
    bin("WS1_PROBE_BIN", "ws1-probe")
}

pub fn workload_bin() -> PathBuf {
    bin("WS1_WORKLOAD_BIN", "ws1-workload")
}

/// The scheduler workload, next to the syscall workload.
pub fn schedload_bin() -> PathBuf {
    workload_bin().with_file_name("ws1-schedload")
}

/// The allocation workload, next to the syscall workload.
pub fn allocload_bin() -> PathBuf {
    workload_bin().with_file_name("ws1-allocload")
}

/// The JIT workload (code in an anonymous executable mapping, a perf map the test shapes), next
/// to the syscall workload.
pub fn jitload_bin() -> PathBuf {
    workload_bin().with_file_name("ws1-jitload")
}

/// The resources workload (fds, threads, processes, CPU), next to the syscall workload.
pub fn resload_bin() -> PathBuf {
    workload_bin().with_file_name("ws1-resload")
}

/// The profiler's workload (tests/workloads/burn.c): `ws1_burn_three` and `ws1_burn_one` burn
/// CPU 3:1, or `--sleep-ms M` sleeps M ms per call in `ws1_sleep_here`. tests/build.rs compiles
/// it with frame pointers in every function, or without any, next to this crate's build.
pub fn burn_bin(frame_pointers: bool) -> PathBuf {
    PathBuf::from(if frame_pointers {
        env!("WS1_BURN_FP")
    } else {
        env!("WS1_BURN_NOFP")
    })
}

/// The Go pprof tool, the reader the profiler's pprof output must satisfy: `WS1_PPROF_BIN` (set
/// by `cargo xtask test`, which builds it from Debian's packages), defaulting to where xtask
/// puts it.
pub fn pprof_bin() -> PathBuf {
    std::env::var_os("WS1_PPROF_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/pprof"))
}

/// True when the tests can load BPF programs. Without root they are skipped, except in CI where
/// a skip is a failure.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("privileged test cannot run: not root (CI must run `cargo xtask test` as root)");
    }
    eprintln!("skipping test - not root (run `cargo xtask test` as root)");
    false
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// A GET request with a binary body; returns (status, body bytes).
pub fn http_get_bytes(port: u16, path: &str, timeout: Duration) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, raw[split..].to_vec()))
}

/// A GET request; returns (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
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

/// The agent, started with `args` on a free port; stopped with SIGKILL if the test does not stop
/// it.
pub struct Agent {
    pub child: Child,
    pub port: u16,
    pub ready_after: Duration,
    /// The agent's log lines, when started with [`Agent::start_logged`].
    log: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
}

impl Agent {
    pub fn start(args: &[&str]) -> Agent {
        Self::start_with(args, false)
    }

    /// Like [`Agent::start`], keeping the agent's log (stderr) for [`Agent::log_lines`]; each
    /// line is echoed to this process's stderr too.
    pub fn start_logged(args: &[&str]) -> Agent {
        Self::start_with(args, true)
    }

    fn start_with(args: &[&str], logged: bool) -> Agent {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut child = Command::new(probe_bin())
            .arg("agent")
            .args(["--listen", &listen])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if logged {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", probe_bin().display()));
        let log = child.stderr.take().map(|stderr| {
            let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let sink = std::sync::Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("{line}");
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
            lines
        });
        let mut agent = Agent {
            child,
            port,
            ready_after: Duration::ZERO,
            log,
        };
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(port, "/readyz") {
                agent.ready_after = started.elapsed();
                return agent;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("agent exited before ready: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "agent not ready after 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn metrics(&self) -> Metrics {
        let (status, body) = http_get(self.port, "/metrics").expect("scrape /metrics");
        assert_eq!(status, 200, "/metrics status");
        Metrics::parse(&body)
    }

    /// Polls `/metrics` until `pred` holds (for effects that go through the agent's exec
    /// handling, which is asynchronous), failing after 10 s.
    pub fn wait_for(&self, what: &str, mut pred: impl FnMut(&Metrics) -> bool) -> Metrics {
        let started = Instant::now();
        loop {
            let m = self.metrics();
            if pred(&m) {
                return m;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Log lines so far that contain `needle` (the agent must have been started with
    /// [`Agent::start_logged`]).
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let log = self.log.as_ref().expect("agent started with start_logged");
        let lines = log.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Polls the log until a line contains `needle`, failing after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Vec<String> {
        let started = Instant::now();
        loop {
            let found = self.log_lines(needle);
            if !found.is_empty() {
                return found;
            }
            assert!(
                started.elapsed() < timeout,
                "timed out after {timeout:?} waiting for a log line with {needle:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits (at most 5 s) for the exit status and how long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "agent did not exit within 5 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ws1-probe` to completion with `args`.
pub fn run_probe(args: &[&str]) -> Output {
    Command::new(probe_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", probe_bin().display()))
}

/// The test workload, driven over stdin/stdout.
pub struct Workload {
    pub child: Child,
    pub pid: u32,
    /// The workload's first line, `ready ...`.
    pub ready: String,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Workload {
    /// Starts the workload under command name `comm` (at most 15 bytes): it is run through a
    /// symlink of that name, and the kernel takes a process's comm from the executed path. A
    /// name per test keeps tests independent of any other workload running on the machine.
    pub fn spawn(comm: &str) -> Workload {
        Self::spawn_program(&workload_bin(), comm)
    }

    /// Starts `program` (a workload speaking the same line protocol) under command name `comm`.
    pub fn spawn_program(program: &std::path::Path, comm: &str) -> Workload {
        Self::spawn_args(program, comm, &[])
    }

    /// Like [`Workload::spawn_program`], with command-line arguments.
    pub fn spawn_args(program: &std::path::Path, comm: &str, args: &[&str]) -> Workload {
        assert!(comm.len() <= 15, "comm {comm:?} is longer than 15 bytes");
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        let dir = std::env::temp_dir()
            .join(format!("ws1-probe-tests-{}", std::process::id()))
            .join(name.unwrap_or_default());
        std::fs::create_dir_all(&dir).expect("temp dir for workload links");
        let link = dir.join(comm);
        if !link.exists() {
            std::os::unix::fs::symlink(program, &link).expect("workload symlink");
        }
        let mut child = Command::new(&link)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("workload ready line");
        assert!(line.starts_with("ready "), "workload said {line:?}");
        let pid = child.id();
        Workload {
            child,
            pid,
            ready: line.trim_end().to_owned(),
            stdin,
            stdout,
        }
    }

    /// Sends one command and returns its reply (without the newline); panics on `error`.
    pub fn cmd(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("write to workload");
        self.stdin.flush().expect("flush workload stdin");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read workload reply");
        let line = line.trim_end().to_owned();
        assert!(line.starts_with("ok"), "workload: {command} -> {line}");
        line
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample: metric name, labels in exposition order, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Parsed Prometheus text exposition.
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Metrics {
            samples,
            text: text.to_owned(),
        }
    }

    /// The value of the one sample named `name` whose labels include all of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert!(
            found.len() <= 1,
            "{name} {labels:?} matches {} series",
            found.len()
        );
        found.first().copied()
    }

    /// Like `get`, 0 when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exposition() {
        let m = Metrics::parse(
            "# HELP x y\nx_total{a=\"1\",b=\"q\\\"z\"} 3\ny 2.5\nh_bucket{le=\"+Inf\"} 4\n",
        );
        assert_eq!(m.get("x_total", &[("a", "1")]), Some(3.0));
        assert_eq!(m.get("x_total", &[("b", "q\"z")]), Some(3.0));
        assert_eq!(m.get("y", &[]), Some(2.5));
        assert_eq!(m.get("h_bucket", &[("le", "+Inf")]), Some(4.0));
        assert_eq!(m.get("nope", &[]), None);
    }
}
