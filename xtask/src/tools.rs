//! Reference tools the privileged tests check ws1-probe's output with, installed by xtask itself
//! so a clean CI machine gets them too: for now the Go pprof tool, the reader the profiler's
//! pprof files must satisfy.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result};

use crate::util::{self, run_cmd};

/// Debian bookworm ships pprof only as Go source (`-dev` packages, for building other Go
/// packages), so the command is built from that source with Debian's Go. The last two are
/// pprof's own dependencies; the `-dev` package pulls them in, they are listed to be explicit.
const PPROF_PACKAGES: &[&str] = &[
    "golang-go",
    "golang-github-google-pprof-dev",
    "golang-github-chzyer-readline-dev",
    "golang-github-ianlancetaylor-demangle-dev",
];

/// Where Debian's `-dev` packages put Go source: a GOPATH tree (`src/github.com/...`).
const DEBIAN_GOPATH: &str = "/usr/share/gocode";

/// Debian's Go, by its own path: a different `go` earlier on PATH must not change what builds.
const DEBIAN_GO: &str = "/usr/lib/go/bin/go";

fn report(step: &str, status: &str) {
    eprintln!("tools: {step} ... {status}");
}

/// Returns the Go pprof tool at `<target>/tools/pprof`, building it once: Debian's packages
/// give Go and the pprof source, and `go build` in GOPATH mode turns them into the command
/// (about a minute from nothing, mostly apt). Later calls only check that the file is there.
pub fn ensure_pprof() -> Result<PathBuf> {
    let tools = util::target_dir().join("tools");
    let pprof = tools.join("pprof");
    if is_executable(&pprof) {
        report("pprof", &format!("already built ({})", pprof.display()));
        return Ok(pprof);
    }
    report("pprof", "missing, will build it from Debian's Go source");
    ensure_debian_packages(PPROF_PACKAGES)?;

    let started = Instant::now();
    fs::create_dir_all(&tools)
        .with_context(|| format!("cannot create {}: check permissions", tools.display()))?;
    // Built under another name and renamed, so an interrupted build never leaves a file that
    // the check above would take for a finished tool.
    let partial = tools.join("pprof.partial");
    let mut build = Command::new(DEBIAN_GO);
    build
        .args(["build", "-o"])
        .arg(&partial)
        .arg("github.com/google/pprof")
        // GOPATH mode: the packages are plain source trees with no go.mod, and no module proxy
        // is reachable anyway.
        .env("GO111MODULE", "off")
        .env("GOPATH", DEBIAN_GOPATH)
        .env("GOCACHE", tools.join("go-cache"))
        // Neither the user's go env file nor GOFLAGS may change the build; cgo is not needed.
        .env("GOENV", "off")
        .env_remove("GOFLAGS")
        .env("CGO_ENABLED", "0");
    run_cmd(&mut build).with_context(|| {
        format!(
            "pprof: `go build` failed: reinstall the sources with `apt-get install --reinstall {}`",
            PPROF_PACKAGES.join(" ")
        )
    })?;
    fs::rename(&partial, &pprof).with_context(|| {
        format!(
            "cannot move {} to {}: check permissions",
            partial.display(),
            pprof.display()
        )
    })?;
    report(
        "pprof",
        &format!(
            "built in {:.1} s ({})",
            started.elapsed().as_secs_f64(),
            pprof.display()
        ),
    );
    Ok(pprof)
}

/// Debian's PostgreSQL (server, initdb, pg_ctl and pgbench, in `/usr/lib/postgresql/<major>/bin`),
/// which `tests/tests/postgres.rs` starts a private cluster of and drives with pgbench.
const POSTGRES_PACKAGES: &[&str] = &["postgresql"];

/// Makes sure PostgreSQL is installed for the dependency tests. The package may start its
/// default cluster on 5432; the tests use their own on a free port and leave it alone.
pub fn ensure_postgres() -> Result<()> {
    ensure_debian_packages(POSTGRES_PACKAGES)
}

/// Prometheus' and Alertmanager's own checkers (`promtool`, `amtool`), which
/// `tests/tests/rules.rs` runs on the shipped rules, their unit tests and the configs, and the
/// servers themselves, which `tests/tests/slo_e2e.rs` runs on loopback.
const ALERTING_PACKAGES: &[&str] = &["prometheus", "prometheus-alertmanager"];

/// Makes sure Debian's Prometheus and Alertmanager are installed for the alerting tests. The
/// packages may start their own services on 9090 and 9093; the tests run their own instances
/// on free ports.
pub fn ensure_alerting() -> Result<()> {
    ensure_debian_packages(ALERTING_PACKAGES)
}

