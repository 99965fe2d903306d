//! `cargo xtask bench profile`: what the CPU profiler costs, and how long symbolizing a large
//! binary takes. Prints figures; only errors (a process failing) fail the run.
//!
//! Overhead: `ws1-probe profile --pid P` at 99 Hz against `ws1-burn --threads 2`, which keeps
//! both CPUs busy, so nearly every tick samples the workload (less so when others share the
//! machine: per-sample figures divide by the workload's samples, estimated from its CPU time). Frame-pointer stacks are measured
//! on `ws1-burn-fp` (`--unwind fp`), DWARF unwinding on `ws1-burn-nofp` (`--unwind dwarf`, what
//! `auto` picks for it). Each profiler run is measured over a window that starts a second after
//! it began sampling and ends before it stops, so loading and verifying the programs and the
//! final drain, symbolization and write are left out (they are shown apart):
//! - kernel side: run time and run count of the `profile_cpu` program from the kernel's BPF
//!   stats (`kernel.bpf_stats_enabled` is on while a profiler runs and restored after; the
//!   switch is machine-wide, so a second bench toggling it at the same time would cut a window
//!   short), read from the fdinfo of that profiler's program fd;
//! - userspace: on-CPU time of the profiler's threads (`/proc/PID/task/*/schedstat`, in ns; the
//!   tick-granular utime+stime of `/proc/PID/stat` is shown beside it as a cross-check).
//!
//! The cross-check is the work the workload got done: `ws1-burn --report` counts rounds per
//! thread and prints the counts at each SIGUSR1, so rounds/s are taken over exactly the same
//! window, and over baseline blocks of the same length without a profiler before and after each
//! profiled one (as `bench syscalls` interleaves its baselines), which also shows the noise.
//! Rounds per second of wall time move with whatever else the shared machine runs; rounds per
//! CPU-second of the workload's own threads do not, and still include what a sample costs the
//! thread it interrupts, so both are shown.
//!
//! Symbolization: `ws1-probe bench-symbolize`, which symbolizes function addresses of the
//! release `ws1-probe` binary in its own process, cold and warm.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::{
    apt,
    bench_util::{Proc, median, other_tracers},
    run, util,
};

/// Samples per second per CPU, and the busy workload threads (one per vCPU of the test VM).
const FREQUENCY: u64 = 99;
const THREADS: u64 = 2;
/// The measured window of each profiler run, and how long after its start line it begins.
const WINDOW: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_secs(1);
/// The profiler's `--duration`: the window plus a second either side.
const PROFILE_SECS: u64 = 12;
/// Profiled runs per mode; each has a baseline block before it and the last one after it too.
const ROUNDS: usize = 2;
/// The goal: kernel plus userspace cost, in % of one core.
const GOAL_PCT: f64 = 1.0;
/// Addresses per call of `bench-symbolize`.
const SYM_ADDRESSES: usize = 1000;
/// The BPF program that takes the samples.
const PROGRAM: &str = "profile_cpu";
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// An unwinding mode under test: its key, the workload binary and the `--unwind` value.
struct Mode {
    key: &'static str,
    burn: PathBuf,
    unwind: &'static str,
    /// Processes the profiler's start line must report as unwound with DWARF.
    dwarf_processes: u32,
}

pub fn run(args: &[String]) -> Result<()> {
    let python_only = args == ["python"];
    ensure!(
        args.is_empty() || python_only,
        "bench profile takes no arguments, or `python` for the Python part alone (got {args:?})"
    );
    apt::ensure_packages(&[("bpftool", "bpftool")])?;
    run::cargo_build_release(&["ws1-probe", "ws1-probe-tests"])?;
    let (burn_fp, burn_nofp) = burn_binaries()?;
    let probe = util::target_dir().join("release/ws1-probe");
    let logs = util::target_dir().join("bench");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let tick_hz = clock_ticks()?;
    let ctx = Ctx {
        probe,
        logs,
        tick_hz,
    };

    let modes = [
        Mode {
            key: "fp",
            burn: burn_fp,
            unwind: "fp",
            dwarf_processes: 0,
        },
        Mode {
            key: "dwarf",
            burn: burn_nofp,
            unwind: "dwarf",
            dwarf_processes: 1,
        },
    ];
    if python_only {
        return crate::bench_python::run(&ctx.probe, &ctx.logs);
    }
    let mut results = Vec::new();
    for mode in &modes {
        results.push(measure_mode(&ctx, mode)?);
    }
    eprintln!("bench: symbolizing {SYM_ADDRESSES} addresses of the release ws1-probe binary");
    let sym = symbolize(&ctx)?;
    report(&results, &sym, ctx.tick_hz)?;
    crate::bench_python::run(&ctx.probe, &ctx.logs)
}

