//! `cargo xtask bench health-sched`: what the run-queue hook (`tp_btf` `sched_switch` reading
//! the kernel's `sched_info`, the agent's default) adds per context switch.
//!
//! The load is `ws1-schedload pingpong N`: two threads pinned to one CPU pass a byte back and
//! forth over two pipes, so every round trip is two wakeups and two context switches on that
//! CPU; ns per switch is the round trip's time / 2. Configurations, each run after a baseline
//! block as `bench syscalls` does (a block's added cost is its median minus the mean of the
//! baseline blocks around it; a configuration's is the median over rounds):
//! (a) no programs, (b) the floor: an empty `tp_btf` program on `sched_switch`
//! (`ws1-probe bench-floor --sched`), (c) the agent with only the `sched` collector observing
//! the ping-pong process (every switch records a wait), (d) the same agent observing an idle
//! process (the cost every unobserved switch of the machine pays). Goal: (c) and (d) add at
//! most 1.5 x what (b) adds. Goals print PASS/MISS; only errors fail the run.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    bench_util::{Agent, Block, Proc, added, median, other_tracers},
    run, util,
};

/// Round trips per sample, samples per block, rounds over all configurations.
const TRIPS: u64 = 20_000;
const SAMPLES: usize = 5;
const ROUNDS: usize = 5;
const CONFIGS: [(&str, &str); 4] = [
    ("a", "no programs (baseline)"),
    ("b", "floor: empty tp_btf sched_switch"),
    ("c", "agent --collectors sched, observed"),
    ("d", "agent --collectors sched, unobserved"),
];
/// The goal: added ns per switch at most this multiple of the floor's.
const GOAL_RATIO: f64 = 1.5;

struct Bench {
    probe: PathBuf,
    logs: PathBuf,
    w: Proc,
    idle: Proc,
    blocks: Vec<Block>,
    load: Vec<String>,
    /// (c): run-queue waits the agent counted for the ping-pong process vs switches made.
    sanity: Vec<(f64, u64)>,
    switches: u64,
}

