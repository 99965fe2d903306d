//! Builds the kernel programs (`ws1-probe-ebpf`) for the BPF target with the nightly toolchain
//! and bpf-linker, so `include_bytes_aligned!` can embed the object. `cargo xtask` installs both.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("ws1-probe has no parent directory"))?
        .join("ws1-probe-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-utf8 path {}", root.display()))?;
    // aya-build forwards the inner cargo's stderr as `cargo:warning` lines, which cargo replays
    // on every later build: a quiet inner cargo leaves only real diagnostics (compiler
    // messages still arrive through its JSON output, errors on stderr).
    // SAFETY: the build script is single-threaded here; nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [Package {
            name: "ws1-probe-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
