//! `cargo xtask bench net`: requests per second of two loopback request/response loads without
//! the agent, with the agent observing both ends, with it observing the server only (the
//! service, as in production, with the load generator unobserved), and with the agent running
//! but observing neither, plus the microseconds of CPU each request gains:
//! - **http**: nginx answering `200 ok` to wrk over keep-alive connections (Debian packages,
//!   installed when missing), nginx on half of the CPUs and wrk on the other half: a real
//!   server's request path, and the load this machine can drive.
//! - **echo**: `ws1-netload rate`, 8-byte requests answered at once with no work at all, one
//!   connection per CPU with both of its ends pinned to that CPU (no wake-up crosses CPUs): the
//!   worst case, where the collector's fixed cost per request is the largest share.
//!
//! Every configuration block follows its own baseline block (and one ends the run), so drift on
//! a shared machine cancels: a block's loss is against the mean of the baselines around it, and
//! a configuration's figure is the median over rounds, printed with every round's loss so the
//! noise is visible. The goal (≤ 3 % throughput loss) prints as PASS/MISS per load, for both
//! ends observed and for the server only. The hooks' share of the load's CPU samples
//! (`ws1-probe profile`) does not move with the CPU the host lends the VM; at saturation it is
//! a lower bound of the throughput the hooks cost (their after-effects on caches and branch
//! predictors fall in other frames), so it prints beside the verdict and can settle a MISS.
//! It is also sampled with the load not observed: what every other process pays. Only errors
//! fail the run. The agent runs only the network collector (`--collectors net`); kernel time per
//! request comes from separate `--bpf-stats` blocks.
//!
//! `cargo xtask bench net -- [--load http|echo] [--rounds N]` measures one load, or fewer rounds,
//! for a quick look while working on the hot path (the goal's verdict wants the 15 rounds).

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{run, util};

mod loads;
mod report;

use loads::{Echo, Http, Load, cpus};
use report::median;

/// Samples per block (after one warm-up sample) and rounds over the configurations.
const SAMPLES: usize = 3;
const DEFAULT_ROUNDS: usize = 15;
/// Largest acceptable throughput loss with the agent observing both ends, in percent.
const GOAL_LOSS_PCT: f64 = 3.0;

/// The agent's selections whose hooks' CPU share is sampled: as in `CONFIGS`; the last one is
/// what every process the agent does not observe pays (the tracepoint dispatch and a load that
/// finds no socket storage).
const SHARES: [(&str, &str); 3] = [
    ("b", "both ends observed"),
    ("s", "server only observed"),
    ("c", "load not observed"),
];

const CONFIGS: [(&str, &str); 3] = [
    ("b", "agent observing server and client"),
    ("s", "agent observing the server only"),
    ("c", "agent observing an idle process only"),
];

/// The agent, killed when dropped.
struct Agent {
    child: Child,
    port: u16,
}

impl Agent {
    /// Starts the agent with `select` (selector arguments such as `--pid 42`) and `extra`.
    fn start(probe: &Path, select: &[String], extra: &[&str], log: &Path) -> Result<Agent> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("no free loopback port")?
            .port();
        let stderr =
            fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(probe);
        cmd.arg("agent")
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        cmd.args(select).args(extra);
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

