//! Network probe, userspace half: attaches the socket and TCP tracepoints (skipping, with a
//! warning, any this kernel lacks) and reads the per-CPU counters and histograms into a
//! [`NetSnapshot`].

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, Ipv6Addr},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap, MapData, PerCpuArray, Queue},
};
use ws1_probe_common::{
    hist::LatencyHist,
    net::{
        DEP_ANY_SERVICE, KIND_BYTES_RECEIVED, KIND_BYTES_SENT, KIND_CONNECT,
        KIND_CONNECTION_REQUESTS, KIND_HANDSHAKE, KIND_LIFETIME, KIND_RTT, NetCounters, NetKey,
        REMOTE_NONE, REMOTE_OTHER, REMOTE_SERVICE_SLOTS, RemoteAddr, SLOT_ENTRIES, SockState,
        dep_key,
    },
};

use super::{MapUsage, take_map, typed};
use crate::{
    ebpf::{
        LoadError, NET_BTF_PROGRAMS, NET_TRACEPOINTS, TRACEFS, attach_btf_tracepoints,
        attach_raw_tracepoint, attach_tracepoint, net_hook_usable, read_net_offsets,
    },
    histogram::Histogram,
    targeting::{
        Matcher, ProcessInfo, ServiceTable,
        config::{Dependency, RemoteAddresses},
    },
};

/// Which end of the connection the observed process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// It connected; the port is the remote port.
    Client,
    /// It accepted on a port it listens on; the port is the local port.
    Server,
}

impl Side {
    fn from_raw(side: u8) -> Self {
        if side == ws1_probe_common::net::SIDE_SERVER {
            Self::Server
        } else {
            Self::Client
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// The peer of an endpoint whose service exports remote addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Remote {
    /// IPv4-mapped addresses (how the kernel stores IPv4 peers) are IPv4 here.
    Addr(IpAddr),
    /// Addresses beyond the kernel's budget of distinct addresses (`REMOTE_ENTRIES`).
    Other,
}

impl Remote {
    /// The address from its 16 bytes as the kernel stores them.
    pub fn from_octets(octets: [u8; 16]) -> Self {
        Self::Addr(Ipv6Addr::from(octets).to_canonical())
    }
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(ip) => ip.fmt(f),
            Self::Other => f.write_str("other"),
        }
    }
}

/// (service id, side, port, remote): the key of every network series. The remote is `None`
/// for services that do not export remote addresses.
pub type Endpoint = (u32, Side, u16, Option<Remote>);

/// Service ids whose series split by remote address: all of them, or the configured services
/// opted in (which have fixed ids in `services`).
pub fn remote_service_ids(setting: &RemoteAddresses, services: &ServiceTable) -> Vec<u32> {
    match setting {
        RemoteAddresses::Off => Vec::new(),
        RemoteAddresses::All => (0..REMOTE_SERVICE_SLOTS).collect(),
        RemoteAddresses::Services(names) => (0..services.len() as u32)
            .filter(|id| names.iter().any(|n| n == services.name(*id)))
            .collect(),
    }
}

/// `NET_DEPS` entries (key, handshake exchanges) of the configured dependencies that have a
/// handshake: a service's own under its id (services missing from `services` are skipped),
/// top-level ones under `DEP_ANY_SERVICE`.
pub fn dependency_handshakes(deps: &[Dependency], services: &ServiceTable) -> Vec<(u64, u32)> {
    deps.iter()
        .filter(|d| d.handshake_exchanges > 0)
        .filter_map(|d| {
            let id = match &d.service {
                None => DEP_ANY_SERVICE,
                Some(name) => (0..services.len() as u32).find(|id| services.name(*id) == name)?,
            };
            Some((dep_key(id, d.port), d.handshake_exchanges))
        })
        .collect()
}