/// The allocators `tests/tests/allocators.rs` builds its C workload against (shared jemalloc,
/// tcmalloc, mimalloc; jemalloc's static archive, renamed with objcopy from binutils; the static
/// C library).
const ALLOCATOR_PACKAGES: &[&str] = &[
    "libjemalloc-dev",
    "libgoogle-perftools-dev",
    "libmimalloc-dev",
    "libc6-dev",
    "binutils",
    // A real program on jemalloc, found without flags: redis-server, driven by redis-benchmark.
    "redis-server",
    "redis-tools",
];

/// Makes sure the allocator libraries and headers are installed for the allocator tests.
pub fn ensure_allocators() -> Result<()> {
    ensure_debian_packages(ALLOCATOR_PACKAGES)
}

/// What `tests/tests/webconfig.rs` makes its certificates (openssl), bcrypt hashes (htpasswd)
/// and TLS requests (curl) with.
const WEB_PACKAGES: &[&str] = &["openssl", "apache2-utils", "curl"];

/// Makes sure Debian's python3 is installed (the Python stack tests profile it).
pub fn ensure_python() -> Result<()> {
    ensure_debian_packages(&["python3"])
}

/// Makes sure the TLS and basic-auth test's tools are installed.
pub fn ensure_web_tools() -> Result<()> {
    ensure_debian_packages(WEB_PACKAGES)
}

/// The managed runtimes `tests/tests/runtimes.rs` profiles: Node.js (`--perf-basic-prof`) and
/// a JDK 17 (javac for its program, jcmd for `Compiler.perfmap`).
const RUNTIME_PACKAGES: &[&str] = &["nodejs", "openjdk-17-jdk-headless"];

/// Makes sure Node.js and the JDK are installed for the runtime tests.
pub fn ensure_runtimes() -> Result<()> {
    ensure_debian_packages(RUNTIME_PACKAGES)
}

/// The Kubernetes schema checker the manifest test runs: `kubernetes-validate` from PyPI (it
/// carries the API schemas, so it validates offline), pinned, in a venv of Debian's Python.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const PYTHON_PACKAGES: &[&str] = &["python3", "python3-venv"];

/// Returns `<target>/tools/kubernetes-validate/bin/kubernetes-validate`, installing it once.
pub fn ensure_kubernetes_validate() -> Result<PathBuf> {
    let venv = util::target_dir().join("tools/kubernetes-validate");
    let bin = venv.join("bin/kubernetes-validate");
    if is_executable(&bin) {
        report(
            "kubernetes-validate",
            &format!("already installed ({})", bin.display()),
        );
        return Ok(bin);
    }
    report(
        "kubernetes-validate",
        "missing, will install it from PyPI into a venv",
    );
    ensure_debian_packages(PYTHON_PACKAGES)?;
    // A half-made venv from an interrupted run is made again.
    let _ = fs::remove_dir_all(&venv);
    run_cmd(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv),
    )
    .context("cannot create the kubernetes-validate venv")?;
    run_cmd(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        KUBERNETES_VALIDATE,
    ]))
    .with_context(|| format!("cannot install {KUBERNETES_VALIDATE}: check access to PyPI"))?;
    Ok(bin)
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Installs the Debian packages that are not installed yet. Unlike `apt::ensure_packages`,
/// which looks for a binary on PATH, this asks dpkg about each package: source-only `-dev`
/// packages have no binary to look for.
fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let installed = installed_packages(packages)?;
    let mut missing = Vec::new();
    for &package in packages {
        if installed.iter().any(|name| name == package) {
            eprintln!("apt: package {package} ... already installed");
        } else {
            eprintln!("apt: package {package} ... missing, will install");
            missing.push(package);
        }
    }
    crate::apt::install(&missing)
}

/// The names among `packages` that dpkg reports as installed. dpkg-query exits non-zero when it
/// knows nothing of one of them but still lists the others, so its status is not an error.
fn installed_packages(packages: &[&str]) -> Result<Vec<String>> {
    let output = Command::new("dpkg-query")
        .args(["--show", "--showformat=${Package} ${db:Status-Status}\\n"])
        .args(packages)
        .output()
        .context("cannot run dpkg-query: this needs a Debian-based system with dpkg")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(parse_installed(&stdout))
}

/// Package names whose status is `installed` in `dpkg-query` lines of `<package> <status>`.
/// Architecture-qualified names (`libfoo:amd64`) are reported without the architecture.
fn parse_installed(lines: &str) -> Vec<String> {
    lines
        .lines()
        .filter_map(|line| {
            let (package, status) = line.trim().split_once(' ')?;
            let package = package.split(':').next().unwrap_or(package);
            (status.trim() == "installed").then(|| package.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_installed;

    #[test]
    fn installed_packages_from_dpkg_query() {
        let out = "golang-go installed\ngolang-github-google-pprof-dev not-installed\n\
                   libc6:amd64 installed\ngolang-src config-files\n";
        assert_eq!(parse_installed(out), ["golang-go", "libc6"]);
    }
}