struct Ctx {
    probe: PathBuf,
    logs: PathBuf,
    /// USER_HZ, the unit of /proc/PID/stat times.
    tick_hz: u64,
}

/// The burn binaries of the current build: the paths tests/build.rs hands the tests crate
/// (`WS1_BURN_FP`, `WS1_BURN_NOFP`), read from cargo's build-script messages rather than by
/// globbing `target/release/build/ws1-probe-tests-*`, where stale copies of other builds lie.
fn burn_binaries() -> Result<(PathBuf, PathBuf)> {
    let mut cmd = util::cargo();
    cmd.args(["build", "--release", "-p", "ws1-probe-tests"])
        .arg("--message-format=json");
    let out = util::capture(&mut cmd)?;
    let (mut fp, mut nofp) = (None, None);
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "build-script-executed" {
            continue;
        }
        for pair in msg["env"].as_array().into_iter().flatten() {
            match (pair[0].as_str(), pair[1].as_str()) {
                (Some("WS1_BURN_FP"), Some(path)) => fp = Some(PathBuf::from(path)),
                (Some("WS1_BURN_NOFP"), Some(path)) => nofp = Some(PathBuf::from(path)),
                _ => {}
            }
        }
    }
    let (Some(fp), Some(nofp)) = (fp, nofp) else {
        bail!(
            "cargo reported no WS1_BURN_FP/WS1_BURN_NOFP from tests/build.rs: check that \
             `cargo build --release -p ws1-probe-tests` builds the burn workloads"
        );
    };
    for path in [&fp, &nofp] {
        ensure!(path.is_file(), "{} does not exist", path.display());
    }
    Ok((fp, nofp))
}

/// USER_HZ from `getconf CLK_TCK`.
fn clock_ticks() -> Result<u64> {
    let out = util::capture(Command::new("getconf").arg("CLK_TCK"))?;
    let hz: u64 = out
        .trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK printed {out:?}"))?;
    ensure!(hz > 0, "getconf CLK_TCK printed 0");
    Ok(hz)
}

/// Work the workload's threads got done over a window.
#[derive(Clone, Copy)]
struct Rate {
    /// Rounds per second of wall time, all threads together.
    wall: f64,
    /// Rounds per CPU-second of the workload's threads.
    cpu: f64,
}

/// What one mode measured: baseline block rates (in run order) and the profiled runs.
struct ModeRun {
    key: &'static str,
    baselines: Vec<Rate>,
    runs: Vec<ProfRun>,
    /// 1-min load average at each baseline block, with tracers not ours.
    load: Vec<String>,
}

/// One profiled run.
struct ProfRun {
    /// Wall time of the window.
    wall: Duration,
    /// `profile_cpu` run time (ns) and runs over the window.
    bpf_ns: u64,
    bpf_runs: u64,
    /// Profiler on-CPU ns over the window (schedstat) and its utime+stime ticks.
    user_ns: u64,
    user_ticks: u64,
    /// Profiler CPU ticks from its start to the window, and from the window to its exit.
    startup_ticks: u64,
    finish_ticks: u64,
    /// Samples in the profile written, and those with ws1_burn_three / ws1_burn_one on stack.
    samples: u64,
    three: u64,
    one: u64,
    /// Workload rate over the window, and its threads' CPU-seconds there.
    rate: Rate,
    window_burn_cpu_s: f64,
    /// Workload CPU-seconds while the profiler sampled (start line to the end of --duration).
    burn_cpu_s: f64,
    /// From the profiler's start line: processes seen, of them unwound with DWARF.
    processes: (u32, u32),
    /// `profile_cpu` programs loaded by others.
    other_programs: usize,
}

impl ProfRun {
    fn secs(&self) -> f64 {
        self.wall.as_secs_f64()
    }
    fn bpf_pct(&self) -> f64 {
        100.0 * self.bpf_ns as f64 / 1e9 / self.secs()
    }
    fn user_pct(&self) -> f64 {
        100.0 * self.user_ns as f64 / 1e9 / self.secs()
    }
    fn bpf_ns_per_run(&self) -> f64 {
        self.bpf_ns as f64 / self.bpf_runs.max(1) as f64
    }
    /// Samples of the workload in the window, estimated as FREQUENCY × its CPU-seconds (the
    /// profile itself spans more than the window). Runs on a tick that finds another task on
    /// the CPU return early; when the machine is busy with others there are many of those.
    fn window_samples(&self) -> f64 {
        FREQUENCY as f64 * self.window_burn_cpu_s
    }
    /// All of the program's run time over the workload's samples.
    fn bpf_ns_per_sample(&self) -> f64 {
        self.bpf_ns as f64 / self.window_samples()
    }
    fn user_ns_per_sample(&self) -> f64 {
        self.user_ns as f64 / self.window_samples()
    }
    /// Program runs over the window against FREQUENCY × CPUs × seconds.
    fn runs_share(&self) -> f64 {
        self.bpf_runs as f64 / (FREQUENCY * THREADS) as f64 / self.secs()
    }
    /// Samples in the profile against FREQUENCY × the workload's CPU-seconds: every tick
    /// that finds a workload thread on a CPU should be one sample.
    fn samples_share(&self) -> f64 {
        self.samples as f64 / FREQUENCY as f64 / self.burn_cpu_s
    }
    /// Share of the CPUs the workload got while it was profiled.
    fn burn_share(&self) -> f64 {
        self.burn_cpu_s / (THREADS * PROFILE_SECS) as f64
    }
}

