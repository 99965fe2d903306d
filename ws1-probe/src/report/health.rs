//! `ws1-probe health`: one row per service computed from two sets of metric families taken an
//! interval apart (as `Probe::families` builds them). Families are looked up by name, so a
//! column whose family is absent (its collector off or not built) prints `-`.

use std::collections::{BTreeMap, BTreeSet};

use prometheus::proto::{Metric, MetricFamily, MetricType};
use serde::Serialize;

pub const CPU_SECONDS: &str = "ws1_probe_service_cpu_seconds_total";
pub const RESIDENT: &str = "ws1_probe_resident_memory_bytes";
pub const MEMORY_LIMIT: &str = "ws1_probe_service_memory_limit_bytes";
pub const THREADS: &str = "ws1_probe_service_threads";
pub const OPEN_FDS: &str = "ws1_probe_service_open_fds";
pub const FD_LIMIT: &str = "ws1_probe_service_fd_limit";
pub const RUNQUEUE: &str = "ws1_probe_runqueue_latency_seconds";
pub const BLOCK_IO: &str = "ws1_probe_block_io_duration_seconds";
pub const EXITS: &str = "ws1_probe_process_exits_total";
pub const REQUESTS: &str = "ws1_probe_request_duration_seconds";

/// One service's health over an interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HealthRow {
    pub service: String,
    /// CPU time over the interval as a percentage of one core (user + system).
    pub cpu_percent: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub memory_limit_bytes: Option<f64>,
    /// Resident memory as a percentage of the cgroup memory limit.
    pub memory_percent: Option<f64>,
    pub threads: Option<f64>,
    pub open_fds: Option<f64>,
    pub fd_limit: Option<f64>,
    /// p99 over the interval's observations (bucket deltas), in seconds.
    pub runqueue_p99_seconds: Option<f64>,
    pub block_io_p99_seconds: Option<f64>,
    /// Server-side request latency p99.
    pub request_p99_seconds: Option<f64>,
    /// Process exits during the interval, by reason.
    pub exits: Option<BTreeMap<String, f64>>,
}

/// What the screen shows: the rows and which families were present.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Health {
    pub interval_seconds: f64,
    pub rows: Vec<HealthRow>,
}

fn find<'a>(fams: &'a [MetricFamily], name: &str) -> Option<&'a MetricFamily> {
    fams.iter().find(|f| f.name() == name)
}

fn label<'a>(m: &'a Metric, name: &str) -> Option<&'a str> {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map(|l| l.value())
}

/// Sums a family's values per service, over the series `keep` accepts. `None` when the family
/// is absent.
fn sum_by_service(
    fams: &[MetricFamily],
    name: &str,
    keep: impl Fn(&Metric) -> bool,
) -> Option<BTreeMap<String, f64>> {
    let f = find(fams, name)?;
    let mut out = BTreeMap::new();
    for m in f.get_metric() {
        let Some(service) = label(m, "service") else {
            continue;
        };
        if !keep(m) {
            continue;
        }
        let v = match f.get_field_type() {
            MetricType::COUNTER => m.get_counter().get_value(),
            MetricType::GAUGE => m.get_gauge().get_value(),
            _ => continue,
        };
        *out.entry(service.to_owned()).or_insert(0.0) += v;
    }
    Some(out)
}

/// Cumulative buckets (upper bound → count) and the total count of a histogram family per
/// service, summed over its other labels.
type Buckets = (BTreeMap<u64, f64>, f64);

fn histograms_by_service(
    fams: &[MetricFamily],
    name: &str,
    keep: impl Fn(&Metric) -> bool,
) -> Option<BTreeMap<String, Buckets>> {
    let f = find(fams, name)?;
    let mut out: BTreeMap<String, Buckets> = BTreeMap::new();
    for m in f.get_metric() {
        let Some(service) = label(m, "service") else {
            continue;
        };
        if !keep(m) {
            continue;
        }
        let h = m.get_histogram();
        let e = out.entry(service.to_owned()).or_default();
        e.1 += h.get_sample_count() as f64;
        for b in h.get_bucket() {
            // Keyed by the bound's bits: bounds are positive, so the order is the numeric one.
            *e.0.entry(b.upper_bound().to_bits()).or_insert(0.0) += b.cumulative_count() as f64;
        }
    }
    Some(out)
}

