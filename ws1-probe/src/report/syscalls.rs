//! The `ws1-probe syscalls` table: one row per syscall, sorted by total time, like
//! `syscount -L` with quantiles.

use serde::Serialize;

use crate::{collectors::syscalls::SyscallSnapshot, names::syscall_label, units::format_ns};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SyscallRow {
    pub syscall: String,
    pub nr: u32,
    pub count: u64,
    pub errors: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub total_ns: u64,
}

/// Rows summed over services, sorted by total time (then count, then name).
pub fn rows(snap: &SyscallSnapshot) -> Vec<SyscallRow> {
    let mut rows: Vec<SyscallRow> = snap
        .by_syscall()
        .into_iter()
        .filter(|(_, (h, _))| h.count > 0)
        .map(|(nr, (h, errors))| SyscallRow {
            syscall: syscall_label(nr).into_owned(),
            nr,
            count: h.count,
            errors,
            p50_ns: h.quantile_ns(0.5).unwrap_or(0),
            p90_ns: h.quantile_ns(0.9).unwrap_or(0),
            p99_ns: h.quantile_ns(0.99).unwrap_or(0),
            max_ns: h.max_ns,
            total_ns: h.sum_ns,
        })
        .collect();
    rows.sort_by(|a, b| {
        b.total_ns
            .cmp(&a.total_ns)
            .then(b.count.cmp(&a.count))
            .then(a.syscall.cmp(&b.syscall))
    });
    rows
}

/// The aligned text table, at most `top` rows, with a summary line.
pub fn render(rows: &[SyscallRow], top: usize) -> String {
    let header = [
        "SYSCALL", "COUNT", "ERRORS", "P50", "P90", "P99", "MAX", "TOTAL",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .take(top)
        .map(|r| {
            vec![
                r.syscall.clone(),
                r.count.to_string(),
                r.errors.to_string(),
                format_ns(r.p50_ns),
                format_ns(r.p90_ns),
                format_ns(r.p99_ns),
                format_ns(r.max_ns),
                format_ns(r.total_ns),
            ]
        })
        .collect();
    let mut out = super::table(&header, &cells);
    let calls: u64 = rows.iter().map(|r| r.count).sum();
    let errors: u64 = rows.iter().map(|r| r.errors).sum();
    out.push_str(&format!(
        "{calls} calls, {errors} errors, {} syscalls{}\n",
        rows.len(),
        super::hidden_note(rows.len(), top)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::Histogram;
    use ws1_probe_common::hist::DEFAULT_EXPORT_BOUNDS_NS;

    #[test]
    fn sorted_by_total_time_and_summed_over_services() {
        let b = &DEFAULT_EXPORT_BOUNDS_NS;
        let mut snap = SyscallSnapshot::default();
        let mut fast = Histogram::default();
        for _ in 0..100 {
            fast.observe(b, 1_000);
        }
        let mut slow = Histogram::default();
        slow.observe(b, 5_000_000);
        snap.hists.insert((1, 110), fast.clone()); // getppid, 100 µs total
        snap.hists.insert((2, 110), fast); // same syscall, another service
        snap.hists.insert((1, 35), slow); // nanosleep, 5 ms total
        snap.errors.insert((1, 110, 2), 3);
        let rows = rows(&snap);
        assert_eq!(rows[0].syscall, "nanosleep");
        assert_eq!(rows[1].syscall, "getppid");
        assert_eq!(rows[1].count, 200);
        assert_eq!(rows[1].errors, 3);
        assert_eq!(rows[1].total_ns, 200_000);
        let text = render(&rows, 10);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SYSCALL"), "{text}");
        assert!(lines[1].starts_with("nanosleep"), "{text}");
        assert!(
            lines[2].contains("200") && lines[2].contains("1.00µs"),
            "{text}"
        );
        assert_eq!(lines[3], "201 calls, 3 errors, 2 syscalls");
        assert!(render(&rows, 1).contains("(1 not shown; use --top)"));
    }
}
