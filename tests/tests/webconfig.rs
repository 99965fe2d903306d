//! `--web-config`: TLS and basic authentication on the agent's endpoint, with a certificate
//! made by openssl and a bcrypt hash made by htpasswd in the test, checked with curl.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ws1_probe_tests::{free_port, privileged, probe_bin};

fn tmp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ws1-webconfig-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A CA and a certificate it signed for `cn` (with 127.0.0.1 as a SAN): (cert, key) paths.
fn issue(dir: &Path, ca: &str, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let crt = dir.join(format!("{name}.crt"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(Command::new("openssl")
        .args(["req", "-new", "-newkey", "rsa:2048", "-nodes"])
        .args([
            "-keyout".as_ref(),
            key.as_os_str(),
            "-out".as_ref(),
            csr.as_os_str(),
            "-subj".as_ref(),
            format!("/CN={cn}").as_ref(),
        ]));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(dir.join(format!("{ca}.crt")))
        .arg("-CAkey")
        .arg(dir.join(format!("{ca}.key")))
        .args(["-CAcreateserial", "-out"])
        .arg(&crt)
        .arg("-extfile")
        .arg(&ext));
    (crt, key)
}

fn make_ca(dir: &Path, name: &str) {
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.crt")))
        .args(["-subj", &format!("/CN={name}")]));
}

/// `htpasswd -nbBC 10 user password` prints `user:$2y$10$...`.
fn bcrypt_hash(user: &str, password: &str) -> String {
    let line = run(Command::new("htpasswd").args(["-nbBC", "10", user, password]));
    let hash = line.trim().split_once(':').unwrap().1.to_owned();
    assert!(hash.starts_with("$2y$10$"), "{hash}");
    hash
}

struct TlsAgent {
    child: Child,
    port: u16,
    ca: PathBuf,
}

impl Drop for TlsAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl's (exit code, HTTP status, body) for `url` with extra arguments.
fn curl(args: &[&str], url: &str) -> (i32, u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "20", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("cannot run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        out.status.code().unwrap_or(-1),
        code.trim().parse().unwrap_or(0),
        body.to_owned(),
    )
}

