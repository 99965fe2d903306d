//! The TOML configuration file and the precedence that turns defaults, file, environment and
//! flags into one [`Settings`]: built-in defaults < file < environment < flags.
//!
//! ```toml
//! [agent]
//! listen = "127.0.0.1:9479"
//!
//! [[service]]
//! name = "trading-engine"
//! match = { comm = "^trading-engine$", cgroup = "/system.slice/trading.service" }
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;
use ws1_probe_common::hist::{DEFAULT_EXPORT_BOUNDS_NS, MAX_EXPORT_BOUNDS};

use crate::slo::{self, AlertSettings, PromDuration, Slo};

use super::{
    Rule, TargetSpec,
    selector::{CGROUP_ROOT, regex_reason},
};

/// Default listen address of the agent (loopback: the agent runs as root).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9479";
/// Environment variable naming the config file.
pub const ENV_CONFIG: &str = "WS1_PROBE_CONFIG";
/// Default of the syscall series budget in host mode (`[agent] syscalls_per_service`); with
/// selectors or configured services every syscall has its own series unless the file sets it.
pub const DEFAULT_SYSCALLS_PER_SERVICE: usize = 8;
/// Environment variable overriding the listen address.
pub const ENV_LISTEN: &str = "WS1_PROBE_LISTEN";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub histogram: HistogramSection,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceSection>,
    /// Dependencies of every service (`[[dependency]]` at the top level).
    #[serde(default, rename = "dependency")]
    pub dependencies: Vec<DependencySection>,
    /// Thresholds of the generated alert rules (`ws1-probe rules`).
    #[serde(default)]
    pub alerts: AlertsSection,
}

/// `[alerts]`: every field optional, defaults from the WS1 plan (see [`AlertSettings`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsSection {
    pub cpu_percent: Option<Spanned<f64>>,
    pub cpu_for: Option<Spanned<String>>,
    pub memory_percent: Option<Spanned<f64>>,
    pub memory_for: Option<Spanned<String>>,
    pub latency: Option<Spanned<String>>,
    pub latency_for: Option<Spanned<String>>,
    pub error_ratio: Option<Spanned<f64>>,
    pub error_for: Option<Spanned<String>>,
    /// `for` of the fast (paging) and slow (ticket) burn-rate alerts.
    pub slo_fast_for: Option<Spanned<String>>,
    pub slo_slow_for: Option<Spanned<String>>,
    pub agent_memory_mib: Option<Spanned<u64>>,
    pub agent_cpu_percent: Option<Spanned<f64>>,
    pub job: Option<Spanned<String>>,
    pub runbook_base: Option<Spanned<String>>,
}

/// `slo = { latency = "5ms", target = 0.99 }` on a service (`window` defaults to 30d).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloSection {
    pub latency: String,
    pub target: f64,
    pub window: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub listen: Option<Spanned<String>>,
    pub bpf_stats: Option<bool>,
    /// Syscalls with their own series per service (0: all); the rest are `syscall="other"`.
    pub syscalls_per_service: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistogramSection {
    /// Prometheus `le` bounds in seconds, ascending.
    pub buckets_seconds: Option<Spanned<Vec<f64>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    pub name: Spanned<String>,
    #[serde(rename = "match")]
    pub matches: Spanned<MatchSection>,
    /// Trace this service's allocations with uprobes (leak suspects and allocation metrics).
    #[serde(default)]
    pub precise_alloc: bool,
    /// Binary holding the allocator, as the process sees it (a statically linked program, or e.g.
    /// libjemalloc); `exe` for the program itself. Overrides the allocator found by itself.
    pub alloc_lib: Option<String>,
    /// Prefix of the allocator's function names, e.g. `je_` for jemalloc built with a prefix.
    pub alloc_prefix: Option<String>,
    /// Split this service's network series by remote address (a `remote` label).
    #[serde(default)]
    pub remote_addresses: bool,
    /// Remote ports this service connects to, by name (`[[service.dependency]]`).
    #[serde(default, rename = "dependency")]
    pub dependencies: Vec<DependencySection>,
    /// A latency objective on the service's server-side requests.
    pub slo: Option<Spanned<SloSection>>,
}

/// `[[dependency]]` or `[[service.dependency]]`: a remote port named for the `peer` label of
/// the client-side series of connections to it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependencySection {
    pub name: Spanned<String>,
    pub port: Option<Spanned<i64>>,
    /// The first exchanges of each connection that are the protocol's handshake.
    pub handshake_exchanges: Option<Spanned<i64>>,
}

/// Most handshake exchanges a dependency may declare (PostgreSQL with SCRAM over TLS needs
/// five; more is a typo).
pub const MAX_HANDSHAKE_EXCHANGES: i64 = 100;

/// A configured dependency, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dependency {
    /// The service whose connections it names; `None`: every service (top level).
    pub service: Option<String>,
    /// The `peer` label value.
    pub name: String,
    /// The remote port.
    pub port: u16,
    /// Exchanges at the start of each connection counted as handshake, not as requests.
    pub handshake_exchanges: u32,
}

/// The dependency name of connections `service` opens to `port`: the service's own dependency
/// on that port, else one configured for every service.
pub fn peer_name<'a>(deps: &'a [Dependency], service: &str, port: u16) -> Option<&'a str> {
    let find = |own: bool| {
        deps.iter().find(|d| {
            d.port == port
                && (if own {
                    d.service.as_deref() == Some(service)
                } else {
                    d.service.is_none()
                })
        })
    };
    find(true).or_else(|| find(false)).map(|d| d.name.as_str())
}

