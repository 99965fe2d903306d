//! `ws1-probe bench-health` (hidden): what the procfs sampling of host mode costs, for `cargo
//! xtask bench health`. It samples every process on the host the way the agent does in host
//! mode (one service per command name), `--rounds` times, and prints the CPU time per sample
//! and as a share of one core at the agent's sampling interval, as JSON. No BPF is loaded.

use std::{collections::HashMap, path::Path, time::Duration};

use anyhow::Context as _;
use ws1_probe::{
    collectors::{host, resources},
    targeting::process::{Needs, ProcessInfo, list_pids},
};

/// Time the procfs sampling of every process on the host and print JSON
#[derive(clap::Args, Debug)]
pub struct BenchHealthArgs {
    /// Samples to time (after one warm-up sample)
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
}

/// CPU time (user + system) this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

pub fn run(args: BenchHealthArgs) -> anyhow::Result<()> {
    let pids = list_pids(Path::new("/proc")).context("cannot list /proc")?;
    let mut names: HashMap<String, u32> = HashMap::new();
    let mut targets = Vec::with_capacity(pids.len());
    for pid in pids {
        if let Ok(info) = ProcessInfo::read(Path::new("/proc"), pid, Needs::default()) {
            let next = names.len() as u32;
            targets.push((pid, *names.entry(info.comm).or_insert(next)));
        }
    }
    let mut c = resources::ResourceCollector::new(true, true, Duration::ZERO);
    // The first sample reads every process in full (as the agent does for each process at
    // least every minute); later ones reuse the figures of idle single-threaded processes.
    let f0 = thread_cpu();
    c.sample_now(&targets);
    let _ = c.snapshot();
    let full = thread_cpu() - f0;
    let rounds = args.rounds.max(1);
    let cpu0 = thread_cpu();
    let wall0 = std::time::Instant::now();
    for _ in 0..rounds {
        c.sample_now(&targets);
        let _ = c.snapshot();
    }
    let per_sample = (thread_cpu() - cpu0) / rounds;
    let wall = wall0.elapsed() / rounds;
    let threads: u64 = {
        c.sample_now(&targets);
        c.snapshot().services.values().map(|s| s.threads).sum()
    };
    let h0 = thread_cpu();
    for _ in 0..rounds {
        let _ = host::read();
    }
    let host_per_read = (thread_cpu() - h0) / rounds;
    let every = resources::SAMPLE_EVERY.as_secs_f64();
    let out = serde_json::json!({
        "processes": targets.len(),
        "threads": threads,
        "services": names.len(),
        "rounds": rounds,
        "sample_cpu_us": per_sample.as_secs_f64() * 1e6,
        "sample_wall_us": wall.as_secs_f64() * 1e6,
        "sample_every_s": every,
        "core_percent": 100.0 * per_sample.as_secs_f64() / every,
        "full_sample_cpu_us": full.as_secs_f64() * 1e6,
        // One full read per minute (12 samples), the rest like the timed ones.
        "core_percent_amortized": 100.0 * (per_sample.as_secs_f64() * 11.0 + full.as_secs_f64()) / 12.0 / every,
        "host_read_cpu_us": host_per_read.as_secs_f64() * 1e6,
    });
    println!("{out}");
    Ok(())
}
