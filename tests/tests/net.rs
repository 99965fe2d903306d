//! Network collector against the real kernel: `ws1-netload` servers and clients whose
//! connections and requests we control, over loopback and inside a network namespace.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use ws1_probe_tests::{Agent, Metrics, free_port, privileged, run_probe};

const REQUEST: &str = "ws1_probe_request_duration_seconds";
const CONNECT: &str = "ws1_probe_tcp_connect_duration_seconds";

fn netload_bin() -> PathBuf {
    std::env::var_os("WS1_NETLOAD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/ws1-netload")
        })
}

/// `ws1-netload` under its own command name (a symlink, as `Workload::spawn` does), optionally
/// inside a network namespace; driven over stdin/stdout.
struct NetLoad {
    child: Child,
    pid: u32,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl NetLoad {
    fn spawn(comm: &str) -> NetLoad {
        Self::spawn_in(comm, None)
    }

    fn spawn_in(comm: &str, netns: Option<&str>) -> NetLoad {
        assert!(comm.len() <= 15, "comm {comm:?} is longer than 15 bytes");
        let dir = std::env::temp_dir().join(format!("ws1-probe-net-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir for netload links");
        let link = dir.join(comm);
        if !link.exists() {
            std::os::unix::fs::symlink(netload_bin(), &link).expect("netload symlink");
        }
        // `ip netns exec` execs the link in place, so the pid stays the one we spawned.
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&link);
                c
            }
            None => Command::new(&link),
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", netload_bin().display()));
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("netload ready line");
        assert!(line.starts_with("ready "), "netload said {line:?}");
        let pid = child.id();
        NetLoad {
            child,
            pid,
            stdin,
            stdout,
        }
    }

    /// Sends one command and returns the words of its reply after `ok`; panics on `error`.
    fn cmd(&mut self, command: &str) -> Vec<u64> {
        writeln!(self.stdin, "{command}").expect("write to netload");
        self.stdin.flush().expect("flush netload stdin");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read netload reply");
        assert!(line.starts_with("ok"), "netload: {command} -> {line}");
        line.split_whitespace()
            .skip(1)
            .map(|w| w.parse().expect("numeric reply"))
            .collect()
    }

    /// Starts a server; returns its port.
    fn listen(&mut self, addr: &str) -> u16 {
        self.cmd(&format!("listen {addr}"))[0] as u16
    }
}

impl Drop for NetLoad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn series<'a>(service: &'a str, side: &'a str, port: &'a str) -> [(&'a str, &'a str); 3] {
    [("service", service), ("side", side), ("port", port)]
}

/// Checks every `le` bucket of a request histogram against the requests' bounds: a request of
/// delay `req` ns whose wall time (plus `slack` ns) was `wall` lies in `[req, wall + slack]`.
fn assert_buckets(m: &Metrics, labels: &[(&str, &str)], requests: &[(u64, u64)], slack: u64) {
    let bucket = |le: &str| {
        let mut l = labels.to_vec();
        l.push(("le", le));
        m.get(&format!("{REQUEST}_bucket"), &l)
            .unwrap_or_else(|| panic!("no {labels:?} bucket le={le}\n{}", m.text))
    };
    for (le, bound_ns) in [
        ("0.001", 1_000_000u64),
        ("0.005", 5_000_000),
        ("0.01", 10_000_000),
        ("0.025", 25_000_000),
        ("0.05", 50_000_000),
    ] {
        let surely = requests
            .iter()
            .filter(|(_, wall)| wall + slack <= bound_ns)
            .count() as f64;
        let maybe = requests.iter().filter(|(req, _)| *req <= bound_ns).count() as f64;
        let got = bucket(le);
        assert!(
            (surely..=maybe).contains(&got),
            "{labels:?} le={le}: {got} requests, expected {surely}..={maybe} from {requests:?}"
        );
    }
    assert_eq!(bucket("+Inf"), requests.len() as f64, "{labels:?}");
}