/// Everything counted for one endpoint, summed over CPUs.
#[derive(Clone, Debug, Default)]
pub struct EndpointStats {
    pub counters: NetCounters,
    /// Connections open now.
    pub active: i64,
    pub connect: Histogram,
    pub rtt: Histogram,
    pub request: Histogram,
    pub lifetime: Histogram,
    /// Accept-side handshake (SYN-ACK → ACK round trip), server side.
    pub handshake: Histogram,
    /// Bytes per connection, observed at close (`sum_ns` holds bytes).
    pub bytes_sent: Histogram,
    pub bytes_received: Histogram,
    /// Requests per connection after its handshake exchanges, observed at close (`sum_ns`
    /// holds requests).
    pub connection_requests: Histogram,
}

impl EndpointStats {
    /// Requests on already-used connections / all requests, `None` without requests.
    pub fn reuse_ratio(&self) -> Option<f64> {
        let c = &self.counters;
        (c.requests > 0).then(|| c.reused_requests as f64 / c.requests as f64)
    }

    /// Connections established / requests, `None` without requests: about 0 for a pooled
    /// client, 1 for one that connects per request.
    pub fn connections_per_request(&self) -> Option<f64> {
        let c = &self.counters;
        (c.requests > 0).then(|| c.connections as f64 / c.requests as f64)
    }
}

/// Everything the network probe has counted since it was attached.
#[derive(Clone, Debug, Default)]
pub struct NetSnapshot {
    pub endpoints: BTreeMap<Endpoint, EndpointStats>,
}

impl NetSnapshot {
    /// Requests and connections per service (activity for the host-mode label cap).
    pub fn activity_by_service(&self) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        for ((service, ..), e) in &self.endpoints {
            *out.entry(*service).or_insert(0) += e.counters.requests + e.counters.connections;
        }
        out
    }

    pub fn total_requests(&self) -> u64 {
        self.endpoints.values().map(|e| e.counters.requests).sum()
    }

    pub fn total_connections(&self) -> u64 {
        self.endpoints
            .values()
            .map(|e| e.counters.connections)
            .sum()
    }
}

/// Adds `b`'s counters to `a`'s (per-CPU sums, endpoints merged under one label).
pub fn add_counters(a: &mut NetCounters, b: &NetCounters) {
    a.connections += b.connections;
    a.connect_failures += b.connect_failures;
    a.closed += b.closed;
    a.bytes_sent += b.bytes_sent;
    a.bytes_received += b.bytes_received;
    a.resets_sent += b.resets_sent;
    a.resets_received += b.resets_received;
    a.retransmits += b.retransmits;
    a.requests += b.requests;
    a.reused_requests += b.reused_requests;
    a.handshake_exchanges += b.handshake_exchanges;
    a.active = a.active.wrapping_add(b.active);
}

pub struct NetCollector {
    socks: HashMap<MapData, u64, SockState>,
    listen: HashMap<MapData, u32, u32>,
    slots: HashMap<MapData, NetKey, u32>,
    counters: PerCpuArray<MapData, NetCounters>,
    request_hist: Array<MapData, LatencyHist>,
    hist: HashMap<MapData, NetKey, LatencyHist>,
    remotes: HashMap<MapData, u32, RemoteAddr>,
    /// Service id → opted in to remote addresses; filled once in `attach`, kept open like the
    /// other maps for as long as the programs that read it may still be loaded.
    _remote_services: Array<MapData, u32>,
    /// Slots the kernel has not handed out yet; filled once in `attach`.
    _free_slots: Queue<MapData, u32>,
    /// Handshake exchanges of configured dependencies; filled once in `attach`.
    _deps: HashMap<MapData, u64, u32>,
    /// Hooks attached, as `category:name`.
    pub attached: Vec<String>,
    /// Hooks skipped, with the reason.
    pub skipped: Vec<(String, String)>,
}

