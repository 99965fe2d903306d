//! `ws1-probe syscalls`: collect for a while, print a table sorted by total time.

use std::time::Duration;

use anyhow::Context as _;
use ws1_probe::{probe::Probe, report, targeting::config::Collectors, units};

use super::{Collected, CommonArgs, collect};

/// Collect syscall latency
#[derive(clap::Args, Debug)]
pub struct SyscallsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// How long to collect (e.g. 10s, 500ms, 2m); Ctrl-C stops early and prints what was seen
    #[arg(long, short = 'd', default_value = "10s", value_parser = units::parse_duration)]
    pub duration: Duration,
    /// Print JSON (one object with a `syscalls` array) instead of a table
    #[arg(long)]
    pub json: bool,
    /// Rows to print in the table
    #[arg(long, default_value_t = 25)]
    pub top: usize,
}

pub fn run(args: SyscallsArgs) -> anyhow::Result<()> {
    let mut settings = super::settings(&args.common, None, false)?;
    // Only the syscall programs: no network, memory or profile hooks for a one-shot report.
    settings.collectors = Collectors {
        syscalls: true,
        ..Collectors::NONE
    };
    let mut probe = Probe::start(&settings).context("cannot start the syscall collector")?;
    let what = settings.targets.describe();
    let start_line = format!(
        "collecting syscalls of {what} for {}s ({} processes now)",
        args.duration.as_secs_f64(),
        probe.scan.targeted
    );
    let Collected {
        interrupted,
        elapsed,
    } = collect(&mut probe, args.duration, &start_line, |probe| {
        let calls = probe.syscalls.snapshot().total_calls();
        format!("collecting syscalls of {what}, {calls} calls")
    })?;
    let snap = probe.syscalls.snapshot();
    drop(probe);
    let rows = report::syscalls::rows(&snap);
    if args.json {
        let out = serde_json::json!({
            "targets": what,
            "duration_seconds": elapsed.as_secs_f64(),
            "interrupted": interrupted,
            "syscalls": rows,
        });
        println!("{out}");
    } else {
        eprintln!(
            "syscall latency of {what} over {:.1}s{}",
            elapsed.as_secs_f64(),
            if interrupted { " (interrupted)" } else { "" }
        );
        print!("{}", report::syscalls::render(&rows, args.top));
    }
    Ok(())
}
