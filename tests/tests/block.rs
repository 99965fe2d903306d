//! Block I/O latency and bytes per service, device and operation, against O_DIRECT I/O on a
//! real block device. `xtask test` runs this file on the `tp_btf` programs and again with
//! `WS1_PROBE_BLOCK_HOOKS=tracepoint`.

use std::{os::unix::fs::MetadataExt, path::PathBuf};

use ws1_probe_tests::{Agent, Metrics, Workload, privileged};

const DURATION: &str = "ws1_probe_block_io_duration_seconds";
const BYTES: &str = "ws1_probe_block_io_bytes_total";
const BS: u64 = 4096;

/// A directory on a real block device (tmpfs and overlay have no block I/O), and the whole
/// disk's kernel name when the device is not stacked (device-mapper, md: their I/O reaches
/// the disks below, which the metric names).
fn block_dir() -> Option<(PathBuf, Option<String>)> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("WS1_BLOCK_TEST_DIR")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    candidates.push(PathBuf::from("/var/tmp"));
    candidates.push(std::env::temp_dir());
    for dir in candidates {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        let dev = meta.dev();
        // SAFETY: major/minor are pure arithmetic on the number.
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let Ok(real) = std::fs::canonicalize(&sys) else {
            continue;
        };
        let disk = if real.join("partition").exists() {
            real.parent().map(PathBuf::from)
        } else {
            Some(real)
        };
        let name = disk.and_then(|d| {
            let stacked = std::fs::read_dir(d.join("slaves"))
                .map(|mut e| e.next().is_some())
                .unwrap_or(false);
            if stacked {
                return None;
            }
            d.file_name().map(|n| n.to_string_lossy().into_owned())
        });
        return Some((dir, name));
    }
    None
}

/// (count, bytes) of a service's `op`, summed over devices (`device` given: that one only).
fn io(m: &Metrics, service: &str, op: &str, device: Option<&str>) -> (f64, f64) {
    let matches = |labels: &[(String, String)]| {
        let has = |k: &str, v: &str| labels.iter().any(|(lk, lv)| lk == k && lv == v);
        has("service", service) && has("op", op) && device.is_none_or(|d| has("device", d))
    };
    let sum = |name: &str| {
        m.samples
            .iter()
            .filter(|(n, l, _)| n == name && matches(l))
            .map(|(_, _, v)| *v)
            .sum::<f64>()
    };
    (sum(&format!("{DURATION}_count")), sum(BYTES))
}

#[test]
fn direct_writes_reads_and_flushes_are_counted_per_service_and_device() {
    if !privileged() {
        return;
    }
    let Some((dir, device)) = block_dir() else {
        if std::env::var_os("CI").is_some() {
            panic!("no directory on a block device (set WS1_BLOCK_TEST_DIR)");
        }
        eprintln!("skipping test - no directory on a block device (set WS1_BLOCK_TEST_DIR)");
        return;
    };
    const SERVICE: &str = "b-direct";
    const N: u64 = 64;
    let path = dir.join(format!("ws1-block-test-{}", std::process::id()));
    let mut w = Workload::spawn_program(
        &ws1_probe_tests::workload_bin().with_file_name("ws1-blockload"),
        SERVICE,
    );
    // Filled and fsynced through the page cache before the agent starts: the O_DIRECT writes
    // below overwrite allocated blocks, so the file system has no block allocation to journal
    // for them.
    w.cmd(&format!("open {} {N} {BS}", path.display()));
    let agent = Agent::start(&["--pid", &w.pid.to_string()]);
    let dev = device.as_deref();
    let before = agent.metrics();
    assert_eq!(io(&before, SERVICE, "write", None), (0.0, 0.0));

    w.cmd(&format!("write {N}"));
    let m = agent.metrics();
    let (writes, written) = io(&m, SERVICE, "write", dev);
    assert!(
        writes >= N as f64,
        "{writes} writes on {dev:?} for {N} O_DIRECT writes\n{}",
        m.text
    );
    assert!(written >= (N * BS) as f64, "{written} bytes written");
    // Each write is one request of one block: no more requests than that from this process
    // (the journal's writes are jbd2's, not the service's).
    assert!(writes <= 2.0 * N as f64, "{writes} writes for {N}");
    // fdatasync flushes the device's volatile cache where it has one ("write back"); the
    // empty flush request is created by the process that called it.
    let cache = device
        .as_ref()
        .and_then(|d| std::fs::read_to_string(format!("/sys/block/{d}/queue/write_cache")).ok());
    if cache.as_deref().map(str::trim) == Some("write back") {
        let (flushes, flushed) = io(&m, SERVICE, "flush", dev);
        assert!(flushes >= 1.0, "no flush counted\n{}", m.text);
        assert_eq!(flushed, 0.0, "a flush carries no data");
    }
    // The latency histogram is exact: every request lands in one bucket, +Inf holds them all.
    let inf = m
        .samples
        .iter()
        .filter(|(n, l, _)| {
            n == &format!("{DURATION}_bucket")
                && l.iter().any(|(k, v)| k == "service" && v == SERVICE)
                && l.iter().any(|(k, v)| k == "op" && v == "write")
                && l.iter().any(|(k, v)| k == "le" && v == "+Inf")
        })
        .map(|(_, _, v)| *v)
        .sum::<f64>();
    assert_eq!(inf, writes);
    let (reads_before, _) = io(&m, SERVICE, "read", dev);

    w.cmd(&format!("read {N}"));
    let m = agent.metrics();
    let (reads, read_bytes) = io(&m, SERVICE, "read", dev);
    assert!(
        reads - reads_before >= N as f64,
        "{} reads for {N} O_DIRECT reads\n{}",
        reads - reads_before,
        m.text
    );
    assert!(read_bytes >= (N * BS) as f64, "{read_bytes} bytes read");
    // Reading issued no writes.
    assert_eq!(io(&m, SERVICE, "write", dev).0, writes);
    w.cmd("exit");
}

/// Which programs the agent loaded: the `tp_btf` ones by default on this kernel, the
/// tracepoints with `WS1_PROBE_BLOCK_HOOKS=tracepoint`, never both.
#[test]
fn block_hooks_are_tp_btf_by_default_and_tracepoints_on_request() {
    if !privileged() {
        return;
    }
    let w = Workload::spawn("b-hooks");
    let agent = Agent::start(&["--pid", &w.pid.to_string()]);
    let m = agent.metrics();
    let loaded = |program: &str| {
        m.samples.iter().any(|s| {
            s.0 == "ws1_probe_bpf_program_runs_total"
                && s.1.iter().any(|(k, v)| k == "program" && v == program)
        })
    };
    let btf = [
        "block_io_start_btf",
        "block_rq_complete_btf",
        "block_rq_merge_btf",
    ];
    let classic = ["block_io_start", "block_rq_complete", "block_rq_merge"];
    let fallback = std::env::var("WS1_PROBE_BLOCK_HOOKS").as_deref() == Ok("tracepoint");
    let (want, not): (&[&str], &[&str]) = if fallback {
        (&classic, &btf)
    } else {
        (&btf, &classic)
    };
    for p in want {
        assert!(loaded(p), "program {p} not loaded (fallback: {fallback})");
    }
    for p in not {
        assert!(!loaded(p), "program {p} loaded (fallback: {fallback})");
    }
}
