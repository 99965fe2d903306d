//! Idempotent toolchain setup: the nightly toolchain with rust-src (aya-build compiles the kernel
//! programs with `-Z build-std`) and bpf-linker built against nightly's own libLLVM, so the
//! bitcode rustc emits is always readable by the linker. Every subcommand runs this first.

use std::{
    env, fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::util::{self, capture, find_in_path, run_cmd};

const BPF_LINKER_VERSION: &str = "0.13.0";

fn report(step: &str, status: &str) {
    eprintln!("bootstrap: {step} ... {status}");
}

pub fn run() -> Result<()> {
    if env::var_os(util::BOOTSTRAPPED_ENV).is_some() {
        report("toolchain", "already checked before sudo");
        return Ok(());
    }
    let toolchains = installed_toolchains()?;
    ensure_rust_src()?;
    ensure_bpf_linker(&toolchains)?;
    Ok(())
}

/// Channel names of the installed toolchains ("stable", "nightly", ...), checking that nightly is
/// there: it cannot be downloaded from here, so the fix is left to the user.
fn installed_toolchains() -> Result<Vec<String>> {
    let step = "rustup with the nightly toolchain";
    if find_in_path("rustup").is_none() {
        bail!(
            "rustup not found on PATH: install rustup (https://rustup.rs) and add ~/.cargo/bin to PATH"
        );
    }
    let list = capture(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is not working: check `rustup toolchain list`")?;
    let toolchains: Vec<String> = list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(channel_of)
        .collect();
    if !toolchains.iter().any(|t| t == "nightly") {
        bail!("nightly toolchain not installed: run `rustup toolchain install nightly`");
    }
    report(step, "already installed");
    Ok(toolchains)
}

/// "nightly-x86_64-unknown-linux-gnu" -> "nightly". Dated ("nightly-2025-01-01-...") and
/// versioned ("1.95.0-...") toolchains do not answer to `+nightly`/`+stable`, so they map to
/// their full name and never match.
fn channel_of(toolchain: &str) -> String {
    for channel in ["stable", "beta", "nightly"] {
        if let Some(rest) = toolchain.strip_prefix(channel) {
            let dated = rest
                .strip_prefix('-')
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()));
            if rest.is_empty() || (rest.starts_with('-') && !dated) {
                return channel.to_owned();
            }
        }
    }
    toolchain.to_owned()
}

fn ensure_rust_src() -> Result<()> {
    let step = "rust-src for nightly";
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("cannot list nightly components: check `rustup component list --toolchain nightly`")?;
    if installed
        .lines()
        .any(|line| line.split_whitespace().next() == Some("rust-src"))
    {
        report(step, "already installed");
        return Ok(());
    }
    report(step, "installing");
    run_cmd(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context("rust-src: run `rustup component add rust-src --toolchain nightly`")?;
    report(step, "done");
    Ok(())
}

/// nightly's LLVM: major version and the `libLLVM.so.*` file in its sysroot (the name carries the
/// SONAME that bpf-linker records, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`).
struct NightlyLlvm {
    major: u32,
    lib: PathBuf,
}

fn nightly_llvm() -> Result<NightlyLlvm> {
    let verbose = capture(Command::new("rustc").args(["+nightly", "-vV"]))
        .context("nightly rustc is not working: run `rustup toolchain install nightly`")?;
    let version = verbose
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .map(str::trim)
        .ok_or_else(|| {
            anyhow!("`rustc +nightly -vV` reports no LLVM version: reinstall nightly")
        })?;
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .ok_or_else(|| anyhow!("unparsable nightly LLVM version {version:?}: reinstall nightly"))?;

    let sysroot = capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("nightly sysroot unknown: reinstall nightly")?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let entries = fs::read_dir(&lib_dir)
        .with_context(|| format!("nightly sysroot {}: reinstall nightly", lib_dir.display()))?;
    let mut candidates: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .collect();
    // Prefer the file whose name carries nightly's LLVM major; sort so the choice is stable.
    candidates.sort();
    let prefix = format!("libLLVM.so.{major}");
    let lib = candidates
        .iter()
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)))
        .or(candidates.first())
        .cloned()
        .ok_or_else(|| {
            anyhow!("no libLLVM.so.* in {}: reinstall nightly (`rustup toolchain install nightly --force`)", lib_dir.display())
        })?;
    Ok(NightlyLlvm { major, lib })
}

/// Why the bpf-linker found on PATH is unusable, or its path when it is fine.
enum Linker {
    Good(PathBuf),
    Missing,
    Bad(PathBuf, String),
}

