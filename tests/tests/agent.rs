//! Agent lifecycle and bad input: readiness, clean SIGTERM, one-line errors.

use std::time::Duration;

use ws1_probe_tests::{Agent, free_port, http_get, privileged, run_probe};

#[test]
fn ready_serves_metrics_and_stops_cleanly_on_sigterm() {
    if !privileged() {
        return;
    }
    let mut agent = Agent::start(&[]);
    eprintln!("agent ready after {:?}", agent.ready_after);
    assert_eq!(http_get(agent.port, "/healthz").unwrap().0, 200);
    let m = agent.metrics();
    for name in [
        "ws1_probe_agent_cpu_seconds_total",
        "ws1_probe_agent_resident_memory_bytes",
    ] {
        assert!(m.get(name, &[]).is_some(), "{name} missing");
    }
    assert_eq!(
        m.get("ws1_probe_bpf_map_capacity", &[("map", "TARGETS")]),
        Some(32768.0)
    );
    assert!(
        m.get(
            "ws1_probe_bpf_program_runs_total",
            &[("program", "sys_enter")]
        )
        .is_some()
    );
    assert_eq!(
        m.get(
            "ws1_probe_events_dropped_total",
            &[("reason", "syscall_hist_map_full")]
        ),
        Some(0.0)
    );
    let (status, took) = agent.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(2), "took {took:?} to stop");
    // The port is free again.
    assert!(std::net::TcpListener::bind(("127.0.0.1", agent.port)).is_ok());
}

#[test]
fn bpf_stats_flag_reports_program_runs() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(&["--bpf-stats"]);
    std::thread::sleep(Duration::from_millis(200));
    let m = agent.metrics();
    assert_eq!(m.get("ws1_probe_bpf_stats_enabled", &[]), Some(1.0));
    let runs = m.value(
        "ws1_probe_bpf_program_runs_total",
        &[("program", "sys_enter")],
    );
    assert!(runs > 0.0, "sys_enter ran {runs} times");
}

fn one_line_error(args: &[&str]) -> String {
    let out = run_probe(args);
    assert!(!out.status.success(), "{args:?} should fail");
    assert_eq!(out.status.code(), Some(1), "{args:?}: exit code");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got {stderr:?}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    lines[0].to_owned()
}

#[test]
fn bad_input_gets_one_clear_line() {
    if !privileged() {
        return;
    }
    let line = one_line_error(&["agent", "--pid", "4000000"]);
    assert!(line.contains("no process with pid 4000000"), "{line}");
    let line = one_line_error(&["syscalls", "--comm", "a(b"]);
    assert!(line.contains("invalid --comm regex"), "{line}");
    let line = one_line_error(&["syscalls", "--cgroup", "/no/such/cgroup"]);
    assert!(line.contains("cgroup /no/such/cgroup not found"), "{line}");

    let cfg = std::env::temp_dir().join(format!("ws1-bad-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        "[[service]]\nname = \"risk\"\nmatch = { comn = \"x\" }\n",
    )
    .unwrap();
    let line = one_line_error(&["agent", "--config", cfg.to_str().unwrap()]);
    assert!(
        line.contains(&format!("{}:3:", cfg.display())) && line.contains("unknown field `comn`"),
        "{line}"
    );
    std::fs::remove_file(&cfg).unwrap();

    // Port in use: held by this test.
    let port = free_port();
    let _held = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let line = one_line_error(&["agent", "--listen", &format!("127.0.0.1:{port}")]);
    assert!(line.contains("address already in use"), "{line}");
}

#[test]
fn missing_capabilities_are_named() {
    if !privileged() {
        return;
    }
    // Drop to nobody with no capabilities.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(ws1_probe_tests::probe_bin())
        .args(["syscalls", "--duration", "1s"])
        .output()
        .expect("setpriv (util-linux) runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim().starts_with("error: ") && stderr.contains("missing CAP_BPF and CAP_PERFMON"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// A raw GET with extra request headers; returns the response head and body bytes.
fn get_with(port: u16, path: &str, headers: &str) -> (String, Vec<u8>) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the agent");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("read timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n").expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |p| p + 4);
    (
        String::from_utf8_lossy(&raw[..split]).into_owned(),
        raw[split..].to_vec(),
    )
}

#[test]
fn gzip_and_concurrent_scrapes_hold_exact_counts_and_healthz_answers() {
    if !privileged() {
        return;
    }
    const SERVICE: &str = "w-scrapes";
    let mut target = ws1_probe_tests::Workload::spawn(SERVICE);
    let agent = Agent::start(&["--pid", &target.pid.to_string()]);
    target.cmd("getppid 4321");
    let exact = format!(
        "ws1_probe_syscall_duration_seconds_count{{service=\"{SERVICE}\",syscall=\"getppid\"}} 4321"
    );

    let (head, plain) = get_with(agent.port, "/metrics", "");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.contains("Content-Encoding"), "{head}");
    let plain = String::from_utf8(plain).expect("utf-8 exposition");
    assert!(
        plain.lines().any(|l| l == exact),
        "{exact} missing in\n{plain}"
    );

    let (head, zipped) = get_with(agent.port, "/metrics", "Accept-Encoding: gzip\r\n");
    assert!(head.contains("Content-Encoding: gzip\r\n"), "{head}");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&zipped[..]), &mut text)
        .expect("a gzip body");
    assert!(
        text.lines().any(|l| l == exact),
        "{exact} missing in\n{text}"
    );
    assert!(
        zipped.len() * 3 < text.len(),
        "gzip {} of {}",
        zipped.len(),
        text.len()
    );
    for name in [
        "ws1_probe_build_info{",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "no {name} in\n{text}"
        );
    }

    // Ten scrapers at once, gzip and plain, while /healthz is asked in between.
    let port = agent.port;
    let scrapers: Vec<_> = (0..10)
        .map(|i| {
            let exact = exact.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    let gzip = if i % 2 == 0 {
                        "Accept-Encoding: gzip\r\n"
                    } else {
                        ""
                    };
                    let (head, body) = get_with(port, "/metrics", gzip);
                    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                    let text = if gzip.is_empty() {
                        String::from_utf8(body).expect("utf-8")
                    } else {
                        let mut t = String::new();
                        std::io::Read::read_to_string(
                            &mut flate2::read::GzDecoder::new(&body[..]),
                            &mut t,
                        )
                        .expect("gzip");
                        t
                    };
                    assert!(text.lines().any(|l| l == exact), "{exact} missing");
                }
            })
        })
        .collect();
    for _ in 0..20 {
        let (status, body) = http_get(port, "/healthz").expect("/healthz answers");
        assert_eq!((status, body.as_str()), (200, "ok\n"));
    }
    for s in scrapers {
        s.join().expect("scraper thread");
    }
}

