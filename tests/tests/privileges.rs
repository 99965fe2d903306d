//! Least privilege: after start-up every thread of the agent holds only the capabilities it uses
//! at run time (read from /proc), and what those are for still works: a process of another user
//! started after the drop is profiled, with its binary named through /proc/PID/map_files.

use std::{io::Read, os::unix::process::CommandExt, process::Command, time::Duration};

use ws1_probe_tests::{Agent, burn_bin, http_get_bytes, privileged};

/// CAP_DAC_READ_SEARCH (2), CAP_SYS_PTRACE (19), CAP_SYSLOG (34), CAP_PERFMON (38), CAP_BPF
/// (39), CAP_CHECKPOINT_RESTORE (40).
const KEPT: u64 = (1 << 2) | (1 << 19) | (1 << 34) | (1 << 38) | (1 << 39) | (1 << 40);

fn caps(status: &str, field: &str) -> u64 {
    let v = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field}"));
    u64::from_str_radix(v.trim(), 16).expect("hex capability mask")
}

/// Per thread of `pid`: (tid, CapEff, CapPrm, CapInh, CapBnd, CapAmb).
fn thread_caps(pid: u32) -> Vec<(String, [u64; 5])> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|e| {
            let e = e.ok()?;
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                ["CapEff:", "CapPrm:", "CapInh:", "CapBnd:", "CapAmb:"].map(|f| caps(&status, f)),
            ))
        })
        .collect()
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn every_thread_keeps_only_the_run_time_capabilities() {
    if !privileged() {
        return;
    }
    assert!(
        last_cap() >= 40,
        "this kernel predates CAP_CHECKPOINT_RESTORE"
    );
    let agent = Agent::start_logged(&["--comm", "w-priv-burn", "--collectors", "profile"]);
    // Threads the agent starts later (blocking pool, under load) inherit the reduced sets.
    let _ = agent.metrics();
    let threads = thread_caps(agent.child.id());
    assert!(threads.len() > 1, "{threads:?}");
    for (tid, [eff, prm, inh, bnd, amb]) in &threads {
        assert_eq!(*eff, KEPT, "thread {tid} CapEff {eff:x}");
        assert_eq!(*prm, KEPT, "thread {tid} CapPrm {prm:x}");
        assert_eq!(*bnd, KEPT, "thread {tid} CapBnd {bnd:x}");
        assert_eq!(*inh, 0, "thread {tid} CapInh {inh:x}");
        assert_eq!(*amb, 0, "thread {tid} CapAmb {amb:x}");
    }
    assert_eq!(
        agent
            .log_lines("dropped capabilities; kept CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_CHECKPOINT_RESTORE, CAP_SYSLOG")
            .len(),
        1
    );

    // A process of another user (nobody), started after the drop: found by its exec, sampled,
    // and its functions named from its binary.
    let dir = std::env::temp_dir().join(format!("ws1-priv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("w-priv-burn");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(burn_bin(false), &link).unwrap();
    let mut burn = Command::new(&link)
        .uid(65534)
        .gid(65534)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the burn workload as nobody");
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = http_get_bytes(
        agent.port,
        "/debug/pprof/profile?seconds=3",
        Duration::from_secs(20),
    )
    .expect("profile request");
    let _ = burn.kill();
    let _ = burn.wait();
    assert_eq!(status, 200);
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_end(&mut raw)
        .expect("gzip pprof");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("ws1_burn_three"), "burn functions not named");
    assert!(text.contains("ws1_burn_one"), "burn functions not named");
    // Still every thread, after the profile request's threads ran.
    for (tid, [eff, ..]) in thread_caps(agent.child.id()) {
        assert_eq!(eff, KEPT, "thread {tid} CapEff {eff:x}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn keep_capabilities_keeps_them() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(&[
        "--comm",
        "w-priv-none",
        "--collectors",
        "syscalls",
        "--keep-capabilities",
    ]);
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    for (tid, [eff, ..]) in thread_caps(agent.child.id()) {
        assert_eq!(eff, caps(&own, "CapEff:"), "thread {tid}");
    }
}

#[test]
fn precise_mode_keeps_cap_sys_admin_for_later_uprobes() {
    if !privileged() {
        return;
    }
    // Opening a uprobe perf event needs CAP_SYS_ADMIN here even with CAP_PERFMON, and precise
    // mode attaches uprobes to processes that start later (tests/tests/alloc.rs
    // agent_precise_mode_follows_new_processes runs that).
    let agent = Agent::start(&[
        "--comm",
        "^w-priv-pa$",
        "--precise-alloc",
        "--collectors",
        "syscalls",
    ]);
    for (tid, [eff, prm, ..]) in thread_caps(agent.child.id()) {
        assert_eq!(eff, KEPT | (1 << 21), "thread {tid} CapEff {eff:x}");
        assert_eq!(prm, KEPT | (1 << 21), "thread {tid} CapPrm {prm:x}");
    }
}
