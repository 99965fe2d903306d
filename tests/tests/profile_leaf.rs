//! Callers of frameless leaf functions (issue 18): a Go program (Debian's Go, whose small leaves
//! set up no frame) and C programs built with `-fno-omit-frame-pointer
//! -momit-leaf-frame-pointer` (one whose leaves push nothing, one whose leaves push callee-saved
//! registers), all built here from the sources below, each with two leaves
//! under one caller doing 3:1 of the work. Frame-pointer unwinding alone skips that caller in
//! every sample; the profile must name it in ≥ 95 % of samples and split the leaves 3:1 within
//! ±10 %, with frame pointers (the kernel's word at the stack pointer, confirmed by CFI from
//! `.eh_frame`, compressed `.debug_frame` or, for a Go binary linked with `-w`, `.gopclntab`)
//! and with DWARF unwinding.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use ws1_probe_tests::folded::{parse_folded, truncated_share, user_leaf};
use ws1_probe_tests::{Workload, privileged, run_probe};

/// Two leaves without calls (so the compiler gives them no frame) under `main.main`, 3:1.
const GO_SOURCE: &str = r#"package main

import (
	"fmt"
	"os"
	"time"
)

//go:noinline
func matchOrders(n int) int {
	s := 0
	for i := 0; i < n; i++ {
		s += i ^ (s >> 3)
	}
	return s
}

//go:noinline
func settleTrades(n int) int {
	s := 1
	for i := 0; i < n; i++ {
		s += i ^ (s >> 3)
	}
	return s
}

func main() {
	fmt.Println("ready", os.Getpid())
	// Bounded: the test kills it long before.
	deadline := time.Now().Add(120 * time.Second)
	total := 0
	for time.Now().Before(deadline) {
		total += matchOrders(3000000)
		total += settleTrades(1000000)
	}
	fmt.Fprintln(os.Stderr, total)
}
"#;

/// The same in C: `ws1_leaf_three` and `ws1_leaf_one` under `ws1_leaf_drive`.
const C_SOURCE: &str = r#"#include <stdio.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) unsigned long ws1_leaf_three(unsigned long n) {
    unsigned long s = 0;
    for (unsigned long i = 0; i < n; i++) {
        s += i ^ (s >> 3);
        __asm__ volatile("" : "+r"(s));
    }
    return s;
}

__attribute__((noinline)) unsigned long ws1_leaf_one(unsigned long n) {
    unsigned long s = 1;
    for (unsigned long i = 0; i < n; i++) {
        s += i ^ (s >> 3);
        __asm__ volatile("" : "+r"(s));
    }
    return s;
}

__attribute__((noinline)) unsigned long ws1_leaf_drive(void) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    unsigned long total = 0;
    do { /* bounded: the test kills it long before */
        total += ws1_leaf_three(3000000);
        total += ws1_leaf_one(1000000);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while (now.tv_sec - start.tv_sec < 120);
    return total;
}

/* A frameless leaf that blocks: nanosleep(2) by a raw system call, no call instruction. */
__attribute__((noinline)) long ws1_leaf_nap(const struct timespec *ts) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(35L), "D"(ts), "S"(0L) : "rcx", "r11", "memory");
    return ret;
}

__attribute__((noinline)) void ws1_leaf_naps(void) {
    struct timespec ts = {0, 20 * 1000 * 1000};
    for (int i = 0; i < 6000; i++) /* 120 s at most */
        ws1_leaf_nap(&ts);
}

int main(int argc, char **argv) {
    (void)argv;
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    if (argc > 1) {
        ws1_leaf_naps();
        return 0;
    }
    return (int)(ws1_leaf_drive() & 1);
}
"#;

/// Leaves that push callee-saved registers (the empty `asm` claims them, as a leaf short of
/// scratch registers does) but set up no frame: `ws1_push_three` saves rbx, r12 and r13 (its
/// return address three words above the stack pointer in its body), `ws1_push_one` saves rbx
/// (one word above), under `ws1_push_drive`, 3:1.
const C_PUSH_SOURCE: &str = r#"#include <stdio.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) unsigned long ws1_push_three(unsigned long n) {
    unsigned long s = 0;
    __asm__ volatile("" ::: "rbx", "r12", "r13");
    for (unsigned long i = 0; i < n; i++) {
        s += i ^ (s >> 3);
        __asm__ volatile("" : "+r"(s));
    }
    return s;
}

