//! Resources per service from procfs (exact thread, fd and process counts, CPU seconds against
//! /proc, the cgroup memory limit), the host subset, and `ws1-probe health`.

use std::path::{Path, PathBuf};

use ws1_probe_tests::{Agent, Metrics, Workload, privileged, resload_bin, run_probe};

const THREADS: u64 = 5;
const FILES: u64 = 40;
const CHILDREN: u64 = 2;
const LIMIT: u64 = 256 << 20;

/// The workload: CHILDREN sleeping children (forked first, so they hold only stdio), THREADS
/// sleeping threads, FILES open files; some CPU burnt. Returns it, its children and the fd
/// count it reported after opening.
fn workload(comm: &str) -> (Workload, Vec<u32>, u64) {
    let mut w = Workload::spawn_program(&resload_bin(), comm);
    let children: Vec<u32> = w
        .cmd(&format!("fork {CHILDREN}"))
        .split_whitespace()
        .skip(1)
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(children.len() as u64, CHILDREN);
    w.cmd(&format!("threads {THREADS}"));
    let fds: u64 = w.cmd(&format!("open {FILES}"))[3..].parse().unwrap();
    w.cmd("spin 800");
    (w, children, fds)
}

fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

/// utime + stime of /proc/PID/stat in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the comm start at state (3); utime is 14, stime 15.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A memory cgroup limited to LIMIT that the workload's processes are moved into; removed
/// (processes moved back to the root) when dropped.
struct LimitedCgroup {
    dir: PathBuf,
    parent_procs: PathBuf,
}

impl LimitedCgroup {
    fn new(name: &str, pids: &[u32]) -> LimitedCgroup {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let (base, file) = if v2 {
            (root.to_path_buf(), "memory.max")
        } else {
            (root.join("memory"), "memory.limit_in_bytes")
        };
        assert!(
            base.join("cgroup.procs").exists(),
            "no cgroup v2 with the memory controller and no v1 memory controller at {}",
            base.display()
        );
        let dir = base.join(name);
        let _ = std::fs::create_dir(&dir);
        if v2 {
            // The parent must hand the memory controller to its children.
            let _ = std::fs::write(base.join("cgroup.subtree_control"), "+memory");
        }
        std::fs::write(dir.join(file), LIMIT.to_string()).unwrap();
        for pid in pids {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        }
        LimitedCgroup {
            parent_procs: base.join("cgroup.procs"),
            dir,
        }
    }
}

impl Drop for LimitedCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(&self.parent_procs, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn resources_per_service_are_exact() {
    if !privileged() {
        return;
    }
    let comm = "w-res";
    let (w, children, fds) = workload(comm);
    let all: Vec<u32> = std::iter::once(w.pid)
        .chain(children.iter().copied())
        .collect();
    let _cg = LimitedCgroup::new(&format!("ws1-res-test-{}", std::process::id()), &all);
    // The agent's first sample is at its first scrape or tick, after all this.
    let agent = Agent::start(&["--comm", &format!("^{comm}$")]);
    let m = agent.metrics();
    let l = [("service", comm)];
    assert_eq!(m.get("ws1_probe_service_processes", &l), Some(3.0));
    // Main thread + THREADS, and one thread per child.
    assert_eq!(
        m.get("ws1_probe_service_threads", &l),
        Some((1 + THREADS + CHILDREN) as f64)
    );
    // The workload's own count after opening, plus the children's (stdio only).
    let expected_fds = fds + children.iter().map(|p| fd_count(*p)).sum::<u64>();
    assert_eq!(
        m.get("ws1_probe_service_open_fds", &l),
        Some(expected_fds as f64)
    );
    assert_eq!(fd_count(w.pid), fds, "the workload's fds changed");
    assert!(fds >= FILES + 3, "{fds}");
    let soft = {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads this process's limit into a valid rlimit; the workload inherited it.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
        r.rlim_cur as f64
    };
    assert_eq!(m.get("ws1_probe_service_fd_limit", &l), Some(soft));
    assert_eq!(
        m.get("ws1_probe_service_memory_limit_bytes", &l),
        Some(LIMIT as f64)
    );
    // The workload is idle now: its CPU time does not move between the sample and this read.
    let user = m.value(
        "ws1_probe_service_cpu_seconds_total",
        &[("service", comm), ("mode", "user")],
    );
    let system = m.value(
        "ws1_probe_service_cpu_seconds_total",
        &[("service", comm), ("mode", "system")],
    );
    let proc_cpu: f64 = all.iter().map(|p| cpu_seconds(*p)).sum();
    assert!(proc_cpu >= 0.5, "the workload burnt {proc_cpu} s");
    assert!(
        ((user + system) - proc_cpu).abs() <= 0.05 * proc_cpu,
        "metric {user} + {system} s vs /proc {proc_cpu} s"
    );
    let switches = m.value(
        "ws1_probe_service_context_switches_total",
        &[("service", comm), ("kind", "voluntary")],
    );
    // Every sleeping thread blocked at least once.
    assert!(switches >= (THREADS + CHILDREN) as f64, "{switches}");
    assert!(
        m.get(
            "ws1_probe_service_io_bytes_total",
            &[("service", comm), ("direction", "read")]
        )
        .is_some()
    );
    host_metrics_are_sane(&m);
}

fn host_metrics_are_sane(m: &Metrics) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib = |key: &str| -> f64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        m.get("ws1_probe_host_memory_total_bytes", &[]),
        Some(kib("MemTotal:") * 1024.0)
    );
    let avail = m.get("ws1_probe_host_memory_available_bytes", &[]).unwrap();
    assert!(avail > 0.0 && avail <= kib("MemTotal:") * 1024.0);
    let cpus = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    assert_eq!(m.get("ws1_probe_host_cpus", &[]), Some(cpus as f64));
    assert!(m.value("ws1_probe_host_cpu_seconds_total", &[("mode", "idle")]) > 0.0);
    assert!(
        m.get(
            "ws1_probe_host_network_receive_bytes_total",
            &[("device", "lo")]
        )
        .is_some()
    );
    assert!(
        m.get("ws1_probe_host_tcp_listen_drops_total", &[])
            .is_some()
    );
    // The root filesystem's size, as statvfs says.
    let root: Vec<_> = m
        .samples
        .iter()
        .filter(|(n, l, _)| {
            n == "ws1_probe_host_filesystem_size_bytes"
                && l.iter().any(|(k, v)| k == "mountpoint" && v == "/")
        })
        .collect();
    assert_eq!(root.len(), 1, "{}", m.text);
    assert!(root[0].2 > 0.0);
    assert!(!m.text.contains("fstype=\"proc\""));
}