impl NetCollector {
    /// Attaches every network tracepoint the kernel has. A missing hook is logged and skipped:
    /// the metrics it feeds stay absent, everything else works. Without
    /// `sock:inet_sock_set_state` no socket is ever observed, so that one is reported too.
    /// When `enabled` is false the maps are taken but nothing is attached: they stay empty.
    /// Connections of the services in `remote_services` (ids) are split by remote address
    /// from their creation on; a kernel whose tracepoint lacks the address is warned about.
    /// `handshakes` are the `NET_DEPS` entries ([`dependency_handshakes`]).
    pub fn attach(
        ebpf: &mut Ebpf,
        enabled: bool,
        remote_services: &[u32],
        handshakes: &[(u64, u32)],
    ) -> Result<Self, LoadError> {
        let offsets = read_net_offsets(std::path::Path::new(TRACEFS));
        let mut remote_on: Array<MapData, u32> = typed(
            "NET_REMOTE_SERVICES",
            take_map(ebpf, "NET_REMOTE_SERVICES")?,
        )?;
        if enabled && !remote_services.is_empty() {
            if offsets.state_daddr_v6 == u32::MAX {
                tracing::warn!(
                    "network: tracepoint sock:inet_sock_set_state has no daddr_v6 field on this kernel; remote addresses are not exported (drop --remote-addresses and `remote_addresses` from the config to silence this)"
                );
            } else {
                // Before the hooks attach, so every observed connection has its address.
                for &id in remote_services {
                    remote_on.set(id, 1, 0).map_err(|source| LoadError::Map {
                        map: "NET_REMOTE_SERVICES".to_owned(),
                        source,
                    })?;
                }
            }
        }
        let mut deps: HashMap<MapData, u64, u32> = typed("NET_DEPS", take_map(ebpf, "NET_DEPS")?)?;
        if enabled {
            // Before the hooks attach: a client socket reads its handshake when it connects.
            for &(key, n) in handshakes {
                deps.insert(key, n, 0).map_err(|source| LoadError::Map {
                    map: "NET_DEPS".to_owned(),
                    source,
                })?;
            }
        }
        let mut free_slots: Queue<MapData, u32> =
            typed("NET_FREE_SLOTS", take_map(ebpf, "NET_FREE_SLOTS")?)?;
        if enabled {
            // Before the hooks attach: a socket gets its endpoint's slot when it is created.
            for slot in 0..SLOT_ENTRIES {
                free_slots.push(slot, 0).map_err(|source| LoadError::Map {
                    map: "NET_FREE_SLOTS".to_owned(),
                    source,
                })?;
            }
        }
        let mut attached = Vec::new();
        let mut skipped = Vec::new();
        let mut hooks: &[(&str, &str, &str)] = if enabled { &NET_TRACEPOINTS } else { &[] };
        // The fast path first: `tp_btf` programs keep each socket's state in its local storage,
        // so the per-call work needs no hash lookup and no process filter. All seven or none; the
        // tracepoints below are the fallback.
        if enabled && net_hooks_setting()? == NetHooks::Auto {
            match attach_net_btf(ebpf) {
                Ok(()) => {
                    attached.extend(
                        NET_BTF_PROGRAMS
                            .iter()
                            .map(|(_, tp)| format!("tp_btf {tp}")),
                    );
                    hooks = &[];
                }
                Err(reason) => tracing::info!(
                    "network: tp_btf programs with socket storage unavailable ({reason}); using the tracepoints"
                ),
            }
        }
        for &(category, name, program) in hooks {
            let hook = format!("{category}:{name}");
            if !net_hook_usable(&offsets, program) {
                tracing::warn!(
                    "network: this kernel lacks tracepoint {hook} (or its fields); its metrics are not collected (`ws1-probe check` lists what this kernel allows)"
                );
                skipped.push((hook, "tracepoint or fields missing".to_owned()));
                continue;
            }
            // The send/receive hooks run on every socket call of every process: prefer their
            // raw tracepoints (arguments read directly), falling back to the tracepoint.
            let raw = format!("{program}_raw");
            if matches!(name, "sock_send_length" | "sock_recv_length")
                && attach_raw_tracepoint(ebpf, &raw, name).is_ok()
            {
                attached.push(format!("raw_tp {name}"));
                continue;
            }
            // tcp_probe fires for every received segment of every socket on the host; the
            // send/receive hooks sample RTT from the socket instead wherever BTF gives the
            // offset of tcp_sock.srtt_us, so it is only the fallback.
            if name == "tcp_probe" && crate::ebpf::tcp_sock_srtt_offset() != u32::MAX {
                continue;
            }
            if name == "tcp_retransmit_skb" && offsets.retransmit_skbaddr == u32::MAX {
                tracing::warn!(
                    "network: tracepoint {hook} has no skbaddr field on this kernel; retransmits count one segment per retransmitted packet (exact segment counts need a newer kernel)"
                );
            }
            match attach_tracepoint(ebpf, program, category, name) {
                Ok(()) => attached.push(hook),
                // A kernel without the hook; anything else (verifier, permissions) is fatal.
                Err(LoadError::Attach { reason, .. }) => {
                    tracing::warn!(
                        "network: cannot attach {hook}: {reason}; skipped, the other network hooks run (`ws1-probe check` lists what this kernel allows)"
                    );
                    skipped.push((hook, reason));
                }
                Err(err) => return Err(err),
            }
        }
        Ok(Self {
            socks: typed("NET_SOCKS", take_map(ebpf, "NET_SOCKS")?)?,
            listen: typed("NET_LISTEN", take_map(ebpf, "NET_LISTEN")?)?,
            slots: typed("NET_SLOTS", take_map(ebpf, "NET_SLOTS")?)?,
            counters: typed("NET_COUNTERS", take_map(ebpf, "NET_COUNTERS")?)?,
            request_hist: typed("NET_REQUEST_HIST", take_map(ebpf, "NET_REQUEST_HIST")?)?,
            hist: typed("NET_HIST", take_map(ebpf, "NET_HIST")?)?,
            remotes: typed("NET_REMOTES", take_map(ebpf, "NET_REMOTES")?)?,
            _remote_services: remote_on,
            _free_slots: free_slots,
            _deps: deps,
            attached,
            skipped,
        })
    }

