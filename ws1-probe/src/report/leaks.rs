//! The `ws1-probe leaks` report: outstanding allocations older than a threshold, grouped by
//! allocation stack, largest first.

use serde::Serialize;

use crate::{
    symbolize::{Frame, Symbolizer, same_stack, trim_unknown_tail},
    units::format_ns,
};

pub use crate::collectors::alloc::{LeakGroup, group};
use crate::{allocator::Inspection, collectors::alloc::Activity};

/// A group with its symbolized stack and service name, as printed.
#[derive(Clone, Debug, Serialize)]
pub struct LeakReport {
    pub service: String,
    pub bytes: u64,
    pub count: u64,
    pub oldest_age_seconds: f64,
    pub pid: u32,
    pub stack: Vec<Frame>,
}

/// Symbolizes the groups and merges those whose stacks print the same, largest first. Stacks are
/// cut at the first unknown frame (see [`trim_unknown_tail`]): such garbage would otherwise
/// split one call site into many stacks.
pub fn symbolize<'a>(
    groups: &[LeakGroup],
    service_name: impl Fn(u32) -> &'a str,
    stack: impl Fn(i32) -> Vec<u64>,
) -> Vec<LeakReport> {
    let symbolizer = Symbolizer::new();
    let mut merged: Vec<LeakReport> = Vec::new();
    for g in groups {
        let mut frames = symbolizer.user_frames(g.pid, &stack(g.stack_id));
        trim_unknown_tail(&mut frames);
        let service = service_name(g.service);
        match merged
            .iter_mut()
            .find(|r| r.service == service && same_stack(&r.stack, &frames))
        {
            Some(r) => {
                r.bytes += g.bytes;
                r.count += g.count;
                r.oldest_age_seconds = r.oldest_age_seconds.max(g.oldest_age_ns as f64 / 1e9);
            }
            None => merged.push(LeakReport {
                service: service.to_owned(),
                bytes: g.bytes,
                count: g.count,
                oldest_age_seconds: g.oldest_age_ns as f64 / 1e9,
                pid: g.pid,
                stack: frames,
            }),
        }
    }
    merged.sort_by_key(|r| std::cmp::Reverse(r.bytes));
    merged
}

/// Human-readable bytes: `512 B`, `7.0 KiB`, `3.2 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

/// The header of `leaks` and `allocs`: per process, the allocators hooked and their entry
/// points, or why its allocations are not observed.
pub fn render_allocators<'a>(
    processes: impl IntoIterator<Item = (&'a u32, &'a Inspection)>,
) -> String {
    let mut out = String::new();
    for (pid, inspection) in processes {
        match inspection {
            Inspection::Observed { allocators } => {
                for plan in allocators {
                    // C++ operators are counted, not listed: their mangled names are long.
                    let (cxx, names): (Vec<&str>, Vec<&str>) = plan
                        .hooks
                        .iter()
                        .map(|h| h.symbol.as_str())
                        .partition(|s| s.starts_with("_Z"));
                    let cxx = if cxx.is_empty() {
                        String::new()
                    } else {
                        format!(" +{} C++ operator new/delete", cxx.len())
                    };
                    out.push_str(&format!(
                        "pid {pid}: {}, hooked: {}{cxx}\n",
                        plan.describe(),
                        names.join(" ")
                    ));
                }
            }
            Inspection::NotObserved { reason } => {
                out.push_str(&format!("pid {pid}: allocations not observed: {reason}\n"));
            }
        }
    }
    out
}

/// Activity per second over a window, from two [`Activity`] readings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Share of one CPU.
    pub cpu: f64,
    pub syscalls_per_second: f64,
}

impl Rates {
    pub fn between(a: Activity, b: Activity, seconds: f64) -> Self {
        let seconds = seconds.max(1e-3);
        Self {
            cpu: (b.cpu_seconds - a.cpu_seconds).max(0.0) / seconds,
            syscalls_per_second: b.syscalls.saturating_sub(a.syscalls) as f64 / seconds,
        }
    }
}