pub fn run(args: &[String]) -> Result<()> {
    ensure!(
        args.is_empty(),
        "bench health-sched takes no arguments (got {args:?})"
    );
    run::cargo_build_release(&["ws1-probe", "ws1-probe-tests"])?;
    let release = util::target_dir().join("release");
    let logs = util::target_dir().join("bench");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut w = Proc::spawn(
        "ws1-schedload",
        &mut Command::new(release.join("ws1-schedload")),
        &logs,
    )?;
    w.wait_for_line("ready ", 10)?;
    let idle = Proc::spawn("sleep", Command::new("sleep").arg("600"), &logs)?;
    let mut bench = Bench {
        probe: release.join("ws1-probe"),
        logs,
        w,
        idle,
        blocks: Vec::new(),
        load: Vec::new(),
        sanity: Vec::new(),
        switches: 0,
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
    report(&bench)?;
    Ok(())
}

impl Bench {
    fn block(&mut self, key: &'static str) -> Result<()> {
        if key == "a" {
            let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
            let load = load.split(' ').next().unwrap_or("?").to_owned();
            self.load.push(load + &other_tracers());
        }
        self.time_switch(TRIPS / 4)?;
        let mut ns = Vec::new();
        for _ in 0..SAMPLES {
            ns.push(self.time_switch(TRIPS)?);
        }
        self.blocks.push(Block { key, ns });
        Ok(())
    }

    /// `n` round trips; returns ns per context switch (two per round trip).
    fn time_switch(&mut self, n: u64) -> Result<f64> {
        let reply = self.w.request(&format!("pingpong {n}"))?;
        self.switches += 2 * n;
        let total = reply
            .strip_prefix("ok ")
            .and_then(|ns| ns.trim().parse::<u64>().ok())
            .with_context(|| format!("workload: pingpong said {reply:?}"))?;
        Ok(total as f64 / (2 * n) as f64)
    }

    fn config(&mut self, key: &'static str) -> Result<()> {
        if key == "b" {
            let mut cmd = Command::new(&self.probe);
            cmd.args(["bench-floor", "--sched"]);
            let mut floor = Proc::spawn("bench-floor-sched", &mut cmd, &self.logs)?;
            floor.wait_for_line("ready", 20)?;
            self.block(key)?;
            let status = floor.stop()?;
            let tail = floor.log_tail();
            ensure!(status.success(), "bench-floor exited with {status}: {tail}");
            return Ok(());
        }
        let target = if key == "c" {
            self.w.pid()
        } else {
            self.idle.pid()
        };
        let name = format!("agent-sched-{key}");
        let args = ["--pid", &target.to_string(), "--collectors", "sched"];
        let mut agent = Agent::start_with(&self.probe, &args, &self.logs, &name)?;
        let before = self.switches;
        self.block(key)?;
        if key == "c" {
            let waits = runqueue_count(&agent.scrape()?)?;
            self.sanity.push((waits, self.switches - before));
        }
        let status = agent.proc.stop()?;
        let tail = agent.proc.log_tail();
        ensure!(status.success(), "{name} exited with {status}: {tail}");
        Ok(())
    }
}

/// Sum of `ws1_probe_runqueue_latency_seconds_count` over services.
fn runqueue_count(body: &str) -> Result<f64> {
    let prefix = "ws1_probe_runqueue_latency_seconds_count{";
    let mut total = 0.0;
    for line in body.lines().filter(|l| l.starts_with(prefix)) {
        let value = line.rsplit(' ').next().unwrap_or_default();
        total += value
            .parse::<f64>()
            .with_context(|| format!("bad sample {line:?}"))?;
    }
    Ok(total)
}

fn report(bench: &Bench) -> Result<()> {
    println!(
        "\nns per context switch ({ROUNDS} rounds x {SAMPLES} samples of {TRIPS} pipe round trips, 2 switches each, one CPU):"
    );
    println!(
        "configuration                             median ns     min..max ns   added ns   added per round"
    );
    let mut adds = Vec::new();
    for (key, label) in CONFIGS {
        let mut ns: Vec<f64> = bench
            .blocks
            .iter()
            .filter(|b| b.key == key)
            .flat_map(|b| b.ns.iter().copied())
            .collect();
        ns.sort_by(f64::total_cmp);
        ensure!(!ns.is_empty(), "no samples for ({key})");
        let mut per_round = added(&bench.blocks, key);
        per_round.sort_by(f64::total_cmp);
        let (mut add, mut range) = ("-".to_owned(), "-".to_owned());
        if let (Some(lo), Some(hi), true) = (per_round.first(), per_round.last(), key != "a") {
            adds.push(median(&per_round));
            add = format!("{:+.1}", median(&per_round));
            range = format!("{lo:+.0}..{hi:+.0}");
        }
        let spread = format!("{:.0}..{:.0}", ns[0], ns[ns.len() - 1]);
        let label = format!("({key}) {label}");
        println!(
            "{label:<40} {:>10.1} {spread:>15} {add:>10} {range:>17}",
            median(&ns)
        );
    }
    let drift: Vec<String> = bench
        .blocks
        .iter()
        .filter(|b| b.key == "a")
        .map(|b| format!("{:.0}", median(&b.ns)))
        .collect();
    println!(
        "baseline block medians in run order (ns): {}",
        drift.join(" ")
    );
    let load = bench.load.join(" ");
    println!("1-min load average at each baseline block [other tracers running]: {load}");
    for (waits, switches) in &bench.sanity {
        println!(
            "sanity (c): {waits} run-queue waits counted for the ping-pong process over {switches} switches"
        );
    }
    let [b, c, d] = adds[..] else {
        bail!("missing configurations in the results")
    };
    println!("\ngoals (added ns per context switch, medians over rounds):");
    for (name, value) in [("(c) observed", c), ("(d) unobserved", d)] {
        let limit = GOAL_RATIO * b;
        let verdict = if value <= limit { "PASS" } else { "MISS" };
        let ratio = if b > 0.0 { value / b } else { f64::NAN };
        println!(
            "  {verdict}  {name:<16} {value:>7.1} ns = {ratio:.2} x the floor (limit {GOAL_RATIO} x {b:.1} = {limit:.1} ns)"
        );
    }
    Ok(())
}