/// Change of a profiled run's rates against the mean of the baseline blocks either side, in %.
fn changes(m: &ModeRun, i: usize) -> (f64, f64) {
    let (a, b, r) = (m.baselines[i], m.baselines[i + 1], m.runs[i].rate);
    (
        pct_change(r.wall, (a.wall + b.wall) / 2.0),
        pct_change(r.cpu, (a.cpu + b.cpu) / 2.0),
    )
}

/// The workload for one mode, baseline blocks interleaved with profiled runs.
fn measure_mode(ctx: &Ctx, mode: &Mode) -> Result<ModeRun> {
    let name = format!("burn-{}", mode.key);
    let mut cmd = Command::new(&mode.burn);
    cmd.args(["--threads", &THREADS.to_string(), "--report"]);
    let mut burn = Proc::spawn(&name, &mut cmd, &ctx.logs)?;
    burn.wait_for_line("ready ", 10)?;
    // Threads started and caches warm before the first block.
    thread::sleep(Duration::from_secs(1));
    let mut m = ModeRun {
        key: mode.key,
        baselines: Vec::new(),
        runs: Vec::new(),
        load: Vec::new(),
    };
    for round in 1..=ROUNDS + 1 {
        eprintln!(
            "bench: {}: baseline block {round} ({} s, no profiler)",
            mode.key,
            WINDOW.as_secs()
        );
        m.load.push(load_note());
        let before = rounds(&mut burn)?;
        thread::sleep(WINDOW);
        let after = rounds(&mut burn)?;
        m.baselines.push(before.rate_to(&after)?);
        if round <= ROUNDS {
            eprintln!(
                "bench: {}: profiled run {round}/{ROUNDS} (`profile --unwind {}`, {PROFILE_SECS} s)",
                mode.key, mode.unwind
            );
            let run = profiled(ctx, mode, &mut burn, round)?;
            let before = m.baselines[round - 1];
            eprintln!(
                "bench: {}: BPF {:.0} ns/sample ({:.3} %), userspace {:.3} %, {:.1} % of \
                 expected samples; workload vs the block before: {:+.2} % rounds/s, {:+.2} % \
                 rounds/CPU-s",
                mode.key,
                run.bpf_ns_per_sample(),
                run.bpf_pct(),
                run.user_pct(),
                100.0 * run.samples_share(),
                pct_change(run.rate.wall, before.wall),
                pct_change(run.rate.cpu, before.cpu),
            );
            m.runs.push(run);
        }
    }
    let status = burn.stop()?;
    // Stopped by our SIGTERM: any end but a crash of its own is fine.
    ensure!(
        status.code().is_none_or(|c| c == 0),
        "{name} exited with {status}: {}",
        burn.log_tail()
    );
    Ok(m)
}

/// The 1-min load average, and other tracers running (they cost the workload too).
fn load_note() -> String {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split(' ').next().unwrap_or("?").to_owned();
    load + &other_tracers()
}

