//! `cargo xtask bench health-block`: what the block collector's programs cost per I/O.
//!
//! A 4 KiB O_DIRECT read loop (and a write + fdatasync loop) on a 1 MiB file on a real block
//! device, driven through `ws1-blockload`, under (a) no probe, (b) the floor: empty `tp_btf`
//! programs on the same two hooks (`ws1-probe bench-floor --block`), (c) the agent with only
//! the block collector, observing the workload. Each program's run time per run comes from
//! the kernel's BPF statistics (`--bpf-stats`), which a device's tens of microseconds per I/O
//! would drown in wall-clock differences; wall-clock ns per I/O are printed for context.
//! Per I/O = `block_io_start` + `block_rq_complete` runs (the merge hook does not run in
//! these loops).

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    bench_util::{Proc, http_get, median},
    run, util,
};

/// Blocks of the file (4 KiB each): 1 MiB in all.
const FILE_BLOCKS: u64 = 256;
const BS: u64 = 4096;
/// Reads per timed block, and timed blocks per configuration.
const READS: u64 = 2_000;
const BLOCKS: usize = 5;
/// Writes (each with fdatasync) per configuration.
const WRITES: u64 = 300;

/// Run time and run count of one program.
#[derive(Clone, Copy, Debug, Default)]
struct Stat {
    ns: f64,
    runs: f64,
}

impl Stat {
    fn per_run(self) -> f64 {
        if self.runs > 0.0 {
            self.ns / self.runs
        } else {
            f64::NAN
        }
    }
}

/// One configuration's results: wall-clock ns per read, and (io_start, complete) statistics.
struct Measured {
    read_ns: f64,
    start: Stat,
    complete: Stat,
}

impl Measured {
    fn per_io(&self) -> f64 {
        self.start.per_run() + self.complete.per_run()
    }
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    ensure!(
        args.is_empty(),
        "bench health-block takes no arguments (got {args:?})"
    );
    let r = measure()?;
    report(&r);
    Ok(())
}

