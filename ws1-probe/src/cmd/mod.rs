//! One file per subcommand, plus the arguments they share.

pub mod agent;
pub mod allocs;
pub mod benchhealth;
pub mod check;
pub mod floor;
pub mod health;
pub mod leaks;
pub mod net;
pub mod profile;
pub mod rules;
pub mod scrapebench;
pub mod slo;
pub mod symbench;
pub mod syscalls;
pub mod top;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ws1_probe::targeting::{
    config::{self, FlagOverrides, Settings},
    selector::{CGROUP_ROOT, SelectorArgs},
};

/// Arguments every collecting subcommand takes.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    #[command(flatten)]
    pub selectors: SelectorArgs,
    /// TOML config file with [[service]] definitions (also: WS1_PROBE_CONFIG)
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Resolves flags, environment and config file into settings.
pub fn settings(
    common: &CommonArgs,
    listen: Option<String>,
    bpf_stats: bool,
) -> anyhow::Result<Settings> {
    settings_with(
        common,
        FlagOverrides {
            listen,
            bpf_stats,
            ..Default::default()
        },
    )
}

/// Like [`settings`], with every flag override given.
pub fn settings_with(common: &CommonArgs, flags: FlagOverrides) -> anyhow::Result<Settings> {
    let rules = common
        .selectors
        .to_rules(Path::new("/proc"), Path::new(CGROUP_ROOT))?;
    let flags = FlagOverrides {
        config: common.config.clone(),
        ..flags
    };
    config::resolve(&flags, rules, |k| std::env::var(k).ok()).context("invalid configuration")
}

/// "1 process now", "3 processes now".
pub fn processes(n: usize) -> String {
    if n == 1 {
        "1 process now".to_owned()
    } else {
        format!("{n} processes now")
    }
}

/// How a collection window ended.
pub struct Collected {
    pub interrupted: bool,
    pub elapsed: std::time::Duration,
}

/// Runs a one-shot collection window: follows execs every 100 ms, shows `progress(probe)` on a
/// terminal every second (one start line otherwise), and stops after `duration` or at Ctrl-C.
pub fn collect(
    probe: &mut ws1_probe::probe::Probe,
    duration: std::time::Duration,
    start_line: &str,
    mut progress: impl FnMut(&mut ws1_probe::probe::Probe) -> String,
) -> anyhow::Result<Collected> {
    use std::{
        io::{IsTerminal as _, Write as _},
        time::{Duration, Instant},
    };
    let tty = std::io::stderr().is_terminal();
    if probe.scan.targeted == 0 {
        eprintln!(
            "note: no running process matches yet; processes that start in the next {:.0}s are observed (check the selector with `ps -eo pid,comm`)",
            duration.as_secs_f64()
        );
    }
    if !tty {
        eprintln!("{start_line}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut ring = probe.take_exec_ring();
    let started = Instant::now();
    let interrupted = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + duration;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut last_progress = Instant::now() - Duration::from_secs(1);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return true,
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = tick.tick() => {
                    // Exec events are rare: polling them every 100 ms is cheap and keeps the
                    // one-shot commands single-threaded.
                    if let Some(ring) = ring.as_mut() {
                        probe.drain_execs(ring);
                    }
                    probe.poll_streams();
                    if tty && last_progress.elapsed() >= Duration::from_secs(1) {
                        last_progress = Instant::now();
                        eprint!(
                            "\r\x1b[K{:.0}s/{:.0}s: {} (Ctrl-C to stop)",
                            started.elapsed().as_secs_f64(),
                            duration.as_secs_f64(),
                            progress(probe)
                        );
                        let _ = std::io::stderr().flush();
                    }
                }
            }
        }
    });
    if let Some(ring) = ring.as_mut() {
        probe.drain_execs(ring);
    }
    if tty {
        eprint!("\r\x1b[K");
    }
    Ok(Collected {
        interrupted,
        elapsed: started.elapsed(),
    })
}