/// The allocator of a precise-mode service, when the one found by itself is not the right one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocatorConfig {
    pub lib: Option<String>,
    pub prefix: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSection {
    pub comm: Option<Spanned<String>>,
    pub exe: Option<Spanned<String>>,
    pub cgroup: Option<String>,
    pub pid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The io error is the message's end, not a `#[source]`, so a printed chain says it once.
    #[error("cannot read config file {}: {}; check the path given with --config or WS1_PROBE_CONFIG", path.display(), os_text(error))]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}:{line}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        reason: String,
    },
    #[error("{source_name} {field}: {reason}")]
    BadValue {
        source_name: String,
        field: &'static str,
        reason: String,
    },
}

use crate::units::os_text;

/// Settings given on the command line; `None` means "not given".
#[derive(Clone, Debug, Default)]
pub struct FlagOverrides {
    pub config: Option<PathBuf>,
    pub listen: Option<String>,
    pub bpf_stats: bool,
    /// `--precise-alloc`: allocation uprobes on every selected process.
    pub precise_alloc: bool,
    /// `--alloc-lib` / `--alloc-prefix`: the allocator of every selected process.
    pub allocator: AllocatorConfig,
    /// `--remote-addresses`: a `remote` label on the network series of every selected process.
    pub remote_addresses: bool,
}

/// Which processes get the allocation uprobes (precise mode), an opt-in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PreciseAlloc {
    #[default]
    Off,
    /// Every observed process (`--precise-alloc` with command-line selectors).
    All,
    /// The configured services with `precise_alloc = true`.
    Services(Vec<String>),
}

/// Which services' network series carry the remote address (`remote` label), an opt-in: the
/// number of series grows with the number of peers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RemoteAddresses {
    #[default]
    Off,
    /// Every observed process (`--remote-addresses` with selectors or configured services).
    All,
    /// The configured services with `remote_addresses = true`.
    Services(Vec<String>),
}

/// Everything the agent and CLI need to know, resolved.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub bpf_stats: bool,
    /// Prometheus `le` bounds in nanoseconds (ascending, at most `EXPORT_BOUND_SLOTS`).
    pub bounds_ns: Vec<u64>,
    pub targets: TargetSpec,
    pub config_path: Option<PathBuf>,
    pub precise_alloc: PreciseAlloc,
    /// Services whose network series are split by remote address.
    pub remote_addresses: RemoteAddresses,
    /// Allocator per service name; `""` is the default for every process (flags).
    pub allocators: Vec<(String, AllocatorConfig)>,
    /// Which collectors run (the agent runs all; one-shot commands only their own).
    pub collectors: Collectors,
    /// Series budget: syscalls with their own series per service label (0: every syscall;
    /// default 8 in host mode, 0 otherwise).
    pub syscalls_per_service: usize,
    /// On-CPU sampling frequency, off-CPU, unwinding.
    pub profile: ProfileOptions,
    /// Host mode's label policy (`--label-idle-retire`).
    pub labels: crate::hostlabels::LabelOptions,
    /// Map capacities set with `--map-entries`.
    pub map_entries: Vec<(String, u32)>,
    /// Named remote ports (`peer` label) and their handshake exchanges.
    pub dependencies: Vec<Dependency>,
    /// The configured services' latency objectives.
    pub slos: Vec<Slo>,
    /// Thresholds of the generated alert rules.
    pub alerts: AlertSettings,
}

/// Which collectors attach their programs. A collector that is off costs nothing in the
/// kernel; its metrics are simply absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Collectors {
    pub syscalls: bool,
    pub net: bool,
    pub memory: bool,
    pub profile: bool,
    /// Run-queue latency (`sched`); process starts and exits are counted whatever is on.
    pub sched: bool,
    /// Block I/O latency and bytes per service, device and operation.
    pub block: bool,
    /// Per-service resources from procfs (no kernel part).
    pub resources: bool,
    /// Host CPU, memory, filesystems, network (node_exporter's subset; no kernel part).
    pub host: bool,
}

impl Collectors {
    pub const ALL: Self = Self {
        syscalls: true,
        net: true,
        memory: true,
        profile: true,
        sched: true,
        block: true,
        resources: true,
        host: true,
    };
    pub const NONE: Self = Self {
        syscalls: false,
        net: false,
        memory: false,
        profile: false,
        sched: false,
        block: false,
        resources: false,
        host: false,
    };

    /// Parses a comma-separated list such as `syscalls,profile` (or `all`).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut c = Self::NONE;
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "all" => c = Self::ALL,
                "syscalls" => c.syscalls = true,
                "net" => c.net = true,
                "memory" => c.memory = true,
                "profile" => c.profile = true,
                "sched" => c.sched = true,
                "block" => c.block = true,
                "resources" => c.resources = true,
                "host" => c.host = true,
                other => {
                    return Err(format!(
                        "unknown collector `{other}`: expected syscalls, net, memory, profile, sched, block, resources, host or all"
                    ));
                }
            }
        }
        Ok(c)
    }
}

impl Default for Collectors {
    fn default() -> Self {
        Self::ALL
    }
}

impl Settings {
    /// The allocator configured for a service (its own, else the flags', else libc).
    pub fn allocator(&self, service: &str) -> AllocatorConfig {
        let find = |name: &str| self.allocators.iter().find(|(n, _)| n == name);
        find(service)
            .or_else(|| find(""))
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
    }
}

/// Parses a config file's text; `path` only names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|err| {
        let (line, column) = err
            .span()
            .map(|span| line_col(text, span.start))
            .unwrap_or((1, 1));
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message: err.message().replace('\n', " "),
        }
    })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Turns the file's services into rules, checking every field.