/// The `q` quantile of cumulative buckets as Prometheus' `histogram_quantile` computes it
/// (linear within the bucket; the highest finite bound when it falls above it). `None` without
/// observations.
pub fn quantile(buckets: &BTreeMap<u64, f64>, count: f64, q: f64) -> Option<f64> {
    if count <= 0.0 {
        return None;
    }
    let rank = q * count;
    let mut lower = 0.0;
    let mut below = 0.0;
    let mut highest = 0.0;
    for (bits, cum) in buckets {
        let upper = f64::from_bits(*bits);
        if upper.is_finite() {
            highest = upper;
        }
        if *cum >= rank {
            if !upper.is_finite() {
                return Some(highest);
            }
            let inside = cum - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (upper - lower) * frac);
        }
        lower = upper;
        below = *cum;
    }
    Some(highest)
}

/// Interval p99 per service of a histogram family: the bucket deltas between `prev` and `now`.
fn p99_delta(
    prev: &[MetricFamily],
    now: &[MetricFamily],
    name: &str,
    keep: impl Fn(&Metric) -> bool + Copy,
) -> Option<BTreeMap<String, Option<f64>>> {
    let now = histograms_by_service(now, name, keep)?;
    let prev = histograms_by_service(prev, name, keep).unwrap_or_default();
    Some(
        now.into_iter()
            .map(|(service, (buckets, count))| {
                let (pb, pc) = prev.get(&service).cloned().unwrap_or_default();
                // A series that went down (a label that came back) counts whole.
                let (delta, dc) = if count >= pc {
                    (
                        buckets
                            .iter()
                            .map(|(b, c)| (*b, (c - pb.get(b).copied().unwrap_or(0.0)).max(0.0)))
                            .collect(),
                        count - pc,
                    )
                } else {
                    (buckets, count)
                };
                (service, quantile(&delta, dc, 0.99))
            })
            .collect(),
    )
}

/// Counter increases per service between `prev` and `now` (a counter that went down counts
/// its whole value).
fn delta(now: &BTreeMap<String, f64>, prev: Option<&BTreeMap<String, f64>>, s: &str) -> f64 {
    let n = now.get(s).copied().unwrap_or(0.0);
    let p = prev.and_then(|p| p.get(s)).copied().unwrap_or(0.0);
    if n >= p { n - p } else { n }
}

