//! `cargo xtask bench scrape`: what a `/metrics` scrape costs.
//!
//! 1. Render time, bytes and gzip size at 1k, 10k and 50k series (`ws1-probe bench-scrape`,
//!    the agent's own rendering code on a synthetic snapshot). Goal: ≤ 10 ms at 10k series.
//! 2. A real host-mode agent with every collector: ten scrapers asking for gzip at once, in a
//!    loop, while `/healthz` is asked every 20 ms. Prints the scrape latencies, the body sizes
//!    and the slowest `/healthz` answer (goal: scrapes never starve it).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    bench_util::{Proc, median},
    run, util,
};

const SERIES: [usize; 3] = [1_000, 10_000, 50_000];
const SCRAPERS: usize = 10;
const LOAD: Duration = Duration::from_secs(10);

pub fn run(args: &[String]) -> Result<()> {
    ensure!(
        args.is_empty(),
        "bench scrape takes no arguments (got {args:?})"
    );
    run::cargo_build_release(&["ws1-probe"])?;
    let probe = util::target_dir().join("release").join("ws1-probe");
    let logs = util::target_dir().join("bench");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;

    println!("render (median of 15, ws1-probe bench-scrape):");
    println!("  series   render ms   gzip ms       bytes   gzip bytes");
    for n in SERIES {
        let out = Command::new(&probe)
            .args(["bench-scrape", "--series", &n.to_string()])
            .output()
            .context("running ws1-probe bench-scrape")?;
        ensure!(
            out.status.success(),
            "bench-scrape failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("bench-scrape printed no JSON")?;
        let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {:>6}   {:>9.2}   {:>7.2}   {:>9}   {:>10}",
            num("series"),
            num("render_ms"),
            num("gzip_ms"),
            num("bytes"),
            num("gzip_bytes")
        );
        if n == 10_000 {
            let verdict = if num("render_ms") <= 10.0 {
                "PASS"
            } else {
                "MISS"
            };
            println!("  goal: render ≤ 10 ms at 10k series: {verdict}");
        }
    }

    let port = (TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))
        .context("no free loopback port")?
        .port();
    let mut cmd = Command::new(&probe);
    cmd.args(["agent", "--listen", &format!("127.0.0.1:{port}")]);
    let mut agent = Proc::spawn("scrape-agent", &mut cmd, &logs)?;
    let started = Instant::now();
    while !get(port, "/readyz", false).is_ok_and(|r| r.0 == 200) {
        agent.fail_if_exited()?;
        if started.elapsed() > Duration::from_secs(30) {
            bail!("agent not ready after 30 s: {}", agent.log_tail());
        }
        thread::sleep(Duration::from_millis(20));
    }
    // Let host mode see some activity first.
    thread::sleep(Duration::from_secs(3));
    let (_, plain, _) = get(port, "/metrics", false)?;
    let samples = String::from_utf8_lossy(&plain)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();
    let end = Instant::now() + LOAD;
    let scrapers: Vec<_> = (0..SCRAPERS)
        .map(|_| {
            thread::spawn(move || {
                let mut times = Vec::new();
                let mut bytes = 0;
                while Instant::now() < end {
                    if let Ok((200, body, took)) = get(port, "/metrics", true) {
                        times.push(took.as_secs_f64() * 1e3);
                        bytes = body.len();
                    }
                }
                (times, bytes)
            })
        })
        .collect();
    let mut health = Vec::new();
    let mut failed = 0;
    while Instant::now() < end {
        match get(port, "/healthz", false) {
            Ok((200, _, took)) => health.push(took.as_secs_f64() * 1e3),
            _ => failed += 1,
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut times = Vec::new();
    let mut gz = 0;
    for s in scrapers {
        let (t, b) = s
            .join()
            .map_err(|_| anyhow::anyhow!("scraper thread panicked"))?;
        times.extend(t);
        gz = gz.max(b);
    }
    agent.interrupt()?;
    times.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "host-mode agent, every collector: {samples} samples, {} bytes plain, {gz} bytes gzip",
        plain.len()
    );
    println!(
        "  {SCRAPERS} concurrent gzip scrapers for {}s: {} scrapes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        LOAD.as_secs(),
        times.len(),
        median(&times),
        pct(&times, 0.99),
        times.last().copied().unwrap_or(f64::NAN)
    );
    health.sort_by(f64::total_cmp);
    println!(
        "  /healthz meanwhile: {} answers, p50 {:.2} ms, max {:.1} ms, {failed} failed",
        health.len(),
        median(&health),
        health.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}

/// A GET; returns (status, body bytes, time to the last byte). `gzip` asks for a gzip body.
fn get(port: u16, path: &str, gzip: bool) -> Result<(u16, Vec<u8>, Duration)> {
    let started = Instant::now();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let enc = if gzip {
        "Accept-Encoding: gzip\r\n"
    } else {
        ""
    };
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n{enc}\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let took = started.elapsed();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, raw[split..].to_vec(), took))
}
