//! Dependencies by name and connection reuse against a real PostgreSQL (Debian's, installed by
//! `cargo xtask test`): each test starts a private cluster on a free loopback port under a
//! temporary directory (initdb and pg_ctl as the `postgres` user, which they require), drives
//! it with pgbench under a command name of its own, and stops and removes the cluster when it
//! ends, failed or not.
//!
//! What the protocol fixes, and the assertions rely on: libpq with `sslmode=prefer` against a
//! server without SSL opens every connection with two request/response exchanges (the SSL
//! request, answered `N`, then the start-up packet, answered with authentication-ok, the
//! parameters and ready-for-query in one go; `trust` authentication needs no more), and
//! `PGGSSENCMODE=disable` rules out the GSSAPI-encryption request. Each statement of a pgbench
//! script is then one exchange (simple query protocol). pgbench also opens one set-up
//! connection before the clients start; with `-n` and a custom script it runs no statement on
//! it (no vacuum, no scale query), so it carries the two handshake exchanges and nothing else.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use ws1_probe_tests::{Agent, Metrics, free_port, privileged, run_probe};

const REQUEST: &str = "ws1_probe_request_duration_seconds";
const PER_CONN: &str = "ws1_probe_connection_requests";
const HANDSHAKES: &str = "ws1_probe_connection_handshake_exchanges_total";
/// Exchanges libpq needs to open a connection here (see the module comment).
const HANDSHAKE_EXCHANGES: u64 = 2;

