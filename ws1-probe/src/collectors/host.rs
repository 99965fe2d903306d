//! Host basics with node_exporter's semantics, a small subset of it: CPU seconds by mode
//! (/proc/stat), memory total and available (/proc/meminfo), size and free space of real
//! filesystems (statvfs of the mounts node_exporter keeps by default), network bytes, errors and
//! drops per interface (/proc/net/dev) and TCP listen overflows and drops (/proc/net/netstat).
//! Read at each scrape; no kernel part. Users who run node_exporter leave it out with
//! `--collectors`.

use std::collections::BTreeMap;

use procfs::{Current, CurrentSI};

/// Interfaces exported at most (sorted by name, loopback first); the rest are counted in
/// [`HostSnapshot::interfaces_skipped`]. veth ends of containers come and go and are skipped.
pub const MAX_INTERFACES: usize = 32;
/// Filesystems exported at most.
pub const MAX_FILESYSTEMS: usize = 64;

/// node_exporter's default `--collector.filesystem.fs-types-exclude`.
const EXCLUDED_FS_TYPES: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "fusectl",
    "hugetlbfs",
    "iso9660",
    "mqueue",
    "nsfs",
    "overlay",
    "proc",
    "procfs",
    "pstore",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "erofs",
    "sysfs",
    "tracefs",
];

/// node_exporter's default `--collector.filesystem.mount-points-exclude`:
/// `^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)`.
pub fn mount_point_excluded(mount: &str) -> bool {
    let under = |root: &str| mount == root || mount.starts_with(&format!("{root}/"));
    let strictly_under = |root: &str| mount.starts_with(&format!("{root}/"));
    under("/dev")
        || under("/proc")
        || under("/sys")
        || strictly_under("/run/credentials")
        || strictly_under("/var/lib/docker")
        || strictly_under("/var/lib/containers/storage")
}

/// Whether node_exporter's defaults keep a filesystem type.
pub fn fs_type_kept(fstype: &str) -> bool {
    !EXCLUDED_FS_TYPES.contains(&fstype)
}