__attribute__((noinline)) unsigned long ws1_push_one(unsigned long n) {
    unsigned long s = 1;
    __asm__ volatile("" ::: "rbx");
    for (unsigned long i = 0; i < n; i++) {
        s += i ^ (s >> 3);
        __asm__ volatile("" : "+r"(s));
    }
    return s;
}

__attribute__((noinline)) unsigned long ws1_push_drive(void) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    unsigned long total = 0;
    do { /* bounded: the test kills it long before */
        total += ws1_push_three(3000000);
        total += ws1_push_one(1000000);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while (now.tv_sec - start.tv_sec < 120);
    return total;
}

int main(void) {
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    return (int)(ws1_push_drive() & 1);
}
"#;

/// Where the built programs are kept between runs: under the target directory, by source.
fn cache_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/leaf-workloads");
    std::fs::create_dir_all(&dir).expect("leaf workload dir");
    dir
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ws1-leaf-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Builds `source` into `name` with `build` (given the source path and the output path) unless
/// the cached binary was built from the same source.
fn build_cached(name: &str, ext: &str, source: &str, build: impl FnOnce(&Path, &Path)) -> PathBuf {
    let dir = cache_dir();
    let src = dir.join(format!("{name}.{ext}"));
    let out = dir.join(name);
    if out.exists() && std::fs::read_to_string(&src).ok().as_deref() == Some(source) {
        return out;
    }
    std::fs::write(&src, source).expect("write source");
    let _ = std::fs::remove_file(&out);
    build(&src, &out);
    assert!(out.exists(), "{} was not built", out.display());
    out
}

/// Debian's Go, by its own path (as xtask's tools use it); `None` (after saying so) when it is
/// missing, which fails on CI, where `cargo xtask test` installs `golang-go`.
fn debian_go() -> Option<PathBuf> {
    let go = PathBuf::from("/usr/lib/go/bin/go");
    if go.exists() {
        return Some(go);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "no Go toolchain at {} on a CI machine (cargo xtask test installs golang-go)",
        go.display()
    );
    eprintln!("skipping test - no Go toolchain (apt-get install golang-go)");
    None
}

/// Go's caches and settings under a temporary directory, so the build neither reads the
/// user's settings nor writes into their home.
fn go_command(go: &Path, tmp: &Path) -> Command {
    let mut cmd = Command::new(go);
    cmd.env("GOCACHE", tmp.join("cache"))
        .env("GOPATH", tmp.join("path"))
        .env("GOFLAGS", "")
        .env("GO111MODULE", "off")
        .env("CGO_ENABLED", "0")
        .env("TMPDIR", tmp);
    cmd
}

