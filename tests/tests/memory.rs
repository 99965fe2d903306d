//! The always-on memory signal: resident memory per service and its growth slope.

use std::time::Duration;

use ws1_probe_tests::{Agent, Metrics, Workload, privileged};

const SERVICE: &str = "w-grow";

fn resident(m: &Metrics) -> f64 {
    m.value("ws1_probe_resident_memory_bytes", &[("service", SERVICE)])
}

fn statm_rss(pid: u32) -> f64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).expect("statm");
    let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64
}

#[test]
fn resident_memory_and_growth_are_reported_per_service() {
    if !privileged() {
        return;
    }
    let mut w = Workload::spawn(SERVICE);
    let agent = Agent::start(&["--pid", &w.pid.to_string()]);
    let m = agent.metrics();
    let before = resident(&m);
    let rss = statm_rss(w.pid);
    assert!(
        (before - rss).abs() < 1024.0 * 1024.0,
        "metric {before} vs statm {rss}"
    );
    // The agent samples every 5 s; grow by 16 MiB between samples.
    for _ in 0..3 {
        w.cmd("grow 16");
        std::thread::sleep(Duration::from_millis(5_200));
    }
    let m = agent.metrics();
    let after = resident(&m);
    let grown = after - before;
    assert!(
        (47.0 * 1024.0 * 1024.0..64.0 * 1024.0 * 1024.0).contains(&grown),
        "grew {grown} bytes"
    );
    let slope = m
        .get(
            "ws1_probe_memory_growth_bytes_per_second",
            &[("service", SERVICE)],
        )
        .expect("a growth slope after three samples");
    // 16 MiB per ~5.2 s is ~3.2 MB/s; the fit sees the same steps, so it is clearly positive.
    assert!(slope > 1024.0 * 1024.0, "slope {slope} B/s");
    // Touching 48 MiB of fresh 4 KiB pages faults 12288 times; page faults are sampled one in
    // 64 per CPU, so the scaled count is within a few samples of that (plus start-up faults).
    let faults = m.value("ws1_probe_page_faults_total", &[("service", SERVICE)]);
    assert!(
        (0.9 * 12288.0..2.0 * 12288.0).contains(&faults),
        "{faults} page faults for 48 MiB"
    );
}
