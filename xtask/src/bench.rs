//! `cargo xtask bench <what>`: benchmarks of the agent's overhead, run as root (main re-executes
//! xtask through sudo first) and after bootstrap.
//!
//! `syscalls`: what each syscall hook in `CONFIGS` adds to getppid, measured in one run against
//! one long-lived workload process. Each round runs a baseline block before every configuration
//! (and one at the end), so drift on a shared machine shows and cancels: a block's added cost is
//! its median minus the mean of the baseline blocks around it, and a configuration's is the
//! median over rounds. Goals print as PASS/MISS; only errors (a probe failing) fail the run.

use std::{fs, path::PathBuf, process::Command, thread, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    apt,
    bench_util::{Agent, Block, Proc, added, median, other_tracers, rss_kib},
    run, util,
};

pub fn run(what: &str, args: &[String]) -> Result<()> {
    match what {
        "syscalls" if args.is_empty() => syscalls(),
        "syscalls" => bail!("bench syscalls takes no arguments (got {args:?})"),
        "net" => crate::bench_net::run(args),
        "alloc" => crate::bench_alloc::run(args),
        "profile" => crate::bench_profile::run(args),
        "scrape" => crate::bench_scrape::run(args),
        "soak" => crate::bench_soak::run(args),
        "health" => crate::bench_health::run(args),
        "health-sched" => crate::bench_sched::run(args),
        "health-block" => crate::bench_block::run(args),
        "load" => crate::bench_load::run(args),
        "scale" => crate::bench_scale::run(args),
        _ => bail!(
            "unknown benchmark {what}: available: syscalls, net, alloc, profile, scrape, soak, health, health-sched, health-block, load, scale"
        ),
    }
}

/// getppid calls per sample, samples per block, and rounds over all configurations.
const CALLS: u64 = 1_000_000;
const SAMPLES: usize = 5;
const ROUNDS: usize = 3;
/// The configurations, in the order each round runs them (each after a baseline block).
const CONFIGS: [(&str, &str); 6] = [
    ("a", "no probe (baseline)"),
    ("b", "floor: empty raw_tp pair"),
    ("f", "floor + pid_tgid helper per hook"),
    ("c", "agent --pid <bench>"),
    ("d", "agent --pid <idle sleep>"),
    ("e", "bpftrace hist, /pid == bench/"),
];