/// Computes the rows from two family sets `seconds` apart, busiest CPU first.
pub fn rows(prev: &[MetricFamily], now: &[MetricFamily], seconds: f64) -> Health {
    let all = |_: &Metric| true;
    let cpu_now = sum_by_service(now, CPU_SECONDS, all);
    let cpu_prev = sum_by_service(prev, CPU_SECONDS, all);
    let resident = sum_by_service(now, RESIDENT, all);
    let limit = sum_by_service(now, MEMORY_LIMIT, all);
    let threads = sum_by_service(now, THREADS, all);
    let fds = sum_by_service(now, OPEN_FDS, all);
    let fd_limit = sum_by_service(now, FD_LIMIT, all);
    let runq = p99_delta(prev, now, RUNQUEUE, all);
    let block = p99_delta(prev, now, BLOCK_IO, all);
    let requests = p99_delta(prev, now, REQUESTS, |m| label(m, "side") == Some("server"));
    let exits_now: Option<BTreeMap<(String, String), f64>> = find(now, EXITS).map(|f| {
        let mut out = BTreeMap::new();
        for m in f.get_metric() {
            if let (Some(s), Some(r)) = (label(m, "service"), label(m, "reason")) {
                *out.entry((s.to_owned(), r.to_owned())).or_insert(0.0) +=
                    m.get_counter().get_value();
            }
        }
        out
    });
    let exits_prev: BTreeMap<(String, String), f64> = find(prev, EXITS)
        .map(|f| {
            let mut out = BTreeMap::new();
            for m in f.get_metric() {
                if let (Some(s), Some(r)) = (label(m, "service"), label(m, "reason")) {
                    *out.entry((s.to_owned(), r.to_owned())).or_insert(0.0) +=
                        m.get_counter().get_value();
                }
            }
            out
        })
        .unwrap_or_default();

    let mut services: BTreeSet<String> = BTreeSet::new();
    for m in [&cpu_now, &resident, &threads, &fds].into_iter().flatten() {
        services.extend(m.keys().cloned());
    }
    for m in [&runq, &block, &requests].into_iter().flatten() {
        services.extend(m.keys().cloned());
    }
    if let Some(e) = &exits_now {
        services.extend(e.keys().map(|(s, _)| s.clone()));
    }
    let get = |m: &Option<BTreeMap<String, f64>>, s: &str| m.as_ref()?.get(s).copied();
    let p99 = |m: &Option<BTreeMap<String, Option<f64>>>, s: &str| m.as_ref()?.get(s).copied()?;
    let mut rows: Vec<HealthRow> = services
        .into_iter()
        .map(|s| {
            let cpu_percent = cpu_now
                .as_ref()
                .filter(|_| seconds > 0.0)
                .map(|now| 100.0 * delta(now, cpu_prev.as_ref(), &s) / seconds);
            let resident_bytes = get(&resident, &s);
            let memory_limit_bytes = get(&limit, &s);
            let exits = exits_now.as_ref().map(|e| {
                e.iter()
                    .filter(|((svc, _), _)| *svc == s)
                    .map(|((_, reason), n)| {
                        let before = exits_prev
                            .get(&(s.clone(), reason.clone()))
                            .copied()
                            .unwrap_or(0.0);
                        (reason.clone(), if *n >= before { n - before } else { *n })
                    })
                    .collect()
            });
            HealthRow {
                cpu_percent,
                resident_bytes,
                memory_limit_bytes,
                memory_percent: match (resident_bytes, memory_limit_bytes) {
                    (Some(r), Some(l)) if l > 0.0 => Some(100.0 * r / l),
                    _ => None,
                },
                threads: get(&threads, &s),
                open_fds: get(&fds, &s),
                fd_limit: get(&fd_limit, &s),
                runqueue_p99_seconds: p99(&runq, &s),
                block_io_p99_seconds: p99(&block, &s),
                request_p99_seconds: p99(&requests, &s),
                exits,
                service: s,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.cpu_percent
            .unwrap_or(0.0)
            .total_cmp(&a.cpu_percent.unwrap_or(0.0))
            .then_with(|| a.service.cmp(&b.service))
    });
    Health {
        interval_seconds: seconds,
        rows,
    }
}

fn bytes(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0}{}", UNITS[0])
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

fn seconds(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |s| {
        crate::units::format_ns((s * 1e9) as u64)
    })
}

fn count(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.0}"))
}