/// Checks the bpf-linker on PATH (the one aya-build will use): right version, and its libLLVM
/// resolves (through whichever prefix it was built with) to nightly's libLLVM file itself.
fn inspect_linker(expected_lib: &Path) -> Linker {
    let Some(path) = find_in_path("bpf-linker") else {
        return Linker::Missing;
    };
    let bad = |why: String| Linker::Bad(path.clone(), why);
    // ldd first: with a dangling libLLVM, `--version` would only fail with a loader error.
    let ldd = match capture(Command::new("ldd").arg(&path)) {
        Ok(out) => out,
        Err(err) => return bad(format!("{err:#}")),
    };
    let Some(line) = ldd.lines().find(|l| l.contains("libLLVM")) else {
        return bad("does not link a shared libLLVM".into());
    };
    let resolved = line
        .split_once("=>")
        .map(|(_, rest)| rest.trim())
        .and_then(|rest| rest.split(" (").next())
        .unwrap_or("not found");
    if resolved.is_empty() || resolved.starts_with("not found") {
        return bad(format!("its libLLVM is not found ({})", line.trim()));
    }
    let same = match (fs::canonicalize(resolved), fs::canonicalize(expected_lib)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        return bad(format!("links {resolved}, not {}", expected_lib.display()));
    }
    match capture(Command::new(&path).arg("--version")) {
        Ok(out) if out.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION) => Linker::Good(path),
        Ok(out) => bad(format!("is {:?}, want {BPF_LINKER_VERSION}", out.trim())),
        Err(err) => bad(format!("{err:#}")),
    }
}

fn ensure_bpf_linker(toolchains: &[String]) -> Result<()> {
    let llvm = nightly_llvm()?;
    let step = format!(
        "bpf-linker {BPF_LINKER_VERSION} for nightly's LLVM {}",
        llvm.major
    );
    match inspect_linker(&llvm.lib) {
        Linker::Good(path) => {
            report(&step, &format!("already installed ({})", path.display()));
            return Ok(());
        }
        Linker::Missing => report(&step, "installing (not on PATH; takes ~1 min)"),
        Linker::Bad(path, why) => report(
            &step,
            &format!("installing ({} {why}; takes ~1 min)", path.display()),
        ),
    }
    if !toolchains.iter().any(|t| t == "stable") {
        bail!(
            "stable toolchain not installed (bpf-linker is built with it): run `rustup toolchain install stable`"
        );
    }
    let prefix = make_llvm_prefix(&llvm)?;
    let mut install = Command::new("cargo");
    install
        .args([
            "+stable",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{}", llvm.major))
        // --force: we only get here when an installed copy is missing, broken or the wrong
        // version, and without it cargo would keep a same-version but broken install.
        .args(["--locked", "--force"])
        .env("LLVM_PREFIX", &prefix);
    run_cmd(&mut install).context("bpf-linker install failed: see the cargo output above")?;

    match inspect_linker(&llvm.lib) {
        Linker::Good(path) => {
            report(&step, &format!("done ({})", path.display()));
            Ok(())
        }
        // The install succeeded, so PATH finds another or no copy: say where ours went.
        Linker::Missing | Linker::Bad(..) => {
            let bin = cargo_install_root()?.join("bin");
            bail!(
                "bpf-linker was installed to {} but PATH does not find a working one first: put {} at the front of PATH",
                bin.display(),
                bin.display()
            )
        }
    }
}

/// Where `cargo install` puts binaries: `$CARGO_INSTALL_ROOT`, else `$CARGO_HOME`, else `~/.cargo`.
fn cargo_install_root() -> Result<PathBuf> {
    for var in ["CARGO_INSTALL_ROOT", "CARGO_HOME"] {
        if let Some(dir) = env::var_os(var).filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(dir));
        }
    }
    Ok(home()?.join(".cargo"))
}

fn home() -> Result<PathBuf> {
    env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("HOME is not set: set HOME (or XDG_DATA_HOME)"))
}

/// Builds the `LLVM_PREFIX` for llvm-sys: `lib/libLLVM.so` for the link step and
/// `lib/<SONAME file>` for the loader (bpf-linker's RUNPATH points at this lib dir). It lives
/// outside target/ because the installed binary keeps loading through it after `cargo clean`.
fn make_llvm_prefix(llvm: &NightlyLlvm) -> Result<PathBuf> {
    let data_home = match env::var_os("XDG_DATA_HOME").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => home()?.join(".local/share"),
    };
    let prefix = data_home
        .join("ws1-probe")
        .join(format!("llvm-{}", llvm.major));
    let lib_dir = prefix.join("lib");
    let step = format!("LLVM prefix {}", prefix.display());
    let file_name = llvm
        .lib
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", llvm.lib.display()))?;
    fs::create_dir_all(&lib_dir)
        .with_context(|| format!("cannot create {}: check permissions", lib_dir.display()))?;
    for name in [Path::new("libLLVM.so"), Path::new(file_name)] {
        let link = lib_dir.join(name);
        replace_symlink(&llvm.lib, &link).with_context(|| {
            format!(
                "cannot create symlink {}: check permissions",
                link.display()
            )
        })?;
    }
    report(&step, "ready");
    Ok(prefix)
}

fn replace_symlink(target: &Path, link: &Path) -> io::Result<()> {
    match fs::read_link(link) {
        Ok(current) if current == target => return Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        // A symlink to elsewhere (an older nightly) or not a symlink at all: replace it.
        Ok(_) | Err(_) => fs::remove_file(link)?,
    }
    std::os::unix::fs::symlink(target, link)
}