/// Whether an interface is exported (container veth ends are not).
pub fn interface_kept(name: &str) -> bool {
    !name.starts_with("veth")
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filesystem {
    pub device: String,
    pub mountpoint: String,
    pub fstype: String,
    pub size_bytes: u64,
    /// Free for root (`f_bfree`).
    pub free_bytes: u64,
    /// Free for unprivileged users (`f_bavail`).
    pub avail_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Interface {
    pub receive_bytes: u64,
    pub transmit_bytes: u64,
    pub receive_errors: u64,
    pub transmit_errors: u64,
    pub receive_drops: u64,
    pub transmit_drops: u64,
}

/// One reading of the host.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostSnapshot {
    /// Seconds by mode (user, nice, system, idle, iowait, irq, softirq, steal), summed over
    /// CPUs (node_exporter exports them per CPU: `sum by (mode)` of its series).
    pub cpu_seconds: BTreeMap<&'static str, f64>,
    pub cpus: usize,
    pub memory_total_bytes: Option<u64>,
    pub memory_available_bytes: Option<u64>,
    pub filesystems: Vec<Filesystem>,
    pub interfaces: BTreeMap<String, Interface>,
    pub interfaces_skipped: usize,
    /// TcpExt ListenOverflows and ListenDrops.
    pub listen_overflows: Option<u64>,
    pub listen_drops: Option<u64>,
}

/// Reads the host. Parts that cannot be read are left out (with a debug log).
pub fn read() -> HostSnapshot {
    let mut snap = HostSnapshot::default();
    match procfs::KernelStats::current() {
        Ok(stat) => {
            let tps = procfs::ticks_per_second().max(1) as f64;
            let t = &stat.total;
            for (mode, ticks) in [
                ("user", Some(t.user)),
                ("nice", Some(t.nice)),
                ("system", Some(t.system)),
                ("idle", Some(t.idle)),
                ("iowait", t.iowait),
                ("irq", t.irq),
                ("softirq", t.softirq),
                ("steal", t.steal),
            ] {
                if let Some(ticks) = ticks {
                    snap.cpu_seconds.insert(mode, ticks as f64 / tps);
                }
            }
            snap.cpus = stat.cpu_time.len();
        }
        Err(err) => tracing::debug!("cannot read /proc/stat: {err}"),
    }
    match procfs::Meminfo::current() {
        Ok(m) => {
            snap.memory_total_bytes = Some(m.mem_total);
            snap.memory_available_bytes = m.mem_available;
        }
        Err(err) => tracing::debug!("cannot read /proc/meminfo: {err}"),
    }
    match procfs::mounts() {
        Ok(mounts) => {
            let mut seen = std::collections::BTreeSet::new();
            for m in mounts {
                if !fs_type_kept(&m.fs_vfstype) || mount_point_excluded(&m.fs_file) {
                    continue;
                }
                if snap.filesystems.len() >= MAX_FILESYSTEMS || !seen.insert(m.fs_file.clone()) {
                    continue;
                }
                if let Some(fs) = statvfs(&m.fs_spec, &m.fs_file, &m.fs_vfstype) {
                    snap.filesystems.push(fs);
                }
            }
        }
        Err(err) => tracing::debug!("cannot read /proc/mounts: {err}"),
    }
    match procfs::net::dev_status() {
        Ok(devs) => {
            let mut names: Vec<&String> = devs.keys().filter(|n| interface_kept(n)).collect();
            names.sort_by_key(|n| (n.as_str() != "lo", n.as_str()));
            snap.interfaces_skipped = devs.len() - names.len().min(MAX_INTERFACES);
            for name in names.into_iter().take(MAX_INTERFACES) {
                if let Some(d) = devs.get(name) {
                    snap.interfaces.insert(
                        name.clone(),
                        Interface {
                            receive_bytes: d.recv_bytes,
                            transmit_bytes: d.sent_bytes,
                            receive_errors: d.recv_errs,
                            transmit_errors: d.sent_errs,
                            receive_drops: d.recv_drop,
                            transmit_drops: d.sent_drop,
                        },
                    );
                }
            }
        }
        Err(err) => tracing::debug!("cannot read /proc/net/dev: {err}"),
    }
    // Not in the procfs crate: two header/value line pairs per protocol.
    if let Ok(text) = std::fs::read_to_string("/proc/net/netstat") {
        let ext = parse_netstat(&text, "TcpExt");
        snap.listen_overflows = ext.get("ListenOverflows").copied();
        snap.listen_drops = ext.get("ListenDrops").copied();
    }
    snap
}

/// The fields of one protocol (`TcpExt`, `IpExt`) of /proc/net/netstat.
pub fn parse_netstat(text: &str, proto: &str) -> BTreeMap<String, u64> {
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return BTreeMap::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect()
}

fn statvfs(device: &str, mountpoint: &str, fstype: &str) -> Option<Filesystem> {
    let path = std::ffi::CString::new(mountpoint).ok()?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some(Filesystem {
        device: device.to_owned(),
        mountpoint: mountpoint.to_owned(),
        fstype: fstype.to_owned(),
        size_bytes: st.f_blocks as u64 * frsize,
        free_bytes: st.f_bfree as u64 * frsize,
        avail_bytes: st.f_bavail as u64 * frsize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_exporter_exclusions() {
        assert!(mount_point_excluded("/proc"));
        assert!(mount_point_excluded("/sys/fs/cgroup"));
        assert!(mount_point_excluded("/var/lib/docker/overlay2/x"));
        assert!(!mount_point_excluded("/var/lib/docker"));
        assert!(!mount_point_excluded("/"));
        assert!(!mount_point_excluded("/devices"));
        assert!(!fs_type_kept("cgroup2"));
        assert!(fs_type_kept("ext4"));
        assert!(fs_type_kept("tmpfs"));
        assert!(!interface_kept("veth1234"));
    }

    #[test]
    fn netstat_fields() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\nIpExt: InNoRoutes\nIpExt: 1\n";
        let t = parse_netstat(text, "TcpExt");
        assert_eq!(t["ListenOverflows"], 7);
        assert_eq!(t["ListenDrops"], 9);
        assert!(parse_netstat(text, "MPTcpExt").is_empty());
    }

    #[test]
    fn reads_this_host() {
        let h = read();
        assert!(h.cpus > 0);
        assert!(h.cpu_seconds["idle"] > 0.0);
        assert!(h.memory_total_bytes.unwrap() > 0);
        assert!(h.interfaces.contains_key("lo"));
        assert!(h.listen_drops.is_some());
    }
}
