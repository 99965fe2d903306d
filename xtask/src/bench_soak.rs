//! `cargo xtask bench soak [-- --minutes N]`: the agent as users run it, for a while.
//!
//! Host mode with every collector (`ws1-probe agent` without selectors) runs for N minutes
//! (default 10; not in CI) while this bench churns processes and connections (short-lived
//! shells that connect to a local listener and burn a little CPU, and a rotation of small
//! tools, so the profiler meets new binaries) and scrapes `/metrics` every second. It prints the
//! agent's RSS each minute, at 1 minute and at the end (goal: within 2 MiB of each other and
//! ≤ 30 MiB), the BPF map entries after the churn against the baseline before it
//! (`ws1_probe_bpf_map_entries`), the drops (`ws1_probe_events_dropped_total`) and the caches
//! (`ws1_probe_agent_cache_bytes`). Goals print as PASS/MISS; only errors fail the run.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

use crate::{bench_util::Proc, run, util};

/// RSS goal in MiB, and how far the end may be from the 1-minute figure.
const RSS_GOAL_MIB: f64 = 30.0;
const FLAT_MIB: f64 = 2.0;
/// Short-lived processes started per second.
const CHURN_PER_SEC: u64 = 20;
/// Churn processes alive at once at most: a machine too slow for the rate must not pile up
/// processes (a first version ran `sort /proc/kallsyms`, whose temporary files then stalled the
/// disk).
const MAX_CHILDREN: usize = 40;
/// After the churn stops: time for exits to reach the maps before they are compared.
const SETTLE: Duration = Duration::from_secs(15);

pub fn run(args: &[String]) -> Result<()> {
    let minutes = parse_minutes(args)?;
    run::cargo_build_release(&["ws1-probe"])?;
    let probe = util::target_dir().join("release/ws1-probe");
    let logs = util::target_dir().join("bench");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let port = free_port()?;

    let mut agent = Proc::spawn(
        "soak-agent",
        Command::new(&probe).args(["agent", "--listen", &format!("127.0.0.1:{port}")]),
        &logs,
    )?;
    wait_ready(&mut agent, port)?;
    eprintln!(
        "bench soak: agent pid {} on port {port}, host mode, every collector; {minutes} min",
        agent.pid()
    );
    // A few seconds for the start-up scan's processes to settle into the maps.
    thread::sleep(Duration::from_secs(5));
    let baseline = scrape(port)?;
    let rss_start = rss_mib(agent.pid())?;

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the churn listener")?;
    let churn_port = listener.local_addr()?.port();
    let server = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || serve(listener, &stop))
    };
    let churn = {
        let (stop, started) = (Arc::clone(&stop), Arc::clone(&started));
        thread::spawn(move || churn(churn_port, &stop, &started))
    };

    let t0 = Instant::now();
    let total = Duration::from_secs(minutes * 60);
    let mut rss_1min = None;
    let mut by_minute = Vec::new();
    let mut scrapes = 0u64;
    let mut failed = 0u64;
    let result = (|| -> Result<()> {
        while t0.elapsed() < total {
            let tick = Instant::now();
            agent.fail_if_exited()?;
            match scrape(port) {
                Ok(_) => scrapes += 1,
                Err(_) => failed += 1,
            }
            let minute = t0.elapsed().as_secs() / 60;
            if minute as usize > by_minute.len() {
                let rss = rss_mib(agent.pid())?;
                by_minute.push(rss);
                eprintln!("bench soak: {minute} min: RSS {rss:.1} MiB");
                if minute == 1 {
                    rss_1min = Some(rss);
                }
            }
            thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
        }
        Ok(())
    })();
    stop.store(true, Ordering::Release);
    let churned = started.load(Ordering::Acquire);
    let _ = churn.join();
    // The server thread blocks in accept; one connection wakes it up to see the stop flag.
    let _ = TcpStream::connect(("127.0.0.1", churn_port));
    let _ = server.join();
    result?;
    let rss_end = rss_mib(agent.pid())?;
    thread::sleep(SETTLE);
    agent.fail_if_exited()?;
    let after = scrape(port)?;
    agent.stop()?;

    report(&Report {
        minutes,
        churned,
        scrapes,
        failed,
        rss_start,
        rss_1min: rss_1min.unwrap_or(rss_start),
        rss_end,
        by_minute,
        baseline,
        after,
    });
    Ok(())
}

fn parse_minutes(args: &[String]) -> Result<u64> {
    match args {
        [] => Ok(10),
        [flag, n] if flag == "--minutes" => {
            let n: u64 = n
                .parse()
                .map_err(|_| anyhow!("invalid --minutes {n}: use a whole number of minutes"))?;
            ensure!(n >= 1, "invalid --minutes {n}: use 1 or more");
            Ok(n)
        }
        _ => bail!("bench soak takes only `--minutes N` (got {args:?})"),
    }
}

/// Answers each connection with one line and closes it.
fn serve(listener: TcpListener, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 64];
        let _ = conn.read(&mut buf);
        let _ = conn.write_all(b"ok\n");
    }
}

