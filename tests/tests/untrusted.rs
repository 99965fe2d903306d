//! Files an observed process controls: its perf map. `ws1-jitload` runs code from an anonymous
//! executable mapping (so only its perf map can name the samples there) and shapes its
//! `/tmp/perf-PID.map` as each test asks: a symbolic link to another user's file, a huge file,
//! a file whose symbols do not fit the budget. The agent must name nothing from the linked file,
//! keep its memory, count each refusal once and log it once; and in JSON log mode every stderr
//! line is one JSON object.

use std::{io::Read, path::PathBuf, time::Duration};

use ws1_probe_tests::{Agent, Workload, http_get_bytes, jitload_bin, privileged, run_probe};

const REFUSED: &str = "ws1_probe_untrusted_input_refused_total";

/// The JIT workload and the address of its code (from its `ready PID ADDR` line). Its perf map
/// is removed on drop (a killed workload cannot).
struct Jit {
    workload: Workload,
    code: u64,
}

impl Jit {
    fn spawn(comm: &str) -> Jit {
        let workload = Workload::spawn_args(&jitload_bin(), comm, &[]);
        let code = workload
            .ready
            .split_whitespace()
            .nth(2)
            .and_then(|a| u64::from_str_radix(a, 16).ok())
            .expect("ready line with the code address");
        Jit { workload, code }
    }

    fn map_path(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/perf-{}.map", self.workload.pid))
    }
}

impl Drop for Jit {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.map_path());
    }
}

/// A `seconds`-long profile from the agent, decompressed: the pprof string table holds every
/// function name as plain bytes.
fn profile(agent: &Agent, seconds: u32) -> String {
    let (status, body) = http_get_bytes(
        agent.port,
        &format!("/debug/pprof/profile?seconds={seconds}"),
        Duration::from_secs(u64::from(seconds) + 20),
    )
    .expect("profile request");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_end(&mut raw)
        .expect("gzip pprof");
    String::from_utf8_lossy(&raw).into_owned()
}

/// `[unknown]+0x…` for a sampled address in the code (its last byte varies).
fn unnamed_code(code: u64) -> String {
    format!("[unknown]+0x{:x}", code >> 8)
}

fn refused(agent: &Agent, reason: &str) -> f64 {
    agent
        .metrics()
        .value(REFUSED, &[("kind", "perf_map"), ("reason", reason)])
}

/// `Name:  value kB` of /proc/PID/status, in bytes.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in status"))
        * 1024
}

/// Resets the agent's peak RSS (VmHWM) to its current RSS.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs");
}