    /// Requests the agent counted on `side` (`client` or `server`).
    fn requests(&self, side: &str) -> Result<f64> {
        let (status, body) = self.get("/metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        let prefix = "ws1_probe_request_duration_seconds_count{";
        let label = format!("side=\"{side}\"");
        let mut total = 0.0;
        for line in body
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(&label))
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

/// The network collector's programs (`tp_btf` where the kernel allows, else the send/receive
/// hooks as raw tracepoints and the rest as tracepoints: whichever is attached reports runs),
/// and the syscall collector's.
const NET_PROGRAMS: [&str; 16] = [
    "inet_sock_set_state_btf",
    "inet_sock_set_state_btf_nested",
    "sock_send_length_btf",
    "sock_recv_length_btf",
    "tcp_retransmit_skb_btf",
    "tcp_send_reset_btf",
    "tcp_receive_reset_btf",
    "inet_sock_set_state",
    "sock_send_length",
    "sock_recv_length",
    "sock_send_length_raw",
    "sock_recv_length_raw",
    "tcp_probe",
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

/// One load's blocks: (configuration key, requests per second of each sample).
struct Bench<L: Load> {
    load: L,
    blocks: Vec<(&'static str, Vec<f64>)>,
    /// Requests of the last block's warm-up sample.
    warmup: u64,
    rounds: usize,
}

type PerRequest = (f64, f64);

/// One configuration's figures: medians over rounds, and each round's loss.
struct Figures {
    key: &'static str,
    label: &'static str,
    rate: f64,
    loss: f64,
    /// µs of CPU per request.
    added: f64,
    losses: Vec<f64>,
}

/// A load's figures.
struct Outcome {
    describe: String,
    rounds: usize,
    base_rate: f64,
    configs: Vec<Figures>,
    sanity: Vec<String>,
    observed: (PerRequest, PerRequest),
    unobserved: PerRequest,
    /// Per selection in `SHARES`: samples of the load's CPU time inside the hooks, and all
    /// samples.
    shares: Vec<(u64, u64)>,
}

impl<L: Load> Bench<L> {
    /// A warm-up sample, then `SAMPLES` samples; returns the requests made.
    fn block(&mut self, key: &'static str) -> Result<u64> {
        let (_, mut made) = self.load.sample()?;
        self.warmup = made;
        let mut rates = Vec::new();
        for _ in 0..SAMPLES {
            let (rate, n) = self.load.sample()?;
            rates.push(rate);
            made += n;
        }
        self.blocks.push((key, rates));
        Ok(made)
    }

    /// Kernel time per request of the network and the syscall programs, as (ns, program runs),
    /// over one block with an agent run with `--bpf-stats` selecting `select`.
    fn kernel_time(
        &mut self,
        probe: &Path,
        select: &[String],
        log: &Path,
    ) -> Result<(PerRequest, PerRequest)> {
        let extra = ["--collectors", "net", "--bpf-stats"];
        let agent = Agent::start(probe, select, &extra, log)?;
        let made = self.block("d")? as f64;
        let per_request = |programs: &[&str]| -> Result<PerRequest> {
            let (seconds, runs) = agent.program_stats(programs)?;
            Ok((seconds / made * 1e9, runs / made))
        };
        Ok((per_request(&NET_PROGRAMS)?, per_request(&SYSCALL_PROGRAMS)?))
    }

    /// The agent's selector arguments for configuration `key`: both ends (`b`), the server
    /// (`s`), or the idle process (`idle`, the load not observed).
    fn selection(&self, key: &str, idle: &[String]) -> Vec<String> {
        match key {
            "b" => self.load.select(),
            "s" => self.load.select_server(),
            _ => idle.to_vec(),
        }
    }

    /// Per block of `key`: (its median rate, the mean median of the baselines around it).
    fn pairs(&self, key: &str) -> Vec<(f64, f64)> {
        let medians: Vec<(&str, f64)> = self.blocks.iter().map(|(k, r)| (*k, median(r))).collect();
        (1..medians.len().saturating_sub(1))
            .filter(|&i| medians[i].0 == key)
            .map(|i| (medians[i].1, (medians[i - 1].1 + medians[i + 1].1) / 2.0))
            .collect()
    }

    /// Runs every round and the kernel-time blocks.
    fn measure(mut self, name: &str, probe: &Path, idle: u32, logs: &Path) -> Result<Outcome> {
        let idle = vec!["--pid".to_owned(), idle.to_string()];
        let mut sanity = Vec::new();
        for round in 1..=self.rounds {
            for (key, label) in CONFIGS {
                let rounds = self.rounds;
                eprintln!("bench net {name}: round {round}/{rounds}: no agent, then {label}");
                self.block("a")?;
                let select = self.selection(key, &idle);
                let log = logs.join(format!("net-{name}-agent-{key}.log"));
                // Only the network collector: its cost is what the goal is about (the syscall
                // collector would add its own per-syscall cost to the same requests).
                let agent = Agent::start(probe, &select, &["--collectors", "net"], &log)?;
                let made = self.block(key)?;
                if key == "b" {
                    sanity.push(self.load.sanity(&agent, made, self.warmup)?);
                }
            }
        }
        self.block("a")?;
        // BPF run-time statistics add about 20 ns per program run themselves, so these blocks
        // are kept out of the throughput figures.
        eprintln!("bench net {name}: kernel time per request (--bpf-stats), observed");
        let select = self.load.select();
        let log = logs.join(format!("net-{name}-agent-stats.log"));
        let observed = self.kernel_time(probe, &select, &log)?;
        eprintln!("bench net {name}: kernel time per request (--bpf-stats), not observed");
        let log = logs.join(format!("net-{name}-agent-stats-idle.log"));
        let unobserved = self.kernel_time(probe, &idle, &log)?.0;
        let mut shares = Vec::new();
        for (key, what) in SHARES {
            eprintln!("bench net {name}: CPU share of the hooks (ws1-probe profile, {what})");
            let select = self.selection(key, &idle);
            shares.push(self.hook_share(probe, logs, &format!("{name}-{key}"), &select)?);
        }

        let base: Vec<f64> = self
            .blocks
            .iter()
            .filter(|(k, _)| *k == "a")
            .map(|(_, r)| median(r))
            .collect();
        let base_rate = median(&base);
        // Every CPU is busy in both loads, so CPUs / rate is the CPU time of one request.
        let cpus = cpus() as f64;
        let configs = CONFIGS
            .iter()
            .map(|&(key, label)| {
                let pairs = self.pairs(key);
                let rate = median(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
                let losses: Vec<f64> = pairs.iter().map(|(c, b)| (1.0 - c / b) * 100.0).collect();
                let added: Vec<f64> = pairs
                    .iter()
                    .map(|(c, b)| (cpus / c - cpus / b) * 1e6)
                    .collect();
                Figures {
                    key,
                    label,
                    rate,
                    loss: median(&losses),
                    added: median(&added),
                    losses,
                }
            })
            .collect();
        Ok(Outcome {
            describe: self.load.describe(),
            rounds: self.rounds,
            base_rate,
            configs,
            sanity,
            observed,
            unobserved,
            shares,
        })
    }

    /// Samples the load's CPU time with `ws1-probe profile` while the agent selects `observe`,
    /// and counts the samples inside the tracepoints' BPF hooks (`HOOK_FRAMES`: the call site,
    /// the dispatch, the programs and everything they call). Unlike the throughput comparison
    /// this does not depend on how much CPU the host lends the VM from one block to the next;
    /// at saturation it is a lower bound of the throughput the hooks cost. Returns (samples in
    /// the hooks, all samples).
    fn hook_share(
        &mut self,
        probe: &Path,
        logs: &Path,
        name: &str,
        observe: &[String],
    ) -> Result<(u64, u64)> {
        let select = self.load.select();
        let log = logs.join(format!("net-{name}-agent-share.log"));
        let agent = Agent::start(probe, observe, &["--collectors", "net"], &log)?;
        let folded = logs.join(format!("net-{name}-load.folded"));
        let log = logs.join(format!("net-{name}-profile.log"));
        let stderr =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        // Frame pointers only: the kernel frames are what counts here.
        let mut profile = Command::new(probe)
            .arg("profile")
            .args(&select)
            .args(["-F", "499", "--unwind", "fp", "--duration", "8s"])
            .args(["--format", "folded", "-o"])
            .arg(&folded)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("cannot start ws1-probe profile")?;
        let status = loop {
            self.block("e")?;
            if let Some(status) = profile.try_wait()? {
                break status;
            }
        };
        drop(agent);
        ensure!(
            status.success(),
            "ws1-probe profile failed; see {}",
            log.display()
        );
        let text = fs::read_to_string(&folded)
            .with_context(|| format!("cannot read {}", folded.display()))?;
        Ok(hook_samples(&text))
    }
}

/// Kernel functions that run only because a program is attached to a tracepoint: the
/// out-of-line call site (`call_trace_sock_*` in net/socket.c), the iterator or static-call
/// target, and the BPF run wrapper (which calls the program and its helpers).
const HOOK_FRAMES: [&str; 4] = [
    "call_trace_",
    "__traceiter_",
    "__bpf_trace_",
    "bpf_trace_run",
];

/// (samples inside a tracepoint's BPF hook, all samples) of folded stacks.
fn hook_samples(folded: &str) -> (u64, u64) {
    let mut counts = (0, 0);
    for line in folded.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else {
            continue;
        };
        if stack
            .split(';')
            .any(|f| HOOK_FRAMES.iter().any(|h| f.starts_with(h)))
        {
            counts.0 += n;
        }
        counts.1 += n;
    }
    counts
}

/// Which loads to measure, and how many rounds, from `cargo xtask bench net -- ARGS`.
fn options(args: &[String]) -> Result<(Vec<&'static str>, usize)> {
    let (mut loads, mut rounds) = (vec!["http", "echo"], DEFAULT_ROUNDS);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = it.next();
        match (arg.as_str(), value.map(String::as_str)) {
            ("--load", Some("http")) => loads = vec!["http"],
            ("--load", Some("echo")) => loads = vec!["echo"],
            ("--rounds", Some(n)) => match n.parse::<usize>() {
                Ok(n) if n >= 1 => rounds = n,
                _ => bail!("bench net: --rounds wants a whole number ≥ 1, got {n:?}"),
            },
            _ => bail!(
                "bench net: unknown argument {arg:?}; usage: cargo xtask bench net -- [--load http|echo] [--rounds N]"
            ),
        }
    }
    Ok((loads, rounds))
}

pub fn run(args: &[String]) -> Result<()> {
    let (loads, rounds) = options(args)?;
    run::cargo_build_release(&["ws1-probe", "ws1-probe-tests"])?;
    let release = util::target_dir().join("release");
    let (probe, netload) = (release.join("ws1-probe"), release.join("ws1-netload"));
    let logs: PathBuf = util::target_dir().join("bench");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut idle = Command::new("sleep")
        .arg("3600")
        .spawn()
        .context("cannot start sleep")?;
    let outcomes = (|| -> Result<Vec<(&str, Outcome)>> {
        let mut out = Vec::new();
        if loads.contains(&"http") {
            let http = Bench {
                load: Http::start(&logs.join("nginx"))?,
                blocks: Vec::new(),
                warmup: 0,
                rounds,
            };
            out.push(("http", http.measure("http", &probe, idle.id(), &logs)?));
        }
        if loads.contains(&"echo") {
            let echo = Bench {
                load: Echo::start(&netload)?,
                blocks: Vec::new(),
                warmup: 0,
                rounds,
            };
            out.push(("echo", echo.measure("echo", &probe, idle.id(), &logs)?));
        }
        Ok(out)
    })();
    let _ = idle.kill();
    let _ = idle.wait();
    let outcomes = outcomes?;
    for (_, o) in &outcomes {
        report::report(o);
    }
    report::verdicts(&outcomes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_samples_under_the_hooks() {
        let folded = "a;b_[k] 5\nwrk;__send;bpf_trace_run3_[k];bpf_prog_x_[k] 3\nx;bpf_trace_run2_[k] 2\nx;__sys_sendto_[k];call_trace_sock_send_length.constprop.0_[k] 4\nbroken line\n";
        assert_eq!(hook_samples(folded), (9, 14));
    }
}
