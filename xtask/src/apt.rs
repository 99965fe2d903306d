//! Installing host tools from Debian packages, for benchmarks that compare against them.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::util::{find_in_path, run_cmd};

/// Makes sure each `(binary, debian package)` is available: binaries already on PATH are left
/// alone; packages for the missing ones are installed with one `apt-get update` and one
/// `apt-get install`, non-interactively so it also works from scripts and CI.
pub fn ensure_packages(pkgs: &[(&str, &str)]) -> Result<()> {
    let mut missing = Vec::new();
    for &(binary, package) in pkgs {
        if find_in_path(binary).is_some() {
            eprintln!("apt: {binary} ... already installed");
        } else {
            eprintln!("apt: {binary} ... missing, will install package {package}");
            if !missing.contains(&package) {
                missing.push(package);
            }
        }
    }
    install(&missing)
}

/// Installs `packages` (nothing when empty) with one `apt-get update` and one `apt-get
/// install`, non-interactively, and says how long it took.
pub fn install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let list = packages.join(" ");
    let started = std::time::Instant::now();
    run_cmd(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| {
        format!("{list}: `apt-get update` failed (needs root and a reachable mirror)")
    })?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("{list}: install with `apt-get install {list}`"))?;
    eprintln!(
        "apt: {list} ... done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