fn start(config: &Path, ca: &Path) -> TlsAgent {
    let port = free_port();
    let child = Command::new(probe_bin())
        .args([
            "agent",
            "--collectors",
            "profile",
            "--profile-frequency",
            "19",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--web-config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut agent = TlsAgent {
        child,
        port,
        ca: ca.to_owned(),
    };
    let started = Instant::now();
    loop {
        let cacert = agent.ca.to_str().unwrap();
        let (_, status, _) = curl(&["--cacert", cacert], &agent.url("/readyz"));
        if status == 200 {
            return agent;
        }
        if let Ok(Some(status)) = agent.child.try_wait() {
            panic!("agent exited before ready: {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "agent not ready after 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl TlsAgent {
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

#[test]
fn tls_and_basic_auth_guard_metrics_and_profiles() {
    if !privileged() {
        return;
    }
    let dir = tmp_dir("auth");
    make_ca(&dir, "ca");
    let (crt, key) = issue(&dir, "ca", "server", "localhost");
    let hash = bcrypt_hash("prometheus", "s3cret pass");
    let config = dir.join("web.yml");
    std::fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  prometheus: '{hash}'\n",
            crt.display(),
            key.display()
        ),
    )
    .unwrap();
    let agent = start(&config, &dir.join("ca.crt"));
    let ca = agent.ca.to_str().unwrap().to_owned();

    // The right password: metrics.
    let (_, status, body) = curl(
        &["--cacert", &ca, "-u", "prometheus:s3cret pass"],
        &agent.url("/metrics"),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ws1_probe_build_info"), "{body}");
    // Twice more (the second and third are answered from the check cache).
    for _ in 0..2 {
        let (_, status, _) = curl(
            &["--cacert", &ca, "-u", "prometheus:s3cret pass"],
            &agent.url("/metrics"),
        );
        assert_eq!(status, 200);
    }
    // A wrong password, an unknown user, no credentials: 401 and no metrics.
    for args in [
        vec!["-u", "prometheus:wrong"],
        vec!["-u", "grafana:s3cret pass"],
        vec![],
    ] {
        let mut all = vec!["--cacert", ca.as_str()];
        all.extend(args.iter().copied());
        let (_, status, body) = curl(&all, &agent.url("/metrics"));
        assert_eq!(status, 401, "{args:?}: {body}");
        assert!(!body.contains("ws1_probe_"), "{args:?}: {body}");
    }
    let (_, _, headers) = curl(
        &["--cacert", &ca, "-D", "-", "-o", "/dev/null"],
        &agent.url("/metrics"),
    );
    assert!(
        headers.contains("WWW-Authenticate: Basic realm=\"ws1-probe\""),
        "{headers}"
    );
    // The profile endpoint is behind the same authentication.
    let (_, status, _) = curl(
        &["--cacert", &ca],
        &agent.url("/debug/pprof/profile?seconds=1"),
    );
    assert_eq!(status, 401);
    let profile = dir.join("cpu.pb.gz");
    let (_, status, _) = curl(
        &[
            "--cacert",
            &ca,
            "-u",
            "prometheus:s3cret pass",
            "-o",
            profile.to_str().unwrap(),
        ],
        &agent.url("/debug/pprof/profile?seconds=1"),
    );
    assert_eq!(status, 200);
    let gz = std::fs::read(&profile).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "a gzipped pprof");
    // Liveness and readiness answer without credentials.
    let (_, status, _) = curl(&["--cacert", &ca], &agent.url("/healthz"));
    assert_eq!(status, 200);
    // Plain HTTP on the TLS listener: a 400 that says so, never metrics.
    let (_, status, body) = curl(
        &["-u", "prometheus:s3cret pass"],
        &format!("http://127.0.0.1:{}/metrics", agent.port),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("HTTP request to an HTTPS server"), "{body}");
    assert!(!body.contains("ws1_probe_"));
    // A client that does not trust the agent's CA refuses it (curl exit 60).
    let (code, _, _) = curl(&["-u", "prometheus:s3cret pass"], &agent.url("/metrics"));
    assert_eq!(code, 60, "curl should reject an unknown CA");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn client_certificates_are_required_when_configured() {
    if !privileged() {
        return;
    }
    let dir = tmp_dir("mtls");
    make_ca(&dir, "ca");
    make_ca(&dir, "clientca");
    make_ca(&dir, "otherca");
    // The server's certificate, at the relative names the config uses.
    issue(&dir, "ca", "server", "localhost");
    let (client_crt, client_key) = issue(&dir, "clientca", "client", "prometheus");
    let (rogue_crt, rogue_key) = issue(&dir, "otherca", "rogue", "prometheus");
    let config = dir.join("web.yml");
    // Relative names are relative to the web config file, as for Prometheus' exporters.
    std::fs::write(
        &config,
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: clientca.crt\n",
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(probe_bin())
        .args([
            "agent",
            "--collectors",
            "memory",
            "--profile-frequency",
            "0",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--web-config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut agent = TlsAgent {
        child,
        port,
        ca: dir.join("ca.crt"),
    };
    let ca = dir.join("ca.crt");
    let ca = ca.to_str().unwrap();
    let with_cert = |crt: &Path, key: &Path, path: &str| {
        curl(
            &[
                "--cacert",
                ca,
                "--cert",
                crt.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
            ],
            &format!("https://127.0.0.1:{port}{path}"),
        )
    };
    let url = agent.url("/metrics");
    let started = Instant::now();
    while with_cert(&client_crt, &client_key, "/readyz").1 != 200 {
        assert!(agent.child.try_wait().unwrap().is_none(), "agent exited");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "agent not ready after 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, status, body) = with_cert(&client_crt, &client_key, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("ws1_probe_build_info"));
    // No client certificate, or one from another CA: the handshake fails, no metrics.
    let (code, status, body) = curl(&["--cacert", ca], &url);
    assert!(
        code != 0 && status == 0 && body.is_empty(),
        "{code} {status} {body}"
    );
    let (code, status, body) = with_cert(&rogue_crt, &rogue_key, "/metrics");
    assert!(
        code != 0 && status == 0 && body.is_empty(),
        "{code} {status} {body}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_web_config_is_one_error_line() {
    if !privileged() {
        return;
    }
    let dir = tmp_dir("bad");
    let config = dir.join("web.yml");
    std::fs::write(&config, "basic_auth_users:\n  prometheus: plaintext\n").unwrap();
    let port = free_port();
    let out = Command::new(probe_bin())
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--web-config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("basic_auth_users.prometheus: not a bcrypt hash")
            && errors[0].contains("htpasswd -nBC 10 prometheus"),
        "{stderr}"
    );
    let missing = Command::new(probe_bin())
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--web-config", "/nonexistent/web.yml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("cannot read web config /nonexistent/web.yml: No such file or directory"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
