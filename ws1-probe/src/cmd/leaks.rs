//! `ws1-probe leaks`: trace the malloc family of the selected processes for a while, then report
//! the blocks still outstanding after `--min-age`, grouped by allocation stack.

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ws1_probe::{
    collectors::alloc::AllocCollector,
    probe::Probe,
    report::leaks::{self, format_bytes},
    units,
};

use super::CommonArgs;

/// Find memory leaks: allocations still outstanding after --min-age, by stack
#[derive(clap::Args, Debug)]
pub struct LeaksArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// How long to trace (e.g. 60s, 2m); Ctrl-C stops early and reports what was seen
    #[arg(long, short = 'd', default_value = "60s", value_parser = units::parse_duration)]
    pub duration: Duration,
    /// Report blocks outstanding for at least this long
    #[arg(long, default_value = "5s", value_parser = parse_age)]
    pub min_age: Duration,
    /// Stacks to report
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

fn parse_age(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" || text.trim() == "0s" {
        return Ok(Duration::ZERO);
    }
    units::parse_duration(text)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn run(args: LeaksArgs) -> anyhow::Result<()> {
    let settings = super::settings(&args.common, None, false)?;
    if settings.targets.is_host() {
        bail!(
            "precise allocation tracing needs a selector (uprobes on every process would slow the whole host): pass --pid, --comm, --cgroup or --config"
        );
    }
    let mut probe = Probe::start(&settings).context("cannot start the collectors")?;
    let pids = probe.targets.targeted_pids();
    if pids.is_empty() {
        bail!("no running process matches {}", settings.targets.describe());
    }
    let mut allocs = AllocCollector::attach(probe.ebpf_mut(), &pids)
        .context("cannot attach the allocation probes")?;
    let what = settings.targets.describe();
    let tty = std::io::stderr().is_terminal();
    eprintln!(
        "collecting allocations of {} process(es) ({what}) for {:.0}s; leaks are blocks outstanding for {:.1}s or more",
        allocs.pids.len(),
        args.duration.as_secs_f64(),
        args.min_age.as_secs_f64()
    );
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let interrupted = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + args.duration;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return true,
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = tick.tick() => if tty {
                    let stats = allocs.stats();
                    let (a, f): (u64, u64) = stats.values().fold((0, 0), |(a, f), s| (a + s.alloc_bytes, f + s.free_bytes));
                    eprint!(
                        "\r\x1b[K{:.0}s/{:.0}s: {} allocated, {} freed (Ctrl-C to stop)",
                        started.elapsed().as_secs_f64(),
                        args.duration.as_secs_f64(),
                        format_bytes(a),
                        format_bytes(f)
                    );
                    let _ = std::io::stderr().flush();
                },
            }
        }
    });
    if tty {
        eprint!("\r\x1b[K");
    }
    let swept = allocs.sweep_exited();
    let now = monotonic_ns();
    let outstanding = allocs.outstanding();
    let min_age_ns = args.min_age.as_nanos() as u64;
    let groups = leaks::group(&outstanding, now, min_age_ns);
    let services = probe.targets.matcher().services();
    let mut reports = leaks::symbolize(&groups, |id| services.name(id), |id| allocs.stack(id));
    let stacks = reports.len();
    reports.truncate(args.top);
    let stats = allocs.stats();
    if args.json {
        let per_service: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .map(|(id, s)| {
                (
                    services.name(*id).to_owned(),
                    serde_json::json!({
                        "alloc_bytes": s.alloc_bytes, "allocs": s.allocs,
                        "free_bytes": s.free_bytes, "frees": s.frees,
                        "failed": s.failed, "untracked": s.untracked,
                    }),
                )
            })
            .collect();
        let out = serde_json::json!({
            "targets": what,
            "duration_seconds": started.elapsed().as_secs_f64(),
            "interrupted": interrupted,
            "min_age_seconds": args.min_age.as_secs_f64(),
            "outstanding_blocks": outstanding.len(),
            "exited_blocks_removed": swept,
            "leaks": reports,
            "stats": per_service,
        });
        println!("{out}");
    } else {
        print!("{}", leaks::render(&reports, stacks, min_age_ns, 12));
    }
    Ok(())
}
