//! Precise mode finds each process's allocator by itself: `workloads/allocators.c` built here
//! against Debian's shared libjemalloc, libtcmalloc (gperftools) and libmimalloc, against a
//! static jemalloc whose API carries tikv-jemallocator's `_rjem_` prefix (Debian's
//! `libjemalloc_pic.a` with its public symbols renamed by objcopy), and against a static C
//! library with and without symbols. Each build leaks exactly K blocks of S bytes in
//! `leak_plain` and K in `leak_special` and frees everything else through the allocator's own
//! entry points (sdallocx, dallocx, rallocx, xallocx; tc_free_sized, sized delete; mi_free,
//! mi_free_size, mi_free_aligned), all without --alloc-lib.
//!
//! The packages are installed by `cargo xtask test`; without them a test is skipped, and in CI
//! (CI set) fails.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use serde_json::Value;
use ws1_probe_tests::{Workload, privileged, probe_bin};

const K: u64 = 9;
const S: u64 = 768;
/// Rounds of balanced churn.
const N: u64 = 200;

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/workloads/allocators.c");
const LIBDIR: &str = "/usr/lib/x86_64-linux-gnu";

/// The public API of jemalloc 5, renamed with the `_rjem_` prefix for the static build.
const JEMALLOC_API: [&str; 20] = [
    "aligned_alloc",
    "calloc",
    "dallocx",
    "free",
    "mallctl",
    "mallctlbymib",
    "mallctlnametomib",
    "malloc",
    "malloc_stats_print",
    "malloc_usable_size",
    "mallocx",
    "memalign",
    "nallocx",
    "posix_memalign",
    "rallocx",
    "realloc",
    "sallocx",
    "sdallocx",
    "valloc",
    "xallocx",
];

/// One build of the workload.
#[derive(Clone, Copy)]
enum Build {
    Jemalloc,
    JemallocStaticPrefixed,
    Tcmalloc,
    Mimalloc,
    StaticLibc,
    StaticLibcStripped,
}

impl Build {
    fn name(self) -> &'static str {
        match self {
            Self::Jemalloc => "je",
            Self::JemallocStaticPrefixed => "rjem",
            Self::Tcmalloc => "tc",
            Self::Mimalloc => "mi",
            Self::StaticLibc => "libc",
            Self::StaticLibcStripped => "stripped",
        }
    }

    /// The files the build needs, and the Debian package that has them.
    fn needs(self) -> (&'static [&'static str], &'static str) {
        match self {
            Self::Jemalloc => (
                &["/usr/include/jemalloc/jemalloc.h", "libjemalloc.so"],
                "libjemalloc-dev",
            ),
            Self::JemallocStaticPrefixed => (&["libjemalloc_pic.a"], "libjemalloc-dev"),
            Self::Tcmalloc => (
                &["/usr/include/gperftools/tcmalloc.h", "libtcmalloc.so"],
                "libgoogle-perftools-dev",
            ),
            Self::Mimalloc => (
                &["/usr/include/mimalloc.h", "libmimalloc.so"],
                "libmimalloc-dev",
            ),
            Self::StaticLibc | Self::StaticLibcStripped => (&["libc.a"], "libc6-dev"),
        }
    }
}

fn fail_or_skip(reason: &str) -> Option<PathBuf> {
    if std::env::var_os("CI").is_some() {
        panic!("allocator test cannot run: {reason} (`cargo xtask test` installs it)");
    }
    eprintln!("skipping test - {reason} (`cargo xtask test` installs it)");
    None
}