/// Runs the three configurations and returns (a, b, c).
fn measure() -> Result<[Measured; 3]> {
    run::cargo_build_release(&["ws1-probe", "ws1-probe-tests"])?;
    let release = util::target_dir().join("release");
    let probe = release.join("ws1-probe");
    let logs = util::target_dir().join("bench");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let dir = std::env::var_os("WS1_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| logs.clone());
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    ensure_block_device(&dir)?;
    let file = dir.join("ws1-bench-block.bin");
    let mut w = Proc::spawn(
        "ws1-blockload",
        &mut Command::new(release.join("ws1-blockload")),
        &logs,
    )?;
    w.wait_for_line("ready ", 10)?;
    w.request(&format!("open {} {FILE_BLOCKS} {BS}", file.display()))?;
    let pid = w.pid().to_string();

    eprintln!("bench health-block: (a) no probe");
    let a = Measured {
        read_ns: read_loop(&mut w)?,
        start: Stat::default(),
        complete: Stat::default(),
    };
    w.request(&format!("write {WRITES}"))?;

    eprintln!("bench health-block: (b) floor: empty tp_btf programs on the block hooks");
    let mut floor = Proc::spawn(
        "bench-floor-block",
        Command::new(&probe).args(["bench-floor", "--block"]),
        &logs,
    )?;
    floor.wait_for_line("ready", 20)?;
    let read_ns = read_loop(&mut w)?;
    w.request(&format!("write {WRITES}"))?;
    let status = floor.stop()?;
    ensure!(
        status.success(),
        "bench-floor exited with {status}: {}",
        floor.log_tail()
    );
    let mut b = Measured {
        read_ns,
        start: Stat::default(),
        complete: Stat::default(),
    };
    while let Ok(line) = floor.next_line(Duration::from_secs(2)) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["stat", name, ns, runs] = words.as_slice() {
            let stat = Stat {
                ns: ns.parse().unwrap_or(f64::NAN),
                runs: runs.parse().unwrap_or(f64::NAN),
            };
            match *name {
                "floor_block_io_start" => b.start = stat,
                "floor_block_rq_complete" => b.complete = stat,
                _ => {}
            }
        }
    }

    eprintln!("bench health-block: (c) agent, block collector only, observing the workload");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("no free loopback port")?
        .port();
    let mut agent = Proc::spawn(
        "agent-block",
        Command::new(&probe).args([
            "agent",
            "--collectors",
            "block",
            "--bpf-stats",
            "--pid",
            &pid,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]),
        &logs,
    )?;
    let started = Instant::now();
    while !matches!(http_get(port, "/readyz"), Ok((200, _))) {
        agent.fail_if_exited()?;
        if started.elapsed() > Duration::from_secs(20) {
            bail!("agent: /readyz not 200 after 20 s: {}", agent.log_tail());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let read_ns = read_loop(&mut w)?;
    w.request(&format!("write {WRITES}"))?;
    let (status, body) = http_get(port, "/metrics").context("scraping the agent")?;
    ensure!(status == 200, "/metrics answered {status}");
    let stat = |program: &str| Stat {
        ns: sample(&body, "ws1_probe_bpf_program_run_seconds_total", program) * 1e9,
        runs: sample(&body, "ws1_probe_bpf_program_runs_total", program),
    };
    let c = Measured {
        read_ns,
        start: stat("block_io_start_btf"),
        complete: stat("block_rq_complete_btf"),
    };
    agent.stop()?;
    w.request("exit")?;
    Ok([a, b, c])
}

/// Median wall-clock ns per 4 KiB O_DIRECT read over [`BLOCKS`] blocks of [`READS`].
fn read_loop(w: &mut Proc) -> Result<f64> {
    let mut ns = Vec::new();
    for _ in 0..BLOCKS {
        let t = Instant::now();
        w.request(&format!("read {READS}"))?;
        ns.push(t.elapsed().as_nanos() as f64 / READS as f64);
    }
    Ok(median(&ns))
}

/// The value of `name{program="<program>"}` in an exposition body (NaN when absent).
fn sample(body: &str, name: &str, program: &str) -> f64 {
    let want = format!("program=\"{program}\"");
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(&want))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Fails unless `dir` is on a block device (tmpfs and overlay have no block I/O).
fn ensure_block_device(dir: &Path) -> Result<()> {
    let dev = fs::metadata(dir)
        .with_context(|| format!("cannot stat {}", dir.display()))?
        .dev();
    // glibc's encoding of dev_t (gnu_dev_major/minor).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let sys = format!("/sys/dev/block/{major}:{minor}");
    ensure!(
        Path::new(&sys).exists(),
        "{} is not on a block device ({major}:{minor}); set WS1_BENCH_DIR to a directory on a disk",
        dir.display()
    );
    Ok(())
}

fn report(r: &[Measured; 3]) {
    let [a, b, c] = r;
    println!(
        "block hooks, 4 KiB O_DIRECT reads ({READS} × {BLOCKS}) and writes + fdatasync ({WRITES}):"
    );
    println!(
        "  wall clock per read: (a) no probe {:.0} ns, (b) floor {:.0} ns, (c) agent {:.0} ns",
        a.read_ns, b.read_ns, c.read_ns
    );
    for (label, m, start, complete) in [
        (
            "(b) floor",
            b,
            "floor_block_io_start",
            "floor_block_rq_complete",
        ),
        (
            "(c) agent",
            c,
            "block_io_start_btf",
            "block_rq_complete_btf",
        ),
    ] {
        println!(
            "  {label}: {start} {:.0} ns/run ({} runs), {complete} {:.0} ns/run ({} runs): {:.0} ns per I/O",
            m.start.per_run(),
            m.start.runs,
            m.complete.per_run(),
            m.complete.runs,
            m.per_io()
        );
    }
    println!(
        "  added by the block collector per I/O: {:.0} ns over the floor; ratio {:.1}× the floor",
        c.per_io() - b.per_io(),
        c.per_io() / b.per_io()
    );
}