/// The newest PostgreSQL server binaries Debian installed (`/usr/lib/postgresql/<major>/bin`).
fn pg_bindir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            ["initdb", "pg_ctl", "pgbench"]
                .iter()
                .all(|b| bin.join(b).is_file())
                .then_some((major, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A private PostgreSQL cluster, stopped and removed on drop.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    started: bool,
}

impl Cluster {
    /// Starts a cluster, or says why not: `None` means skip (outside CI only).
    fn start(name: &str) -> Option<Cluster> {
        let Some(bin) = pg_bindir() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL is not installed: `cargo xtask test` installs Debian's postgresql package"
            );
            eprintln!(
                "skipping test - PostgreSQL is not installed (`cargo xtask test` installs it)"
            );
            return None;
        };
        let dir = std::env::temp_dir().join(format!("ws1-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create cluster directory");
        let mut cluster = Cluster {
            bin,
            dir,
            port: free_port(),
            started: false,
        };
        // From here on, drop removes the directory whatever fails.
        run(Command::new("chown")
            .arg("postgres:postgres")
            .arg(&cluster.dir));
        cluster.as_postgres(&[
            "initdb",
            "-D",
            &cluster.data(),
            "--auth=trust",
            "-U",
            "postgres",
            "--no-sync",
            "--no-instructions",
        ]);
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c fsync=off -c ssl=off",
            cluster.port,
            cluster.dir.display()
        );
        cluster.started = true;
        cluster.as_postgres(&[
            "pg_ctl",
            "-D",
            &cluster.data(),
            "-l",
            &cluster.dir.join("log").display().to_string(),
            "-o",
            &options,
            "-w",
            "start",
        ]);
        Some(cluster)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Runs one of the server's programs as the `postgres` user (initdb and pg_ctl refuse root).
    fn as_postgres(&self, args: &[&str]) -> String {
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(args[0]))
            .args(&args[1..])
            .current_dir(&self.dir))
    }

    /// pgbench, run under command name `comm` (a symlink), with `args` after the connection
    /// options; returns the transactions it reports as processed.
    /// pgbench under the command name `comm` (a symlink).
    fn exe(&self, comm: &str) -> PathBuf {
        let exe = self.dir.join(comm);
        if !exe.exists() {
            std::os::unix::fs::symlink(self.bin.join("pgbench"), &exe).expect("symlink pgbench");
        }
        exe
    }

    /// Makes the agent decide `comm` before the measured run: the first exec of a command name
    /// is decided by the agent, a few milliseconds later, and pgbench connects before that;
    /// once decided, later execs of a name-only match are decided in the kernel at exec.
    /// `pgbench --version` makes no connection. Waits for the agent to count that exec as a
    /// start of the service, which it does when it decides.
    fn warm_up(&self, agent: &Agent, comm: &str) {
        run(Command::new(self.exe(comm)).arg("--version"));
        agent.wait_for(&format!("{comm}'s first exec decided"), |m| {
            m.get("ws1_probe_process_starts_total", &[("service", comm)])
                .is_some_and(|v| v >= 1.0)
        });
    }

    fn pgbench(&self, comm: &str, script: &str, args: &[&str]) -> u64 {
        let exe = self.exe(comm);
        let file = self.dir.join(format!("{comm}.sql"));
        std::fs::write(&file, script).expect("write pgbench script");
        let out = run(Command::new(&exe)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-n", "-f"])
            .arg(&file)
            .args(args)
            .arg("postgres")
            // The handshake this file's assertions count (see the module comment).
            .env("PGSSLMODE", "prefer")
            .env("PGGSSENCMODE", "disable")
            .env_remove("PGSERVICE")
            .env_remove("PGSSLNEGOTIATION"));
        out.lines()
            .find_map(|l| {
                l.strip_prefix("number of transactions actually processed: ")?
                    .split('/')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no transaction count in pgbench output:\n{out}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started {
            let stop = Command::new("runuser")
                .current_dir("/")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
                .output();
            if !stop.is_ok_and(|o| o.status.success()) {
                // pg_ctl could not stop it: the postmaster's pid is the first line of its file.
                let pid = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
                    .ok()
                    .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok());
                if let Some(pid) = pid {
                    // SAFETY: kill has no memory preconditions; the pid is our postmaster's.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("ws1.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

fn labels<'a>(service: &'a str, port: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("service", service),
        ("side", "client"),
        ("port", port),
        ("peer", "postgres"),
    ]
}

fn with<'a>(l: [(&'a str, &'a str); 4], k: &'a str, v: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut v2 = l.to_vec();
    v2.push((k, v));
    v2
}

/// Waits until every connection of `service` has closed (the requests-per-connection
/// histogram observes each at close).
fn closed(agent: &Agent, service: &str, port: &str, connections: f64) -> Metrics {
    agent.wait_for(
        &format!("{service}'s {connections} connections closed"),
        |m| m.get(&format!("{PER_CONN}_count"), &labels(service, port)) == Some(connections),
    )
}

#[test]
fn dependency_label_names_postgres_and_counts_match_pgbench() {
    if !privileged() {
        return;
    }
    let Some(pg) = Cluster::start("pg-dep") else {
        return;
    };
    let port = pg.port.to_string();
    let config = write_config(
        &pg.dir,
        &format!(
            "[[service]]\nname = \"pg-dep-cli\"\nmatch = {{ comm = \"^pg-dep-cli$\" }}\n\
             [[service.dependency]]\nname = \"postgres\"\nport = {port}\nhandshake_exchanges = {HANDSHAKE_EXCHANGES}\n"
        ),
    );
    let agent = Agent::start(&["--config", &config]);
    pg.warm_up(&agent, "pg-dep-cli");
    // Three statements per transaction, two pooled clients.
    let txns = pg.pgbench(
        "pg-dep-cli",
        "SELECT 1;\nSELECT 2;\nSELECT 3;\n",
        &["-c", "2", "-t", "50"],
    );
    assert_eq!(txns, 100);
    let l = labels("pg-dep-cli", &port);
    // The set-up connection and the two clients'.
    let m = closed(&agent, "pg-dep-cli", &port, 3.0);
    assert_eq!(
        m.value("ws1_probe_tcp_connections_total", &l),
        3.0,
        "{}",
        m.text
    );
    // Every statement is one request; the exchanges that open each connection are counted
    // apart, so the request count is pgbench's exactly.
    assert_eq!(
        m.get(&format!("{REQUEST}_count"), &l),
        Some(3.0 * txns as f64)
    );
    assert_eq!(
        m.get(HANDSHAKES, &l),
        Some((HANDSHAKE_EXCHANGES * 3) as f64)
    );
    // Requests per connection: 0 on the set-up connection, 150 on each client's.
    assert_eq!(m.get(&format!("{PER_CONN}_sum"), &l), Some(300.0));
    assert_eq!(
        m.get(&format!("{PER_CONN}_bucket"), &with(l, "le", "0")),
        Some(1.0)
    );
    assert_eq!(
        m.get(&format!("{PER_CONN}_bucket"), &with(l, "le", "100")),
        Some(1.0)
    );
    assert_eq!(
        m.get(&format!("{PER_CONN}_bucket"), &with(l, "le", "200")),
        Some(3.0)
    );
    // The same label on the connect latency (no `side` there), and only the configured name
    // anywhere: every series of this service's connections to the port carries it.
    assert_eq!(
        m.get(
            "ws1_probe_tcp_connect_duration_seconds_count",
            &[
                ("service", "pg-dep-cli"),
                ("port", &port),
                ("peer", "postgres")
            ]
        ),
        Some(3.0)
    );
    let ours: Vec<&str> = m
        .text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("service=\"pg-dep-cli\""))
        .filter(|l| {
            l.starts_with("ws1_probe_tcp_")
                || l.starts_with("ws1_probe_request")
                || l.starts_with("ws1_probe_connection")
        })
        .collect();
    assert!(!ours.is_empty());
    for line in &ours {
        assert!(line.contains(",peer=\"postgres\""), "{line}");
    }
}

#[test]
fn pooled_and_unpooled_pgbench_told_apart() {
    if !privileged() {
        return;
    }
    let Some(pg) = Cluster::start("pg-reuse") else {
        return;
    };
    let port = pg.port.to_string();
    // A dependency for every service, with command-line selectors.
    let config = write_config(
        &pg.dir,
        &format!(
            "[[dependency]]\nname = \"postgres\"\nport = {port}\nhandshake_exchanges = {HANDSHAKE_EXCHANGES}\n"
        ),
    );
    let agent = Agent::start(&["--config", &config, "--comm", "^pg-(un)?pooled$"]);
    pg.warm_up(&agent, "pg-pooled");
    pg.warm_up(&agent, "pg-unpooled");
    // One statement per transaction: two pooled clients of 100 transactions each, and one
    // client that connects for every transaction (-C) 20 times.
    let script = "SELECT 1;\n";
    assert_eq!(
        pg.pgbench("pg-pooled", script, &["-c", "2", "-t", "100"]),
        200
    );
    assert_eq!(
        pg.pgbench("pg-unpooled", script, &["-C", "-c", "1", "-t", "20"]),
        20
    );
    closed(&agent, "pg-pooled", &port, 3.0);
    let m = closed(&agent, "pg-unpooled", &port, 21.0);
    let pooled = labels("pg-pooled", &port);
    let unpooled = labels("pg-unpooled", &port);

    // Requests per connection at close. Pooled: the set-up connection (0) and two of 100.
    // Unpooled: the set-up connection and 20 of exactly one each.
    let bucket =
        |l: [(&str, &str); 4], le| m.get(&format!("{PER_CONN}_bucket"), &with(l, "le", le));
    assert_eq!(bucket(pooled, "0"), Some(1.0));
    assert_eq!(bucket(pooled, "50"), Some(1.0));
    assert_eq!(bucket(pooled, "100"), Some(3.0));
    assert_eq!(m.get(&format!("{PER_CONN}_sum"), &pooled), Some(200.0));
    assert_eq!(bucket(unpooled, "0"), Some(1.0));
    assert_eq!(bucket(unpooled, "1"), Some(21.0));
    assert_eq!(m.get(&format!("{PER_CONN}_sum"), &unpooled), Some(20.0));

    // The reuse ratio without the handshake: 198 of 200 requests pooled were on a connection
    // that had carried one already; none unpooled (counted over all exchanges, 40 of 60
    // would have been "reused", 0.67).
    let ratio = |l: [(&str, &str); 4]| m.get("ws1_probe_connection_reuse_ratio", &l);
    assert_eq!(ratio(pooled), Some(198.0 / 200.0));
    assert_eq!(ratio(unpooled), Some(0.0));
    assert_eq!(m.get(HANDSHAKES, &unpooled), Some(42.0));
    assert_eq!(m.get(HANDSHAKES, &pooled), Some(6.0));
    // Connections opened per request: 3 for 200 pooled, 21 for 20 unpooled.
    let per_request = |l: [(&str, &str); 4]| m.get("ws1_probe_connections_per_request", &l);
    assert_eq!(per_request(pooled), Some(3.0 / 200.0));
    assert_eq!(per_request(unpooled), Some(21.0 / 20.0));
}

#[test]
fn bad_dependency_entries_are_one_error_line_each() {
    // The agent refuses the file before it loads anything, so no privilege is needed.
    let dir = std::env::temp_dir().join(format!("ws1-pg-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let cases = [
        (
            "[[dependency]]\nname = \"postgres\"\n",
            "ws1.toml:2: dependency.port: dependency `postgres` has no port: add e.g. port = 5432",
        ),
        (
            "[[dependency]]\nname = \"postgres\"\nport = 0\n",
            "ws1.toml:3: dependency.port: 0 is not a TCP port: give 1 to 65535",
        ),
        (
            "[[dependency]]\nname = \"pg\"\nport = 5432\n[[dependency]]\nname = \"pg\"\nport = 5433\n",
            "ws1.toml:5: dependency.name: duplicate dependency `pg` (already port 5432): give each name once",
        ),
    ];
    for (text, want) in cases {
        let config = write_config(&dir, text);
        let out = run_probe(&["agent", "--listen", "127.0.0.1:0", "--config", &config]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(out.status.code(), Some(1), "{text}: {stderr}");
        assert_eq!(lines.len(), 1, "{text}: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].ends_with(want),
            "{text}: {stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).expect("remove temp dir");
}