/// The Go program, with DWARF (and so `.debug_frame`) or, with `strip_dwarf`, linked with
/// `-ldflags=-w`, which leaves `.gopclntab` as the only record of the frame sizes.
fn go_program(go: &Path, strip_dwarf: bool) -> PathBuf {
    let tmp = temp_dir("go");
    let name = if strip_dwarf {
        "ws1-leaf-go-w"
    } else {
        "ws1-leaf-go"
    };
    let bin = build_cached(name, "go", GO_SOURCE, |src, out| {
        let mut cmd = go_command(go, &tmp);
        cmd.arg("build");
        if strip_dwarf {
            cmd.arg("-ldflags=-w");
        }
        let status = cmd
            .arg("-o")
            .arg(out)
            .arg(src)
            .status()
            .expect("run go build");
        assert!(status.success(), "go build failed");
    });
    let sections = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(&bin)
        .output()
        .expect("run readelf");
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(sections.contains(".gopclntab"), "{sections}");
    assert_eq!(
        sections.contains(".debug_frame"),
        !strip_dwarf,
        "{sections}"
    );
    // The leaves really set up no frame: no stack adjustment, no saved frame pointer.
    for leaf in ["main.matchOrders", "main.settleTrades"] {
        let out = go_command(go, &tmp)
            .args(["tool", "objdump", "-s"])
            .arg(format!("^{}$", leaf.replace('.', "\\.")))
            .arg(&bin)
            .output()
            .expect("run go tool objdump");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("RET"),
            "{leaf}:\n{text}"
        );
        assert!(
            !text.contains(", SP") && !text.contains("BP"),
            "{leaf} has a frame:\n{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    bin
}

/// The bodies of `functions` in `objdump -d` of `bin`: their instructions (mnemonic and
/// operands), by function.
fn disassembly(bin: &Path, functions: &[&str]) -> Vec<(String, Vec<String>)> {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(bin)
        .output()
        .expect("run objdump");
    let text = String::from_utf8_lossy(&out.stdout);
    functions
        .iter()
        .map(|function| {
            let body = text
                .split(&format!("<{function}>:\n"))
                .nth(1)
                .unwrap_or_else(|| panic!("{function} in objdump output"))
                .split("\n\n")
                .next()
                .unwrap_or_default();
            // Mnemonics: the text after the address's tab (`syscall` is not a call).
            let insns = body
                .lines()
                .map(|line| line.split('\t').nth(1).unwrap_or_default().to_owned())
                .collect();
            ((*function).to_owned(), insns)
        })
        .collect()
}

fn c_build(name: &str, source: &str) -> PathBuf {
    build_cached(name, "c", source, |src, out| {
        let status = Command::new("cc")
            .args([
                "-O2",
                "-g",
                "-fno-omit-frame-pointer",
                "-momit-leaf-frame-pointer",
                "-o",
            ])
            .arg(out)
            .arg(src)
            .status()
            .expect("run cc");
        assert!(status.success(), "cc failed");
    })
}

/// The C program whose leaves push registers: they do push, and set up no frame.
fn c_push_program() -> PathBuf {
    let bin = c_build("ws1-leaf-c-push", C_PUSH_SOURCE);
    for (leaf, pushes) in [("ws1_push_three", 3), ("ws1_push_one", 1)] {
        let insns = &disassembly(&bin, &[leaf])[0].1;
        let pushed = insns.iter().filter(|i| i.starts_with("push")).count();
        let framed = insns
            .iter()
            .any(|i| i.starts_with("call") || i.contains("%rbp") || i.contains(",%rsp"));
        assert!(
            pushed == pushes && !framed,
            "{leaf}: {pushed} pushes (expected {pushes}), or a frame or a call:\n{insns:#?}"
        );
    }
    bin
}

fn c_program() -> PathBuf {
    let bin = c_build("ws1-leaf-c", C_SOURCE);
    let leaves = ["ws1_leaf_three", "ws1_leaf_one", "ws1_leaf_nap"];
    for (leaf, insns) in disassembly(&bin, &leaves) {
        let framed = insns.iter().any(|insn| {
            insn.starts_with("push") || insn.starts_with("call") || insn.contains("%rbp")
        });
        assert!(!framed, "{leaf} has a frame or calls:\n{insns:#?}");
    }
    bin
}

/// Profiles `bin` (run as `comm`) for 6 s with `--unwind unwind` and checks that it was
/// unwound with DWARF when `dwarf` says so, that `caller` is the parent of `three` and `one`
/// in ≥ 95 % of all samples, that they split 3:1 within ±10 % and that no more than 5 % of
/// stacks are truncated.
fn leaves_keep_their_caller(
    bin: &Path,
    comm: &str,
    unwind: &str,
    dwarf: bool,
    caller: &str,
    three: &str,
    one: &str,
) {
    let target = Workload::spawn_args(bin, comm, &[]);
    let folded_path = temp_dir("out").join(format!("{comm}-{unwind}.folded"));
    let out = run_probe(&[
        "profile",
        "--pid",
        &target.pid.to_string(),
        "--unwind",
        unwind,
        "--duration",
        "6s",
        "--frequency",
        "997",
        "-o",
        folded_path.to_str().expect("utf-8 path"),
    ]);
    drop(target);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "profile failed: {stderr}");
    let mode = format!("1 processes, {} unwound with DWARF", u32::from(dwarf));
    assert!(stderr.contains(&mode), "expected `{mode}`:\n{stderr}");
    let text = std::fs::read_to_string(&folded_path).expect("folded output");
    let folded = parse_folded(&text);
    let total: u64 = folded.iter().map(|(_, v)| v).sum();
    assert!(
        total >= 500,
        "only {total} samples in 5 s\n{stderr}\n{text}"
    );
    let under_caller = |leaf: &str| -> u64 {
        folded
            .iter()
            .filter(|(f, _)| {
                user_leaf(f) == leaf && f.windows(2).any(|w| w[0] == caller && w[1] == leaf)
            })
            .map(|(_, v)| v)
            .sum()
    };
    let (n3, n1) = (under_caller(three), under_caller(one));
    assert!(
        (n3 + n1) * 100 >= total * 95,
        "{unwind}: {three}+{one} under {caller} in {n3}+{n1} of {total} samples:\n{text}"
    );
    let ratio = n3 as f64 / n1.max(1) as f64;
    assert!(
        (2.7..=3.3).contains(&ratio),
        "{unwind}: {three}:{one} = {n3}:{n1} = {ratio:.2}\n{text}"
    );
    let share = truncated_share(&stderr);
    assert!(share < 5.0, "{unwind}: {share}% truncated stacks\n{stderr}");
}