/// One agent start: configuration, time to ready, VmRSS (KiB) after ready and after its block.
struct AgentRun(&'static str, Duration, [u64; 2]);

#[derive(Default)]
struct Results {
    blocks: Vec<Block>,
    agents: Vec<AgentRun>,
    /// (c): (scraped getppid count, getppid calls made while targeted), per agent start.
    sanity: Vec<(f64, u64)>,
    /// At each baseline block: the 1-min load average and tracers not ours that were running.
    load: Vec<String>,
}

struct Bench {
    probe: PathBuf,
    logs: PathBuf,
    /// `ws1-workload`, driven over stdin/stdout like the integration tests do, and the number of
    /// getppid calls it has made.
    w: Proc,
    calls: u64,
    idle: Proc,
    r: Results,
}

fn syscalls() -> Result<()> {
    apt::ensure_packages(&[("bpftrace", "bpftrace")])?;
    run::cargo_build_release(&["ws1-probe", "ws1-probe-tests"])?;
    let release = util::target_dir().join("release");
    let (probe, workload) = (release.join("ws1-probe"), release.join("ws1-workload"));
    let logs = util::target_dir().join("bench");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;

    let mut w = Proc::spawn("ws1-workload", &mut Command::new(workload), &logs)?;
    w.wait_for_line("ready ", 10)?;
    let idle = Proc::spawn("sleep", Command::new("sleep").arg("600"), &logs)?;
    let (r, calls) = (Results::default(), 0);
    let mut bench = Bench {
        probe,
        logs,
        w,
        calls,
        idle,
        r,
    };
    for round in 1..=ROUNDS {
        for (key, label) in &CONFIGS[1..] {
            eprintln!("bench: round {round}/{ROUNDS}: (a) baseline, then ({key}) {label}");
            bench.block("a")?;
            bench.config(key)?;
        }
    }
    bench.block("a")?;
    bench.w.request("exit")?;
    bench.w.stop()?;
    bench.idle.stop()?;
    bench.report()
}

impl Bench {
    /// A warm-up batch (a quarter of a sample), then the samples.
    fn block(&mut self, key: &'static str) -> Result<()> {
        if key == "a" {
            let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
            let load = load.split(' ').next().unwrap_or("?").to_owned();
            self.r.load.push(load + &other_tracers());
        }
        self.time_getppid(CALLS / 4)?;
        let mut ns = Vec::new();
        for _ in 0..SAMPLES {
            ns.push(self.time_getppid(CALLS)?);
        }
        self.r.blocks.push(Block { key, ns });
        Ok(())
    }

    /// `n` getppid calls timed by the workload; returns ns per call.
    fn time_getppid(&mut self, n: u64) -> Result<f64> {
        let reply = self.w.request(&format!("time-getppid {n}"))?;
        self.calls += n;
        let total = reply
            .strip_prefix("ok ")
            .and_then(|ns| ns.trim().parse::<u64>().ok());
        let total = total.with_context(|| format!("workload: time-getppid said {reply:?}"))?;
        Ok(total as f64 / n as f64)
    }

    /// Starts configuration `key`, waits until it is ready, measures a block, stops it.
    fn config(&mut self, key: &'static str) -> Result<()> {
        let mut cmd = Command::new(&self.probe);
        let mut p = match key {
            "b" | "f" => {
                cmd.arg("bench-floor");
                if key == "f" {
                    cmd.arg("--pid-helper");
                }
                let mut floor = Proc::spawn("bench-floor", &mut cmd, &self.logs)?;
                floor.wait_for_line("ready", 20)?;
                floor
            }
            "e" => {
                let bpftrace = util::find_in_path("bpftrace").context("bpftrace not on PATH")?;
                // The same per-syscall latency histogram, for the workload only.
                let program = format!(
                    "tracepoint:raw_syscalls:sys_enter /pid == {}/ {{ @s[tid] = nsecs; }} \
                     tracepoint:raw_syscalls:sys_exit /@s[tid]/ \
                     {{ @h[args->id] = hist(nsecs - @s[tid]); delete(@s[tid]); }}",
                    self.w.pid()
                );
                let mut cmd = Command::new(bpftrace);
                let mut bt = Proc::spawn("bpftrace", cmd.arg("-e").arg(program), &self.logs)?;
                bt.wait_for_line("Attaching", 60)?;
                thread::sleep(Duration::from_secs(1));
                bt
            }
            _ => return self.agent(key),
        };
        self.block(key)?;
        let status = p.stop()?;
        // bpftrace's exit status on SIGTERM is not ours to judge.
        let (name, tail) = (&p.name, p.log_tail());
        ensure!(
            status.success() || key == "e",
            "{name} exited with {status}: {tail}"
        );
        Ok(())
    }

    /// (c) or (d): the agent targeting the workload or the idle process.
    fn agent(&mut self, key: &'static str) -> Result<()> {
        let (bench, idle) = (self.w.pid(), self.idle.pid());
        let target = if key == "c" { bench } else { idle };
        let name = format!("agent-{key}");
        let mut agent = Agent::start(&self.probe, target, &self.logs, &name)?;
        let rss_ready = rss_kib(&mut agent.proc)?;
        let before = self.calls;
        self.block(key)?;
        let rss = [rss_ready, rss_kib(&mut agent.proc)?];
        if key == "c" {
            let made = self.calls - before;
            self.r.sanity.push((agent.getppid_count()?, made));
        }
        let status = agent.proc.stop()?;
        let tail = agent.proc.log_tail();
        ensure!(status.success(), "{name} exited with {status}: {tail}");
        self.r.agents.push(AgentRun(key, agent.ready, rss));
        Ok(())
    }

    fn added(&self, key: &str) -> Vec<f64> {
        added(&self.r.blocks, key)
    }

    fn report(&self) -> Result<()> {
        println!(
            "\ngetppid cost per configuration ({ROUNDS} rounds x {SAMPLES} samples of {CALLS} calls):"
        );
        println!(
            "configuration                         median ns       min..max ns   added ns   added per round"
        );
        let mut added = Vec::new();
        for (key, label) in CONFIGS {
            let blocks = self.r.blocks.iter().filter(|b| b.key == key);
            let mut ns: Vec<f64> = blocks.flat_map(|b| b.ns.iter().copied()).collect();
            ns.sort_by(f64::total_cmp);
            ensure!(!ns.is_empty(), "no samples for ({key})");
            let mut per_round = self.added(key);
            per_round.sort_by(f64::total_cmp);
            let (mut add, mut range) = ("-".to_owned(), "-".to_owned());
            if let (Some(lo), Some(hi), true) = (per_round.first(), per_round.last(), key != "a") {
                added.push(median(&per_round));
                add = format!("{:+.1}", median(&per_round));
                range = format!("{lo:+.0}..{hi:+.0}");
            }
            let spread = format!("{:.1}..{:.1}", ns[0], ns[ns.len() - 1]);
            let (label, med) = (format!("({key}) {label}"), median(&ns));
            println!("{label:<36} {med:>10.1} {spread:>17} {add:>10} {range:>17}");
        }
        let base = self.r.blocks.iter().filter(|b| b.key == "a");
        let drift: Vec<String> = base.map(|b| format!("{:.0}", median(&b.ns))).collect();
        let (drift, load) = (drift.join(" "), self.r.load.join(" "));
        println!("baseline block medians in run order (ns): {drift}");
        println!("1-min load average at each baseline block [other tracers running]: {load}");
        if load.contains('[') {
            println!("WARNING: other tracers ran; their hooks cost every row, the baseline too");
        }

        println!();
        let mib = |kib: u64| kib as f64 / 1024.0;
        for AgentRun(key, ready, rss) in &self.r.agents {
            let ([after_ready, after_block], ms) = (rss.map(mib), ready.as_millis());
            println!(
                "agent ({key}): ready in {ms} ms; VmRSS {after_ready:.1} MiB when ready, \
                {after_block:.1} MiB after its block"
            );
        }
        for (scraped, made) in &self.r.sanity {
            let ok = *scraped == *made as f64;
            let verdict = if ok { "match" } else { "MISMATCH" };
            println!(
                "sanity (c): ws1_probe_syscall_duration_seconds_count{{syscall=\"getppid\"}} = \
                 {scraped} vs {made} getppid calls made while targeted: {verdict}"
            );
        }

        let [b, f, c, d, e] = added[..] else {
            bail!("missing configurations in the results")
        };
        let rss = mib(self.r.agents.iter().flat_map(|a| a.2).max().unwrap_or(0));
        let ready = self.r.agents.iter().map(|a| a.1.as_secs_f64() * 1e3);
        let ready = ready.fold(0.0, f64::max);
        println!("\ngoals (added ns per getppid: medians over rounds):");
        let goals = [
            ("(c) <= 2.5 x (b)", c, 2.5 * b, "ns"),
            ("(c) <= 0.3 x (e)", c, 0.3 * e, "ns"),
            ("(d) <= (b) + 25 ns", d, b + 25.0, "ns"),
            ("agent VmRSS <= 30 MiB", rss, 30.0, "MiB"),
            ("start to ready <= 1 s", ready, 1000.0, "ms"),
        ];
        for (name, value, limit, unit) in goals {
            let verdict = if value <= limit { "PASS" } else { "MISS" };
            println!("  {verdict}  {name:<22} {value:>8.1} {unit:<3} (limit {limit:.1} {unit})");
        }
        // Any per-process filter must learn the current process, which takes a helper call per
        // hook; (f) is that floor, so (d) - (f) is what the agent's filter itself adds.
        println!(
            "\ncontext: one bpf_get_current_pid_tgid call per hook adds {:.1} ns per syscall over the \
             empty pair; the agent's untargeted path adds {:.1} ns over that",
            f - b,
            d - f
        );
        Ok(())
    }
}
