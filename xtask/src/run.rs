//! `build`, `run` and `test`: thin wrappers over cargo that make sure bootstrap ran first.

use std::{env, ffi::OsString};

use anyhow::{Context as _, Result, bail};

use crate::{
    bootstrap, tools,
    util::{self, cargo, run_cmd},
};

/// `cargo build --release -p <packages>...`; public so `bench` can build what it measures.
pub fn cargo_build_release(packages: &[&str]) -> Result<()> {
    cargo_build(true, packages)
}

fn cargo_build(release: bool, packages: &[&str]) -> Result<()> {
    let mut cmd = cargo();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    for package in packages {
        cmd.args(["-p", package]);
    }
    run_cmd(&mut cmd)
}

pub fn build(release: bool) -> Result<()> {
    bootstrap::run()?;
    cargo_build(release, &["ws1-probe"])
}

/// Builds the agent and replaces this process with it (through sudo when not root), so signals
/// such as Ctrl-C reach the agent directly.
pub fn run(debug: bool, args: &[String]) -> Result<()> {
    bootstrap::run()?;
    cargo_build_release(&["ws1-probe"])?;
    let agent = util::target_dir().join("release/ws1-probe");
    let mut agent_args = vec![OsString::from("agent")];
    agent_args.extend(args.iter().map(OsString::from));
    // --debug only turns up the agent's logging (its --log flag reads WS1_PROBE_LOG); the build
    // stays release so what runs is what gets deployed and measured.
    let envs = if debug {
        vec![("WS1_PROBE_LOG", OsString::from("debug"))]
    } else {
        Vec::new()
    };
    Err(util::exec_as_root(&agent, &agent_args, &envs))
}

/// Unit tests (no root), then the privileged integration tests against the release binaries.
pub fn test(args: &[String]) -> Result<()> {
    bootstrap::run()?;

    let mut unit = cargo();
    // The tests crate needs root and built binaries; the eBPF crate only builds for BPF targets.
    unit.args(["test", "--workspace", "--exclude", "ws1-probe-tests"])
        .args(["--exclude", "ws1-probe-ebpf"]);
    let mut totals = run_tests(&mut unit).context("xtask test: unit tests failed")?;

    let privileged = if util::is_root()? {
        let counts = privileged_tests(args)?;
        totals.0 += counts.0;
        totals.1 += counts.1;
        "privileged ok"
    } else if in_ci() {
        // A CI job that silently skips the tests that matter would pass for the wrong reason.
        bail!("xtask test: privileged tests need root and CI is set: run the CI job as root");
    } else {
        eprintln!("skipping privileged tests - not root (run as root or set up sudo)");
        "privileged skipped (not root)"
    };
    eprintln!("xtask test: unit ok, {privileged}");
    // The closing line CI reads: every test of both stages.
    println!("total: {} passed, {} failed", totals.0, totals.1);
    Ok(())
}

/// Runs a `cargo test` command, passing its output through, and returns the passed and failed
/// counts summed over its `test result:` lines.
fn run_tests(cmd: &mut std::process::Command) -> Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    let shown = format!("{cmd:?}");
    eprintln!("+ {shown}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {shown}"))?;
    let mut totals = (0, 0);
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("cannot read cargo test output")?;
            println!("{line}");
            if let Some((passed, failed)) = parse_test_result(&line) {
                totals.0 += passed;
                totals.1 += failed;
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("could not wait for {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(totals)
}

/// Passed and failed counts of a libtest `test result: ok. 3 passed; 0 failed; ...` line.
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(word)?
                .trim()
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
    };
    Some((count(" passed")?, count(" failed")?))
}

