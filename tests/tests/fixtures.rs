//! Smoke test of the profiler's fixtures: the burn workload in both builds and the Go pprof
//! reader. Needs no root; the profiler tests that use these fixtures will replace it.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ws1_probe_tests::{burn_bin, pprof_bin};

/// Starts `burn args` and checks that it announces itself with its pid.
fn start_burn(bin: &Path, args: &[&str]) -> Child {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read ready line");
    assert_eq!(line.trim_end(), format!("ready {}", child.id()), "{args:?}");
    child
}

/// The disassembly of one function, by `objdump` (binutils, installed with gcc).
fn disassemble(bin: &Path, function: &str) -> String {
    let output = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(format!("--disassemble={function}"))
        .arg(bin)
        .output()
        .expect("run objdump (apt-get install binutils)");
    assert!(output.status.success(), "objdump {}", bin.display());
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        text.contains(&format!("<{function}>:")),
        "{function} missing in {}",
        bin.display()
    );
    text
}

#[test]
fn burn_runs_in_every_mode() {
    // All at once, so the test takes the one second each runs.
    let started = Instant::now();
    let mut runs = Vec::new();
    for fp in [true, false] {
        for args in [
            &["--seconds", "1"][..],
            &["--cpu", "--threads", "2", "--seconds", "1"],
            &["--sleep-ms", "50", "--seconds", "1"],
        ] {
            runs.push((start_burn(&burn_bin(fp), args), fp, args));
        }
    }
    for (mut child, fp, args) in runs {
        let status = child.wait().expect("wait for burn");
        assert!(status.success(), "frame pointers {fp}, {args:?}: {status}");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(5),
        "--seconds 1 runs took {elapsed:?}"
    );
}

/// Whether `disassembly` (of one function) starts with the frame-pointer prologue.
fn starts_with_frame_pointer(disassembly: &str) -> bool {
    let mut instructions = disassembly
        .lines()
        .skip_while(|line| !line.ends_with(">:"))
        .skip(1)
        .filter_map(|line| line.split_once(":\t").map(|(_, insn)| insn.trim()));
    instructions.next() == Some("push   %rbp") && instructions.next() == Some("mov    %rsp,%rbp")
}

#[test]
fn burn_builds_differ_only_in_frame_pointers() {
    // The functions of the CPU stacks; a frame-pointer walk needs the prologue in every one.
    // (ws1_sleep_here and ws1_run_sleep have it too, but GCC schedules it among other code.)
    for function in ["ws1_burn_three", "ws1_burn_one", "ws1_run_cpu"] {
        let with = disassemble(&burn_bin(true), function);
        let without = disassemble(&burn_bin(false), function);
        assert!(
            starts_with_frame_pointer(&with),
            "{function} has no frame pointer in ws1-burn-fp:\n{with}"
        );
        assert!(
            !starts_with_frame_pointer(&without),
            "{function} sets up a frame pointer in ws1-burn-nofp:\n{without}"
        );
    }
    // Each burn loop is in its own function, with 3x the iterations in ws1_burn_three
    // (UNIT_ITERATIONS in burn.c), the count GCC loads into the loop register.
    const UNIT_ITERATIONS: u64 = 600_000;
    for fp in [true, false] {
        let three = disassemble(&burn_bin(fp), "ws1_burn_three");
        let one = disassemble(&burn_bin(fp), "ws1_burn_one");
        assert!(
            three.contains(&format!("${:#x},", 3 * UNIT_ITERATIONS)),
            "{three}"
        );
        assert!(one.contains(&format!("${UNIT_ITERATIONS:#x},")), "{one}");
    }
}

#[test]
fn pprof_reader_runs() {
    let pprof = pprof_bin();
    if !pprof.exists() {
        // `cargo xtask test` builds it before the tests; only CI must not go without it.
        assert!(
            std::env::var_os("CI").is_none(),
            "no pprof at {}: `cargo xtask test` builds it",
            pprof.display()
        );
        eprintln!(
            "skipping test - no pprof at {} (`cargo xtask test` builds it)",
            pprof.display()
        );
        return;
    }
    let output = Command::new(&pprof)
        .arg("-h")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", pprof.display()));
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "pprof -h: {}", output.status);
    assert!(
        text.contains("pprof <format> [options]"),
        "pprof -h said {text}"
    );
}