#[test]
fn a_symlinked_perf_map_is_refused_and_logged_as_json() {
    if !privileged() {
        return;
    }
    // Another user's file, naming the JIT code: were the link followed, the profile would show it.
    let mut jit = Jit::spawn("w-jit-link");
    let dir = std::env::temp_dir().join(format!("ws1-untrusted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret.map");
    std::fs::write(
        &secret,
        format!("{:x} 40 ws1_secret_of_another_user\n", jit.code),
    )
    .unwrap();
    let c = std::ffi::CString::new(secret.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
    jit.workload.cmd(&format!("link {}", secret.display()));

    let pid = jit.workload.pid.to_string();
    let agent = Agent::start_logged(&[
        "--pid",
        &pid,
        "--collectors",
        "profile",
        "--log-format",
        "json",
    ]);
    let text = profile(&agent, 3);
    assert!(!text.contains("ws1_secret_of_another_user"));
    assert!(
        text.contains(&unnamed_code(jit.code)),
        "JIT code was not sampled"
    );
    assert_eq!(refused(&agent, "symlink"), 1.0);
    // Once, not per sample or per recheck.
    let _ = profile(&agent, 2);
    assert_eq!(refused(&agent, "symlink"), 1.0);

    // Once the runtime writes its own file, its code is named: the refusal held nothing back
    // that should have been read.
    jit.workload.cmd("map ws1_jit_visible");
    let text = profile(&agent, 3);
    assert!(text.contains("ws1_jit_visible"), "perf map not used");
    assert!(!text.contains("ws1_secret_of_another_user"));

    // Every stderr line is one JSON object with timestamp, level, target and fields; the
    // refusal is one warning with its kind and reason as fields and the advice in the message.
    let lines = agent.log_lines("");
    assert!(!lines.is_empty());
    let mut warnings = Vec::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        let ts = v["timestamp"].as_str().expect("timestamp");
        assert!(
            ts.len() >= 20 && ts.as_bytes()[10] == b'T',
            "timestamp {ts}"
        );
        let level = v["level"].as_str().expect("level");
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
            "{line}"
        );
        assert!(
            v["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("ws1_probe")),
            "{line}"
        );
        assert!(v["fields"]["message"].is_string(), "{line}");
        if v["fields"]["kind"] == "perf_map" {
            warnings.push(v);
        }
    }
    assert_eq!(warnings.len(), 1, "{lines:?}");
    let w = &warnings[0];
    assert_eq!(w["level"], "WARN");
    assert_eq!(w["fields"]["reason"], "symlink");
    let message = w["fields"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("/tmp/perf-{pid}.map of pid {pid}")),
        "{message}"
    );
    assert!(message.contains("it is a symbolic link"), "{message}");
    assert!(
        message.contains("owned by the process's user or root"),
        "{message}"
    );
    drop(jit);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_huge_perf_map_leaves_memory_alone() {
    if !privileged() {
        return;
    }
    let mut jit = Jit::spawn("w-jit-huge");
    jit.workload.cmd("map ws1_jit_small");
    let pid = jit.workload.pid.to_string();
    let agent = Agent::start(&["--pid", &pid, "--collectors", "profile"]);
    let agent_pid = agent.child.id();
    let text = profile(&agent, 3);
    assert!(text.contains("ws1_jit_small"), "perf map not used");
    let baseline = status_kib(agent_pid, "VmRSS:");
    reset_peak(agent_pid);

    // 240 MiB (sparse): over the 64 MiB a perf map is read, so it is not read at all.
    jit.workload.cmd("huge 240 ws1_jit_huge");
    let text = profile(&agent, 3);
    assert!(!text.contains("ws1_jit_huge"));
    assert!(
        text.contains(&unnamed_code(jit.code)),
        "JIT code was not sampled"
    );
    assert_eq!(refused(&agent, "too_large"), 1.0);
    let peak_huge = status_kib(agent_pid, "VmHWM:");

    // 100 000 lines, 12.8 MB: read (it is under 64 MiB), but its symbols pass the 1 MiB perf
    // maps may keep of the default 8 MiB cache budget, and reading stops there.
    jit.workload.cmd("lines 100000 ws1_jit_bloat");
    let text = profile(&agent, 3);
    assert!(!text.contains("ws1_jit_bloat"));
    assert!(!text.contains("ws1_filler_"));
    assert_eq!(refused(&agent, "over_budget"), 1.0);
    let peak_bloat = status_kib(agent_pid, "VmHWM:");
    let rss = status_kib(agent_pid, "VmRSS:");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "agent RSS {:.1} MiB before; peak {:.1} MiB with the 240 MiB map, {:.1} MiB with the 12.8 MB map; {:.1} MiB after",
        mib(baseline),
        mib(peak_huge),
        mib(peak_bloat),
        mib(rss)
    );
    // The budget: the perf-map share of --profile-cache-bytes (1 MiB) and a 64 KiB read
    // buffer; 16 MiB leaves room for the allocator and the profile requests themselves. Reading
    // these files whole took hundreds of MiB.
    let budget = baseline + (16 << 20);
    assert!(peak_huge <= budget, "peak {peak_huge} > {budget}");
    assert!(peak_bloat <= budget, "peak {peak_bloat} > {budget}");

    // A small map again (a new file): named again.
    jit.workload.cmd("map ws1_jit_again");
    let text = profile(&agent, 3);
    assert!(
        text.contains("ws1_jit_again"),
        "perf map not used after refusals"
    );
}

#[test]
fn a_bad_log_format_is_a_clear_error() {
    let out = run_probe(&["--log-format", "xml", "check"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value 'xml' for '--log-format <LOG_FORMAT>'"),
        "{stderr}"
    );
    assert!(stderr.contains("[possible values: text, json]"), "{stderr}");
}

#[test]
fn an_unprivileged_process_gets_its_own_map_and_not_another_users() {
    if !privileged() {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::CommandExt;
    // The JIT runs as nobody and writes its own map: owned by its user, so it is read.
    let mut child = std::process::Command::new(jitload_bin())
        .uid(65534)
        .gid(65534)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ws1-jitload as nobody");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"ready"), "{line}");
    let pid: u32 = words[1].parse().unwrap();
    let code = u64::from_str_radix(words[2], 16).unwrap();
    let map = PathBuf::from(format!("/tmp/perf-{pid}.map"));
    struct Cleanup(std::process::Child, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_file(&self.1);
        }
    }
    writeln!(stdin, "map ws1_nobody_jit").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ok");
    let _guard = Cleanup(child, map.clone());

    let agent = Agent::start(&["--pid", &pid.to_string(), "--collectors", "profile"]);
    let text = profile(&agent, 3);
    assert!(text.contains("ws1_nobody_jit"), "own perf map not used");

    // Another user's file in its place (here uid 1, made by root, as a planted file would be):
    // refused, and what it names never shows.
    std::fs::remove_file(&map).unwrap();
    std::fs::write(&map, format!("{code:x} 40 ws1_planted_by_uid_1\n")).unwrap();
    let c = std::ffi::CString::new(map.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 1, 1) }, 0);
    let text = profile(&agent, 3);
    assert!(!text.contains("ws1_planted_by_uid_1"));
    assert!(
        text.contains(&unnamed_code(code)),
        "JIT code was not sampled"
    );
    assert_eq!(refused(&agent, "foreign_owner"), 1.0);
}
