//! Host families (`ws1_probe_host_*`), a subset of node_exporter's with its semantics (see
//! `collectors/host.rs`). They carry no `service` label.

use prometheus::proto::{MetricFamily, MetricType};

use super::{counter, family, gauge};
use crate::collectors::host::HostSnapshot;

pub const CPU_SECONDS: &str = "ws1_probe_host_cpu_seconds_total";
pub const MEMORY_TOTAL: &str = "ws1_probe_host_memory_total_bytes";
pub const MEMORY_AVAILABLE: &str = "ws1_probe_host_memory_available_bytes";

pub fn families(h: &HostSnapshot) -> Vec<MetricFamily> {
    let cpu = h
        .cpu_seconds
        .iter()
        .map(|(mode, s)| counter(&[("mode", mode)], *s))
        .collect();
    let one = |v: Option<u64>| v.map(|v| gauge(&[], v as f64)).into_iter().collect();
    let one_counter = |v: Option<u64>| v.map(|v| counter(&[], v as f64)).into_iter().collect();
    let fs = |f: &dyn Fn(&crate::collectors::host::Filesystem) -> u64| {
        h.filesystems
            .iter()
            .map(|fs| {
                gauge(
                    &[
                        ("device", &fs.device),
                        ("mountpoint", &fs.mountpoint),
                        ("fstype", &fs.fstype),
                    ],
                    f(fs) as f64,
                )
            })
            .collect()
    };
    let net = |f: &dyn Fn(&crate::collectors::host::Interface) -> u64| {
        h.interfaces
            .iter()
            .map(|(name, i)| counter(&[("device", name)], f(i) as f64))
            .collect()
    };
    vec![
        family(
            CPU_SECONDS,
            "Seconds the CPUs spent in each mode, summed over CPUs (/proc/stat; node_cpu_seconds_total summed by mode).",
            MetricType::COUNTER,
            cpu,
        ),
        family(
            "ws1_probe_host_cpus",
            "CPUs in /proc/stat.",
            MetricType::GAUGE,
            one(Some(h.cpus as u64)),
        ),
        family(
            MEMORY_TOTAL,
            "MemTotal of /proc/meminfo (node_memory_MemTotal_bytes).",
            MetricType::GAUGE,
            one(h.memory_total_bytes),
        ),
        family(
            MEMORY_AVAILABLE,
            "MemAvailable of /proc/meminfo (node_memory_MemAvailable_bytes).",
            MetricType::GAUGE,
            one(h.memory_available_bytes),
        ),
        family(
            "ws1_probe_host_filesystem_size_bytes",
            "Filesystem size (node_filesystem_size_bytes; node_exporter's default mount and type exclusions).",
            MetricType::GAUGE,
            fs(&|f| f.size_bytes),
        ),
        family(
            "ws1_probe_host_filesystem_free_bytes",
            "Free space, root's reserve included (node_filesystem_free_bytes).",
            MetricType::GAUGE,
            fs(&|f| f.free_bytes),
        ),
        family(
            "ws1_probe_host_filesystem_avail_bytes",
            "Free space for unprivileged users (node_filesystem_avail_bytes).",
            MetricType::GAUGE,
            fs(&|f| f.avail_bytes),
        ),
        family(
            "ws1_probe_host_network_receive_bytes_total",
            "Bytes received per interface (/proc/net/dev; veth interfaces skipped, at most 32).",
            MetricType::COUNTER,
            net(&|i| i.receive_bytes),
        ),
        family(
            "ws1_probe_host_network_transmit_bytes_total",
            "Bytes sent per interface (/proc/net/dev).",
            MetricType::COUNTER,
            net(&|i| i.transmit_bytes),
        ),
        family(
            "ws1_probe_host_network_receive_errs_total",
            "Receive errors per interface (/proc/net/dev).",
            MetricType::COUNTER,
            net(&|i| i.receive_errors),
        ),
        family(
            "ws1_probe_host_network_transmit_errs_total",
            "Transmit errors per interface (/proc/net/dev).",
            MetricType::COUNTER,
            net(&|i| i.transmit_errors),
        ),
        family(
            "ws1_probe_host_network_receive_drop_total",
            "Received packets dropped per interface (/proc/net/dev).",
            MetricType::COUNTER,
            net(&|i| i.receive_drops),
        ),
        family(
            "ws1_probe_host_network_transmit_drop_total",
            "Packets dropped on transmit per interface (/proc/net/dev).",
            MetricType::COUNTER,
            net(&|i| i.transmit_drops),
        ),
        family(
            "ws1_probe_host_tcp_listen_overflows_total",
            "Times a listen queue was full (TcpExt ListenOverflows of /proc/net/netstat).",
            MetricType::COUNTER,
            one_counter(h.listen_overflows),
        ),
        family(
            "ws1_probe_host_tcp_listen_drops_total",
            "Connection requests dropped at a listening socket (TcpExt ListenDrops).",
            MetricType::COUNTER,
            one_counter(h.listen_drops),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{collectors::host::Interface, metrics::encode};

    #[test]
    fn renders_the_subset() {
        let h = HostSnapshot {
            cpu_seconds: [("idle", 12.5)].into(),
            cpus: 2,
            memory_total_bytes: Some(1 << 30),
            interfaces: [(
                "lo".to_owned(),
                Interface {
                    receive_bytes: 7,
                    ..Interface::default()
                },
            )]
            .into(),
            listen_drops: Some(3),
            ..HostSnapshot::default()
        };
        let text = encode(&families(&h));
        for line in [
            "ws1_probe_host_cpu_seconds_total{mode=\"idle\"} 12.5",
            "ws1_probe_host_memory_total_bytes 1073741824",
            "ws1_probe_host_network_receive_bytes_total{device=\"lo\"} 7",
            "ws1_probe_host_tcp_listen_drops_total 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("memory_available"));
    }
}
