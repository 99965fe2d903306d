//! `cargo xtask bench net`: requests per second of a loopback request/response load
//! (`ws1-netload rate`: one connection per CPU, 8-byte requests answered at once) without the
//! agent, with the agent observing both ends, and with the agent running but observing neither,
//! plus the microseconds each request round trip gains. Like `bench syscalls`, every
//! configuration block follows its own baseline block (and one ends the run), so drift on a
//! shared machine cancels: a block's loss is against the mean of the baselines around it, and a
//! configuration's figure is the median over rounds. The goal (≤ 3 % throughput loss) prints as
//! PASS/MISS; only errors fail the run.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{run, util};

/// Requests per connection per sample, samples per block, rounds over the configurations.
const REQUESTS: u64 = 20_000;
const SAMPLES: usize = 5;
const ROUNDS: usize = 3;
/// Largest acceptable throughput loss with the agent observing both ends, in percent.
const GOAL_LOSS_PCT: f64 = 3.0;

const CONFIGS: [(&str, &str); 2] = [
    ("b", "agent --collectors net --pid <server> --pid <client>"),
    (
        "c",
        "agent --collectors net --pid <idle sleep> (load not observed)",
    ),
];

/// A `ws1-netload` driven over stdin/stdout.
struct NetLoad {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl NetLoad {
    fn spawn(bin: &Path) -> Result<NetLoad> {
        let mut child = Command::new(bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stdin = child.stdin.take().context("netload stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("netload stdout")?);
        let mut n = NetLoad {
            child,
            stdin,
            stdout,
        };
        let ready = n.line()?;
        ensure!(ready.starts_with("ready "), "ws1-netload said {ready:?}");
        Ok(n)
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .context("cannot read from ws1-netload")?;
        Ok(line.trim_end().to_owned())
    }

    /// One command; returns the first number of its `ok` reply.
    fn cmd(&mut self, command: &str) -> Result<u64> {
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .context("cannot write to ws1-netload")?;
        let reply = self.line()?;
        let value = reply.strip_prefix("ok ").and_then(|v| v.parse().ok());
        value.with_context(|| format!("ws1-netload: {command} -> {reply:?}"))
    }
}

impl Drop for NetLoad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent, killed when dropped.
struct Agent {
    child: Child,
    port: u16,
}

impl Agent {
    fn start(probe: &Path, pids: &[u32], extra: &[&str], log: &Path) -> Result<Agent> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("no free loopback port")?
            .port();
        let stderr =
            fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(probe);
        cmd.arg("agent")
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        for pid in pids {
            cmd.args(["--pid", &pid.to_string()]);
        }
        cmd.args(extra);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("cannot start the agent")?;
        let mut agent = Agent { child, port };
        let started = Instant::now();
        while !matches!(agent.get("/readyz"), Ok((200, _))) {
            if let Some(status) = agent.child.try_wait()? {
                bail!("agent exited ({status}); see {}", log.display());
            }
            ensure!(
                started.elapsed() < Duration::from_secs(20),
                "agent not ready after 20 s; see {}",
                log.display()
            );
            thread::sleep(Duration::from_millis(10));
        }
        Ok(agent)
    }

    fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok());
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((status.unwrap_or(0), body.to_owned()))
    }

