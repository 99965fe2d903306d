//! `cargo xtask bench <what>`: benchmarks of the agent's overhead. Placeholder until the
//! benchmarks land. It runs as root (main re-executes xtask through sudo first) and after
//! bootstrap; `crate::run::cargo_build_release`, `crate::util::workspace_root` and
//! `crate::apt::ensure_packages` (e.g. for bpftrace) are there to be reused.

use anyhow::{Result, bail};

pub fn run(what: &str, args: &[String]) -> Result<()> {
    let _ = args;
    bail!("unknown benchmark {what}: available: syscalls")
}
