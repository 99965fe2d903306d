//! `cargo xtask bench profile` (also alone: `cargo xtask bench profile python`): what Python
//! stacks cost per sample against native-only stacks of the same processes. Prints figures;
//! the goal (≤ 2× the native-only cost) is reported, not enforced.
//!
//! Two Debian `python3` (CPython 3.11) processes run three nested functions, keeping both CPUs
//! busy. Each is profiled by `ws1-probe profile` at `FREQUENCY` Hz four times: frame-pointer
//! and DWARF unwinding (`--unwind fp` / `dwarf`), each with Python stacks and without
//! (`--no-python`). Over a window that leaves out start-up and the final drain:
//! - kernel: run time of `profile_cpu` from the kernel's BPF stats (fdinfo of the profiler's
//!   program fd, `kernel.bpf_stats_enabled` on for the run);
//! - userspace: on-CPU time of the profiler's threads (schedstat);
//!
//! both divided by the workload's samples (FREQUENCY × its CPU-seconds in the window).

use std::{
    fs,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    apt,
    bench_profile::{BpfStats, find_program, program_stats, task_cpu_ns, wait_for_log},
    bench_util::Proc,
};

const FREQUENCY: u64 = 499;
const WINDOW: Duration = Duration::from_secs(6);
const SETTLE: Duration = Duration::from_millis(1500);
const PROFILE_SECS: u64 = 9;
const GOAL_RATIO: f64 = 2.0;

const SCRIPT: &str = r#"
import sys
def inner_a(n):
    s = 0
    for i in range(n):
        s += i * i
    return s
def inner_b(n):
    s = 0
    for i in range(n):
        s += i * i
    return s
def middle():
    inner_a(300000)
    inner_b(100000)
def outer():
    while True:
        middle()
print("ready", flush=True)
outer()
"#;

struct Run {
    unwind: &'static str,
    python: bool,
    kernel_ns: f64,
    user_ns: f64,
    /// Share of the profile's samples whose stack holds the Python function `outer`.
    outer_share: f64,
}

pub fn run(probe: &Path, logs: &Path) -> Result<()> {
    apt::ensure_packages(&[("python3", "python3")])?;
    let script = logs.join("python-nested.py");
    fs::write(&script, SCRIPT).with_context(|| format!("cannot write {}", script.display()))?;
    let mut workers = Vec::new();
    for i in 0..2 {
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(&script);
        let mut p = Proc::spawn(&format!("python-{i}"), &mut cmd, logs)?;
        p.wait_for_line("ready", 10)?;
        workers.push(p);
    }
    let pids: Vec<u32> = workers.iter().map(Proc::pid).collect();
    let mut runs = Vec::new();
    for unwind in ["fp", "dwarf"] {
        for python in [false, true] {
            eprintln!(
                "bench: python: profile --unwind {unwind}{} ({PROFILE_SECS} s)",
                if python { "" } else { " --no-python" }
            );
            runs.push(profiled(probe, logs, &pids, unwind, python)?);
        }
    }
    for mut w in workers {
        w.stop()?;
    }
    report(&runs);
    Ok(())
}

fn profiled(
    probe: &Path,
    logs: &Path,
    pids: &[u32],
    unwind: &'static str,
    python: bool,
) -> Result<Run> {
    let name = format!(
        "profile-python-{unwind}-{}",
        if python { "on" } else { "off" }
    );
    let folded = logs.join(format!("{name}.folded"));
    let mut cmd = Command::new(probe);
    cmd.arg("profile");
    for pid in pids {
        cmd.args(["--pid", &pid.to_string()]);
    }
    cmd.args(["--duration", &format!("{PROFILE_SECS}s")])
        .args(["--frequency", &FREQUENCY.to_string()])
        .args(["--unwind", unwind])
        .arg("-o")
        .arg(&folded);
    if !python {
        cmd.arg("--no-python");
    }
    let stats = BpfStats::enable()?;
    let mut p = Proc::spawn(&name, &mut cmd, logs)?;
    wait_for_log(&mut p, "sampling ", Duration::from_secs(60))?;
    thread::sleep(SETTLE);
    let (program, _) = find_program(p.pid())?;
    let work = |pids: &[u32]| -> Result<u64> {
        pids.iter()
            .map(|&pid| task_cpu_ns(pid))
            .sum::<Result<u64>>()
    };
    let (b0, u0, w0) = (
        program_stats(p.pid(), &program)?,
        task_cpu_ns(p.pid())?,
        work(pids)?,
    );
    let at = Instant::now();
    thread::sleep(WINDOW);
    let (b1, u1, w1) = (
        program_stats(p.pid(), &program)?,
        task_cpu_ns(p.pid())?,
        work(pids)?,
    );
    let secs = at.elapsed().as_secs_f64();
    drop(stats);
    let status = p.wait_exit(Duration::from_secs(PROFILE_SECS + 60))?;
    ensure!(
        status.success(),
        "{name} exited with {status}: {}",
        p.log_tail()
    );
    let samples = FREQUENCY as f64 * w1.saturating_sub(w0) as f64 / 1e9;
    ensure!(
        samples > 0.0,
        "{name}: the workload did not run in the {secs:.1} s window"
    );
    let text = fs::read_to_string(&folded)
        .with_context(|| format!("cannot read the profile {}", folded.display()))?;
    let (mut total, mut outer) = (0u64, 0u64);
    for line in text.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let n: u64 = n.parse().unwrap_or(0);
        total += n;
        if stack.split(';').any(|f| f == "outer") {
            outer += n;
        }
    }
    Ok(Run {
        unwind,
        python,
        kernel_ns: b1.0.saturating_sub(b0.0) as f64 / samples,
        user_ns: u1.saturating_sub(u0) as f64 / samples,
        outer_share: outer as f64 / total.max(1) as f64,
    })
}

fn report(runs: &[Run]) {
    println!();
    println!(
        "Python stacks (2 × Debian python3, {FREQUENCY} Hz, {} s windows): cost per sample",
        WINDOW.as_secs()
    );
    println!(
        "{:<28} {:>14} {:>14} {:>14} {:>12}",
        "run", "kernel ns", "userspace ns", "total ns", "`outer` %"
    );
    for r in runs {
        println!(
            "{:<28} {:>14.0} {:>14.0} {:>14.0} {:>11.1}%",
            format!(
                "--unwind {}{}",
                r.unwind,
                if r.python { "" } else { " --no-python" }
            ),
            r.kernel_ns,
            r.user_ns,
            r.kernel_ns + r.user_ns,
            100.0 * r.outer_share
        );
    }
    for pair in runs.chunks(2) {
        if let [native, py] = pair {
            let ratio = (py.kernel_ns + py.user_ns) / (native.kernel_ns + native.user_ns).max(1.0);
            let kernel = py.kernel_ns / native.kernel_ns.max(1.0);
            println!(
                "--unwind {}: with Python stacks {ratio:.2}× the native-only cost per sample \
                 (kernel alone {kernel:.2}×); goal ≤ {GOAL_RATIO}× — {}",
                py.unwind,
                if ratio <= GOAL_RATIO {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
    }
}
