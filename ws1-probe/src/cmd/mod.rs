//! One file per subcommand, plus the arguments they share.

pub mod agent;
pub mod allocs;
pub mod check;
pub mod floor;
pub mod leaks;
pub mod net;
pub mod syscalls;

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