/// One `ws1-probe profile` run against `burn`, measured over its window.
fn profiled(ctx: &Ctx, mode: &Mode, burn: &mut Proc, round: usize) -> Result<ProfRun> {
    let name = format!("profile-{}-{round}", mode.key);
    let folded = ctx.logs.join(format!("{name}.folded"));
    let mut cmd = Command::new(&ctx.probe);
    cmd.args(["profile", "--pid", &burn.pid().to_string()])
        .args(["--duration", &format!("{PROFILE_SECS}s")])
        .args(["--frequency", &FREQUENCY.to_string()])
        .args(["--unwind", mode.unwind])
        .arg("-o")
        .arg(&folded);
    let stats = BpfStats::enable()?;
    let mut p = Proc::spawn(&name, &mut cmd, &ctx.logs)?;
    let start_line = wait_for_log(&mut p, "sampling ", Duration::from_secs(60))?;
    // The sampler is attached before this line and --duration counts from it.
    let (sampling, burn_cpu0) = (Instant::now(), task_cpu_ns(burn.pid())?);
    let processes = dwarf_counts(&start_line)
        .with_context(|| format!("{name}: unexpected start line {start_line:?}"))?;
    ensure!(
        processes == (1, mode.dwarf_processes),
        "{name}: the profiler saw {} process(es), {} unwound with DWARF; expected 1 and {} \
         (start line {start_line:?})",
        processes.0,
        processes.1,
        mode.dwarf_processes
    );
    thread::sleep(SETTLE);

    let (program, other_programs) = find_program(p.pid())?;
    let s1 = Snapshot::take(p.pid(), &program, burn)?;
    thread::sleep(WINDOW);
    let s2 = Snapshot::take(p.pid(), &program, burn)?;
    drop(stats);
    thread::sleep(
        (sampling + Duration::from_secs(PROFILE_SECS)).saturating_duration_since(Instant::now()),
    );
    let burn_cpu_s = task_cpu_ns(burn.pid())?.saturating_sub(burn_cpu0) as f64 / 1e9;

    let exit_ticks = ticks_at_exit(&mut p, Duration::from_secs(PROFILE_SECS + 60))?;
    let status = p.wait_exit(Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "{name} exited with {status}: {}",
        p.log_tail()
    );
    let text = fs::read_to_string(&folded)
        .with_context(|| format!("cannot read the profile {}", folded.display()))?;
    let (samples, three, one) = fold_counts(&text);
    ensure!(samples > 0, "{name}: no samples in {}", folded.display());
    Ok(ProfRun {
        wall: s2.at.duration_since(s1.at),
        bpf_ns: s2.bpf.0.saturating_sub(s1.bpf.0),
        bpf_runs: s2.bpf.1.saturating_sub(s1.bpf.1),
        user_ns: s2.cpu_ns.saturating_sub(s1.cpu_ns),
        user_ticks: s2.ticks.saturating_sub(s1.ticks),
        startup_ticks: s1.ticks,
        finish_ticks: exit_ticks.saturating_sub(s2.ticks),
        samples,
        three,
        one,
        rate: s1.rounds.rate_to(&s2.rounds)?,
        window_burn_cpu_s: s2.rounds.cpu_ns.saturating_sub(s1.rounds.cpu_ns) as f64 / 1e9,
        burn_cpu_s,
        processes,
        other_programs,
    })
}

/// Turns `kernel.bpf_stats_enabled` on and back to what it was when dropped, so an error path
/// does not leave every BPF program on the machine paying for the stats.
pub(crate) struct BpfStats {
    old: String,
}

impl BpfStats {
    pub(crate) fn enable() -> Result<BpfStats> {
        let old = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("cannot read {BPF_STATS}: the kernel lacks BPF stats"))?;
        fs::write(BPF_STATS, "1")
            .with_context(|| format!("cannot enable BPF stats: write 1 to {BPF_STATS} as root"))?;
        Ok(BpfStats {
            old: old.trim().to_owned(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(err) = fs::write(BPF_STATS, &self.old) {
            eprintln!(
                "bench: cannot restore {BPF_STATS} to {}: {err}; write it by hand",
                self.old
            );
        }
    }
}

/// Waits until a line of `p`'s stderr log starts with `prefix` and returns it.
pub(crate) fn wait_for_log(p: &mut Proc, prefix: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = fs::read_to_string(&p.log).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.starts_with(prefix)) {
            return Ok(line.to_owned());
        }
        p.fail_if_exited()?;
        ensure!(
            Instant::now() < deadline,
            "{}: no line starting {prefix:?} within {timeout:?}: {}",
            p.name,
            p.log_tail()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// (processes, unwound with DWARF) from "sampling … (N processes, M unwound with DWARF; …".
fn dwarf_counts(line: &str) -> Option<(u32, u32)> {
    let (_, rest) = line.rsplit_once('(')?;
    let (n, rest) = rest.split_once(" processes, ")?;
    let (m, _) = rest.split_once(" unwound with DWARF")?;
    Some((n.trim().parse().ok()?, m.trim().parse().ok()?))
}

/// The id of `profile_cpu` that process `pid` loaded, and how many others are loaded: bpftool
/// finds the programs by name, the process's fdinfo says which is its own.
pub(crate) fn find_program(pid: u32) -> Result<(String, usize)> {
    let out =
        util::capture(Command::new("bpftool").args(["prog", "show", "name", PROGRAM, "--json"]))?;
    let json: Value = serde_json::from_str(&out)
        .with_context(|| format!("bpftool printed no JSON: {}", out.trim()))?;
    // One program comes as an object, several as an array.
    let progs = match json {
        Value::Array(v) => v,
        one => vec![one],
    };
    let ids: Vec<String> = progs
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .map(|id| id.to_string())
        .collect();
    for (_, info) in fdinfos(pid)? {
        if let Some(id) = field(&info, "prog_id")
            && ids.contains(&id.to_owned())
        {
            return Ok((id.to_owned(), ids.len() - 1));
        }
    }
    bail!(
        "process {pid} holds no {PROGRAM} program (bpftool lists ids {ids:?}): did the profiler \
         attach its sampler?"
    )
}

/// (fd, text) of each /proc/PID/fdinfo entry.
fn fdinfos(pid: u32) -> Result<Vec<(String, String)>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let fd = e.file_name().to_string_lossy().into_owned();
        // An fd closed meanwhile is not ours to report.
        if let Ok(text) = fs::read_to_string(e.path()) {
            out.push((fd, text));
        }
    }
    Ok(out)
}

/// The value of a `key:\tvalue` line.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// (run_time_ns, run_cnt) of program `id` through process `pid`'s fd for it.
pub(crate) fn program_stats(pid: u32, id: &str) -> Result<(u64, u64)> {
    for (fd, info) in fdinfos(pid)? {
        if field(&info, "prog_id") != Some(id) {
            continue;
        }
        let num = |key: &str| {
            field(&info, key)
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("no {key} in /proc/{pid}/fdinfo/{fd} (kernel too old?)"))
        };
        return Ok((num("run_time_ns")?, num("run_cnt")?));
    }
    bail!("process {pid} no longer holds program {id}")
}