    /// The address behind a remote id of a key; ids never change their address, but are
    /// looked up once per snapshot (there are at most `REMOTE_ENTRIES`).
    fn remote(
        &self,
        id: u32,
        known: &mut std::collections::HashMap<u32, Remote>,
    ) -> Option<Remote> {
        match id {
            REMOTE_NONE => None,
            REMOTE_OTHER => Some(Remote::Other),
            id => Some(*known.entry(id).or_insert_with(|| {
                // The kernel stores the address before any key carries its id.
                self.remotes
                    .get(&id, 0)
                    .map_or(Remote::Other, |a| Remote::from_octets(a.octets()))
            })),
        }
    }

    /// Reads the maps. Entries that disappear mid-walk are skipped.
    pub fn snapshot(&self) -> NetSnapshot {
        let mut snap = NetSnapshot::default();
        let mut known = std::collections::HashMap::new();
        let mut endpoint = |k: &NetKey| {
            let remote = self.remote(k.remote, &mut known);
            (k.service, Side::from_raw(k.side), k.port, remote)
        };
        // Endpoints keep their slot for the agent's lifetime: the counters and the request
        // histogram at a slot belong to the endpoint that holds it.
        for (key, slot) in self.slots.iter().flatten() {
            let e = snap.endpoints.entry(endpoint(&key)).or_default();
            if let Ok(per_cpu) = self.counters.get(&slot, 0) {
                let mut sum = NetCounters::default();
                for cpu in per_cpu.iter() {
                    add_counters(&mut sum, cpu);
                }
                // Only the sum over CPUs means anything (two's complement).
                e.active += sum.active as i64;
                sum.active = 0;
                add_counters(&mut e.counters, &sum);
            }
            if let Ok(hist) = self.request_hist.get(&slot, 0) {
                e.request.add_kernel(&hist);
            }
        }
        for (key, value) in self.hist.iter().flatten() {
            let e = snap.endpoints.entry(endpoint(&key)).or_default();
            let h = match key.kind {
                KIND_CONNECT => &mut e.connect,
                KIND_RTT => &mut e.rtt,
                KIND_LIFETIME => &mut e.lifetime,
                KIND_BYTES_SENT => &mut e.bytes_sent,
                KIND_BYTES_RECEIVED => &mut e.bytes_received,
                KIND_HANDSHAKE => &mut e.handshake,
                KIND_CONNECTION_REQUESTS => &mut e.connection_requests,
                _ => continue,
            };
            h.add_kernel(&value);
        }
        snap
    }