/// Builds the workload for `build` in a fresh directory; `None` when skipped.
fn compile(build: Build) -> Option<PathBuf> {
    let (files, package) = build.needs();
    for file in files {
        let path = if file.starts_with('/') {
            PathBuf::from(file)
        } else {
            Path::new(LIBDIR).join(file)
        };
        if !path.exists() {
            return fail_or_skip(&format!("{} missing: install {package}", path.display()));
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "ws1-probe-tests-allocators-{}-{}",
        std::process::id(),
        build.name()
    ));
    std::fs::create_dir_all(&dir).expect("build dir");
    let out = dir.join(format!("alloc-{}", build.name()));
    let mut cc = Command::new("cc");
    // Frame pointers in the workload: the kernel takes the allocation stacks by walking them.
    cc.args(["-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-Werror"]);
    match build {
        Build::Jemalloc => cc
            .args(["-DUSE_JEMALLOC", "-o"])
            .arg(&out)
            .arg(SOURCE)
            .arg("-ljemalloc"),
        Build::Tcmalloc => cc
            .args(["-DUSE_TCMALLOC", "-o"])
            .arg(&out)
            .arg(SOURCE)
            .arg("-ltcmalloc"),
        Build::Mimalloc => cc
            .args(["-DUSE_MIMALLOC", "-o"])
            .arg(&out)
            .arg(SOURCE)
            .arg("-lmimalloc"),
        Build::JemallocStaticPrefixed => {
            let archive = dir.join("librjem.a");
            let mut objcopy = Command::new("objcopy");
            for name in JEMALLOC_API {
                objcopy.arg(format!("--redefine-sym={name}=_rjem_{name}"));
            }
            let status = objcopy
                .arg(Path::new(LIBDIR).join("libjemalloc_pic.a"))
                .arg(&archive)
                .status()
                .expect("run objcopy (binutils)");
            assert!(status.success(), "objcopy failed: {status}");
            cc.args(["-DUSE_RJEM", "-o"])
                .arg(&out)
                .arg(SOURCE)
                .arg(&archive)
                .args(["-lpthread", "-lm", "-ldl"])
        }
        Build::StaticLibc => cc
            .args(["-DUSE_LIBC", "-static", "-o"])
            .arg(&out)
            .arg(SOURCE),
        Build::StaticLibcStripped => cc
            .args(["-DUSE_LIBC", "-static", "-s", "-o"])
            .arg(&out)
            .arg(SOURCE),
    };
    let status = cc.status().expect("run cc");
    assert!(
        status.success(),
        "building {} failed: {status}",
        build.name()
    );
    Some(out)
}

/// Starts the workload built for `build` under `comm`; `None` when skipped.
fn spawn(build: Build, comm: &str) -> Option<Workload> {
    let bin = compile(build)?;
    let (k, s, n) = (K.to_string(), S.to_string(), N.to_string());
    Some(Workload::spawn_args(&bin, comm, &[&k, &s, &n]))
}

/// Starts `ws1-probe leaks` on `pid` (no allocator flags) and returns once it is attached,
/// with the lines it printed on stderr until then.
fn start_leaks(pid: u32, json: bool) -> (Child, Vec<String>) {
    start_leaks_with(pid, json, &["--duration", "3s", "--min-age", "0s"])
}

/// [`start_leaks`] with other arguments than its duration and minimum age.
fn start_leaks_with(pid: u32, json: bool, extra: &[&str]) -> (Child, Vec<String>) {
    let pid = pid.to_string();
    let mut args = vec!["leaks", "--pid", &pid, "--top", "50"];
    if json {
        args.push("--json");
    }
    args.extend_from_slice(extra);
    let mut child = Command::new(probe_bin())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ws1-probe");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("collecting allocations") => break,
            Some(Ok(line)) => {
                eprintln!("ws1-probe: {line}");
                seen.push(line);
            }
            _ => panic!("ws1-probe {args:?} exited before attaching: {seen:?}"),
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (child, seen)
}

fn finish(child: Child) -> Vec<u8> {
    let out = child.wait_with_output().expect("wait for ws1-probe leaks");
    assert!(out.status.success(), "leaks failed: {}", out.status);
    out.stdout
}

/// Leak groups whose first frame is in `function`.
fn at<'a>(report: &'a Value, function: &str) -> Vec<&'a Value> {
    report["leaks"]
        .as_array()
        .expect("leaks array")
        .iter()
        .filter(|g| {
            g["stack"][0]["function"]
                .as_str()
                .is_some_and(|f| f.ends_with(function))
        })
        .collect()
}

/// Runs the leak/churn scenario on `build`; returns the report and the pid.
fn leaks_of(build: Build, comm: &str) -> Option<(Value, u32)> {
    let mut w = spawn(build, comm)?;
    let (leaks, _) = start_leaks(w.pid, true);
    w.cmd("go");
    let report: Value = serde_json::from_slice(&finish(leaks)).expect("leaks prints JSON");
    Some((report, w.pid))
}