/// The table: one row per service, `-` where a figure is unknown.
pub fn render(h: &Health) -> String {
    let rows: Vec<Vec<String>> = h
        .rows
        .iter()
        .map(|r| {
            vec![
                r.service.clone(),
                r.cpu_percent.map_or("-".to_owned(), |c| format!("{c:.1}")),
                r.resident_bytes.map_or("-".to_owned(), bytes),
                r.memory_percent
                    .map_or("-".to_owned(), |p| format!("{p:.1}")),
                count(r.threads),
                match (r.open_fds, r.fd_limit) {
                    (Some(n), Some(l)) => format!("{n:.0}/{l:.0}"),
                    (n, _) => count(n),
                },
                seconds(r.runqueue_p99_seconds),
                seconds(r.block_io_p99_seconds),
                r.exits.as_ref().map_or("-".to_owned(), |e| {
                    let n = |k: &str| e.get(k).copied().unwrap_or(0.0);
                    format!("{:.0}/{:.0}/{:.0}", n("ok"), n("error"), n("signal"))
                }),
                seconds(r.request_p99_seconds),
            ]
        })
        .collect();
    super::table(
        &[
            "SERVICE",
            "CPU%",
            "RSS",
            "MEM%",
            "THREADS",
            "FDS/LIMIT",
            "RUNQ_P99",
            "BLKIO_P99",
            "EXITS ok/err/sig",
            "REQ_P99",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        histogram::Histogram,
        metrics::{counter, family, gauge, histogram},
    };

    fn fams(cpu: f64, h: &Histogram, exits: f64, with_runq: bool) -> Vec<MetricFamily> {
        let bounds = [1_000_000u64, 2_000_000, 4_000_000, 8_000_000];
        let mut v = vec![
            family(
                CPU_SECONDS,
                "h",
                MetricType::COUNTER,
                vec![
                    counter(&[("service", "api"), ("mode", "user")], cpu),
                    counter(&[("service", "api"), ("mode", "system")], cpu / 2.0),
                ],
            ),
            family(
                RESIDENT,
                "h",
                MetricType::GAUGE,
                vec![gauge(&[("service", "api")], 50.0 * 1048576.0)],
            ),
            family(
                MEMORY_LIMIT,
                "h",
                MetricType::GAUGE,
                vec![gauge(&[("service", "api")], 200.0 * 1048576.0)],
            ),
            family(
                EXITS,
                "h",
                MetricType::COUNTER,
                vec![counter(&[("service", "api"), ("reason", "signal")], exits)],
            ),
            family(
                REQUESTS,
                "h",
                MetricType::HISTOGRAM,
                vec![
                    histogram(
                        &[("service", "api"), ("side", "server"), ("port", "80")],
                        h,
                        &bounds,
                    ),
                    // Client side is not the service's own latency.
                    histogram(
                        &[("service", "api"), ("side", "client"), ("port", "5432")],
                        &{
                            let mut c = Histogram::default();
                            for _ in 0..1000 {
                                c.observe(&bounds, 7_000_000);
                            }
                            c
                        },
                        &bounds,
                    ),
                ],
            ),
        ];
        if with_runq {
            v.push(family(
                RUNQUEUE,
                "h",
                MetricType::HISTOGRAM,
                vec![histogram(&[("service", "api")], h, &bounds)],
            ));
        }
        v
    }

    #[test]
    fn cpu_from_counter_deltas_and_p99_from_bucket_deltas() {
        let bounds = [1_000_000u64, 2_000_000, 4_000_000, 8_000_000];
        let mut h = Histogram::default();
        // Before the interval: slow requests that must not count.
        for _ in 0..1000 {
            h.observe(&bounds, 7_000_000);
        }
        let prev = fams(10.0, &h, 1.0, true);
        // In the interval: 100 requests in (1 ms, 2 ms].
        for _ in 0..100 {
            h.observe(&bounds, 1_500_000);
        }
        let now = fams(11.0, &h, 3.0, true);
        let health = rows(&prev, &now, 2.0);
        assert_eq!(health.rows.len(), 1);
        let r = &health.rows[0];
        assert_eq!(r.service, "api");
        // (1.0 user + 0.5 system) s over 2 s.
        assert!((r.cpu_percent.unwrap() - 75.0).abs() < 1e-9, "{r:?}");
        assert!((r.memory_percent.unwrap() - 25.0).abs() < 1e-9);
        // Rank 99 of 100 in (1 ms, 2 ms]: 1 ms + 0.99 ms.
        let p = r.request_p99_seconds.unwrap();
        assert!((p - 0.00199).abs() < 1e-9, "{p}");
        assert!((r.runqueue_p99_seconds.unwrap() - 0.00199).abs() < 1e-9);
        assert_eq!(r.exits.as_ref().unwrap()["signal"], 2.0);
        // Families nobody exports are `-`.
        assert_eq!(r.block_io_p99_seconds, None);
        assert_eq!(r.threads, None);
        let text = render(&health);
        assert!(text.starts_with("SERVICE"), "{text}");
        assert!(text.contains("75.0"), "{text}");
        assert!(text.contains("0/0/2"), "{text}");
    }

    #[test]
    fn absent_families_and_idle_intervals() {
        let bounds = [1_000_000u64, 2_000_000, 4_000_000, 8_000_000];
        let h = Histogram::default();
        let prev = fams(1.0, &h, 0.0, false);
        let now = fams(1.0, &h, 0.0, false);
        let r = &rows(&prev, &now, 1.0).rows[0];
        assert_eq!(r.cpu_percent, Some(0.0));
        // No requests in the interval, and no run-queue family at all.
        assert_eq!(r.request_p99_seconds, None);
        assert_eq!(r.runqueue_p99_seconds, None);
        let _ = bounds;
        assert!(render(&rows(&prev, &now, 1.0)).contains(" - "));
    }

    #[test]
    fn quantile_like_prometheus() {
        let b = |v: &[(f64, f64)]| -> BTreeMap<u64, f64> {
            v.iter().map(|(u, c)| (u.to_bits(), *c)).collect()
        };
        let buckets = b(&[(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)]);
        assert_eq!(quantile(&buckets, 100.0, 0.5), Some(0.1));
        assert!((quantile(&buckets, 100.0, 0.75).unwrap() - 0.15).abs() < 1e-12);
        let above = b(&[(0.1, 0.0), (f64::INFINITY, 10.0)]);
        assert_eq!(quantile(&above, 10.0, 0.99), Some(0.1));
        assert_eq!(quantile(&buckets, 0.0, 0.99), None);
    }
}