    /// Registers the TCP ports that targeted processes already listen on, so connections they
    /// accept are observed even though their `listen()` ran before the agent. `matcher` is a
    /// copy of the targeting matcher (it hands out the same service ids). Returns the number of
    /// ports registered.
    pub fn seed_listeners(
        &mut self,
        proc_root: &Path,
        pids: &[u32],
        mut matcher: Matcher,
    ) -> usize {
        let needs = matcher.needs();
        let mut seeded = 0;
        for &pid in pids {
            let ports = listening_ports(proc_root, pid);
            if ports.is_empty() {
                continue;
            }
            let Ok(info) = ProcessInfo::read(proc_root, pid, needs) else {
                continue;
            };
            let Some(service) = matcher.decide(&info) else {
                continue;
            };
            for port in ports {
                match self.listen.insert(u32::from(port), service, 0) {
                    Ok(()) => seeded += 1,
                    Err(err) => {
                        tracing::warn!(
                            "network: cannot register listening port {port}: {err}; connections accepted on it are not observed (raise --map-entries NET_LISTEN=N)"
                        )
                    }
                }
            }
        }
        seeded
    }

    pub fn usage(&self) -> Vec<MapUsage> {
        vec![
            MapUsage::of("NET_SOCKS", self.socks.keys().count(), self.socks.map()),
            MapUsage::of("NET_LISTEN", self.listen.keys().count(), self.listen.map()),
            MapUsage::of("NET_SLOTS", self.slots.keys().count(), self.slots.map()),
            MapUsage::of("NET_HIST", self.hist.keys().count(), self.hist.map()),
            MapUsage::of(
                "NET_REMOTES",
                self.remotes.keys().count(),
                self.remotes.map(),
            ),
        ]
    }
}

/// Which hooks the network collector uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NetHooks {
    /// `tp_btf` with socket-local storage where the kernel allows, the tracepoints otherwise.
    Auto,
    /// Only the tracepoints (raw where possible): the fallback path, for comparison, or to rule
    /// out the `tp_btf` programs when something looks wrong.
    Tracepoint,
}

/// Environment variable that chooses [`NetHooks`]: `auto` (the default) or `tracepoint`.
pub const NET_HOOKS_ENV: &str = "WS1_PROBE_NET_HOOKS";

fn net_hooks_setting() -> Result<NetHooks, LoadError> {
    parse_net_hooks(std::env::var(NET_HOOKS_ENV).ok().as_deref())
}

fn parse_net_hooks(value: Option<&str>) -> Result<NetHooks, LoadError> {
    match value {
        None | Some("") | Some("auto") => Ok(NetHooks::Auto),
        Some("tracepoint") => Ok(NetHooks::Tracepoint),
        Some(other) => Err(LoadError::Setting {
            name: NET_HOOKS_ENV,
            value: other.to_owned(),
            expected: "auto (tp_btf where the kernel allows) or tracepoint",
        }),
    }
}