/// The exact K × S at both leaking functions, nothing from the churn, and every block of the
/// churn freed: only the 2K leaked blocks are outstanding.
fn assert_exact_leaks(report: &Value, comm: &str) {
    for function in ["leak_plain", "leak_special"] {
        let groups = at(report, function);
        assert_eq!(groups.len(), 1, "{function}: {report}");
        assert_eq!(groups[0]["bytes"], K * S, "{function}: {}", groups[0]);
        assert_eq!(groups[0]["count"], K, "{function}: {}", groups[0]);
    }
    assert!(at(report, "balanced_churn").is_empty(), "{report}");
    assert_eq!(report["outstanding_blocks"], 2 * K, "{report}");
    let stats = &report["stats"][comm];
    let (allocs, frees) = (stats["allocs"].as_u64(), stats["frees"].as_u64());
    assert_eq!(
        allocs.zip(frees).map(|(a, f)| a - f),
        Some(2 * K),
        "{report}"
    );
    let (alloc_bytes, free_bytes) = (stats["alloc_bytes"].as_u64(), stats["free_bytes"].as_u64());
    assert_eq!(
        alloc_bytes.zip(free_bytes).map(|(a, f)| a - f),
        Some(2 * K * S),
        "{report}"
    );
}

/// The allocators the report says it hooked in `pid`: (kind, binary, prefix, symbols).
fn hooked(report: &Value, pid: u32) -> Vec<(String, String, Vec<String>)> {
    let found = &report["allocators"][pid.to_string()];
    assert_eq!(found["status"], "observed", "{report}");
    found["allocators"]
        .as_array()
        .expect("allocators")
        .iter()
        .map(|a| {
            let binary = match &a["binary"] {
                Value::String(s) => s.clone(),
                other => other["lib"].as_str().unwrap_or_default().to_owned(),
            };
            let symbols = a["hooks"]
                .as_array()
                .expect("hooks")
                .iter()
                .map(|h| h["symbol"].as_str().unwrap_or_default().to_owned())
                .collect();
            (
                a["kind"].as_str().unwrap_or_default().to_owned(),
                binary,
                symbols,
            )
        })
        .collect()
}

fn has_all(symbols: &[String], wanted: &[&str]) -> bool {
    wanted.iter().all(|w| symbols.iter().any(|s| s == w))
}

#[test]
fn shared_jemalloc_is_found_and_its_sized_frees_count() {
    if !privileged() {
        return;
    }
    let Some((report, pid)) = leaks_of(Build::Jemalloc, "a-je") else {
        return;
    };
    assert_exact_leaks(&report, "a-je");
    // The cost line's trapped calls are the session's allocator calls.
    let stats = &report["stats"]["a-je"];
    let calls = stats["allocs"].as_f64().unwrap_or(0.0) + stats["frees"].as_f64().unwrap_or(0.0);
    let per_second = report["cost"]["allocator_calls_per_second"].as_f64();
    let seconds = report["duration_seconds"].as_f64().unwrap_or(0.0);
    assert!(
        per_second.is_some_and(|r| (r * seconds - calls).abs() <= calls * 0.01),
        "{report}"
    );
    assert!(report["cost"]["before"]["cpu"].is_number(), "{report}");
    let hooked = hooked(&report, pid);
    assert_eq!(hooked.len(), 1, "{hooked:?}");
    let (kind, binary, symbols) = &hooked[0];
    assert_eq!(kind, "jemalloc");
    assert!(binary.contains("libjemalloc.so"), "{binary}");
    assert!(
        has_all(
            symbols,
            &[
                "malloc", "free", "mallocx", "rallocx", "xallocx", "sdallocx", "dallocx", "_ZdlPvm"
            ]
        ),
        "{symbols:?}"
    );
}

#[test]
fn static_prefixed_jemalloc_is_found_beside_libc() {
    if !privileged() {
        return;
    }
    let Some((report, pid)) = leaks_of(Build::JemallocStaticPrefixed, "a-rjem") else {
        return;
    };
    assert_exact_leaks(&report, "a-rjem");
    let hooked = hooked(&report, pid);
    assert_eq!(hooked.len(), 2, "{hooked:?}");
    assert_eq!(
        (hooked[0].0.as_str(), hooked[0].1.as_str()),
        ("jemalloc", "exe")
    );
    assert_eq!(
        report["allocators"][pid.to_string()]["allocators"][0]["prefix"],
        "_rjem_"
    );
    assert!(
        has_all(
            &hooked[0].2,
            &["_rjem_mallocx", "_rjem_sdallocx", "_rjem_free"]
        ),
        "{hooked:?}"
    );
    // The C library stays hooked: the prefixed jemalloc does not interpose its malloc.
    assert_eq!(hooked[1].0, "glibc");
}

