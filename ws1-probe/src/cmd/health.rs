//! `ws1-probe health`: a row per service (CPU %, memory and its limit, threads, fds, run-queue
//! and block I/O p99, exits, request p99), redrawn every interval on a terminal like `top`, or
//! printed once (or `--count` times) as a plain table or JSON when output is not a terminal.
//! The rows are computed by `report::health` from the probe's metric families.

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ws1_probe::{
    collectors::resources::ResourceCollector, probe::Probe, profile::top, report::health,
    targeting::config::Collectors, units,
};

use super::CommonArgs;

/// One screen of service health
#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Time between two readings; rates and p99s cover this interval
    #[arg(long, short = 'i', default_value = "2s", value_parser = units::parse_duration)]
    pub interval: Duration,
    /// Print this many tables (or JSON lines) and stop (default: until q or Ctrl-C on a
    /// terminal, once otherwise)
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// Print one table (or JSON object) after one interval and stop
    #[arg(long, conflicts_with = "count")]
    pub once: bool,
    /// JSON instead of a table, one object per interval
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: HealthArgs) -> anyhow::Result<()> {
    if args.interval < Duration::from_millis(100) {
        anyhow::bail!(
            "invalid --interval {:?}: use at least 100ms (e.g. --interval 2s)",
            args.interval
        );
    }
    let mut settings = super::settings(&args.common, None, false)?;
    // What the columns need; the syscall, profile and host collectors add nothing here.
    settings.collectors = Collectors {
        syscalls: false,
        profile: false,
        host: false,
        ..Collectors::ALL
    };
    let mut probe = Probe::start(&settings).context("cannot start the collectors")?;
    // Every reading samples /proc, so the CPU % covers exactly the interval.
    probe.resources = ResourceCollector::new(true, settings.targets.is_host(), Duration::ZERO);
    let what = settings.targets.describe();
    let live = std::io::stdout().is_terminal() && !args.json && !args.once;
    let count = match (args.once, args.count) {
        (true, _) => Some(1),
        (false, Some(n)) => Some(n.max(1)),
        (false, None) if live => None,
        (false, None) => Some(1),
    };
    let _raw = if live {
        top::RawTerminal::new().ok()
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut ring = probe.take_exec_ring();
    let mut prev = probe.families().0;
    let mut prev_at = Instant::now();
    let mut printed = 0u64;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {}
            }
            if let Some(ring) = ring.as_mut() {
                probe.targets.drain(ring);
            }
            if live && matches!(top::key_pressed(Duration::ZERO), Some(b'q' | b'Q')) {
                break;
            }
            if prev_at.elapsed() < args.interval {
                continue;
            }
            let now = probe.families().0;
            let seconds = prev_at.elapsed().as_secs_f64();
            prev_at = Instant::now();
            let h = health::rows(&prev, &now, seconds);
            prev = now;
            print(&h, &what, live, args.json)?;
            printed += 1;
            if count.is_some_and(|n| printed >= n) {
                break;
            }
        }
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(())
}

fn print(h: &health::Health, what: &str, live: bool, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let line = serde_json::to_string(h).context("cannot encode the rows")?;
        writeln!(out, "{line}")
    } else {
        let header = format!(
            "ws1-probe health: {what}, last {:.1}s (CPU% of one core; exits in the interval)",
            h.interval_seconds
        );
        let table = health::render(h);
        if live {
            write!(
                out,
                "{}{header}\n{table}q or Ctrl-C quits\n",
                top::CLEAR_SCREEN
            )
        } else {
            writeln!(out, "{header}\n{table}")
        }
    }
    .and_then(|()| out.flush())
    .context("cannot write to standard output")
}