pub fn service_rules(path: &Path, text: &str, cfg: &FileConfig) -> Result<Vec<Rule>, ConfigError> {
    let invalid = |offset: usize, field: &str, reason: String| ConfigError::Invalid {
        path: path.to_owned(),
        line: line_col(text, offset).0,
        field: field.to_owned(),
        reason,
    };
    let mut rules = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for svc in &cfg.services {
        let name = svc.name.get_ref();
        let name_at = svc.name.span().start;
        if name.is_empty() || name == "other" {
            return Err(invalid(
                name_at,
                "service.name",
                format!("`{name}` is reserved or empty: pick another name"),
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(invalid(
                name_at,
                "service.name",
                format!("duplicate service `{name}`"),
            ));
        }
        let m = svc.matches.get_ref();
        let mut rule = Rule::labeled(Some(name.clone()));
        rule.pid = m.pid;
        let regex = |pattern: &Option<Spanned<String>>, field: &str| {
            pattern
                .as_ref()
                .map(|p| {
                    regex::Regex::new(p.get_ref()).map_err(|e| {
                        invalid(
                            p.span().start,
                            field,
                            format!("invalid regex: {}", regex_reason(&e)),
                        )
                    })
                })
                .transpose()
        };
        rule.comm = regex(&m.comm, "match.comm")?;
        rule.exe = regex(&m.exe, "match.exe")?;
        if let Some(cgroup) = &m.cgroup {
            let rel = cgroup.strip_prefix(CGROUP_ROOT).unwrap_or(cgroup);
            rule.cgroup = Some(format!("/{}", rel.trim_matches('/')));
        }
        if rule.is_empty() {
            return Err(invalid(
                svc.matches.span().start,
                "service.match",
                format!("service `{name}` matches nothing: give comm, exe, cgroup or pid"),
            ));
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// Checks the file's dependencies (top level and per service) and resolves them. Within one
/// scope (the top level, or one service) names and ports are unique; a service's dependency on
/// a port takes precedence over a top-level one.
pub fn dependencies(
    path: &Path,
    text: &str,
    cfg: &FileConfig,
) -> Result<Vec<Dependency>, ConfigError> {
    let invalid = |offset: usize, field: &str, reason: String| ConfigError::Invalid {
        path: path.to_owned(),
        line: line_col(text, offset).0,
        field: field.to_owned(),
        reason,
    };
    let scopes = std::iter::once((None, "dependency", &cfg.dependencies)).chain(
        cfg.services.iter().map(|s| {
            (
                Some(s.name.get_ref().clone()),
                "service.dependency",
                &s.dependencies,
            )
        }),
    );
    let mut out = Vec::new();
    for (service, table, deps) in scopes {
        let first = out.len();
        for d in deps {
            let name = d.name.get_ref();
            let name_at = d.name.span().start;
            let field = |f: &str| format!("{table}.{f}");
            if name.trim().is_empty() {
                return Err(invalid(
                    name_at,
                    &field("name"),
                    "empty name: give the `peer` label value, e.g. name = \"postgres\"".into(),
                ));
            }
            let Some(port) = &d.port else {
                return Err(invalid(
                    name_at,
                    &field("port"),
                    format!("dependency `{name}` has no port: add e.g. port = 5432"),
                ));
            };
            let Ok(port_value) = u16::try_from(*port.get_ref()) else {
                return Err(invalid(
                    port.span().start,
                    &field("port"),
                    format!("{} is not a TCP port: give 1 to 65535", port.get_ref()),
                ));
            };
            if port_value == 0 {
                return Err(invalid(
                    port.span().start,
                    &field("port"),
                    "0 is not a TCP port: give 1 to 65535".into(),
                ));
            }
            let handshake_exchanges = match &d.handshake_exchanges {
                None => 0,
                Some(h) => match u32::try_from(*h.get_ref()) {
                    Ok(n) if i64::from(n) <= MAX_HANDSHAKE_EXCHANGES => n,
                    _ => {
                        return Err(invalid(
                            h.span().start,
                            &field("handshake_exchanges"),
                            format!(
                                "{} is not a number of exchanges: give 0 to {MAX_HANDSHAKE_EXCHANGES}",
                                h.get_ref()
                            ),
                        ));
                    }
                },
            };
            let scope: &[Dependency] = &out[first..];
            if let Some(other) = scope.iter().find(|o| o.name == *name) {
                return Err(invalid(
                    name_at,
                    &field("name"),
                    format!(
                        "duplicate dependency `{name}` (already port {}): give each name once",
                        other.port
                    ),
                ));
            }
            if let Some(other) = scope.iter().find(|o| o.port == port_value) {
                return Err(invalid(
                    port.span().start,
                    &field("port"),
                    format!(
                        "port {port_value} is already dependency `{}`: one name per port",
                        other.name
                    ),
                ));
            }
            out.push(Dependency {
                service: service.clone(),
                name: name.clone(),
                port: port_value,
                handshake_exchanges,
            });
        }
    }
    Ok(out)
}

/// The services' SLOs, checked: the latency must be a bound of the exported histogram (the SLI
/// is the share of requests in its `le` bucket), the target a fraction in (0, 1).
pub fn service_slos(
    path: &Path,
    text: &str,
    cfg: &FileConfig,
    bounds_ns: &[u64],
) -> Result<Vec<Slo>, ConfigError> {
    let mut out = Vec::new();
    for svc in &cfg.services {
        let Some(spanned) = &svc.slo else { continue };
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_col(text, spanned.span().start).0,
            field: "service.slo".to_owned(),
            reason,
        };
        let s = spanned.get_ref();
        let latency = crate::units::parse_duration(&s.latency).map_err(&invalid)?;
        let latency_ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        if !bounds_ns.contains(&latency_ns) {
            let listed: Vec<String> = bounds_ns
                .iter()
                .map(|b| format!("{}", *b as f64 / 1e9))
                .collect();
            return Err(invalid(format!(
                "latency {} is not a histogram bound, so no `le` bucket counts the requests within it: use one of {} s, or add {} to [histogram] buckets_seconds",
                s.latency,
                listed.join(", "),
                latency_ns as f64 / 1e9
            )));
        }
        if !(s.target > 0.0 && s.target < 1.0) {
            return Err(invalid(format!(
                "target {} is not a fraction between 0 and 1 (e.g. 0.99 for 99 %)",
                s.target
            )));
        }
        let window = match &s.window {
            Some(w) => PromDuration::parse(w).map_err(&invalid)?,
            None => slo::DEFAULT_WINDOW,
        };
        if window < PromDuration::hours(72) {
            return Err(invalid(format!(
                "window {window} is shorter than the 3d the slowest burn-rate alert looks back: give 3d or more (30d is usual)"
            )));
        }
        out.push(Slo {
            service: svc.name.get_ref().clone(),
            latency_ns,
            target: s.target,
            window,
        });
    }
    Ok(out)
}

/// `[alerts]` over the WS1 plan's defaults.
pub fn alert_settings(
    path: &Path,
    text: &str,
    sec: &AlertsSection,
) -> Result<AlertSettings, ConfigError> {
    let invalid = |at: usize, field: &str, reason: String| ConfigError::Invalid {
        path: path.to_owned(),
        line: line_col(text, at).0,
        field: format!("alerts.{field}"),
        reason,
    };
    let mut a = AlertSettings::default();
    let duration = |v: &Option<Spanned<String>>, field: &str, into: &mut PromDuration| {
        if let Some(v) = v {
            *into =
                PromDuration::parse(v.get_ref()).map_err(|r| invalid(v.span().start, field, r))?;
        }
        Ok::<(), ConfigError>(())
    };
    duration(&sec.cpu_for, "cpu_for", &mut a.cpu_for)?;
    duration(&sec.memory_for, "memory_for", &mut a.memory_for)?;
    duration(&sec.latency_for, "latency_for", &mut a.latency_for)?;
    duration(&sec.error_for, "error_for", &mut a.error_for)?;
    duration(&sec.slo_fast_for, "slo_fast_for", &mut a.slo_fast_for)?;
    duration(&sec.slo_slow_for, "slo_slow_for", &mut a.slo_slow_for)?;
    let percent = |v: &Option<Spanned<f64>>, field: &str, into: &mut f64| {
        if let Some(v) = v {
            let p = *v.get_ref();
            if !(p > 0.0 && p <= 100.0) {
                return Err(invalid(
                    v.span().start,
                    field,
                    format!("{p} is not a percentage in (0, 100]"),
                ));
            }
            *into = p;
        }
        Ok(())
    };
    percent(&sec.cpu_percent, "cpu_percent", &mut a.cpu_percent)?;
    percent(&sec.memory_percent, "memory_percent", &mut a.memory_percent)?;
    let mut agent_cpu = a.agent_cpu_cores * 100.0;
    percent(&sec.agent_cpu_percent, "agent_cpu_percent", &mut agent_cpu)?;
    a.agent_cpu_cores = agent_cpu / 100.0;
    if let Some(v) = &sec.error_ratio {
        let r = *v.get_ref();
        if !(r > 0.0 && r < 1.0) {
            return Err(invalid(
                v.span().start,
                "error_ratio",
                format!("{r} is not a fraction between 0 and 1 (0.05 is 5 %)"),
            ));
        }
        a.error_ratio = r;
    }
    if let Some(v) = &sec.latency {
        let d = crate::units::parse_duration(v.get_ref())
            .map_err(|r| invalid(v.span().start, "latency", r))?;
        a.latency_ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    }
    if let Some(v) = &sec.agent_memory_mib {
        a.agent_memory_bytes = v.get_ref().saturating_mul(1 << 20);
    }
    if let Some(v) = &sec.job {
        a.job = v.get_ref().clone();
    }
    if let Some(v) = &sec.runbook_base {
        a.runbook_base = v.get_ref().trim_end_matches('/').to_owned();
    }
    Ok(a)
}

/// Converts configured bucket bounds in seconds to nanoseconds, checking order and count.
pub fn bounds_from_seconds(secs: &[f64]) -> Result<Vec<u64>, String> {
    if secs.is_empty() || secs.len() > MAX_EXPORT_BOUNDS {
        return Err(format!("give between 1 and {MAX_EXPORT_BOUNDS} bounds"));
    }
    let mut out = Vec::with_capacity(secs.len());
    for &s in secs {
        if !(s.is_finite() && s > 0.0) {
            return Err(format!("bound {s} is not a positive number of seconds"));
        }
        let ns = (s * 1e9).round() as u64;
        if out.last().is_some_and(|prev| *prev >= ns) {
            return Err("bounds must be strictly ascending".to_owned());
        }
        out.push(ns);
    }
    Ok(out)
}

/// Resolves defaults < file < environment < flags. `selectors` are the CLI's `--pid/--comm/
/// --cgroup` rules; when given they replace the file's services.
pub fn resolve(
    flags: &FlagOverrides,
    selectors: Vec<Rule>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    let config_path = flags
        .config
        .clone()
        .or_else(|| env(ENV_CONFIG).filter(|s| !s.is_empty()).map(PathBuf::from));
    let (file, text) = match &config_path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                path: path.clone(),
                error,
            })?;
            (parse(path, &text)?, text)
        }
        None => (FileConfig::default(), String::new()),
    };
    let path = config_path.clone().unwrap_or_default();

    let mut listen = (DEFAULT_LISTEN.to_owned(), "default".to_owned());
    if let Some(l) = &file.agent.listen {
        listen = (
            l.get_ref().clone(),
            format!("{}:{}", path.display(), line_col(&text, l.span().start).0),
        );
    }
    if let Some(l) = env(ENV_LISTEN).filter(|s| !s.is_empty()) {
        listen = (l, ENV_LISTEN.to_owned());
    }
    if let Some(l) = &flags.listen {
        listen = (l.clone(), "--listen".to_owned());
    }
    let listen_addr: SocketAddr = listen.0.parse().map_err(|_| ConfigError::BadValue {
        source_name: listen.1.clone(),
        field: "listen",
        reason: format!("`{}` is not an address like 127.0.0.1:9479", listen.0),
    })?;

    let bounds_ns = match &file.histogram.buckets_seconds {
        Some(b) => bounds_from_seconds(b.get_ref()).map_err(|reason| ConfigError::Invalid {
            path: path.clone(),
            line: line_col(&text, b.span().start).0,
            field: "histogram.buckets_seconds".to_owned(),
            reason,
        })?,
        None => DEFAULT_EXPORT_BOUNDS_NS.to_vec(),
    };

    let file_rules = service_rules(&path, &text, &file)?;
    let mut dependencies = dependencies(&path, &text, &file)?;
    if !selectors.is_empty() {
        // Selectors replace the file's services, and with them their dependencies.
        dependencies.retain(|d| d.service.is_none());
    }
    let slos = service_slos(&path, &text, &file, &bounds_ns)?;
    let alerts = alert_settings(&path, &text, &file.alerts)?;
    let precise_alloc = if flags.precise_alloc {
        if selectors.is_empty() && file_rules.is_empty() {
            return Err(ConfigError::BadValue {
                source_name: "--precise-alloc".to_owned(),
                field: "precise_alloc",
                reason: "needs a selector (--pid, --comm, --cgroup or configured services): uprobes on every process would slow the whole host".to_owned(),
            });
        }
        PreciseAlloc::All
    } else {
        let names: Vec<String> = file
            .services
            .iter()
            .filter(|s| s.precise_alloc && selectors.is_empty())
            .map(|s| s.name.get_ref().clone())
            .collect();
        if names.is_empty() {
            PreciseAlloc::Off
        } else {
            PreciseAlloc::Services(names)
        }
    };
    let remote_addresses = if flags.remote_addresses {
        if selectors.is_empty() && file_rules.is_empty() {
            return Err(ConfigError::BadValue {
                source_name: "--remote-addresses".to_owned(),
                field: "remote_addresses",
                reason: "needs a selector (--pid, --comm, --cgroup or configured services): remote addresses of every process on the host would be unbounded".to_owned(),
            });
        }
        RemoteAddresses::All
    } else {
        let names: Vec<String> = file
            .services
            .iter()
            .filter(|s| s.remote_addresses && selectors.is_empty())
            .map(|s| s.name.get_ref().clone())
            .collect();
        if names.is_empty() {
            RemoteAddresses::Off
        } else {
            RemoteAddresses::Services(names)
        }
    };
    let mut allocators: Vec<(String, AllocatorConfig)> = file
        .services
        .iter()
        .filter(|s| s.alloc_lib.is_some() || s.alloc_prefix.is_some())
        .map(|s| {
            let config = AllocatorConfig {
                lib: s.alloc_lib.clone(),
                prefix: s.alloc_prefix.clone().unwrap_or_default(),
            };
            (s.name.get_ref().clone(), config)
        })
        .collect();
    if flags.allocator != AllocatorConfig::default() {
        allocators.push((String::new(), flags.allocator.clone()));
    }
    let targets = if !selectors.is_empty() {
        TargetSpec::Rules(selectors)
    } else if !file_rules.is_empty() {
        TargetSpec::Rules(file_rules)
    } else {
        TargetSpec::Host
    };

    Ok(Settings {
        collectors: Collectors::ALL,
        syscalls_per_service: file
            .agent
            .syscalls_per_service
            .unwrap_or(if targets.is_host() {
                DEFAULT_SYSCALLS_PER_SERVICE
            } else {
                0
            }),
        profile: ProfileOptions::default(),
        labels: crate::hostlabels::LabelOptions::default(),
        map_entries: Vec::new(),
        slos,
        alerts,
        listen: listen_addr,
        bpf_stats: flags.bpf_stats || file.agent.bpf_stats.unwrap_or(false),
        bounds_ns,
        targets,
        config_path,
        precise_alloc,
        remote_addresses,
        allocators,
        dependencies,
    })
}