    /// Client-side requests the agent counted.
    fn client_requests(&self) -> Result<f64> {
        let (status, body) = self.get("/metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        let prefix = "ws1_probe_request_duration_seconds_count{";
        let mut total = 0.0;
        for line in body
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains("side=\"client\""))
        {
            let value = line.rsplit(' ').next().unwrap_or_default();
            total += value
                .parse::<f64>()
                .with_context(|| format!("bad {line:?}"))?;
        }
        Ok(total)
    }
}

impl Agent {
    /// Kernel run time in seconds and run count of the named programs (needs `--bpf-stats`).
    fn program_stats(&self, programs: &[&str]) -> Result<(f64, f64)> {
        let (status, body) = self.get("/metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        let mut total = (0.0, 0.0);
        for p in programs {
            for (metric, sum) in [
                ("ws1_probe_bpf_program_run_seconds_total", &mut total.0),
                ("ws1_probe_bpf_program_runs_total", &mut total.1),
            ] {
                let series = format!("{metric}{{program=\"{p}\"}} ");
                if let Some(v) = body.lines().find_map(|l| l.strip_prefix(&series)) {
                    *sum += v
                        .parse::<f64>()
                        .with_context(|| format!("bad value {v:?}"))?;
                }
            }
        }
        Ok(total)
    }
}

/// The network collector's programs (the send/receive hooks as raw tracepoints where the kernel
/// allows, as tracepoints otherwise: whichever is attached reports runs), and the syscall
/// collector's.
const NET_PROGRAMS: [&str; 10] = [
    "inet_sock_set_state",
    "sock_send_length",
    "sock_recv_length",
    "sock_send_length_raw",
    "sock_recv_length_raw",
    "tcp_probe",
    "tcp_probe_raw",
    "tcp_retransmit_skb",
    "tcp_send_reset",
    "tcp_receive_reset",
];
const SYSCALL_PROGRAMS: [&str; 2] = ["sys_enter", "sys_exit"];

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Bench {
    client: NetLoad,
    addr: String,
    conns: u64,
    /// (configuration key, requests per second of each sample).
    blocks: Vec<(&'static str, Vec<f64>)>,
}

impl Bench {
    /// A warm-up sample, then `SAMPLES` samples; returns the requests made.
    fn block(&mut self, key: &'static str) -> Result<u64> {
        let command = format!("rate {} {} {REQUESTS}", self.addr, self.conns);
        self.client.cmd(&command)?;
        let mut rates = Vec::new();
        for _ in 0..SAMPLES {
            let ns = self.client.cmd(&command)?;
            rates.push((self.conns * REQUESTS) as f64 / (ns as f64 / 1e9));
        }
        self.blocks.push((key, rates));
        Ok(self.conns * REQUESTS * (SAMPLES as u64 + 1))
    }

    /// Per block of `key`: (its median rate, the mean median of the baselines around it).
    fn pairs(&self, key: &str) -> Vec<(f64, f64)> {
        let medians: Vec<(&str, f64)> = self.blocks.iter().map(|(k, r)| (*k, median(r))).collect();
        (1..medians.len().saturating_sub(1))
            .filter(|&i| medians[i].0 == key)
            .map(|i| (medians[i].1, (medians[i - 1].1 + medians[i + 1].1) / 2.0))
            .collect()
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn run() -> Result<()> {
    run::cargo_build_release(&["ws1-probe", "ws1-probe-tests"])?;
    let release = util::target_dir().join("release");
    let (probe, netload) = (release.join("ws1-probe"), release.join("ws1-netload"));
    let logs: PathBuf = util::target_dir().join("bench");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let conns = thread::available_parallelism().map_or(2, |n| n.get() as u64);

    let mut server = NetLoad::spawn(&netload)?;
    let port = server.cmd("listen 127.0.0.1:0")?;
    let client = NetLoad::spawn(&netload)?;
    let mut idle = Command::new("sleep")
        .arg("600")
        .spawn()
        .context("cannot start sleep")?;
    let pids = [server.child.id(), client.child.id()];
    let mut bench = Bench {
        client,
        addr: format!("127.0.0.1:{port}"),
        conns,
        blocks: Vec::new(),
    };
    let mut sanity = Vec::new();
    for round in 1..=ROUNDS {
        for (key, label) in CONFIGS {
            eprintln!("bench net: round {round}/{ROUNDS}: (a) no agent, then ({key}) {label}");
            bench.block("a")?;
            let targets: Vec<u32> = if key == "b" {
                pids.to_vec()
            } else {
                vec![idle.id()]
            };
            let log = logs.join(format!("net-agent-{key}.log"));
            // Only the network collector: its cost is what the goal is about (the syscall
            // collector would add its own per-syscall cost to the same requests).
            let agent = Agent::start(&probe, &targets, &["--collectors", "net"], &log)?;
            let made = bench.block(key)?;
            if key == "b" {
                sanity.push((agent.client_requests()?, made));
            }
        }
    }
    bench.block("a")?;
    // Kernel time of each collector per request, from BPF run-time statistics (which add about
    // 20 ns per program run themselves, so this run is kept out of the throughput figures).
    eprintln!("bench net: kernel time per request (agent --bpf-stats, both ends observed)");
    let log = logs.join("net-agent-stats.log");
    let agent = Agent::start(&probe, &pids, &["--bpf-stats"], &log)?;
    let made = bench.block("d")? as f64;
    // Per request: (ns of kernel time, program runs).
    let per_request = |programs: &[&str]| -> Result<(f64, f64)> {
        let (seconds, runs) = agent.program_stats(programs)?;
        Ok((seconds / made * 1e9, runs / made))
    };
    let stats = (per_request(&NET_PROGRAMS)?, per_request(&SYSCALL_PROGRAMS)?);
    drop(agent);
    let _ = idle.kill();
    let _ = idle.wait();
    drop(server);
    report(&bench, &sanity, stats)
}

type PerRequest = (f64, f64);

fn report(
    bench: &Bench,
    sanity: &[(f64, u64)],
    (net, sys): (PerRequest, PerRequest),
) -> Result<()> {
    let base: Vec<f64> = bench
        .blocks
        .iter()
        .filter(|(k, _)| *k == "a")
        .map(|(_, r)| median(r))
        .collect();
    let base_rate = median(&base);
    let conns = bench.conns as f64;
    println!(
        "loopback request/response, {} connections × {REQUESTS} requests per sample, {SAMPLES} samples per block, {ROUNDS} rounds",
        bench.conns
    );
    println!(
        "(a) {:<46} {base_rate:>9.0} req/s   {:>6.2} µs per request round trip",
        "no agent",
        conns / base_rate * 1e6
    );
    let mut loss_b = 0.0;
    for (key, label) in CONFIGS {
        let pairs = bench.pairs(key);
        let rate = median(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
        let loss = median(
            &pairs
                .iter()
                .map(|(c, b)| (1.0 - c / b) * 100.0)
                .collect::<Vec<_>>(),
        );
        let added = median(
            &pairs
                .iter()
                .map(|(c, b)| (conns / c - conns / b) * 1e6)
                .collect::<Vec<_>>(),
        );
        if key == "b" {
            loss_b = loss;
        }
        println!(
            "({key}) {label:<46} {rate:>9.0} req/s   {loss:>6.2} % fewer requests   {added:>+6.2} µs per request"
        );
    }
    let verdict = if loss_b <= GOAL_LOSS_PCT {
        "PASS"
    } else {
        "MISS"
    };
    println!(
        "goal: ≤ {GOAL_LOSS_PCT} % throughput loss with both ends observed: {verdict} ({loss_b:.2} %)"
    );
    println!(
        "kernel time per request (both ends): network programs {:.0} ns in {:.1} runs, syscall programs {:.0} ns in {:.1} runs",
        net.0, net.1, sys.0, sys.1
    );
    for (counted, made) in sanity {
        let check = if (*counted - *made as f64).abs() < 0.5 {
            "match"
        } else {
            "MISMATCH"
        };
        println!(
            "sanity (b): agent counted {counted} client requests, the load made {made}: {check}"
        );
    }
    Ok(())
}