#[test]
fn go_frameless_leaves_keep_main_main_with_frame_pointers() {
    if !privileged() {
        return;
    }
    let Some(go) = debian_go() else { return };
    // Go binaries are profiled with frame pointers by default.
    leaves_keep_their_caller(
        &go_program(&go, false),
        "w-leaf-go-fp",
        "auto",
        false,
        "main.main",
        "main.matchOrders",
        "main.settleTrades",
    );
}

#[test]
fn go_frameless_leaves_keep_main_main_without_debug_frame() {
    if !privileged() {
        return;
    }
    let Some(go) = debian_go() else { return };
    leaves_keep_their_caller(
        &go_program(&go, true),
        "w-leaf-go-w",
        "auto",
        false,
        "main.main",
        "main.matchOrders",
        "main.settleTrades",
    );
}

#[test]
fn go_frameless_leaves_keep_main_main_with_dwarf_unwinding() {
    if !privileged() {
        return;
    }
    let Some(go) = debian_go() else { return };
    // framehop reads the compressed `.debug_frame`.
    leaves_keep_their_caller(
        &go_program(&go, false),
        "w-leaf-go-dw",
        "dwarf",
        true,
        "main.main",
        "main.matchOrders",
        "main.settleTrades",
    );
}

#[test]
fn c_frameless_leaves_keep_their_caller_with_frame_pointers() {
    if !privileged() {
        return;
    }
    leaves_keep_their_caller(
        &c_program(),
        "w-leaf-c-fp",
        "fp",
        false,
        "ws1_leaf_drive",
        "ws1_leaf_three",
        "ws1_leaf_one",
    );
}

/// Leaves that pushed one and three registers: the kernel finds their return addresses one and
/// three words above the stack pointer, and `.eh_frame` confirms those slots.
#[test]
fn c_leaves_that_push_registers_keep_their_caller_with_frame_pointers() {
    if !privileged() {
        return;
    }
    leaves_keep_their_caller(
        &c_push_program(),
        "w-leaf-c-push",
        "fp",
        false,
        "ws1_push_drive",
        "ws1_push_three",
        "ws1_push_one",
    );
}

#[test]
fn c_frameless_leaves_keep_their_caller_with_dwarf_unwinding() {
    if !privileged() {
        return;
    }
    leaves_keep_their_caller(
        &c_program(),
        "w-leaf-c-dw",
        "dwarf",
        true,
        "ws1_leaf_drive",
        "ws1_leaf_three",
        "ws1_leaf_one",
    );
}

/// Off-CPU time with frame pointers: the block starts in a frameless leaf (a raw system call,
/// like Go's `runtime.futex`), so its caller comes from the word at the user stack pointer the
/// kernel saved on entry.
#[test]
fn c_frameless_leaf_that_blocks_keeps_its_caller_off_cpu() {
    if !privileged() {
        return;
    }
    let target = Workload::spawn_args(&c_program(), "w-leaf-c-nap", &["nap"]);
    let folded_path = temp_dir("out").join("w-leaf-c-nap.folded");
    let out = run_probe(&[
        "profile",
        "--pid",
        &target.pid.to_string(),
        "--off-cpu",
        "--unwind",
        "fp",
        "--duration",
        "3s",
        "-o",
        folded_path.to_str().expect("utf-8 path"),
    ]);
    drop(target);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "profile --off-cpu failed: {stderr}");
    let text = std::fs::read_to_string(&folded_path).expect("folded output");
    let folded = parse_folded(&text);
    let nap_us: u64 = folded
        .iter()
        .filter(|(f, _)| user_leaf(f) == "ws1_leaf_nap")
        .map(|(_, v)| v)
        .sum();
    // 3 s of 20 ms naps; blocks cut by the window's edges are counted in part or not at all.
    assert!(
        (2_500_000..=3_100_000).contains(&nap_us),
        "{nap_us} us asleep in ws1_leaf_nap\n{text}\n{stderr}"
    );
    let under_caller: u64 = folded
        .iter()
        .filter(|(f, _)| {
            user_leaf(f) == "ws1_leaf_nap"
                && f.windows(2)
                    .any(|w| w[0] == "ws1_leaf_naps" && w[1] == "ws1_leaf_nap")
        })
        .map(|(_, v)| v)
        .sum();
    assert!(
        under_caller * 100 >= nap_us * 95,
        "{under_caller} of {nap_us} us under ws1_leaf_naps\n{text}"
    );
}
