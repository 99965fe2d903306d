//! Helpers shared by the subcommands and by `bench`.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

/// Set on the sudo re-exec of xtask so the root instance does not redo bootstrap: the toolchain
/// belongs to the invoking user, and root's HOME/rustup may not have it at all.
pub const BOOTSTRAPPED_ENV: &str = "WS1_XTASK_BOOTSTRAPPED";

/// The workspace root. Taken from the compile-time manifest dir rather than `cargo metadata` or
/// the current directory, so it is right even when the binary is re-executed through sudo.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// cargo's target directory. Honours `CARGO_TARGET_DIR` like cargo does; a relative one is
/// relative to the workspace root because `cargo()` runs there.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// A `cargo` command run from the workspace root. Uses `$CARGO` (set by `cargo run`) so nested
/// builds use the same toolchain as the one that started xtask (`cargo +nightly xtask ...`).
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// A shell-like rendering of `cmd` (explicit env assignments, program, args) for logs and errors.
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    // `$CARGO` is a long toolchain path; "cargo" says the same thing in logs and errors.
    if env::var_os("CARGO").is_some_and(|cargo| cargo == cmd.get_program()) {
        parts.push("cargo".to_owned());
    } else {
        parts.push(quote(cmd.get_program()));
    }
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio after printing it, failing with the command line and status
/// so the one-line error says which command broke.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    eprintln!("+ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; on failure the error carries the first stderr line
/// so the reason still fits on one line.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let output = cmd
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("`{shown}` failed ({}): {}", output.status, first.trim());
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{shown}` printed non-UTF-8"))
}

/// Looks `name` up on PATH like `which` does (first executable regular file wins), without a
/// dependency or spawning a process.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// Whether the effective uid is 0. Read from /proc/self/status (field 2 of `Uid:` is the
/// effective uid) to avoid an `unsafe` libc call and an extra dependency.
pub fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no effective uid in /proc/self/status"))?;
    Ok(euid == "0")
}

/// Replaces this process with `program args` as root: directly when already root, otherwise
/// through `sudo -E` (loading eBPF programs and reading tracefs need root in practice). Only
/// returns on failure, hence the error return type.
pub fn exec_as_root(program: &Path, args: &[OsString], envs: &[(&str, OsString)]) -> anyhow::Error {
    let root = match is_root() {
        Ok(root) => root,
        Err(err) => return err,
    };
    let mut cmd = if root {
        let mut cmd = Command::new(program);
        cmd.envs(envs.iter().map(|(k, v)| (k, v)));
        cmd
    } else {
        let Some(sudo) = find_in_path("sudo") else {
            return anyhow!(
                "root privileges: not root and sudo is not installed: run this as root"
            );
        };
        let mut cmd = Command::new(sudo);
        // `-E` keeps RUST_LOG and friends; PATH goes through `env` because sudo's secure_path
        // replaces it even with -E, and re-executed xtask still needs to find cargo/rustup.
        cmd.args(["-E", "--", "env"]);
        let mut path = OsString::from("PATH=");
        path.push(env::var_os("PATH").unwrap_or_default());
        cmd.arg(path);
        for (key, value) in envs {
            let mut assignment = OsString::from(format!("{key}="));
            assignment.push(value);
            cmd.arg(assignment);
        }
        cmd.arg(program);
        cmd
    };
    cmd.args(args);
    let shown = display(&cmd);
    eprintln!("+ exec {shown}");
    let err = cmd.exec();
    anyhow!("could not exec `{shown}`: {err}")
}