/// Everything read at one edge of a window.
struct Snapshot {
    at: Instant,
    bpf: (u64, u64),
    cpu_ns: u64,
    ticks: u64,
    rounds: Rounds,
}

impl Snapshot {
    fn take(pid: u32, program: &str, burn: &mut Proc) -> Result<Snapshot> {
        let rounds = rounds(burn)?;
        let at = Instant::now();
        let bpf = program_stats(pid, program)?;
        let cpu_ns = task_cpu_ns(pid)?;
        let (_, ticks) = stat_ticks(pid)?;
        Ok(Snapshot {
            at,
            bpf,
            cpu_ns,
            ticks,
            rounds,
        })
    }
}

/// On-CPU ns of all threads of `pid` (first field of each thread's schedstat).
pub(crate) fn task_cpu_ns(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for e in fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        let path = e
            .with_context(|| format!("cannot list {dir}"))?
            .path()
            .join("schedstat");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("cannot read {} (CONFIG_SCHED_INFO off?)", path.display()))?;
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok());
        total += ns.with_context(|| format!("{}: unexpected {text:?}", path.display()))?;
    }
    Ok(total)
}

/// (state, utime + stime in ticks) of process `pid` from /proc/PID/stat.
fn stat_ticks(pid: u32) -> Result<(char, u64)> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // Fields after the parenthesised command name, which may itself contain spaces.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let state = f.first().and_then(|s| s.chars().next());
    match (state, num(11), num(12)) {
        (Some(state), Some(utime), Some(stime)) => Ok((state, utime + stime)),
        _ => bail!("{path}: unexpected {text:?}"),
    }
}

/// The process's total CPU ticks when it has exited: read while it is a zombie, before it is
/// reaped (a zombie's stat still sums all its threads).
fn ticks_at_exit(p: &mut Proc, timeout: Duration) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let (state, ticks) = stat_ticks(p.pid())?;
        if state == 'Z' {
            return Ok(ticks);
        }
        ensure!(
            Instant::now() < deadline,
            "{} still running {timeout:?} after its start: {}",
            p.name,
            p.log_tail()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The workload's per-thread round counts at one moment (its own CLOCK_MONOTONIC ns), and
/// the CPU time of its threads read right after.
struct Rounds {
    ns: u64,
    counts: Vec<u64>,
    cpu_ns: u64,
}

impl Rounds {
    /// The rates of all threads together from `self` to `later`.
    fn rate_to(&self, later: &Rounds) -> Result<Rate> {
        ensure!(
            later.ns > self.ns
                && later.cpu_ns > self.cpu_ns
                && later.counts.len() == self.counts.len(),
            "workload counts out of order"
        );
        let done: u64 = (later.counts.iter().zip(&self.counts))
            .map(|(b, a)| b.saturating_sub(*a))
            .sum();
        Ok(Rate {
            wall: done as f64 / ((later.ns - self.ns) as f64 / 1e9),
            cpu: done as f64 / ((later.cpu_ns - self.cpu_ns) as f64 / 1e9),
        })
    }
}

/// SIGUSR1 to `ws1-burn --report`, and the "rounds <ns> <n1> <n2>…" line it answers with.
fn rounds(burn: &mut Proc) -> Result<Rounds> {
    util::capture(Command::new("kill").args(["-USR1", &burn.pid().to_string()]))?;
    let line = burn.next_line(Duration::from_secs(5))?;
    let mut nums = line
        .strip_prefix("rounds ")
        .map(|r| r.split_whitespace().map(|v| v.parse::<u64>().ok()));
    let parsed = nums.as_mut().and_then(|n| {
        let ns = n.next()??;
        let counts = n.collect::<Option<Vec<u64>>>()?;
        Some((ns, counts))
    });
    let (ns, counts) = parsed.with_context(|| {
        format!(
            "{}: expected \"rounds <ns> <counts>\", got {line:?} (is the burn workload built \
             with --report support?)",
            burn.name
        )
    })?;
    let cpu_ns = task_cpu_ns(burn.pid())?;
    Ok(Rounds { ns, counts, cpu_ns })
}

/// (samples, samples with ws1_burn_three on the stack, with ws1_burn_one) of a folded profile.
fn fold_counts(text: &str) -> (u64, u64, u64) {
    let (mut all, mut three, mut one) = (0, 0, 0);
    for line in text.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.trim().parse::<u64>() else {
            continue;
        };
        all += n;
        let frames = stack.split(';');
        for f in frames {
            if f.starts_with("ws1_burn_three") {
                three += n;
                break;
            }
            if f.starts_with("ws1_burn_one") {
                one += n;
                break;
            }
        }
    }
    (all, three, one)
}