#[test]
fn request_latency_lands_in_le_buckets_on_both_sides() {
    if !privileged() {
        return;
    }
    let mut server = NetLoad::spawn("n-lat-srv");
    let mut client = NetLoad::spawn("n-lat-cli");
    // Bystanders with the same command names, not targeted: their traffic must not count.
    let mut by_server = NetLoad::spawn("n-lat-srv");
    let mut by_client = NetLoad::spawn("n-lat-cli");
    let agent = Agent::start(&[
        "--pid",
        &server.pid.to_string(),
        "--pid",
        &client.pid.to_string(),
    ]);
    let port = server.listen("127.0.0.1:0");
    let addr = format!("127.0.0.1:{port}");
    let by_port = by_server.listen("127.0.0.1:0");
    by_client.cmd(&format!("pooled 127.0.0.1:{by_port} 5 1"));
    // The bystander client also talks to the targeted server: that is the server's traffic.
    by_client.cmd(&format!("pooled {addr} 2 6"));
    // 6 ms and 22 ms sit inside (5 ms, 10 ms] and (10 ms, 25 ms]; each request's wall time, as
    // the client measured it around write + read, bounds what the kernel can have measured.
    let mut requests: Vec<(u64, u64)> = Vec::new();
    for (ms, n) in [(6u64, 4), (22, 3)] {
        for wall in client.cmd(&format!("pooled {addr} {n} {ms}")) {
            requests.push((ms * 1_000_000, wall));
        }
    }
    let m = agent.metrics();
    let p = port.to_string();
    let cli = series("n-lat-cli", "client", &p);
    assert_eq!(
        m.get(&format!("{REQUEST}_count"), &cli),
        Some(7.0),
        "client requests"
    );
    assert_buckets(&m, &cli, &requests, 0);
    // The server side also saw the bystander's 2 requests of 6 ms; their wall times are
    // unknown, so bound them by the test's own: add them as (6 ms, max wall).
    let max_wall = requests.iter().map(|(_, w)| *w).max().unwrap_or(0);
    let mut server_side = requests.clone();
    server_side.extend([(6_000_000, max_wall), (6_000_000, max_wall)]);
    let srv = series("n-lat-srv", "server", &p);
    assert_eq!(
        m.get(&format!("{REQUEST}_count"), &srv),
        Some(9.0),
        "server requests"
    );
    // The server's send may return a few µs after the client's read did.
    assert_buckets(&m, &srv, &server_side, 1_000_000);
    // One connection per `pooled` command: two from the client, three to the server.
    assert_eq!(
        m.get(
            &format!("{CONNECT}_count"),
            &[("service", "n-lat-cli"), ("port", &p)]
        ),
        Some(2.0)
    );
    assert_eq!(m.value("ws1_probe_tcp_connections_total", &srv), 3.0);
    assert_eq!(
        m.value(
            "ws1_probe_tcp_bytes_total",
            &[("service", "n-lat-cli"), ("direction", "sent")]
        ),
        7.0 * 8.0
    );
    // Nothing of the bystanders' own connection.
    let by = by_port.to_string();
    assert!(
        !m.samples
            .iter()
            .any(|(_, l, _)| l.iter().any(|(k, v)| k == "port" && *v == by)),
        "untargeted traffic on port {by} was counted:\n{}",
        m.text
    );
}

#[test]
fn accepted_connections_give_one_handshake_observation_each() {
    if !privileged() {
        return;
    }
    let mut server = NetLoad::spawn("n-hs-srv");
    let mut client = NetLoad::spawn("n-hs-cli");
    // Only the server is targeted: the accept side alone.
    let agent = Agent::start(&["--pid", &server.pid.to_string()]);
    let port = server.listen("127.0.0.1:0");
    client.cmd(&format!("connect 127.0.0.1:{port} 6"));
    let p = port.to_string();
    const HANDSHAKE: &str = "ws1_probe_tcp_accept_handshake_duration_seconds";
    let labels = [("service", "n-hs-srv"), ("port", p.as_str())];
    let m = agent.wait_for("6 accepted connections", |m| {
        m.value(
            "ws1_probe_tcp_connections_total",
            &series("n-hs-srv", "server", &p),
        ) == 6.0
    });
    assert_eq!(
        m.get(&format!("{HANDSHAKE}_count"), &labels),
        Some(6.0),
        "{}",
        m.text
    );
    // A loopback round trip: microseconds, and never zero (zero is not recorded).
    let sum = m.value(&format!("{HANDSHAKE}_sum"), &labels);
    assert!(sum > 0.0 && sum < 6.0 * 0.001, "handshake sum {sum} s");
    let mut le = labels.to_vec();
    le.push(("le", "0.001"));
    assert_eq!(m.get(&format!("{HANDSHAKE}_bucket"), &le), Some(6.0));
    assert!(!m.text.contains("n-hs-cli"), "untargeted client counted");
}

#[test]
fn connects_counted_and_refused_is_a_failure_with_a_reset() {
    if !privileged() {
        return;
    }
    let mut server = NetLoad::spawn("n-conn-srv");
    let mut client = NetLoad::spawn("n-conn-cli");
    let agent = Agent::start(&["--pid", &client.pid.to_string()]);
    let port = server.listen("127.0.0.1:0");
    client.cmd(&format!("connect 127.0.0.1:{port} 5"));
    let closed = free_port();
    assert_eq!(
        client.cmd(&format!("refused 127.0.0.1:{closed} 3")),
        vec![3]
    );
    let p = port.to_string();
    let c = closed.to_string();
    let m = agent.wait_for("5 closed connections", |m| {
        m.value(
            "ws1_probe_tcp_connections_active",
            &series("n-conn-cli", "client", &p),
        ) == 0.0
    });
    assert_eq!(
        m.get(
            &format!("{CONNECT}_count"),
            &[("service", "n-conn-cli"), ("port", &p)]
        ),
        Some(5.0)
    );
    assert_eq!(
        m.value(
            "ws1_probe_tcp_connections_total",
            &series("n-conn-cli", "client", &p)
        ),
        5.0
    );
    assert_eq!(
        m.value(
            "ws1_probe_tcp_connect_failures_total",
            &[("service", "n-conn-cli"), ("port", &c)]
        ),
        3.0
    );
    assert_eq!(
        m.value(
            "ws1_probe_tcp_resets_total",
            &[
                ("service", "n-conn-cli"),
                ("port", &c),
                ("direction", "received")
            ]
        ),
        3.0
    );
    assert_eq!(
        m.get(
            &format!("{CONNECT}_count"),
            &[("service", "n-conn-cli"), ("port", &c)]
        ),
        None
    );
    // The server was not targeted: no server-side series at all.
    assert!(!m.text.contains("n-conn-srv"), "{}", m.text);
}