#[test]
fn gperftools_tcmalloc_is_found_and_sized_deletes_count() {
    if !privileged() {
        return;
    }
    let Some((report, pid)) = leaks_of(Build::Tcmalloc, "a-tc") else {
        return;
    };
    assert_exact_leaks(&report, "a-tc");
    let hooked = hooked(&report, pid);
    assert_eq!(hooked.len(), 1, "{hooked:?}");
    assert_eq!(hooked[0].0, "tcmalloc");
    assert!(hooked[0].1.contains("libtcmalloc"), "{hooked:?}");
    // free, tc_free and operator delete are one function there, hooked once as `free`;
    // tc_free_sized is operator delete(void*, size_t) too.
    assert!(
        has_all(&hooked[0].2, &["malloc", "free", "tc_free_sized", "tc_new"]),
        "{hooked:?}"
    );
}

#[test]
fn mimalloc_is_found_and_mi_frees_count() {
    if !privileged() {
        return;
    }
    let Some((report, pid)) = leaks_of(Build::Mimalloc, "a-mi") else {
        return;
    };
    assert_exact_leaks(&report, "a-mi");
    let hooked = hooked(&report, pid);
    assert_eq!(hooked.len(), 1, "{hooked:?}");
    assert_eq!(hooked[0].0, "mimalloc");
    assert!(
        has_all(
            &hooked[0].2,
            &[
                "malloc",
                "free",
                "mi_zalloc",
                "mi_malloc_aligned",
                "mi_free_size",
                "mi_free_aligned"
            ]
        ),
        "{hooked:?}"
    );
}

#[test]
fn static_libc_with_symbols_is_hooked_in_the_executable() {
    if !privileged() {
        return;
    }
    let Some((report, pid)) = leaks_of(Build::StaticLibc, "a-static") else {
        return;
    };
    assert_exact_leaks(&report, "a-static");
    let hooked = hooked(&report, pid);
    assert_eq!(hooked.len(), 1, "{hooked:?}");
    assert_eq!(
        (hooked[0].0.as_str(), hooked[0].1.as_str()),
        ("malloc", "exe")
    );
}

#[test]
fn a_stripped_static_program_is_reported_not_observed() {
    if !privileged() {
        return;
    }
    let Some(mut w) = spawn(Build::StaticLibcStripped, "a-stripped") else {
        return;
    };
    let (leaks, stderr) = start_leaks(w.pid, false);
    w.cmd("go");
    let stdout = String::from_utf8(finish(leaks)).expect("utf-8 report");
    let warning = format!(
        "pid {}: allocations not observed: no known allocator",
        w.pid
    );
    // Said once on stderr, with what to do, and in the report's header.
    let warned: Vec<&String> = stderr.iter().filter(|l| l.contains(&warning)).collect();
    assert_eq!(warned.len(), 1, "{stderr:?}");
    assert!(warned[0].contains("--alloc-lib"), "{stderr:?}");
    assert!(stdout.contains(&warning), "{stdout}");
    assert!(
        stdout
            .contains("allocations not observed: no selected process's allocator could be hooked"),
        "{stdout}"
    );
    assert!(!stdout.contains("no outstanding allocations"), "{stdout}");
    assert!(
        stdout.contains("\ncost: 0 allocator calls/s trapped"),
        "{stdout}"
    );
}

#[test]
fn stacks_without_room_keep_their_calling_function() {
    if !privileged() {
        return;
    }
    let Some(mut w) = spawn(Build::Jemalloc, "a-top") else {
        return;
    };
    // One bucket for full stacks: every stack but the first collides and falls back to the
    // calling function alone (what programs without frame pointers flood the map with).
    let (leaks, _) = start_leaks_with(
        w.pid,
        true,
        &[
            "--duration",
            "3s",
            "--min-age",
            "0s",
            "--map-entries",
            "ALLOC_STACKS=1",
        ],
    );
    w.cmd("go");
    let report: Value = serde_json::from_slice(&finish(leaks)).expect("leaks prints JSON");
    assert_exact_leaks(&report, "a-top");
    assert_eq!(report["stack_unavailable_bytes"], 0, "{report}");
    let depths: Vec<usize> = ["leak_plain", "leak_special"]
        .iter()
        .map(|f| at(&report, f)[0]["stack"].as_array().map_or(0, Vec::len))
        .collect();
    assert!(
        depths.contains(&1),
        "one stack is its top frame only: {report}"
    );
}

#[test]
fn check_names_the_allocator_of_a_pid() {
    if !privileged() {
        return;
    }
    let Some(w) = spawn(Build::Mimalloc, "a-check") else {
        return;
    };
    let pid = w.pid.to_string();
    let out = ws1_probe_tests::run_probe(&["check", "--json", "--pid", &pid]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("check prints JSON");
    let found = &report["allocators"][&pid];
    assert_eq!(found["status"], "observed", "{report}");
    assert_eq!(found["allocators"][0]["kind"], "mimalloc", "{report}");
    let text = ws1_probe_tests::run_probe(&["check", "--pid", &pid]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("pid {pid}: mimalloc in libmimalloc.so")),
        "{text}"
    );
}