#[test]
fn collectors_flag_leaves_resources_and_host_out() {
    if !privileged() {
        return;
    }
    let (_w, _children, _fds) = workload("w-res-off");
    let agent = Agent::start(&["--comm", "^w-res-off$", "--collectors", "syscalls,memory"]);
    let m = agent.metrics();
    assert!(!m.text.contains("ws1_probe_service_"), "{}", m.text);
    assert!(!m.text.contains("ws1_probe_host_"), "{}", m.text);
    assert!(
        m.get(
            "ws1_probe_resident_memory_bytes",
            &[("service", "w-res-off")]
        )
        .is_some()
    );
}

#[test]
fn counters_keep_exited_processes() {
    if !privileged() {
        return;
    }
    let comm = "w-res-exit";
    let mut a = Workload::spawn_program(&resload_bin(), comm);
    let mut b = Workload::spawn_program(&resload_bin(), comm);
    a.cmd("spin 600");
    let agent = Agent::start(&["--comm", &format!("^{comm}$")]);
    let cpu = |m: &Metrics| {
        m.value(
            "ws1_probe_service_cpu_seconds_total",
            &[("service", comm), ("mode", "user")],
        ) + m.value(
            "ws1_probe_service_cpu_seconds_total",
            &[("service", comm), ("mode", "system")],
        )
    };
    let before = cpu(&agent.metrics());
    assert!(before >= 0.5, "{before}");
    // Single-threaded and idle since the first sample, `b` now opens files: the next sample
    // must see them (an idle process's figures are reused only while it has not run).
    let fds: f64 = b.cmd("open 7")[3..].parse().unwrap();
    drop(a);
    // The next sample (at most 5 s later) sees one process with its new files, and the CPU
    // counter did not drop.
    let m = agent.wait_for("one process left", |m| {
        m.get("ws1_probe_service_processes", &[("service", comm)]) == Some(1.0)
    });
    assert_eq!(
        m.get("ws1_probe_service_open_fds", &[("service", comm)]),
        Some(fds)
    );
    assert!(cpu(&m) >= before, "{} < {before}", cpu(&m));
    drop(b);
}

