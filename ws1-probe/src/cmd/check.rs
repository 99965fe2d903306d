//! `ws1-probe check` (being written).

use std::process::ExitCode;

/// Report which hooks this kernel allows
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: CheckArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("check is not built yet")
}