#[test]
fn the_agent_hooks_found_allocators_and_names_unobservable_processes_once() {
    if !privileged() {
        return;
    }
    let Some(mut stripped) = spawn(Build::StaticLibcStripped, "a-agstrip") else {
        return;
    };
    let Some(mut mi) = spawn(Build::Mimalloc, "a-agmi") else {
        return;
    };
    let (p1, p2) = (stripped.pid.to_string(), mi.pid.to_string());
    let agent =
        ws1_probe_tests::Agent::start_logged(&["--pid", &p1, "--pid", &p2, "--precise-alloc"]);
    let warning = format!("pid {p1}: allocations not observed: no known allocator");
    agent.wait_for_log(&warning, std::time::Duration::from_secs(10));
    mi.cmd("go");
    stripped.cmd("go");
    let m = agent.metrics();
    assert_eq!(
        m.get(
            "ws1_probe_alloc_outstanding_bytes",
            &[("service", "a-agmi")]
        ),
        Some((2 * K * S) as f64)
    );
    // Two more ticks of the agent (every 5 s) retry nothing and say nothing again.
    std::thread::sleep(std::time::Duration::from_secs(11));
    assert_eq!(agent.log_lines(&warning).len(), 1);
}

/// A private redis-server on a loopback port, killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    /// Starts Debian's redis-server (no persistence) under `dir`; `None` when skipped.
    fn start(dir: &Path) -> Option<Redis> {
        for tool in [
            "/usr/bin/redis-server",
            "/usr/bin/redis-cli",
            "/usr/bin/redis-benchmark",
        ] {
            if !Path::new(tool).exists() {
                fail_or_skip(&format!(
                    "{tool} missing: install redis-server and redis-tools"
                ))?;
            }
        }
        std::fs::create_dir_all(dir).expect("redis dir");
        let port = ws1_probe_tests::free_port();
        let child = Command::new("/usr/bin/redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let redis = Redis { child, port };
        let started = std::time::Instant::now();
        while redis.cli(&["ping"]).trim() != "PONG" {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "redis-server not answering after 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Some(redis)
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("/usr/bin/redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// redis' own `used_memory`, bytes.
    fn used_memory(&self) -> u64 {
        self.cli(&["info", "memory"])
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory in INFO")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn redis_new_keys_are_found_at_zmalloc_without_allocator_flags() {
    if !privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ws1-probe-tests-redis-{}", std::process::id()));
    let Some(redis) = Redis::start(&dir) else {
        return;
    };
    let pid = redis.child.id();
    // Stopped with Ctrl-C (SIGINT) once the load is done, however long it took.
    let (leaks, _) = start_leaks_with(pid, true, &["--duration", "10m", "--min-age", "1s"]);
    let before = redis.used_memory();
    // 20 000 new keys of 100 bytes (random keys from 10^9: collisions are negligible).
    let status = Command::new("/usr/bin/redis-benchmark")
        .args(["-p", &redis.port.to_string(), "-t", "set", "-n", "20000"])
        .args(["-r", "1000000000", "-d", "100", "-c", "4", "-q"])
        .stdout(Stdio::null())
        .status()
        .expect("run redis-benchmark");
    assert!(status.success(), "redis-benchmark: {status}");
    let growth = redis.used_memory() - before;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(leaks.id() as libc::pid_t, libc::SIGINT) };
    let report: Value = serde_json::from_slice(&finish(leaks)).expect("leaks prints JSON");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        report["allocators"][pid.to_string()]["allocators"][0]["kind"],
        "jemalloc",
        "{report}"
    );
    let groups = report["leaks"].as_array().expect("leaks");
    let outstanding: u64 = groups.iter().filter_map(|g| g["bytes"].as_u64()).sum();
    eprintln!("redis: {outstanding} B outstanding against {growth} B of used_memory growth");
    assert!(
        outstanding >= growth / 2 && outstanding <= growth * 2,
        "{outstanding} B outstanding against {growth} B of used_memory growth: {report}"
    );
    let top = groups[0]["stack"][0]["function"]
        .as_str()
        .unwrap_or_default();
    assert!(
        top.starts_with("zmalloc") || top.starts_with("zcalloc"),
        "{report}"
    );
    let unavailable = report["stack_unavailable_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(unavailable <= outstanding / 4, "{report}");
}
