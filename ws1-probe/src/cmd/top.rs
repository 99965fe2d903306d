//! `ws1-probe top`: a live table of the hottest functions of the selected processes, redrawn
//! every second on a terminal, or printed as plain tables when output is not a terminal.

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ws1_probe::{
    probe::Probe,
    profile::{ProfileKind, top},
    units,
};

use super::{CommonArgs, profile::SamplingArgs};

/// Live view of the hottest functions
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The table covers the last WINDOW of samples (e.g. 10s, 1m)
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    pub window: Duration,
    /// Stop after this long (default: until q or Ctrl-C)
    #[arg(long, short = 'd', value_parser = units::parse_duration)]
    pub duration: Option<Duration>,
    /// Rows to show
    #[arg(long, default_value_t = 20)]
    pub rows: usize,
}

/// Terminal width from $COLUMNS, else 120.
fn width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(120)
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let settings = args.sampling.settings(&args.common)?;
    let mut probe = Probe::start(&settings).context("cannot start the profiler")?;
    let what = settings.targets.describe();
    let kind = args.sampling.kind();
    let live = std::io::stdout().is_terminal();
    // Keys are read only on a terminal; restored when dropped (also on errors).
    let _raw = if live {
        top::RawTerminal::new().ok()
    } else {
        None
    };
    if !live {
        eprintln!(
            "top of {what}: a table every second (Ctrl-C to stop){}",
            args.duration
                .map_or(String::new(), |d| format!(", for {}s", d.as_secs_f64()))
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut ring = probe.take_exec_ring();
    let started = Instant::now();
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut last_draw = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {}
            }
            if let Some(ring) = ring.as_mut() {
                probe.targets.drain(ring);
            }
            probe.poll_streams();
            if live && matches!(top::key_pressed(Duration::ZERO), Some(b'q' | b'Q')) {
                break;
            }
            let done = args.duration.is_some_and(|d| started.elapsed() >= d);
            if last_draw.elapsed() >= Duration::from_secs(1) || done {
                last_draw = Instant::now();
                draw(&mut probe, &args, kind, &what, live, started)?;
            }
            if done {
                break;
            }
        }
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(())
}

fn draw(
    probe: &mut Probe,
    args: &TopArgs,
    kind: ProfileKind,
    what: &str,
    live: bool,
    started: Instant,
) -> anyhow::Result<()> {
    probe.profile_drain();
    let since = Instant::now()
        .checked_sub(args.window)
        .unwrap_or(started)
        .max(started);
    let (cpu, off) = probe.profiles.since(since);
    let p = match kind {
        ProfileKind::Cpu => cpu,
        ProfileKind::OffCpu => off,
    };
    let header = match kind {
        ProfileKind::Cpu => format!(
            "ws1-probe top: {what}, last {:.0}s, {} samples ({}), at {:.0}s",
            p.duration.as_secs_f64(),
            p.total_samples(),
            units::format_ns(p.total_value_ns()),
            started.elapsed().as_secs_f64()
        ),
        ProfileKind::OffCpu => format!(
            "ws1-probe top (off-CPU): {what}, last {:.0}s, {} blocked, at {:.0}s",
            p.duration.as_secs_f64(),
            units::format_ns(p.total_value_ns()),
            started.elapsed().as_secs_f64()
        ),
    };
    let table = top::render(&top::top_functions(&p, args.rows), &header, width());
    let mut out = std::io::stdout().lock();
    if live {
        writeln!(out, "{}{table}q or Ctrl-C quits", top::CLEAR_SCREEN)
    } else {
        writeln!(out, "{table}")
    }
    .and_then(|()| out.flush())
    .context("cannot write to standard output")
}