/// Agent default: continuous, cheap enough to leave on.
pub const AGENT_FREQUENCY_HZ: u64 = 19;
/// CLI default: the usual profiler rate, off the timer tick so it does not alias with it.
pub const CLI_FREQUENCY_HZ: u64 = 99;
/// Default off-CPU threshold.
pub const DEFAULT_OFFCPU_MIN_NS: u64 = 1_000_000;

/// How user stacks are walked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UnwindMode {
    /// Frame pointers where the main binary keeps them (Go binaries do), DWARF (`.eh_frame`,
    /// `.debug_frame`) otherwise.
    #[default]
    Auto,
    /// Frame pointers only (cheapest; broken stacks for binaries built without them).
    Fp,
    /// Copy the stack and unwind from `.eh_frame` or `.debug_frame` for every process.
    Dwarf,
}

/// What to profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileOptions {
    /// Samples per second per CPU; 0 turns on-CPU sampling off.
    pub frequency_hz: u64,
    /// Also measure blocked time by stack.
    pub off_cpu: bool,
    /// Blocks shorter than this are not counted.
    pub offcpu_min_ns: u64,
    pub unwind: UnwindMode,
    /// Symbolize with DWARF (file:line, inline frames); off, ELF symbol tables only, which
    /// keeps a long-running agent's memory small.
    pub debug_info: bool,
    /// Bytes the profiler's caches (symbolization, unwinding) may hold together
    /// (`--profile-cache-bytes`).
    pub cache_bytes: u64,
    /// Python stacks of CPython 3.11/3.12 processes from their thread states (off with
    /// `--no-python`: their stacks show interpreter frames only).
    pub python: bool,
}