/// Attaches the `tp_btf` network programs, where the kernel's BTF gives the socket fields they
/// read; the reason otherwise.
fn attach_net_btf(ebpf: &mut Ebpf) -> Result<(), String> {
    let kernel = crate::ebpf::kernel_offsets();
    if kernel.sock_protocol == u32::MAX {
        return Err("kernel BTF has no sock.sk_protocol".to_owned());
    }
    if kernel.tcp_sock_srtt_us == u32::MAX {
        // RTT would then need tcp_probe, which reads the tracepoints' socket table.
        return Err("kernel BTF has no tcp_sock.srtt_us".to_owned());
    }
    // Parsed here, once per agent (about 170k allocations).
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("cannot read kernel BTF: {e}"))?;
    attach_btf_tracepoints(ebpf, &NET_BTF_PROGRAMS, &btf)
}

/// Socket inodes a process holds (`/proc/PID/fd/* -> socket:[INODE]`).
fn socket_inodes(proc_root: &Path, pid: u32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(proc_root.join(pid.to_string()).join("fd")) else {
        return HashSet::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// (local port, inode) of the LISTEN sockets in a `/proc/net/tcp` or `tcp6` table.
pub fn parse_listeners(table: &str) -> Vec<(u16, u64)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st 0A is TCP_LISTEN.
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let inode = f.get(9)?.parse().ok()?;
            Some((port, inode))
        })
        .collect()
}

/// TCP ports `pid` listens on, in its own network namespace.
fn listening_ports(proc_root: &Path, pid: u32) -> Vec<u16> {
    let inodes = socket_inodes(proc_root, pid);
    if inodes.is_empty() {
        return Vec::new();
    }
    let net = proc_root.join(pid.to_string()).join("net");
    let mut ports: Vec<u16> = ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(net.join(t)).ok())
        .flat_map(|table| parse_listeners(&table))
        .filter(|(_, inode)| inodes.contains(inode))
        .map(|(port, _)| port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_hooks_setting_is_auto_by_default_and_rejects_unknown_values() {
        assert_eq!(parse_net_hooks(None).ok(), Some(NetHooks::Auto));
        assert_eq!(parse_net_hooks(Some("auto")).ok(), Some(NetHooks::Auto));
        assert_eq!(
            parse_net_hooks(Some("tracepoint")).ok(),
            Some(NetHooks::Tracepoint)
        );
        let err = parse_net_hooks(Some("kprobe")).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "WS1_PROBE_NET_HOOKS=\"kprobe\" is not a known setting: use auto (tp_btf where the kernel allows) or tracepoint"
            )
        );
    }

    #[test]
    fn listeners_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 20 4 30 10 -1
   2: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(parse_listeners(table), vec![(8080, 4242), (22, 77)]);
        assert_eq!(parse_listeners(""), vec![]);
    }

    #[test]
    fn handshakes_of_dependencies_by_service_id_or_for_all() {
        let mut table = ServiceTable::new(16);
        let api = table.intern("api");
        let dep = |service: Option<&str>, port, n| Dependency {
            service: service.map(str::to_owned),
            name: format!("d{port}"),
            port,
            handshake_exchanges: n,
        };
        let deps = [
            dep(None, 5432, 2),
            dep(Some("api"), 5433, 3),
            dep(Some("gone"), 5434, 1),
            dep(None, 6379, 0),
        ];
        assert_eq!(
            dependency_handshakes(&deps, &table),
            vec![(dep_key(DEP_ANY_SERVICE, 5432), 2), (dep_key(api, 5433), 3)]
        );
    }

    #[test]
    fn remote_services_by_name_or_all() {
        let mut table = ServiceTable::new(16);
        let (api, db) = (table.intern("api"), table.intern("db"));
        assert_eq!((api, db), (1, 2));
        let only_db = RemoteAddresses::Services(vec!["db".into(), "gone".into()]);
        assert_eq!(remote_service_ids(&only_db, &table), vec![db]);
        assert!(remote_service_ids(&RemoteAddresses::Off, &table).is_empty());
        let all = remote_service_ids(&RemoteAddresses::All, &table);
        assert_eq!(all.len() as u32, REMOTE_SERVICE_SLOTS);
        assert!(all.contains(&0) && all.contains(&(REMOTE_SERVICE_SLOTS - 1)));
    }
}