fn privileged_tests(args: &[String]) -> Result<(u64, u64)> {
    // The profiler tests read its pprof output with the Go pprof tool.
    let pprof = tools::ensure_pprof()?;
    // The dependency tests start a private PostgreSQL cluster and drive it with pgbench.
    tools::ensure_postgres()?;
    // The alerting tests check the shipped rules and configs with promtool and amtool.
    tools::ensure_alerting()?;
    // The allocator tests build a C workload against jemalloc, tcmalloc and mimalloc.
    tools::ensure_allocators()?;
    // The web config tests make certificates and bcrypt hashes and ask with curl.
    tools::ensure_web_tools()?;
    // The runtime tests profile Node.js and a JVM through their perf maps.
    tools::ensure_runtimes()?;
    // The Python stack tests profile Debian's CPython 3.11 (pyenv's 3.12 is in the image).
    tools::ensure_python()?;
    // The Kubernetes manifests are validated against the API schemas.
    let kube_validate = tools::ensure_kubernetes_validate()?;
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "ws1-probe",
        "-p",
        "ws1-probe-tests",
        "-p",
        "ws1-sim",
        "--bins",
    ]);
    run_cmd(&mut build).context("xtask test: building binaries for privileged tests failed")?;

    let release = util::target_dir().join("release");
    // One at a time: the tests attach kernel programs and share tracefs/perf state.
    let tests = |which: &[&str], extra: &[String]| {
        let mut cmd = cargo();
        // Every test file runs even after one fails, so one run shows every failure.
        cmd.args([
            "test",
            "--release",
            "--no-fail-fast",
            "-p",
            "ws1-probe-tests",
        ])
        .args(which)
        .args(["--", "--test-threads=1"])
        .args(extra)
        .env("WS1_PROBE_BIN", release.join("ws1-probe"))
        .env("WS1_WORKLOAD_BIN", release.join("ws1-workload"))
        .env("WS1_PPROF_BIN", &pprof)
        .env("WS1_KUBE_VALIDATE_BIN", &kube_validate);
        cmd
    };
    let mut counts =
        run_tests(&mut tests(&["--tests"], args)).context("xtask test: privileged tests failed")?;
    if args.is_empty() {
        // The network tests once more on the fallback hooks (the tracepoints and the socket
        // hash), which this kernel would otherwise never run.
        eprintln!("xtask test: the network tests again with WS1_PROBE_NET_HOOKS=tracepoint");
        let mut net = tests(&["--test", "net"], &[]);
        net.env("WS1_PROBE_NET_HOOKS", "tracepoint");
        let (passed, failed) =
            run_tests(&mut net).context("xtask test: network tests on the tracepoints failed")?;
        counts = (counts.0 + passed, counts.1 + failed);
        // The scheduler tests on the run-queue fallbacks (timestamps in task storage; raw
        // tracepoints with a tid hash), which this kernel would otherwise never run.
        for hooks in ["timestamps", "raw_tracepoint"] {
            eprintln!("xtask test: the scheduler tests again with WS1_PROBE_SCHED_HOOKS={hooks}");
            let mut sched = tests(&["--test", "sched"], &[]);
            sched.env("WS1_PROBE_SCHED_HOOKS", hooks);
            let (passed, failed) = run_tests(&mut sched)
                .with_context(|| format!("xtask test: scheduler tests with {hooks} failed"))?;
            counts = (counts.0 + passed, counts.1 + failed);
        }
        // The block tests on the tracepoint fallback too.
        eprintln!("xtask test: the block tests again with WS1_PROBE_BLOCK_HOOKS=tracepoint");
        let mut block = tests(&["--test", "block"], &[]);
        block.env("WS1_PROBE_BLOCK_HOOKS", "tracepoint");
        let (passed, failed) =
            run_tests(&mut block).context("xtask test: block tests on the tracepoints failed")?;
        counts = (counts.0 + passed, counts.1 + failed);
    }
    Ok(counts)
}

/// CI systems set CI=true (or 1); treat empty/"false"/"0" as unset.
fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"))
}

#[cfg(test)]
mod tests {
    use super::parse_test_result;

    #[test]
    fn test_result_lines() {
        let line = "test result: ok. 50 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.04s";
        assert_eq!(parse_test_result(line), Some((50, 0)));
        let line = "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured";
        assert_eq!(parse_test_result(line), Some((2, 1)));
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