#[test]
fn health_once_json_has_the_workload_row() {
    if !privileged() {
        return;
    }
    let comm = "w-res-health";
    let (mut w, _children, fds) = workload(comm);
    w.cmd("spin-thread");
    let out = run_probe(&[
        "health",
        "--comm",
        comm,
        "--once",
        "--json",
        "--interval",
        "1s",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON object");
    let rows = v["rows"].as_array().unwrap();
    let row = rows
        .iter()
        .find(|r| r["service"] == comm)
        .expect("the workload's row");
    // The spinning thread is one more.
    assert_eq!(
        row["threads"],
        serde_json::json!((2 + THREADS + CHILDREN) as f64)
    );
    assert!(row["open_fds"].as_f64().unwrap() >= fds as f64);
    assert!(row["cpu_percent"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["resident_bytes"].as_f64().unwrap() > 0.0);
    // Without a terminal the table is printed once.
    let out = run_probe(&["health", "--comm", comm, "--interval", "500ms"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.matches("SERVICE").count(), 1, "{table}");
    assert!(table.lines().any(|l| l.starts_with(comm)), "{table}");
}

/// Host mode: every process is sampled, ids fold into labels, and no counter goes backwards
/// while processes exit (a CPU-burning process exits between the two scrapes).
#[test]
fn host_mode_counters_stay_monotonic() {
    if !privileged() {
        return;
    }
    let counters = |m: &Metrics| -> Vec<(String, f64)> {
        m.samples
            .iter()
            .filter(|(n, _, _)| n.starts_with("ws1_probe_service_") && n.ends_with("_total"))
            .map(|(n, l, v)| (format!("{n}{l:?}"), *v))
            .collect()
    };
    let mut w = Workload::spawn_program(&resload_bin(), "w-res-host");
    let agent = Agent::start(&[]);
    let first = agent.metrics();
    assert!(
        first
            .samples
            .iter()
            .any(|(n, l, v)| n == "ws1_probe_service_processes"
                && l.iter().any(|(k, v)| k == "service" && v == "kernel")
                && *v > 0.0),
        "no kernel threads sampled"
    );
    w.cmd("spin 500");
    drop(w);
    // Past the 5 s sampling interval: the next scrape samples again.
    std::thread::sleep(std::time::Duration::from_millis(5_500));
    let second = agent.metrics();
    let after: std::collections::HashMap<String, f64> = counters(&second).into_iter().collect();
    let before = counters(&first);
    assert!(!before.is_empty());
    // A label whose processes are gone may retire between the scrapes (its series stop); the
    // series both scrapes have never went down. `kernel` is pinned, so it is in both.
    let mut compared = 0;
    for (series, v) in before {
        if let Some(now) = after.get(&series) {
            assert!(*now >= v, "{series}: {v} then {now}");
            compared += 1;
        }
    }
    let kernel_cpu = |m: &Metrics| {
        m.get(
            "ws1_probe_service_cpu_seconds_total",
            &[("service", "kernel"), ("mode", "system")],
        )
    };
    assert!(kernel_cpu(&first).is_some() && kernel_cpu(&second).is_some());
    assert!(compared >= 2, "{compared} series compared");
}

/// Nested cgroups laid out as the kubelet's cgroupfs driver makes them
/// (`kubepods/burstable/pod<UID>/<container id>`), in the hierarchy the agent reads (v2 with the
/// memory controller, else v1's memory); removed innermost first when dropped.
struct ContainerCgroup {
    dirs: Vec<PathBuf>,
    root_procs: PathBuf,
}

impl ContainerCgroup {
    fn new(relative: &str, pids: &[u32]) -> ContainerCgroup {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let base = if v2 {
            root.to_path_buf()
        } else {
            root.join("memory")
        };
        let mut dirs = Vec::new();
        let mut dir = base.clone();
        for part in relative.split('/') {
            dir = dir.join(part);
            if std::fs::create_dir(&dir).is_ok() {
                dirs.push(dir.clone());
            }
        }
        for pid in pids {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        }
        ContainerCgroup {
            dirs,
            root_procs: base.join("cgroup.procs"),
        }
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.split_whitespace() {
                    let _ = std::fs::write(&self.root_procs, pid);
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[test]
fn a_container_cgroup_gives_pod_and_container_labels() {
    if !privileged() {
        return;
    }
    let pod = "5e1f0c2a-7b3d-4c8e-9f10-2a3b4c5d6e7f";
    let id = format!("{:064x}", 0xc0ffee_u64 + u64::from(std::process::id()));
    let (in_pod, children, _) = workload("w-pod");
    let all: Vec<u32> = std::iter::once(in_pod.pid)
        .chain(children.iter().copied())
        .collect();
    let outside = Workload::spawn_program(&resload_bin(), "w-nopod");
    let _cg = ContainerCgroup::new(&format!("kubepods/burstable/pod{pod}/{id}"), &all);
    let agent = Agent::start(&["--comm", "^w-(no)?pod$", "--collectors", "resources"]);
    let m = agent.metrics();
    let labels = [
        ("service", "w-pod"),
        ("pod_uid", pod),
        ("container_id", id.as_str()),
    ];
    assert_eq!(
        m.get("ws1_probe_service_container_processes", &labels),
        Some((1 + CHILDREN) as f64)
    );
    // Exactly one container series, and none for the process outside any container.
    let series = m
        .text
        .lines()
        .filter(|l| l.starts_with("ws1_probe_service_container_processes{"))
        .count();
    assert_eq!(series, 1, "{}", m.text);
    assert_eq!(
        m.get("ws1_probe_service_processes", &[("service", "w-nopod")]),
        Some(1.0)
    );
    drop(outside);
}