/// The cost line of `leaks`/`allocs`: the observed processes' activity before tracing and
/// during it, and the allocator calls trapped per second. A server serving fewer requests
/// (read/write calls) during tracing, or needing more CPU for the same, shows the slowdown.
pub fn render_cost(before: Rates, during: Rates, calls_per_second: f64) -> String {
    let ratio = if during.syscalls_per_second > 0.0 && before.syscalls_per_second > 0.0 {
        format!(
            " ({:.1}x {})",
            if before.syscalls_per_second >= during.syscalls_per_second {
                before.syscalls_per_second / during.syscalls_per_second
            } else {
                during.syscalls_per_second / before.syscalls_per_second
            },
            if before.syscalls_per_second >= during.syscalls_per_second {
                "fewer"
            } else {
                "more"
            }
        )
    } else {
        String::new()
    };
    format!(
        "cost: {calls:.0} allocator calls/s trapped; observed processes did {b_sys:.0} read/write calls/s at {b_cpu:.0}% CPU before tracing, {d_sys:.0}/s{ratio} at {d_cpu:.0}% CPU during\n",
        calls = calls_per_second,
        b_sys = before.syscalls_per_second,
        b_cpu = before.cpu * 100.0,
        d_sys = during.syscalls_per_second,
        d_cpu = during.cpu * 100.0,
    )
}

/// The share of outstanding bytes whose stack is unknown, as a line (empty when none): what is
/// left of "(stack unavailable)" for the user to weigh.
pub fn render_unavailable(reports: &[LeakReport]) -> String {
    let total: u64 = reports.iter().map(|r| r.bytes).sum();
    let (bytes, blocks) = reports
        .iter()
        .filter(|r| r.stack.is_empty())
        .fold((0, 0), |(b, n), r| (b + r.bytes, n + r.count));
    if bytes == 0 || total == 0 {
        return String::new();
    }
    format!(
        "stack unavailable for {:.1}% of these bytes ({} in {blocks} blocks)\n",
        bytes as f64 * 100.0 / total as f64,
        format_bytes(bytes)
    )
}

/// Whether any process's allocations are observed.
pub fn any_observed<'a>(mut processes: impl Iterator<Item = &'a Inspection>) -> bool {
    processes.any(|p| matches!(p, Inspection::Observed { .. }))
}