#[test]
fn sighup_reloads_services_keeping_exact_counts_and_rejects_a_bad_file() {
    if !privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ws1-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("ws1.toml");
    let service = |name: &str, comm: &str| {
        format!("[[service]]\nname = \"{name}\"\nmatch = {{ comm = \"^{comm}$\" }}\n")
    };
    std::fs::write(&config, service("svc-a", "w-reload-a")).expect("write config");
    let mut a = ws1_probe_tests::Workload::spawn("w-reload-a");
    let mut b = ws1_probe_tests::Workload::spawn("w-reload-b");
    let mut agent = Agent::start_logged(&["--config", &config.to_string_lossy()]);
    let count = |m: &ws1_probe_tests::Metrics, svc: &str| {
        m.get(
            "ws1_probe_syscall_duration_seconds_count",
            &[("service", svc), ("syscall", "getppid")],
        )
    };
    a.cmd("getppid 100");
    b.cmd("getppid 70");
    let m = agent.metrics();
    assert_eq!(count(&m, "svc-a"), Some(100.0));
    assert_eq!(count(&m, "svc-b"), None);

    // A second service appears; the first keeps its counts.
    let both = format!(
        "{}{}",
        service("svc-a", "w-reload-a"),
        service("svc-b", "w-reload-b")
    );
    std::fs::write(&config, both).expect("write config");
    agent.signal(libc::SIGHUP);
    agent.wait_for("svc-b targeted after SIGHUP", |m| {
        m.get("ws1_probe_targeted_processes", &[("service", "svc-b")]) == Some(1.0)
    });
    a.cmd("getppid 25");
    b.cmd("getppid 50");
    let m = agent.metrics();
    assert_eq!(count(&m, "svc-a"), Some(125.0));
    assert_eq!(count(&m, "svc-b"), Some(50.0));

    // A broken file keeps the running configuration and says so in one line.
    std::fs::write(
        &config,
        "[[service]]\nname = \"svc-a\"\nmatch = { comn = \"x\" }\n",
    )
    .expect("write config");
    agent.signal(libc::SIGHUP);
    let started = std::time::Instant::now();
    let line = loop {
        if let Some(l) = agent.log_lines("reload failed").into_iter().next() {
            break l;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "no reload failure logged"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        line.contains("keeping the running configuration") && line.contains("unknown field `comn`"),
        "{line}"
    );
    a.cmd("getppid 5");
    b.cmd("getppid 5");
    let m = agent.metrics();
    assert_eq!(count(&m, "svc-a"), Some(130.0));
    assert_eq!(count(&m, "svc-b"), Some(55.0));
    let (status, _) = agent.terminate();
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// BPF program types (`prog_type` in fdinfo) of the programs process `pid` holds open.
fn program_types(pid: u32) -> Vec<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_type:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

#[test]
fn one_shot_syscalls_attaches_no_network_memory_or_profile_program() {
    if !privileged() {
        return;
    }
    use std::io::BufRead as _;
    const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
    const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
    let mut child = std::process::Command::new(ws1_probe_tests::probe_bin())
        .args(["syscalls", "--comm", "^w-oneshot$", "--duration", "20s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ws1-probe syscalls");
    let stderr = child.stderr.take().expect("stderr pipe");
    let mut lines = std::io::BufReader::new(stderr).lines();
    // Not a terminal: one start line once everything is attached (after any warning).
    let first = lines
        .by_ref()
        .take(5)
        .map_while(Result::ok)
        .find(|l| l.starts_with("collecting"))
        .unwrap_or_default();
    let types = program_types(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.starts_with("collecting"), "{first}");
    let mut sorted = types.clone();
    sorted.sort_unstable();
    // Targeting (fork, exec, exit tracepoints) and sys_enter/sys_exit only: no perf events
    // (profile, page faults), no tp_btf or extra raw tracepoints (network).
    assert_eq!(
        sorted,
        vec![
            BPF_PROG_TYPE_TRACEPOINT,
            BPF_PROG_TYPE_TRACEPOINT,
            BPF_PROG_TYPE_TRACEPOINT,
            BPF_PROG_TYPE_RAW_TRACEPOINT,
            BPF_PROG_TYPE_RAW_TRACEPOINT,
        ],
        "program types held by `ws1-probe syscalls`"
    );
}