/// `ws1-probe bench-symbolize` three times (each a new process, so each cold call is cold); the
/// reports in run order.
fn symbolize(ctx: &Ctx) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for _ in 0..3 {
        let mut cmd = Command::new(&ctx.probe);
        cmd.args(["bench-symbolize", "--addresses", &SYM_ADDRESSES.to_string()]);
        let text = util::capture(&mut cmd)?;
        let json: Value = serde_json::from_str(text.trim())
            .with_context(|| format!("bench-symbolize printed {text:?}, not JSON"))?;
        out.push(json);
    }
    Ok(out)
}

/// `new` against `base`, in %.
fn pct_change(new: f64, base: f64) -> f64 {
    100.0 * (new / base - 1.0)
}

/// Prints the tables; `hz` is USER_HZ, the unit of the tick counts.
fn report(modes: &[ModeRun], sym: &[Value], hz: u64) -> Result<()> {
    let [fp, dwarf] = modes else {
        bail!("missing modes in the results")
    };
    println!(
        "\nprofiler overhead: `ws1-probe profile --frequency {FREQUENCY}` on `ws1-burn --threads \
         {THREADS}` ({} CPUs), {ROUNDS} runs per mode, each measured over {} s from {} s after \
         it started sampling:",
        cpus(),
        WINDOW.as_secs(),
        SETTLE.as_secs()
    );
    println!(
        "mode  run  BPF ns/run  ns/sample  BPF %core  user %core (stat)  user ns/sample  \
         start-up ms  finish ms  runs/exp  burn CPU  samples/exp  three:one  rounds/s  vs base  \
         per CPU-s"
    );
    let ms = |ticks: u64| ticks as f64 * 1e3 / hz as f64;
    for m in modes {
        for (i, r) in m.runs.iter().enumerate() {
            let stat_pct = 100.0 * ms(r.user_ticks) / 1e3 / r.secs();
            let (wall, cpu) = changes(m, i);
            println!(
                "{:<5} {:>3} {:>11.0} {:>10.0} {:>10.3} {:>10.3} ({:>5.2}) {:>15.0} {:>12.0} \
                 {:>10.0} {:>8.1}% {:>8.1}% {:>11.1}% {:>10} {:>9.1} {:>+7.2}% {:>+9.2}%",
                m.key,
                i + 1,
                r.bpf_ns_per_run(),
                r.bpf_ns_per_sample(),
                r.bpf_pct(),
                r.user_pct(),
                stat_pct,
                r.user_ns_per_sample(),
                ms(r.startup_ticks),
                ms(r.finish_ticks),
                100.0 * r.runs_share(),
                100.0 * r.burn_share(),
                100.0 * r.samples_share(),
                ratio(r.three, r.one),
                r.rate.wall,
                wall,
                cpu,
            );
        }
    }
    for m in modes {
        let rates: Vec<String> = m
            .baselines
            .iter()
            .map(|r| format!("{:.1}/{:.1}", r.wall, r.cpu))
            .collect();
        println!(
            "{}: baseline rounds/s / rounds per CPU-s in run order: {}; 1-min load at each: {}",
            m.key,
            rates.join(" "),
            m.load.join(" ")
        );
        let others = m.runs.iter().map(|r| r.other_programs).max().unwrap_or(0);
        if others > 0 {
            println!(
                "WARNING: {others} other {PROGRAM} program(s) were loaded during the {} runs \
                 (another profiler): their samples cost the workload too",
                m.key
            );
        }
        if m.load.iter().any(|l| l.contains('[')) {
            println!("WARNING: other tracers ran during the {} blocks", m.key);
        }
    }

    let med = |m: &ModeRun, f: &dyn Fn(&ProfRun) -> f64| {
        median(&m.runs.iter().map(f).collect::<Vec<f64>>())
    };
    let row = |label: &str, a: String, b: String| println!("{label:<56} {a:>20} {b:>20}");
    let num =
        |m: &ModeRun, f: &dyn Fn(&ProfRun) -> f64, digits: usize| format!("{:.digits$}", med(m, f));
    println!();
    row("summary (medians over runs)", "fp".into(), "dwarf".into());
    row(
        "BPF ns per workload sample (all run time / samples)",
        num(fp, &ProfRun::bpf_ns_per_sample, 0),
        num(dwarf, &ProfRun::bpf_ns_per_sample, 0),
    );
    row(
        &format!("BPF ns per run of {PROGRAM} (every tick)"),
        num(fp, &ProfRun::bpf_ns_per_run, 0),
        num(dwarf, &ProfRun::bpf_ns_per_run, 0),
    );
    row(
        "BPF CPU, % of one core",
        num(fp, &ProfRun::bpf_pct, 3),
        num(dwarf, &ProfRun::bpf_pct, 3),
    );
    row(
        "userspace CPU in the window, % of one core",
        num(fp, &ProfRun::user_pct, 3),
        num(dwarf, &ProfRun::user_pct, 3),
    );
    row(
        "userspace ns per workload sample",
        num(fp, &ProfRun::user_ns_per_sample, 0),
        num(dwarf, &ProfRun::user_ns_per_sample, 0),
    );
    let total = |m: &ModeRun| {
        let t = med(m, &|r: &ProfRun| r.bpf_pct() + r.user_pct());
        let verdict = if t <= GOAL_PCT { "PASS" } else { "MISS" };
        format!("{t:.3} {verdict}")
    };
    row(
        &format!("total, % of one core (goal <= {GOAL_PCT} %)"),
        total(fp),
        total(dwarf),
    );
    row(
        "end of run: drain, symbolize, write (CPU ms, once)",
        num(fp, &|r: &ProfRun| ms(r.finish_ticks), 0),
        num(dwarf, &|r: &ProfRun| ms(r.finish_ticks), 0),
    );
    row(
        "start-up and 1 s settle (CPU ms, once)",
        num(fp, &|r: &ProfRun| ms(r.startup_ticks), 0),
        num(dwarf, &|r: &ProfRun| ms(r.startup_ticks), 0),
    );
    let change = |m: &ModeRun, cpu: bool| {
        let c: Vec<f64> = (0..m.runs.len())
            .map(|i| {
                let (wall, per_cpu) = changes(m, i);
                if cpu { per_cpu } else { wall }
            })
            .collect();
        let lo = c.iter().copied().fold(f64::MAX, f64::min);
        let hi = c.iter().copied().fold(f64::MIN, f64::max);
        format!("{:+.2} ({lo:+.2}..{hi:+.2})", median(&c))
    };
    let spread = |m: &ModeRun, cpu: bool| {
        let v: Vec<f64> = m
            .baselines
            .iter()
            .map(|r| if cpu { r.cpu } else { r.wall })
            .collect();
        let lo = v.iter().copied().fold(f64::MAX, f64::min);
        let hi = v.iter().copied().fold(f64::MIN, f64::max);
        format!("{:.2}", 100.0 * (hi - lo) / median(&v))
    };
    row(
        "workload rounds/s vs baseline, % (range over runs)",
        change(fp, false),
        change(dwarf, false),
    );
    row(
        "  baseline blocks' spread, % ((max - min) / median)",
        spread(fp, false),
        spread(dwarf, false),
    );
    row(
        "workload rounds per CPU-s vs baseline, % (range)",
        change(fp, true),
        change(dwarf, true),
    );
    row(
        "  baseline blocks' spread, % ((max - min) / median)",
        spread(fp, true),
        spread(dwarf, true),
    );
    let each = |m: &ModeRun, f: &dyn Fn(&ProfRun) -> String| {
        m.runs.iter().map(f).collect::<Vec<String>>().join(" ")
    };
    let pct = |f: fn(&ProfRun) -> f64| move |r: &ProfRun| format!("{:.1}", 100.0 * f(r));
    row(
        &format!("sanity: {PROGRAM} runs / ({FREQUENCY} Hz x {THREADS} CPUs x s), %"),
        each(fp, &pct(ProfRun::runs_share)),
        each(dwarf, &pct(ProfRun::runs_share)),
    );
    row(
        &format!("sanity: samples / ({FREQUENCY} Hz x workload CPU-s), %"),
        each(fp, &pct(ProfRun::samples_share)),
        each(dwarf, &pct(ProfRun::samples_share)),
    );
    row(
        &format!("  workload's share of {THREADS} CPUs while sampled, %"),
        each(fp, &pct(ProfRun::burn_share)),
        each(dwarf, &pct(ProfRun::burn_share)),
    );
    row(
        "sanity: ws1_burn_three : ws1_burn_one (3:1)",
        each(fp, &|r: &ProfRun| ratio(r.three, r.one)),
        each(dwarf, &|r: &ProfRun| ratio(r.three, r.one)),
    );
    let procs = |r: &ProfRun| format!("{}/{}", r.processes.1, r.processes.0);
    row(
        "sanity: processes unwound with DWARF",
        each(fp, &procs),
        each(dwarf, &procs),
    );

    report_symbolize(sym)
}