/// The text report, at most `depth` frames per stack. `observed` is false when no process's
/// allocations could be seen: then nothing outstanding means nothing, and the report says so.
pub fn render(
    reports: &[LeakReport],
    total_groups: usize,
    min_age_ns: u64,
    depth: usize,
    observed: bool,
) -> String {
    let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    let count: u64 = reports.iter().map(|r| r.count).sum();
    let mut out = String::new();
    if !observed {
        out.push_str("allocations not observed: no selected process's allocator could be hooked\n");
        return out;
    }
    if reports.is_empty() {
        out.push_str(&format!(
            "no outstanding allocations older than {}\n",
            format_ns(min_age_ns)
        ));
        return out;
    }
    out.push_str(&format!(
        "{} in {count} blocks outstanding for at least {}, from {total_groups} stacks{}\n",
        format_bytes(bytes),
        format_ns(min_age_ns),
        super::hidden_note(total_groups, reports.len())
    ));
    for (i, r) in reports.iter().enumerate() {
        out.push_str(&format!(
            "\n#{} {} in {} blocks, oldest {:.1}s, service {} (pid {})\n",
            i + 1,
            format_bytes(r.bytes),
            r.count,
            r.oldest_age_seconds,
            r.service,
            r.pid
        ));
        if r.stack.is_empty() {
            out.push_str("    (stack unavailable)\n");
        }
        for frame in r.stack.iter().take(depth) {
            out.push_str(&format!("    {}\n", frame.display()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use ws1_probe_common::alloc::{AllocInfo, AllocKey};

    use crate::allocator::{Binary, Hook, Kind, Plan};

    use super::*;

    fn alloc(tgid: u32, addr: u64, size: u64, ts_ns: u64, stack_id: i32) -> (AllocKey, AllocInfo) {
        (
            AllocKey {
                tgid,
                _pad: 0,
                addr,
            },
            AllocInfo {
                size,
                ts_ns,
                service: 1,
                stack_id,
            },
        )
    }

    #[test]
    fn groups_old_blocks_by_stack() {
        let allocs = vec![
            alloc(10, 0x1000, 100, 1_000, 7),
            alloc(10, 0x2000, 100, 2_000, 7),
            alloc(10, 0x3000, 4096, 1_000, 9),
            alloc(10, 0x4000, 100, 9_500, 7), // too young
        ];
        let groups = group(&allocs, 10_000, 1_000);
        assert_eq!(groups.len(), 2);
        assert_eq!(
            (groups[0].stack_id, groups[0].bytes, groups[0].count),
            (9, 4096, 1)
        );
        assert_eq!(
            (groups[1].stack_id, groups[1].bytes, groups[1].count),
            (7, 200, 2)
        );
        assert_eq!(groups[1].oldest_age_ns, 9_000);
        assert!(group(&allocs, 10_000, 1_000_000).is_empty());
    }

    #[test]
    fn renders_report() {
        let reports = vec![LeakReport {
            service: "risk".into(),
            bytes: 7168,
            count: 7,
            oldest_age_seconds: 3.25,
            pid: 42,
            stack: vec![Frame {
                addr: 0x10,
                function: Some("leak_here".into()),
                location: Some("src/main.rs:12".into()),
            }],
        }];
        let text = render(&reports, 1, 5_000_000_000, 8, true);
        assert!(
            text.starts_with("7.0 KiB in 7 blocks outstanding for at least 5.00s, from 1 stacks\n"),
            "{text}"
        );
        assert!(
            text.contains("#1 7.0 KiB in 7 blocks, oldest 3.2s, service risk (pid 42)"),
            "{text}"
        );
        assert!(text.contains("    leak_here (src/main.rs:12)\n"), "{text}");
        assert_eq!(
            render(&[], 0, 1_000, 8, true),
            "no outstanding allocations older than 1.00µs\n"
        );
        assert_eq!(
            render(&[], 0, 1_000, 8, false),
            "allocations not observed: no selected process's allocator could be hooked\n"
        );
    }

    #[test]
    fn unavailable_share_is_stated() {
        let report = |bytes, count, stack: Vec<Frame>| LeakReport {
            service: "s".into(),
            bytes,
            count,
            oldest_age_seconds: 1.0,
            pid: 1,
            stack,
        };
        let frame = Frame {
            addr: 1,
            function: Some("f".into()),
            location: None,
        };
        let reports = vec![
            report(3072, 3, vec![frame.clone()]),
            report(1024, 2, vec![]),
        ];
        assert_eq!(
            render_unavailable(&reports),
            "stack unavailable for 25.0% of these bytes (1.0 KiB in 2 blocks)\n"
        );
        assert_eq!(render_unavailable(&reports[..1]), "");
    }

    #[test]
    fn cost_compares_before_and_during() {
        let a = Activity {
            cpu_seconds: 10.0,
            syscalls: 1_000,
        };
        let b = Activity {
            cpu_seconds: 10.5,
            syscalls: 41_000,
        };
        let before = Rates::between(a, b, 2.0);
        assert_eq!(
            before,
            Rates {
                cpu: 0.25,
                syscalls_per_second: 20_000.0
            }
        );
        let during = Rates {
            cpu: 0.98,
            syscalls_per_second: 4_000.0,
        };
        assert_eq!(
            render_cost(before, during, 90_000.0),
            "cost: 90000 allocator calls/s trapped; observed processes did 20000 read/write calls/s at 25% CPU before tracing, 4000/s (5.0x fewer) at 98% CPU during\n"
        );
        assert!(!render_cost(Rates::default(), during, 1.0).contains("fewer"));
    }

    #[test]
    fn renders_allocator_header() {
        let plan = Plan {
            kind: Kind::Jemalloc,
            binary: Binary::Lib("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2".into()),
            prefix: String::new(),
            hooks: ["malloc", "sdallocx", "_Znwm", "_ZdlPvm"]
                .iter()
                .map(|s| Hook {
                    program: "alloc_malloc",
                    symbol: (*s).into(),
                    offset: 0,
                })
                .collect(),
        };
        let processes = std::collections::BTreeMap::from([
            (
                7,
                Inspection::Observed {
                    allocators: vec![plan],
                },
            ),
            (
                9,
                Inspection::NotObserved {
                    reason: "no known allocator".into(),
                },
            ),
        ]);
        assert_eq!(
            render_allocators(&processes),
            "pid 7: jemalloc in libjemalloc.so.2, hooked: malloc sdallocx +2 C++ operator new/delete\n\
             pid 9: allocations not observed: no known allocator\n"
        );
        assert!(any_observed(processes.values()));
        assert!(!any_observed(processes.values().skip(1)));
    }
}