/// Starts [`CHURN_PER_SEC`] short-lived processes a second until `stop`: shells that connect to
/// `port` and burn a little CPU, and in between a rotation of small tools.
fn churn(port: u16, stop: &AtomicBool, started: &AtomicU64) {
    let shell = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; echo hi >&3; read -t 1 l <&3; i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done"
    );
    let tools: [&[&str]; 6] = [
        &["ls", "-l", "/usr/bin"],
        &["sort", "/proc/self/maps"],
        &["awk", "BEGIN { for (i = 0; i < 200000; i++) s += i }"],
        &["gzip", "-c", "/proc/self/maps"],
        &["sha256sum", "/proc/self/maps"],
        &["python3", "-c", "sum(range(300000))"],
    ];
    let every = Duration::from_millis(1000 / CHURN_PER_SEC);
    let mut children: Vec<std::process::Child> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        let tick = Instant::now();
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        if children.len() >= MAX_CHILDREN {
            thread::sleep(every);
            continue;
        }
        let mut cmd = if n.is_multiple_of(2) {
            let mut c = Command::new("bash");
            c.args(["-c", &shell]);
            c
        } else {
            let tool = tools[(n / 2) as usize % tools.len()];
            let mut c = Command::new(tool[0]);
            c.args(&tool[1..]);
            c
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Ok(child) = cmd.spawn() {
            children.push(child);
            n += 1;
            started.store(n, Ordering::Release);
        }
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        thread::sleep(every.saturating_sub(tick.elapsed()));
    }
    for mut c in children {
        let _ = c.wait();
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

fn wait_ready(agent: &mut Proc, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        agent.fail_if_exited()?;
        if let Ok((200, _)) = http_get(port, "/readyz") {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
    bail!("the agent was not ready within 120 s: {}", agent.log_tail())
}

/// A GET over a raw TcpStream; returns (status, body).
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = (text.split(' ').nth(1).and_then(|c| c.parse().ok()))
        .ok_or_else(|| anyhow!("GET {path}: no HTTP status in the answer"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    Ok((status, body.unwrap_or_default()))
}

/// The series of a scrape, by full series name (name and labels) → value.
type Series = BTreeMap<String, f64>;

fn scrape(port: u16) -> Result<Series> {
    let (status, body) = http_get(port, "/metrics")?;
    ensure!(status == 200, "GET /metrics: status {status}");
    Ok(parse_series(&body))
}

fn parse_series(text: &str) -> Series {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Series of `family` (`name{...}` or `name`), with their label part as key.
fn family<'a>(series: &'a Series, family: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    series.iter().filter_map(move |(k, v)| {
        let rest = k.strip_prefix(family)?;
        (rest.is_empty() || rest.starts_with('{')).then_some((rest, *v))
    })
}

fn rss_mib(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))?;
    Ok(kib / 1024.0)
}

struct Report {
    minutes: u64,
    churned: u64,
    scrapes: u64,
    failed: u64,
    rss_start: f64,
    rss_1min: f64,
    rss_end: f64,
    by_minute: Vec<f64>,
    baseline: Series,
    after: Series,
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn report(r: &Report) {
    println!(
        "\nsoak: {} min host mode, every collector; {} processes started ({CHURN_PER_SEC}/s, half with a TCP connection); {} scrapes ({} failed)",
        r.minutes, r.churned, r.scrapes, r.failed
    );
    let minutes: Vec<String> = r.by_minute.iter().map(|m| format!("{m:.1}")).collect();
    println!("RSS by minute (MiB): {}", minutes.join(" "));
    let flat = (r.rss_end - r.rss_1min).abs() <= FLAT_MIB;
    let small = r.rss_end <= RSS_GOAL_MIB && r.rss_1min <= RSS_GOAL_MIB;
    println!(
        "RSS: start {:.1} MiB, 1 min {:.1} MiB, end {:.1} MiB   flat within {FLAT_MIB} MiB: {}   <= {RSS_GOAL_MIB} MiB: {}",
        r.rss_start,
        r.rss_1min,
        r.rss_end,
        verdict(flat),
        verdict(small)
    );
    println!("\nmap entries (ws1_probe_bpf_map_entries): baseline -> after churn");
    let mut back = true;
    for (labels, before) in family(&r.baseline, "ws1_probe_bpf_map_entries") {
        let after = r
            .after
            .get(&format!("ws1_probe_bpf_map_entries{labels}"))
            .copied()
            .unwrap_or(f64::NAN);
        // Within 5 % (or 10 entries) of the baseline: the host's own processes come and go too.
        let ok = after <= before * 1.05 + 10.0;
        back &= ok;
        println!("  {labels:<40} {before:>8} -> {after:>8} {}", verdict(ok));
    }
    println!("map entries back to baseline: {}", verdict(back));
    println!("\ndrops (ws1_probe_events_dropped_total) at the end:");
    let mut any = false;
    for (labels, v) in family(&r.after, "ws1_probe_events_dropped_total") {
        any = true;
        println!("  {labels:<40} {v}");
    }
    if !any {
        println!("  (none exported)");
    }
    println!("\ncaches (ws1_probe_agent_cache_bytes / budget) at the end:");
    for (labels, v) in family(&r.after, "ws1_probe_agent_cache_bytes") {
        let budget = r
            .after
            .get(&format!("ws1_probe_agent_cache_budget_bytes{labels}"))
            .map_or("-".to_owned(), |b| format!("{:.0} KiB", b / 1024.0));
        println!("  {labels:<40} {:>8.0} KiB / {budget}", v / 1024.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_argument() {
        assert_eq!(parse_minutes(&[]).unwrap(), 10);
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_minutes(&args(&["--minutes", "2"])).unwrap(), 2);
        assert!(parse_minutes(&args(&["--minutes", "0"])).is_err());
        assert!(parse_minutes(&args(&["--minutes"])).is_err());
        assert!(parse_minutes(&args(&["-m", "2"])).is_err());
    }

    #[test]
    fn series_of_a_family() {
        let s = parse_series(
            "# HELP x y\nws1_probe_bpf_map_entries{map=\"A\"} 3\nws1_probe_bpf_map_entries_capacity{map=\"A\"} 9\nup 1\n",
        );
        let got: Vec<(&str, f64)> = family(&s, "ws1_probe_bpf_map_entries").collect();
        assert_eq!(got, vec![("{map=\"A\"}", 3.0)]);
    }
}
