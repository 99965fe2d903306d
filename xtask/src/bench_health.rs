//! `cargo xtask bench health`: what the service-health collectors cost.
//!
//! procfs part (this file's [`procfs_sampling`]): the resources collector's sampling in host
//! mode with 500 extra sleeping processes, timed in-process by the hidden `ws1-probe
//! bench-health` (the collector's own code, every process on the host, one service per command
//! name), printed as CPU time per sample and as a share of one core at the agent's 5 s
//! sampling interval, alone and with the full read each process gets at least once a minute.
//! Goal: ≤ 0.2 % of a core. Kernel-hook parts are added as their own
//! functions.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use crate::{run, util};

/// Sleeping processes started for the procfs measurement.
const EXTRA_PROCESSES: usize = 500;
/// The goal: procfs sampling cost as a share of one core.
const GOAL_CORE_PERCENT: f64 = 0.2;

pub fn run(args: &[String]) -> Result<()> {
    ensure!(
        args.is_empty(),
        "bench health takes no arguments (got {args:?})"
    );
    run::cargo_build_release(&["ws1-probe"])?;
    procfs_sampling()?;
    // The kernel parts: the run-queue hook per context switch and the block hooks per I/O,
    // each against empty programs on the same hooks (also runnable alone as `bench
    // health-sched` and `bench health-block`).
    crate::bench_sched::run(&[])?;
    crate::bench_block::run(&[])
}

/// Kills the sleepers when dropped, also on errors.
struct Sleepers(Vec<Child>);

impl Drop for Sleepers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn procfs_sampling() -> Result<()> {
    let probe = util::target_dir().join("release").join("ws1-probe");
    let measure = || -> Result<serde_json::Value> {
        let out = Command::new(&probe)
            .args(["bench-health", "--rounds", "20"])
            .output()
            .context("running ws1-probe bench-health")?;
        ensure!(
            out.status.success(),
            "bench-health failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).context("bench-health printed no JSON")
    };
    let mut sleepers = Sleepers(Vec::with_capacity(EXTRA_PROCESSES));
    println!("procfs sampling, host mode (ws1-probe bench-health, 20 samples each):");
    println!(
        "  processes   threads   full read µs   CPU µs/sample   % of a core at 5 s   with a full read a minute (goal ≤ {GOAL_CORE_PERCENT})"
    );
    let print = |v: &serde_json::Value| {
        let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {:>9}   {:>7}   {:>12.0}   {:>13.0}   {:>18.3}   {:>8.3}",
            num("processes"),
            num("threads"),
            num("full_sample_cpu_us"),
            num("sample_cpu_us"),
            num("core_percent"),
            num("core_percent_amortized")
        );
    };
    let base = measure()?;
    print(&base);
    for _ in 0..EXTRA_PROCESSES {
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start sleep")?;
        sleepers.0.push(child);
    }
    std::thread::sleep(Duration::from_millis(200));
    let loaded = measure()?;
    print(&loaded);
    drop(sleepers);
    let pct = loaded["core_percent_amortized"]
        .as_f64()
        .unwrap_or(f64::NAN);
    println!(
        "  with {EXTRA_PROCESSES} more processes: {pct:.3} % of a core ({}); host subset read: {:.0} µs per scrape",
        if pct <= GOAL_CORE_PERCENT {
            "within the goal"
        } else {
            "over the goal"
        },
        loaded["host_read_cpu_us"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(())
}