/// Default of `--profile-cache-bytes`.
pub const DEFAULT_PROFILE_CACHE_BYTES: u64 = 8 << 20;

impl Default for ProfileOptions {
    /// The agent's defaults: 19 Hz on-CPU, DWARF symbolization.
    fn default() -> Self {
        Self {
            frequency_hz: AGENT_FREQUENCY_HZ,
            off_cpu: false,
            offcpu_min_ns: DEFAULT_OFFCPU_MIN_NS,
            unwind: UnwindMode::Auto,
            debug_info: true,
            cache_bytes: DEFAULT_PROFILE_CACHE_BYTES,
            python: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
listen = "127.0.0.1:9600"

[[service]]
name = "trading-engine"
match = { comm = "^trading", cgroup = "/sys/fs/cgroup/system.slice/trading.service" }

[[service]]
name = "risk"
match = { exe = "/opt/ws1/bin/risk$", pid = 77 }
"#;

    fn write_tmp(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ws1-cfg-{}-{name}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn parses_services() {
        let path = Path::new("ws1.toml");
        let cfg = parse(path, GOOD).unwrap();
        let rules = service_rules(path, GOOD, &cfg).unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].service.as_deref(), Some("trading-engine"));
        assert_eq!(
            rules[0].cgroup.as_deref(),
            Some("/system.slice/trading.service")
        );
        assert!(rules[0].comm.as_ref().unwrap().is_match("trading-eng"));
        assert_eq!(rules[1].pid, Some(77));
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = "[[service]]\nname = \"x\"\nmatch = { comn = \"a\" }\n";
        let err = parse(Path::new("/etc/ws1.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/ws1.toml:3:"), "{err}");
        assert!(err.contains("unknown field `comn`"), "{err}");
    }

    #[test]
    fn bad_regex_names_line_and_field() {
        let text = "[[service]]\nname = \"x\"\nmatch = { comm = \"(\" }\n";
        let path = Path::new("c.toml");
        let cfg = parse(path, text).unwrap();
        let err = service_rules(path, text, &cfg).unwrap_err().to_string();
        assert!(
            err.starts_with("c.toml:3: match.comm: invalid regex"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn empty_match_and_duplicates_rejected() {
        let path = Path::new("c.toml");
        let text = "[[service]]\nname = \"x\"\nmatch = {}\n";
        let err = service_rules(path, text, &parse(path, text).unwrap()).unwrap_err();
        assert!(err.to_string().contains("matches nothing"), "{err}");
        let text = "[[service]]\nname = \"x\"\nmatch = {pid = 1}\n[[service]]\nname = \"x\"\nmatch = {pid = 2}\n";
        let err = service_rules(path, text, &parse(path, text).unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "c.toml:5: service.name: duplicate service `x`"
        );
    }

    #[test]
    fn precedence_default_file_env_flag() {
        let p = write_tmp("prec", GOOD);
        // Defaults only.
        let s = resolve(&FlagOverrides::default(), vec![], no_env).unwrap();
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert!(s.targets.is_host());
        assert_eq!(s.bounds_ns, DEFAULT_EXPORT_BOUNDS_NS.to_vec());
        // File beats defaults, and its services become the targets.
        let flags = FlagOverrides {
            config: Some(p.clone()),
            ..Default::default()
        };
        let s = resolve(&flags, vec![], no_env).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:9600");
        assert!(matches!(&s.targets, TargetSpec::Rules(r) if r.len() == 2));
        // Environment beats the file; the config path may come from the environment too.
        let env = |k: &str| match k {
            ENV_LISTEN => Some("127.0.0.1:9700".to_owned()),
            ENV_CONFIG => Some(p.to_string_lossy().into_owned()),
            _ => None,
        };
        let s = resolve(&FlagOverrides::default(), vec![], env).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:9700");
        assert_eq!(s.config_path.as_deref(), Some(p.as_path()));
        // Flags beat everything; CLI selectors replace configured services.
        let flags = FlagOverrides {
            config: Some(p.clone()),
            listen: Some("127.0.0.1:9800".into()),
            bpf_stats: true,
            ..Default::default()
        };
        let mut sel = Rule::labeled(None);
        sel.pid = Some(1);
        let s = resolve(&flags, vec![sel], env).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:9800");
        assert!(s.bpf_stats);
        assert!(matches!(&s.targets, TargetSpec::Rules(r) if r.len() == 1 && r[0].pid == Some(1)));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn bad_listen_and_missing_file() {
        let flags = FlagOverrides {
            listen: Some("localhost".into()),
            ..Default::default()
        };
        let err = resolve(&flags, vec![], no_env).unwrap_err().to_string();
        assert_eq!(
            err,
            "--listen listen: `localhost` is not an address like 127.0.0.1:9479"
        );
        let flags = FlagOverrides {
            config: Some("/nonexistent/ws1.toml".into()),
            ..Default::default()
        };
        let err = resolve(&flags, vec![], no_env).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot read config file /nonexistent/ws1.toml: "),
            "{err}"
        );
    }

    #[test]
    fn precise_alloc_is_opt_in_per_service_or_by_flag() {
        let text = "[[service]]\nname = \"risk\"\nmatch = { comm = \"risk\" }\nprecise_alloc = true\nalloc_lib = \"exe\"\nalloc_prefix = \"je_\"\n[[service]]\nname = \"db\"\nmatch = { comm = \"pg\" }\n";
        let p = write_tmp("precise", text);
        let flags = FlagOverrides {
            config: Some(p.clone()),
            ..Default::default()
        };
        let s = resolve(&flags, vec![], no_env).unwrap();
        assert_eq!(s.precise_alloc, PreciseAlloc::Services(vec!["risk".into()]));
        let je = AllocatorConfig {
            lib: Some("exe".into()),
            prefix: "je_".into(),
        };
        assert_eq!(s.allocator("risk"), je);
        assert_eq!(s.allocator("db"), AllocatorConfig::default());
        let flags = FlagOverrides {
            precise_alloc: true,
            ..flags
        };
        assert_eq!(
            resolve(&flags, vec![], no_env).unwrap().precise_alloc,
            PreciseAlloc::All
        );
        std::fs::remove_file(p).unwrap();
        let err = resolve(
            &FlagOverrides {
                precise_alloc: true,
                ..Default::default()
            },
            vec![],
            no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("--precise-alloc precise_alloc: needs a selector"),
            "{err}"
        );
        let s = resolve(&FlagOverrides::default(), vec![], no_env).unwrap();
        assert_eq!(s.precise_alloc, PreciseAlloc::Off);
    }

    #[test]
    fn remote_addresses_are_opt_in_per_service_or_by_flag() {
        let text = "[[service]]\nname = \"api\"\nmatch = { comm = \"api\" }\nremote_addresses = true\n[[service]]\nname = \"db\"\nmatch = { comm = \"pg\" }\nremote_addresses = false\n[[service]]\nname = \"cache\"\nmatch = { comm = \"redis\" }\n";
        let p = write_tmp("remote", text);
        let flags = FlagOverrides {
            config: Some(p.clone()),
            ..Default::default()
        };
        assert_eq!(
            resolve(&flags, vec![], no_env).unwrap().remote_addresses,
            RemoteAddresses::Services(vec!["api".into()])
        );
        // The flag covers every configured service.
        let all = FlagOverrides {
            remote_addresses: true,
            ..flags.clone()
        };
        assert_eq!(
            resolve(&all, vec![], no_env).unwrap().remote_addresses,
            RemoteAddresses::All
        );
        // Selectors replace the file's services, and with them their opt-ins.
        let mut sel = Rule::labeled(None);
        sel.pid = Some(1);
        assert_eq!(
            resolve(&flags, vec![sel.clone()], no_env)
                .unwrap()
                .remote_addresses,
            RemoteAddresses::Off
        );
        let sel_flag = FlagOverrides {
            remote_addresses: true,
            ..Default::default()
        };
        assert_eq!(
            resolve(&sel_flag, vec![sel], no_env)
                .unwrap()
                .remote_addresses,
            RemoteAddresses::All
        );
        std::fs::remove_file(p).unwrap();
        // Host mode: refused, with the fix.
        let err = resolve(&sel_flag, vec![], no_env).unwrap_err().to_string();
        assert_eq!(
            err,
            "--remote-addresses remote_addresses: needs a selector (--pid, --comm, --cgroup or configured services): remote addresses of every process on the host would be unbounded"
        );
        assert_eq!(
            resolve(&FlagOverrides::default(), vec![], no_env)
                .unwrap()
                .remote_addresses,
            RemoteAddresses::Off
        );
    }

    #[test]
    fn remote_addresses_must_be_a_boolean_with_file_and_line() {
        let text =
            "[[service]]\nname = \"api\"\nmatch = { comm = \"api\" }\nremote_addresses = \"yes\"\n";
        let err = parse(Path::new("/etc/ws1.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/ws1.toml:4:"), "{err}");
        assert!(err.contains("expected a boolean"), "{err}");
        assert!(!err.contains('\n'));
    }

    fn deps_of(text: &str) -> Result<Vec<Dependency>, String> {
        let path = Path::new("/etc/ws1.toml");
        let cfg = parse(path, text).map_err(|e| e.to_string())?;
        dependencies(path, text, &cfg).map_err(|e| e.to_string())
    }

    #[test]
    fn dependencies_per_service_and_for_every_service() {
        let text = "[[dependency]]\nname = \"cache\"\nport = 6379\n\
                    [[dependency]]\nname = \"pg\"\nport = 5432\n\
                    [[service]]\nname = \"api\"\nmatch = { comm = \"api\" }\n\
                    [[service.dependency]]\nname = \"postgres\"\nport = 5432\nhandshake_exchanges = 2\n";
        let deps = deps_of(text).unwrap();
        assert_eq!(
            deps,
            vec![
                Dependency {
                    service: None,
                    name: "cache".into(),
                    port: 6379,
                    handshake_exchanges: 0
                },
                Dependency {
                    service: None,
                    name: "pg".into(),
                    port: 5432,
                    handshake_exchanges: 0
                },
                Dependency {
                    service: Some("api".into()),
                    name: "postgres".into(),
                    port: 5432,
                    handshake_exchanges: 2
                },
            ]
        );
        // The service's own name wins on its port; other services get the top-level one.
        assert_eq!(peer_name(&deps, "api", 5432), Some("postgres"));
        assert_eq!(peer_name(&deps, "worker", 5432), Some("pg"));
        assert_eq!(peer_name(&deps, "api", 6379), Some("cache"));
        assert_eq!(peer_name(&deps, "api", 80), None);
        // Selectors replace the file's services and their dependencies, not the top level's.
        let path = write_tmp("deps", text);
        let flags = FlagOverrides {
            config: Some(path.clone()),
            ..Default::default()
        };
        let with_file = resolve(&flags, vec![], no_env).unwrap();
        assert_eq!(with_file.dependencies.len(), 3);
        let with_selector = resolve(&flags, vec![Rule::labeled(None)], no_env).unwrap();
        assert_eq!(
            with_selector
                .dependencies
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>(),
            ["cache", "pg"]
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_dependencies_name_file_line_and_fix() {
        let svc = "[[service]]\nname = \"api\"\nmatch = { comm = \"api\" }\n";
        let cases = [
            (
                format!("{svc}[[service.dependency]]\nname = \"postgres\"\n"),
                "/etc/ws1.toml:5: service.dependency.port: dependency `postgres` has no port: add e.g. port = 5432",
            ),
            (
                "[[dependency]]\nname = \"pg\"\nport = 0\n".to_owned(),
                "/etc/ws1.toml:3: dependency.port: 0 is not a TCP port: give 1 to 65535",
            ),
            (
                "[[dependency]]\nname = \"pg\"\nport = 70000\n".to_owned(),
                "/etc/ws1.toml:3: dependency.port: 70000 is not a TCP port: give 1 to 65535",
            ),
            (
                format!(
                    "{svc}[[service.dependency]]\nname = \"pg\"\nport = 5432\n[[service.dependency]]\nname = \"pg\"\nport = 5433\n"
                ),
                "/etc/ws1.toml:8: service.dependency.name: duplicate dependency `pg` (already port 5432): give each name once",
            ),
            (
                "[[dependency]]\nname = \"a\"\nport = 1\n[[dependency]]\nname = \"b\"\nport = 1\n"
                    .to_owned(),
                "/etc/ws1.toml:6: dependency.port: port 1 is already dependency `a`: one name per port",
            ),
            (
                "[[dependency]]\nname = \"pg\"\nport = 5432\nhandshake_exchanges = -1\n".to_owned(),
                "/etc/ws1.toml:4: dependency.handshake_exchanges: -1 is not a number of exchanges: give 0 to 100",
            ),
            (
                "[[dependency]]\nname = \"\"\nport = 5432\n".to_owned(),
                "/etc/ws1.toml:2: dependency.name: empty name: give the `peer` label value, e.g. name = \"postgres\"",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(deps_of(&text).unwrap_err(), want, "{text}");
        }
        // The same name in two scopes is fine (a service's own name for a port).
        assert!(
            deps_of(&format!(
                "[[dependency]]\nname = \"pg\"\nport = 5432\n{svc}[[service.dependency]]\nname = \"pg\"\nport = 5432\n"
            ))
            .is_ok()
        );
        // Unknown fields are caught by the parser, with their line.
        let err = deps_of("[[dependency]]\nname = \"pg\"\nprot = 5432\n").unwrap_err();
        assert!(
            err.starts_with("/etc/ws1.toml:3:") && err.contains("prot"),
            "{err}"
        );
    }

    #[test]
    fn bucket_bounds() {
        assert_eq!(
            bounds_from_seconds(&[0.001, 0.005]).unwrap(),
            vec![1_000_000, 5_000_000]
        );
        assert!(bounds_from_seconds(&[0.005, 0.001]).is_err());
        assert!(bounds_from_seconds(&[]).is_err());
        assert!(bounds_from_seconds(&[-1.0]).is_err());
        let text = "[histogram]\nbuckets_seconds = [2.0, 1.0]\n";
        let p = write_tmp("buckets", text);
        let flags = FlagOverrides {
            config: Some(p.clone()),
            ..Default::default()
        };
        let err = resolve(&flags, vec![], no_env).unwrap_err().to_string();
        assert!(
            err.ends_with(":2: histogram.buckets_seconds: bounds must be strictly ascending"),
            "{err}"
        );
        std::fs::remove_file(p).unwrap();
    }

    /// Property tests: the config file is the operator's, but a typo must give an error line,
    /// never a panic.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        const EXAMPLE: &str = include_str!("../../../config/ws1-services.example.toml");

        proptest! {
            #![proptest_config(crate::untrusted::fuzz::config(256))]

            #[test]
            fn damaged_config_never_panics(
                keep in any::<prop::sample::Index>(),
                edits in proptest::collection::vec(
                    (any::<prop::sample::Index>(), prop_oneof![
                        Just('"'), Just('='), Just('['), Just(']'), Just('\n'), Just('é'),
                        Just('#'), Just('0'), Just(' '), Just('\\'), any::<char>(),
                    ]),
                    0..8,
                ),
            ) {
                let mut text: Vec<char> = EXAMPLE.chars().collect();
                text.truncate(keep.index(text.len() + 1));
                for (at, c) in edits {
                    if !text.is_empty() {
                        let i = at.index(text.len());
                        text[i] = c;
                    }
                }
                let text: String = text.into_iter().collect();
                let path = Path::new("/etc/ws1.toml");
                if let Ok(cfg) = parse(path, &text) {
                    let _ = service_rules(path, &text, &cfg);
                } else {
                    let err = parse(path, &text).unwrap_err().to_string();
                    prop_assert!(err.starts_with("/etc/ws1.toml:"), "{}", err);
                    prop_assert!(!err.contains('\n'), "{}", err);
                }
            }
        }
    }
}