#[test]
fn pooled_and_unpooled_clients_have_their_reuse_ratios() {
    if !privileged() {
        return;
    }
    let mut server = NetLoad::spawn("n-reuse-srv");
    let mut pooled = NetLoad::spawn("n-pooled");
    let mut unpooled = NetLoad::spawn("n-unpooled");
    let agent = Agent::start(&[
        "--pid",
        &server.pid.to_string(),
        "--pid",
        &pooled.pid.to_string(),
        "--pid",
        &unpooled.pid.to_string(),
    ]);
    let port = server.listen("127.0.0.1:0");
    pooled.cmd(&format!("pooled 127.0.0.1:{port} 20 0"));
    unpooled.cmd(&format!("unpooled 127.0.0.1:{port} 10 0"));
    let p = port.to_string();
    let m = agent.metrics();
    let ratio = |service| {
        m.get(
            "ws1_probe_connection_reuse_ratio",
            &series(service, "client", &p),
        )
    };
    assert_eq!(ratio("n-pooled"), Some(19.0 / 20.0));
    assert_eq!(ratio("n-unpooled"), Some(0.0));
    assert_eq!(
        m.get(
            &format!("{REQUEST}_count"),
            &series("n-pooled", "client", &p)
        ),
        Some(20.0)
    );
    assert_eq!(
        m.get(
            &format!("{REQUEST}_count"),
            &series("n-unpooled", "client", &p)
        ),
        Some(10.0)
    );
    assert_eq!(
        m.value(
            "ws1_probe_tcp_connections_total",
            &series("n-unpooled", "client", &p)
        ),
        10.0
    );
    // The server saw 30 requests on 11 connections: 19 of them reused.
    let srv = series("n-reuse-srv", "server", &p);
    assert_eq!(m.get(&format!("{REQUEST}_count"), &srv), Some(30.0));
    assert_eq!(
        m.value("ws1_probe_connection_requests_reused_total", &srv),
        19.0
    );
    assert_eq!(m.value("ws1_probe_tcp_connections_total", &srv), 11.0);

    // RTT: sampled at the first send or receive of each socket, then at most every 100 ms;
    // these connections last a few ms, so one sample per connection, all loopback-small.
    const RTT: &str = "ws1_probe_tcp_rtt_seconds";
    for (service, n) in [("n-pooled", 1.0), ("n-unpooled", 10.0)] {
        let labels = series(service, "client", &p);
        assert_eq!(
            m.get(&format!("{RTT}_count"), &labels),
            Some(n),
            "{service}"
        );
        let sum = m.value(&format!("{RTT}_sum"), &labels);
        assert!(sum > 0.0 && sum < n * 0.005, "{service}: RTT sum {sum} s");
    }
    // Bytes per connection at close: 8-byte requests, so the pooled connection sent 160 bytes
    // and each unpooled one 8 (all 10 in the 64-byte bucket). Closing takes the FIN exchange.
    const BYTES: &str = "ws1_probe_tcp_connection_bytes";
    let sent = |service: &'static str| {
        let [a, b, c] = series(service, "client", &p);
        [a, b, c, ("direction", "sent")]
    };
    let m = agent.wait_for("both clients' connections closed", |m| {
        m.get(&format!("{BYTES}_count"), &sent("n-pooled")) == Some(1.0)
            && m.get(&format!("{BYTES}_count"), &sent("n-unpooled")) == Some(10.0)
    });
    assert_eq!(
        m.get(&format!("{BYTES}_sum"), &sent("n-pooled")),
        Some(160.0)
    );
    assert_eq!(
        m.get(&format!("{BYTES}_sum"), &sent("n-unpooled")),
        Some(80.0)
    );
    let mut le64 = sent("n-unpooled").to_vec();
    le64.push(("le", "64"));
    assert_eq!(m.get(&format!("{BYTES}_bucket"), &le64), Some(10.0));
    let mut le256 = sent("n-pooled").to_vec();
    le256.push(("le", "64"));
    assert_eq!(m.get(&format!("{BYTES}_bucket"), &le256), Some(0.0));
    le256.pop();
    le256.push(("le", "256"));
    assert_eq!(m.get(&format!("{BYTES}_bucket"), &le256), Some(1.0));
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two network namespaces joined by a veth pair (10.231.0.1 in the first, 10.231.0.2 in the
/// second); both are deleted when dropped.
struct VethPair {
    a: String,
    b: String,
}

impl VethPair {
    fn create(prefix: &str) -> VethPair {
        let (a, b) = (format!("{prefix}-a"), format!("{prefix}-b"));
        // Left over from an interrupted run, if any.
        for ns in [&a, &b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        let pair = VethPair { a, b };
        let (a, b) = (pair.a.as_str(), pair.b.as_str());
        ip(&[
            "link", "add", "ws1v-a", "netns", a, "type", "veth", "peer", "name", "ws1v-b", "netns",
            b,
        ]);
        for (ns, dev, addr) in [
            (a, "ws1v-a", "10.231.0.1/24"),
            (b, "ws1v-b", "10.231.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }
}

impl VethPair {
    /// A counter of namespace `ns`: `section` is the line prefix in `file` (`Tcp:` in
    /// /proc/net/snmp, `TcpExt:` in /proc/net/netstat).
    fn counter(ns: &str, file: &str, section: &str, name: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "cat", file])
            .output()
            .unwrap_or_else(|e| panic!("read {file}: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().filter(|l| l.starts_with(section));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            panic!("no {section} lines in {file}: {text}");
        };
        let idx = names
            .split_whitespace()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no {name} column in {file}"));
        values
            .split_whitespace()
            .nth(idx)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} value in {file}"))
    }

    /// Retransmitted segments the server's namespace `ns` actually sent, the ones
    /// `tcp:tcp_retransmit_skb` reports with `err == 0`: `RetransSegs` counts every attempt,
    /// including those the device refused (`TCPRetransFail`) and SYN-ACK retransmissions of
    /// listeners (`TCPSynRetrans`; that tracepoint does not fire for them, and the server's
    /// namespace sends no SYN of its own), as (sent, the three counters).
    fn sent_retransmissions(ns: &str) -> (u64, [u64; 3]) {
        let segs = Self::counter(ns, "/proc/net/snmp", "Tcp:", "RetransSegs");
        let fail = Self::counter(ns, "/proc/net/netstat", "TcpExt:", "TCPRetransFail");
        let syn = Self::counter(ns, "/proc/net/netstat", "TcpExt:", "TCPSynRetrans");
        (segs.saturating_sub(fail + syn), [segs, fail, syn])
    }

    /// TCP socket states of namespace `ns` (the `st` column of /proc/net/tcp{,6}: 01 is
    /// ESTABLISHED, 06 TIME_WAIT, 0A LISTEN), one per socket with its line.
    fn tcp_states(ns: &str) -> Vec<(String, String)> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "cat",
                "/proc/net/tcp",
                "/proc/net/tcp6",
            ])
            .output()
            .expect("read /proc/net/tcp");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let st = l.split_whitespace().nth(3)?;
                (st != "st").then(|| (st.to_owned(), l.to_owned()))
            })
            .collect()
    }

    /// Waits until namespace `ns` has an established connection and returns when it saw it;
    /// panics after 10 s.
    fn wait_until_established(ns: &str) -> std::time::Instant {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !Self::tcp_states(ns).iter().any(|(st, _)| st == "01") {
            assert!(
                std::time::Instant::now() < deadline,
                "no connection established in {ns} after 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::time::Instant::now()
    }

    /// Waits until namespace `ns` holds no TCP socket but listeners and TIME_WAIT sockets,
    /// neither of which ever retransmits; panics after 10 s.
    fn wait_until_quiet(ns: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let open: Vec<String> = Self::tcp_states(ns)
                .into_iter()
                .filter(|(st, _)| st != "0A" && st != "06")
                .map(|(_, line)| line)
                .collect();
            if open.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "connections still open in {ns} after 10 s:\n{}",
                open.join("\n")
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn retransmissions_from_dropped_packets_are_counted_in_a_netns() {
    if !privileged() {
        return;
    }
    // This kernel has no netem qdisc and the image no nftables, so packets are dropped by
    // removing the client's address while the server's reply is due: the client's namespace
    // drops what is no longer addressed to it (taking the link down instead would only queue
    // the reply in the server's host, and the kernel does not retransmit a queued packet).
    let pair = VethPair::create("ws1-probe-rtx");
    let mut server = NetLoad::spawn_in("n-rtx-srv", Some(&pair.a));
    let mut client = NetLoad::spawn_in("n-rtx-cli", Some(&pair.b));
    let agent = Agent::start(&[
        "--pid",
        &server.pid.to_string(),
        "--pid",
        &client.pid.to_string(),
    ]);
    let port = server.listen("10.231.0.1:0");
    let p = port.to_string();
    let (before, counters_before) = VethPair::sent_retransmissions(&pair.a);
    // Three requests on one connection; the server answers each after 400 ms.
    let requests = std::thread::spawn(move || {
        let walls = client.cmd(&format!("pooled 10.231.0.1:{port} 3 400"));
        (client, walls)
    });
    // The address goes as soon as the connection is up, long before the first reply is due,
    // and comes back 750 ms later.
    let established = VethPair::wait_until_established(&pair.a);
    let (ns, addr) = (pair.b.as_str(), "10.231.0.2/24");
    ip(&["-n", ns, "addr", "del", addr, "dev", "ws1v-b"]);
    std::thread::sleep(std::time::Duration::from_millis(750).saturating_sub(established.elapsed()));
    ip(&["-n", ns, "addr", "add", addr, "dev", "ws1v-b"]);
    let (_client, walls) = requests.join().expect("client thread");
    // Counted at a quiet point: a socket that still exists could retransmit between the
    // kernel's counters and the scrape, and a closed one cannot.
    VethPair::wait_until_quiet(&pair.a);
    VethPair::wait_until_quiet(&pair.b);
    let (after, counters_after) = VethPair::sent_retransmissions(&pair.a);
    let kernel = after - before;
    assert_eq!(walls.len(), 3);
    assert!(
        kernel >= 1 && walls[0] > 600_000_000,
        "the first reply was not retransmitted: {kernel} segments, {walls:?}"
    );
    let m = agent.metrics();
    let srv = series("n-rtx-srv", "server", &p);
    // All TCP traffic of the server's namespace is this connection's.
    assert_eq!(
        m.value("ws1_probe_tcp_retransmits_total", &srv),
        kernel as f64,
        "retransmissions counted vs the namespace's sent retransmissions (RetransSegs, TCPRetransFail, TCPSynRetrans: {counters_before:?} before, {counters_after:?} after)\n{}",
        m.text
    );
    assert_eq!(
        m.get(
            &format!("{REQUEST}_count"),
            &series("n-rtx-cli", "client", &p)
        ),
        Some(3.0)
    );
    assert_eq!(m.get(&format!("{REQUEST}_count"), &srv), Some(3.0));
}

#[test]
fn cli_json_holds_exact_request_counts() {
    if !privileged() {
        return;
    }
    let mut server = NetLoad::spawn("n-cli-srv");
    let mut client = NetLoad::spawn("n-cli-cli");
    let pid = client.pid.to_string();
    let cli = std::thread::spawn(move || {
        run_probe(&["net", "--pid", &pid, "--duration", "3s", "--json"])
    });
    // Wait until the collector is attached (as the syscalls CLI test does).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let port = server.listen("127.0.0.1:0");
    client.cmd(&format!("pooled 127.0.0.1:{port} 12 0"));
    let out = cli.join().expect("cli thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "net failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = format!("\"port\":{port}");
    let start = stdout
        .find(&key)
        .unwrap_or_else(|| panic!("no port {port} row in {stdout}"));
    let obj = &stdout[stdout[..start].rfind('{').unwrap_or(0)..];
    let row = &obj[..obj.find('}').unwrap_or(obj.len())];
    for want in [
        "\"requests\":12",
        "\"connections\":1",
        "\"side\":\"client\"",
        "\"service\":\"n-cli-cli\"",
    ] {
        assert!(row.contains(want), "{want} not in {row}");
    }
    assert!(row.contains("\"reuse_ratio\":0.9166"), "{row}");
}

#[test]
fn server_listening_before_the_agent_started_is_observed() {
    if !privileged() {
        return;
    }
    let mut server = NetLoad::spawn("n-early-srv");
    let mut client = NetLoad::spawn("n-early-cli");
    // listen() runs before the agent exists; the agent finds the port in /proc at start.
    let port = server.listen("127.0.0.1:0");
    let agent = Agent::start(&["--pid", &server.pid.to_string()]);
    client.cmd(&format!("unpooled 127.0.0.1:{port} 4 0"));
    let p = port.to_string();
    let m = agent.metrics();
    let srv = series("n-early-srv", "server", &p);
    assert_eq!(m.value("ws1_probe_tcp_connections_total", &srv), 4.0);
    assert_eq!(m.get(&format!("{REQUEST}_count"), &srv), Some(4.0));
    assert_eq!(m.get("ws1_probe_connection_reuse_ratio", &srv), Some(0.0));
}

/// Which programs the agent loaded: the `tp_btf` family by default on this kernel, the
/// tracepoints (raw for send/receive) when `WS1_PROBE_NET_HOOKS=tracepoint`, never both. `xtask
/// test` runs this file both ways, so every test here covers both paths.
#[test]
fn network_hooks_are_tp_btf_by_default_and_tracepoints_on_request() {
    if !privileged() {
        return;
    }
    let mut server = NetLoad::spawn("n-hooks");
    let agent = Agent::start(&["--pid", &server.pid.to_string()]);
    let port = server.listen("127.0.0.1:0");
    server.cmd(&format!("pooled 127.0.0.1:{port} 3 0"));
    let m = agent.metrics();
    let loaded = |program: &str| {
        m.samples.iter().any(|s| {
            s.0 == "ws1_probe_bpf_program_runs_total"
                && s.1.iter().any(|(k, v)| k == "program" && v == program)
        })
    };
    let btf = [
        "inet_sock_set_state_btf",
        "inet_sock_set_state_btf_nested",
        "sock_send_length_btf",
        "sock_recv_length_btf",
        "tcp_retransmit_skb_btf",
        "tcp_send_reset_btf",
        "tcp_receive_reset_btf",
    ];
    let classic = [
        "inet_sock_set_state",
        "sock_send_length_raw",
        "sock_recv_length_raw",
        "tcp_retransmit_skb",
        "tcp_send_reset",
        "tcp_receive_reset",
    ];
    let fallback = std::env::var("WS1_PROBE_NET_HOOKS").as_deref() == Ok("tracepoint");
    let (want, not): (&[&str], &[&str]) = if fallback {
        (&classic, &btf)
    } else {
        (&btf, &classic)
    };
    for p in want {
        assert!(
            loaded(p),
            "program {p} not loaded (fallback: {fallback})\n{}",
            m.text
        );
    }
    for p in not {
        assert!(
            !loaded(p),
            "program {p} loaded as well (fallback: {fallback})"
        );
    }
    // The process talked to itself: both ends are its own, 3 requests each way.
    let p = port.to_string();
    assert_eq!(
        m.get(
            &format!("{REQUEST}_count"),
            &series("n-hooks", "server", &p)
        ),
        Some(3.0)
    );
    assert_eq!(
        m.get(
            &format!("{REQUEST}_count"),
            &series("n-hooks", "client", &p)
        ),
        Some(3.0)
    );
}

#[test]
fn ipv6_connections_are_observed() {
    if !privileged() {
        return;
    }
    let mut server = NetLoad::spawn("n-v6-srv");
    let mut client = NetLoad::spawn("n-v6-cli");
    let agent = Agent::start(&[
        "--pid",
        &server.pid.to_string(),
        "--pid",
        &client.pid.to_string(),
    ]);
    let port = server.listen("[::1]:0");
    client.cmd(&format!("pooled [::1]:{port} 3 0"));
    let p = port.to_string();
    let m = agent.metrics();
    for s in [
        series("n-v6-cli", "client", &p),
        series("n-v6-srv", "server", &p),
    ] {
        assert_eq!(m.get(&format!("{REQUEST}_count"), &s), Some(3.0), "{s:?}");
        assert_eq!(m.value("ws1_probe_tcp_connections_total", &s), 1.0, "{s:?}");
    }
}

/// Every sample whose labels include `remote`, as (service, remote).
fn remote_labels(m: &Metrics) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = m
        .samples
        .iter()
        .filter_map(|(_, l, _)| {
            let get = |k: &str| l.iter().find(|(lk, _)| lk == k).map(|(_, v)| v.clone());
            Some((get("service")?, get("remote")?))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[test]
fn remote_addresses_split_the_series_of_opted_in_services_only() {
    if !privileged() {
        return;
    }
    let mut server = NetLoad::spawn("n-ra-srv");
    let mut client = NetLoad::spawn("n-ra-cli");
    let mut plain = NetLoad::spawn("n-ra-plain");
    // The same port on three loopback addresses (127.0.0.2 is loopback too): only the remote
    // address tells the servers apart.
    let port = server.listen("127.0.0.1:0");
    assert_eq!(server.listen(&format!("127.0.0.2:{port}")), port);
    assert_eq!(server.listen(&format!("[::1]:{port}")), port);
    let config = std::env::temp_dir().join(format!("ws1-ra-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "[[service]]\nname = \"n-ra-srv\"\nmatch = { comm = \"^n-ra-srv$\" }\nremote_addresses = true\n\
         [[service]]\nname = \"n-ra-cli\"\nmatch = { comm = \"^n-ra-cli$\" }\nremote_addresses = true\n\
         [[service]]\nname = \"n-ra-plain\"\nmatch = { comm = \"^n-ra-plain$\" }\n",
    )
    .expect("write config");
    let agent = Agent::start(&["--config", config.to_str().expect("utf-8 temp path")]);
    std::fs::remove_file(&config).expect("remove config");
    client.cmd(&format!("pooled 127.0.0.1:{port} 3 0"));
    client.cmd(&format!("pooled 127.0.0.2:{port} 5 0"));
    client.cmd(&format!("unpooled 127.0.0.2:{port} 2 0"));
    client.cmd(&format!("pooled [::1]:{port} 4 0"));
    plain.cmd(&format!("pooled 127.0.0.1:{port} 2 0"));
    plain.cmd(&format!("pooled 127.0.0.2:{port} 6 0"));
    let p = port.to_string();
    let m = agent.metrics();
    let with = |service: &'static str, side: &'static str, remote: &'static str| {
        let [a, b, c] = series(service, side, &p);
        [a, b, c, ("remote", remote)]
    };
    // The opted-in client: one series per server address, IPv4 printed as IPv4.
    for (remote, conns, requests) in [
        ("127.0.0.1", 1.0, 3.0),
        ("127.0.0.2", 3.0, 7.0),
        ("::1", 1.0, 4.0),
    ] {
        let l = with("n-ra-cli", "client", remote);
        assert_eq!(
            m.value("ws1_probe_tcp_connections_total", &l),
            conns,
            "{remote}\n{}",
            m.text
        );
        assert_eq!(
            m.get(&format!("{REQUEST}_count"), &l),
            Some(requests),
            "{remote}"
        );
        assert_eq!(
            m.get(
                &format!("{CONNECT}_count"),
                &[("service", "n-ra-cli"), ("port", &p), ("remote", remote)]
            ),
            Some(conns),
            "{remote}"
        );
        assert_eq!(
            m.value(
                "ws1_probe_tcp_bytes_total",
                &[l[0], l[1], l[2], l[3], ("direction", "sent")]
            ),
            requests * 8.0,
            "{remote}"
        );
    }
    // The opted-in server: its peers are the clients, which connect from 127.0.0.1 (the
    // kernel's source for every 127/8 destination) or ::1; the plain client's traffic too.
    for (remote, conns, requests) in [("127.0.0.1", 6.0, 18.0), ("::1", 1.0, 4.0)] {
        let l = with("n-ra-srv", "server", remote);
        assert_eq!(
            m.value("ws1_probe_tcp_connections_total", &l),
            conns,
            "{remote}"
        );
        assert_eq!(
            m.get(&format!("{REQUEST}_count"), &l),
            Some(requests),
            "{remote}"
        );
    }
    // The client without the option: today's label set, one series for both servers.
    let plain_client = series("n-ra-plain", "client", &p);
    assert_eq!(m.get(&format!("{REQUEST}_count"), &plain_client), Some(8.0));
    assert_eq!(
        m.value("ws1_probe_tcp_connections_total", &plain_client),
        2.0
    );
    assert_eq!(
        remote_labels(&m),
        [
            ("n-ra-cli", "127.0.0.1"),
            ("n-ra-cli", "127.0.0.2"),
            ("n-ra-cli", "::1"),
            ("n-ra-srv", "127.0.0.1"),
            ("n-ra-srv", "::1"),
        ]
        .map(|(s, r)| (s.to_owned(), r.to_owned())),
        "remote labels\n{}",
        m.text
    );
    // Three distinct addresses interned in the kernel.
    assert_eq!(
        m.get("ws1_probe_bpf_map_entries", &[("map", "NET_REMOTES")]),
        Some(3.0)
    );
}

#[test]
fn remote_addresses_flag_covers_every_selected_process() {
    if !privileged() {
        return;
    }
    // Host mode with the flag is refused before anything is loaded, in one line.
    let out = run_probe(&["net", "--remote-addresses", "--duration", "1s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        stderr.trim_end(),
        "error: invalid configuration: --remote-addresses remote_addresses: needs a selector (--pid, --comm, --cgroup or configured services): remote addresses of every process on the host would be unbounded"
    );
    let pair = VethPair::create("ws1-probe-ra");
    let mut server = NetLoad::spawn_in("n-raf-srv", Some(&pair.a));
    let mut client = NetLoad::spawn_in("n-raf-cli", Some(&pair.b));
    let (srv_pid, cli_pid) = (server.pid.to_string(), client.pid.to_string());
    let agent = Agent::start(&["--pid", &srv_pid, "--pid", &cli_pid, "--remote-addresses"]);
    // The CLI with the same flag, over the same traffic.
    let cli = std::thread::spawn(move || {
        run_probe(&[
            "net",
            "--pid",
            &cli_pid,
            "--remote-addresses",
            "--duration",
            "3s",
        ])
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let port = server.listen("10.231.0.1:0");
    client.cmd(&format!("pooled 10.231.0.1:{port} 4 0"));
    client.cmd(&format!("unpooled 10.231.0.1:{port} 3 0"));
    let p = port.to_string();
    let m = agent.metrics();
    for (service, side, remote) in [
        ("n-raf-cli", "client", "10.231.0.1"),
        ("n-raf-srv", "server", "10.231.0.2"),
    ] {
        let [a, b, c] = series(service, side, &p);
        let l = [a, b, c, ("remote", remote)];
        assert_eq!(
            m.value("ws1_probe_tcp_connections_total", &l),
            4.0,
            "{service}\n{}",
            m.text
        );
        assert_eq!(
            m.get(&format!("{REQUEST}_count"), &l),
            Some(7.0),
            "{service}"
        );
    }
    assert_eq!(
        remote_labels(&m),
        [("n-raf-cli", "10.231.0.1"), ("n-raf-srv", "10.231.0.2")]
            .map(|(s, r)| (s.to_owned(), r.to_owned()))
    );
    let out = cli.join().expect("cli thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "net failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let endpoint = format!("n-raf-cli → 10.231.0.1:{port} ");
    let row = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&endpoint))
        .unwrap_or_else(|| panic!("no {endpoint:?} row in\n{stdout}"));
    // CONNS FAILED CONN-P50 CONN-P99 RTT-P50 RTT-P99 RETRANS RST-S/R REQS ...
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cols[0], cols[1], cols[8]), ("4", "0", "7"), "{stdout}");
}

#[test]
fn check_lists_every_network_hook_as_attached() {
    if !privileged() {
        return;
    }
    // This kernel has every network tracepoint: each is attached on its own and the network
    // collector is planned `ok`; the text report names them under the collector.
    let out = run_probe(&["check", "--json"]);
    assert!(out.status.success(), "check --json failed: {out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check --json");
    let points = json["points"].as_array().expect("points");
    for hook in [
        "tracepoint sock:inet_sock_set_state",
        "raw_tp sock_send_length",
        "raw_tp sock_recv_length",
        "tracepoint sock:sock_send_length",
        "tracepoint sock:sock_recv_length",
        "tracepoint tcp:tcp_probe",
        "tracepoint tcp:tcp_retransmit_skb",
        "tracepoint tcp:tcp_send_reset",
        "tracepoint tcp:tcp_receive_reset",
        // The seven tp_btf programs with socket storage, loaded and attached as the agent does.
        "tp_btf network programs with socket storage",
    ] {
        let point = points.iter().find(|p| p["hook"] == hook);
        let point = point.unwrap_or_else(|| panic!("{hook} not probed: {points:?}"));
        assert_eq!(point["available"], true, "{hook}: {point}");
    }
    let collectors = json["collectors"].as_array().expect("collectors");
    let net = collectors.iter().find(|c| c["name"] == "net").expect("net");
    assert_eq!(net["status"], "ok", "{net}");
    assert_eq!(json["can_run"], true, "{json}");
    let text = run_probe(&["check"]);
    let text = String::from_utf8_lossy(&text.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with("net "))
        .expect("net row");
    assert!(
        row.contains(" ok ") && row.ends_with("tracepoint sock:inet_sock_set_state"),
        "{text}"
    );
    assert!(
        text.contains("optional for retransmits: tracepoint tcp:tcp_retransmit_skb"),
        "{text}"
    );
    assert!(
        text.ends_with("ok: the agent can run on this kernel\n"),
        "{text}"
    );
}

#[test]
fn busy_connection_without_replies_reports_bytes_and_rtt_every_100ms() {
    if !privileged() {
        return;
    }
    // The client writes 5 requests 150 ms apart and never reads the replies, so none of its
    // requests completes: its byte count reaches the counters only through the 100 ms timer of
    // the send hook, which also samples RTT (once per send here). The server answers each one.
    let mut server = NetLoad::spawn("n-stream-srv");
    let mut client = NetLoad::spawn("n-stream-cli");
    let port = server.listen("127.0.0.1:0");
    let agent = Agent::start(&[
        "--pid",
        &server.pid.to_string(),
        "--pid",
        &client.pid.to_string(),
    ]);
    client.cmd(&format!("stream 127.0.0.1:{port} 5 150"));
    let p = port.to_string();
    let cli = series("n-stream-cli", "client", &p);
    let srv = series("n-stream-srv", "server", &p);
    fn sent<'a>([a, b, c]: [(&'a str, &'a str); 3]) -> [(&'a str, &'a str); 4] {
        [a, b, c, ("direction", "sent")]
    }
    let m = agent.wait_for("the server answered 5 requests", |m| {
        m.get(&format!("{REQUEST}_count"), &srv) == Some(5.0)
    });
    // The connection is still open: nothing was flushed by a close.
    assert_eq!(m.value("ws1_probe_tcp_connections_active", &cli), 1.0);
    assert_eq!(
        m.value("ws1_probe_tcp_bytes_total", &sent(cli)),
        40.0,
        "{}",
        m.text
    );
    // No client request completed (a histogram without observations is not exported).
    let done = m.get(&format!("{REQUEST}_count"), &cli).unwrap_or(0.0);
    assert_eq!(done, 0.0, "client requests completed: {done}");
    assert_eq!(m.value("ws1_probe_tcp_bytes_total", &sent(srv)), 40.0);
    assert_eq!(m.get("ws1_probe_tcp_rtt_seconds_count", &cli), Some(5.0));
    client.cmd("close");
}
