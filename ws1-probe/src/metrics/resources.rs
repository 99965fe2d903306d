//! Resource families per service, from the procfs sampler (`collectors/resources.rs`).

use std::collections::BTreeMap;

use prometheus::proto::{MetricFamily, MetricType};

use super::{counter, family, gauge};
use crate::collectors::resources::{ResourcesSnapshot, ServiceResources, add_container};

pub const CPU_SECONDS: &str = "ws1_probe_service_cpu_seconds_total";
pub const THREADS: &str = "ws1_probe_service_threads";
pub const PROCESSES: &str = "ws1_probe_service_processes";
pub const OPEN_FDS: &str = "ws1_probe_service_open_fds";
pub const FD_LIMIT: &str = "ws1_probe_service_fd_limit";
pub const CONTEXT_SWITCHES: &str = "ws1_probe_service_context_switches_total";
pub const IO_BYTES: &str = "ws1_probe_service_io_bytes_total";
pub const MEMORY_LIMIT: &str = "ws1_probe_service_memory_limit_bytes";
pub const CONTAINER_PROCESSES: &str = "ws1_probe_service_container_processes";

/// Services folded into one label: counters and counts add up, the fd limit is the smallest
/// and the memory limit the largest (as within a service, and as host mode folds them).
fn fold(into: &mut ServiceResources, s: &ServiceResources) {
    let c = &mut into.counters;
    c.user_ticks += s.counters.user_ticks;
    c.system_ticks += s.counters.system_ticks;
    c.voluntary += s.counters.voluntary;
    c.involuntary += s.counters.involuntary;
    c.read_bytes += s.counters.read_bytes;
    c.write_bytes += s.counters.write_bytes;
    if s.processes == 0 {
        return;
    }
    let first = into.processes == 0;
    for (c, n) in &s.containers {
        add_container(&mut into.containers, *c, *n);
    }
    into.processes += s.processes;
    into.threads += s.threads;
    into.fds += s.fds;
    into.fd_limit = match (into.fd_limit, s.fd_limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    into.memory_limit = match (first, into.memory_limit, s.memory_limit) {
        (true, _, m) => m,
        (_, Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    };
}

/// The resource families. `label` maps a service id to its exported label. Gauges of services
/// without a live process are left out; their counters stay.
pub fn families<'a>(snap: &ResourcesSnapshot, label: impl Fn(u32) -> &'a str) -> Vec<MetricFamily> {
    let mut by: BTreeMap<&str, ServiceResources> = BTreeMap::new();
    for (id, s) in &snap.services {
        fold(by.entry(label(*id)).or_default(), s);
    }
    let tps = snap.ticks_per_second.max(1) as f64;
    let (mut cpu, mut switches, mut io) = (Vec::new(), Vec::new(), Vec::new());
    let (mut threads, mut processes, mut fds, mut fd_limit, mut mem_limit) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut containers = Vec::new();
    for (service, s) in &by {
        let c = &s.counters;
        let service = *service;
        cpu.push(counter(
            &[("service", service), ("mode", "user")],
            c.user_ticks as f64 / tps,
        ));
        cpu.push(counter(
            &[("service", service), ("mode", "system")],
            c.system_ticks as f64 / tps,
        ));
        switches.push(counter(
            &[("service", service), ("kind", "voluntary")],
            c.voluntary as f64,
        ));
        switches.push(counter(
            &[("service", service), ("kind", "involuntary")],
            c.involuntary as f64,
        ));
        io.push(counter(
            &[("service", service), ("direction", "read")],
            c.read_bytes as f64,
        ));
        io.push(counter(
            &[("service", service), ("direction", "write")],
            c.write_bytes as f64,
        ));
        if s.processes == 0 {
            continue;
        }
        let l = [("service", service)];
        processes.push(gauge(&l, s.processes as f64));
        threads.push(gauge(&l, s.threads as f64));
        fds.push(gauge(&l, s.fds as f64));
        if let Some(v) = s.fd_limit {
            fd_limit.push(gauge(&l, v as f64));
        }
        if let Some(v) = s.memory_limit {
            mem_limit.push(gauge(&l, v as f64));
        }
        for (c, n) in &s.containers {
            let (pod, id) = (c.pod_uid_text(), c.to_string());
            containers.push(gauge(
                &[
                    ("service", service),
                    ("pod_uid", &pod),
                    ("container_id", &id),
                ],
                *n as f64,
            ));
        }
    }
    vec![
        family(
            CPU_SECONDS,
            "CPU time of the service's processes by mode (utime/stime of /proc/PID/stat: exited threads included, reaped children not).",
            MetricType::COUNTER,
            cpu,
        ),
        family(
            CONTEXT_SWITCHES,
            "Context switches of the service's threads: voluntary (blocked) and involuntary (preempted).",
            MetricType::COUNTER,
            switches,
        ),
        family(
            IO_BYTES,
            "Bytes the service's processes caused to be read from and written to storage (read_bytes/write_bytes of /proc/PID/io).",
            MetricType::COUNTER,
            io,
        ),
        family(
            PROCESSES,
            "Live processes of the service.",
            MetricType::GAUGE,
            processes,
        ),
        family(
            THREADS,
            "Threads of the service's processes.",
            MetricType::GAUGE,
            threads,
        ),
        family(
            OPEN_FDS,
            "Open file descriptors of the service's processes.",
            MetricType::GAUGE,
            fds,
        ),
        family(
            FD_LIMIT,
            "The smallest soft RLIMIT_NOFILE among the service's processes.",
            MetricType::GAUGE,
            fd_limit,
        ),
        family(
            MEMORY_LIMIT,
            "cgroup v2 memory.max of the service's processes (the tightest on each process's cgroup path; the largest among processes), where every process has one.",
            MetricType::GAUGE,
            mem_limit,
        ),
        family(
            CONTAINER_PROCESSES,
            "Live processes of the service per container, from their cgroup paths: pod_uid (Kubernetes pods only, else empty) and the 64-hex container_id, to join with kube-state-metrics' kube_pod_info{uid} or cAdvisor; at most 32 containers per service.",
            MetricType::GAUGE,
            containers,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        collectors::resources::Counters, metrics::encode, targeting::container::ContainerRef,
    };

    #[test]
    fn folded_services() {
        let s = |user: u64, fds: u64, limit: u64| ServiceResources {
            counters: Counters {
                user_ticks: user,
                write_bytes: 10,
                ..Counters::default()
            },
            processes: 1,
            threads: 3,
            fds,
            fd_limit: Some(limit),
            memory_limit: Some(limit << 20),
            containers: [(
                ContainerRef {
                    pod_uid: Some(0x1b2c3d4e_0f1a_4b2c_8d3e_4f5a6b7c8d9e),
                    id: [0xab; 32],
                },
                2,
            )]
            .into(),
        };
        let snap = ResourcesSnapshot {
            services: [(1, s(100, 5, 1024)), (2, s(50, 7, 4096))].into(),
            ticks_per_second: 100,
        };
        let text = encode(&families(&snap, |_| "other"));
        for line in [
            "ws1_probe_service_cpu_seconds_total{service=\"other\",mode=\"user\"} 1.5",
            "ws1_probe_service_io_bytes_total{service=\"other\",direction=\"write\"} 20",
            "ws1_probe_service_threads{service=\"other\"} 6",
            "ws1_probe_service_open_fds{service=\"other\"} 12",
            "ws1_probe_service_fd_limit{service=\"other\"} 1024",
            "ws1_probe_service_memory_limit_bytes{service=\"other\"} 4294967296",
            &format!(
                "ws1_probe_service_container_processes{{service=\"other\",pod_uid=\"1b2c3d4e-0f1a-4b2c-8d3e-4f5a6b7c8d9e\",container_id=\"{}\"}} 4",
                "ab".repeat(32)
            ),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