fn report_symbolize(sym: &[Value]) -> Result<()> {
    let first = sym.first().context("no bench-symbolize report")?;
    let mib = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / (1024.0 * 1024.0);
    let kib_mib = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / 1024.0;
    println!(
        "\nsymbolization of the release ws1-probe binary ({:.1} MiB, {:.1} MiB of .debug_* \
         sections, {} functions in .symtab), {} runs in new processes:",
        mib(&first["binary_bytes"]),
        mib(&first["debug_section_bytes"]),
        first["functions_in_symtab"],
        sym.len()
    );
    println!(
        "run  addresses  named  agree   cold ms  warm ms  {:>4} new, ms  RSS +MiB cold  RSS +MiB \
         (anon/file)",
        first["new_addresses"]
    );
    for (i, s) in sym.iter().enumerate() {
        println!(
            "{:>3} {:>10} {:>6} {:>6} {:>9.1} {:>8.2} {:>13.1} {:>14.1} {:>9.1} ({:.1}/{:.1})",
            i + 1,
            s["addresses"],
            s["named"],
            s["agreeing_with_symtab"],
            s["cold_ms"].as_f64().unwrap_or(f64::NAN),
            s["warm_ms"].as_f64().unwrap_or(f64::NAN),
            s["new_addresses_ms"].as_f64().unwrap_or(f64::NAN),
            kib_mib(&s["rss_growth_cold_kib"]),
            kib_mib(&s["rss_growth_kib"]),
            kib_mib(&s["anon_growth_kib"]),
            kib_mib(&s["file_growth_kib"]),
        );
    }
    let col = |key: &str| {
        let v: Vec<f64> = sym.iter().filter_map(|s| s[key].as_f64()).collect();
        median(&v)
    };
    println!(
        "symbolization (medians): cold {:.1} ms, warm {:.2} ms for {} addresses ({:.1} us and \
         {:.2} us each); new addresses in the parsed binary {:.1} ms",
        col("cold_ms"),
        col("warm_ms"),
        first["addresses"],
        col("cold_ms") * 1e3 / first["addresses"].as_f64().unwrap_or(f64::NAN),
        col("warm_ms") * 1e3 / first["addresses"].as_f64().unwrap_or(f64::NAN),
        col("new_addresses_ms"),
    );
    Ok(())
}

/// `a:b` as "r : 1".
fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        "-".to_owned()
    } else {
        format!("{:.2}:1", a as f64 / b as f64)
    }
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(0, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_line() {
        let line = "sampling pid 42 at 99 Hz for 12s (1 processes, 1 unwound with DWARF; Ctrl-C \
                    to stop)";
        assert_eq!(dwarf_counts(line), Some((1, 1)));
        assert_eq!(dwarf_counts("sampling pid 42"), None);
    }

    #[test]
    fn counts_folded_stacks() {
        let text = "main;ws1_run_cpu;ws1_burn_three 30\nmain;ws1_run_cpu;ws1_burn_one 10\n\
                    [unknown] 2\n";
        assert_eq!(fold_counts(text), (42, 30, 10));
    }

    #[test]
    fn rate_over_a_window() {
        let a = Rounds {
            ns: 1_000_000_000,
            counts: vec![10, 20],
            cpu_ns: 5_000_000_000,
        };
        let b = Rounds {
            ns: 3_000_000_000,
            counts: vec![110, 220],
            cpu_ns: 8_000_000_000,
        };
        let rate = a.rate_to(&b).unwrap();
        assert_eq!((rate.wall, rate.cpu), (150.0, 100.0));
    }
}
