//! The `ws1-probe allocs` report: allocation rate, size histogram and top allocating stacks.

use serde::Serialize;
use ws1_probe_common::alloc::{AllocSite, AllocSiteKey, AllocStats, SIZE_BOUNDS};

use crate::{
    report::leaks::format_bytes,
    symbolize::{Frame, Symbolizer, same_stack, trim_unknown_tail},
};

/// One allocating stack, symbolized.
#[derive(Clone, Debug, Serialize)]
pub struct SiteReport {
    pub service: String,
    pub bytes: u64,
    pub count: u64,
    pub stack: Vec<Frame>,
}

/// Symbolizes sites and merges those whose stacks print the same, most bytes first. `pid_of`
/// names a live process of a service (symbolization reads its memory map).
pub fn sites<'a>(
    sites: &[(AllocSiteKey, AllocSite)],
    service_name: impl Fn(u32) -> &'a str,
    pid_of: impl Fn(u32) -> Option<u32>,
    stack: impl Fn(i32) -> Vec<u64>,
) -> Vec<SiteReport> {
    let symbolizer = Symbolizer::new();
    let mut merged: Vec<SiteReport> = Vec::new();
    for (key, site) in sites {
        let mut frames = match pid_of(key.service) {
            Some(pid) => symbolizer.user_frames(pid, &stack(key.stack_id)),
            None => Vec::new(),
        };
        trim_unknown_tail(&mut frames);
        let service = service_name(key.service);
        match merged
            .iter_mut()
            .find(|r| r.service == service && same_stack(&r.stack, &frames))
        {
            Some(r) => {
                r.bytes += site.bytes;
                r.count += site.count;
            }
            None => merged.push(SiteReport {
                service: service.to_owned(),
                bytes: site.bytes,
                count: site.count,
                stack: frames,
            }),
        }
    }
    merged.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.count.cmp(&a.count)));
    merged
}

/// Size histogram rows: (`le` label, count), non-cumulative.
pub fn size_rows(stats: &AllocStats) -> Vec<(String, u64)> {
    let mut rows: Vec<(String, u64)> = SIZE_BOUNDS
        .iter()
        .zip(stats.size_buckets.iter())
        .map(|(b, n)| (format!("<= {}", format_bytes(*b)), *n))
        .collect();
    if let Some(n) = stats.size_buckets.last() {
        rows.push((
            format!("> {}", format_bytes(SIZE_BOUNDS[SIZE_BOUNDS.len() - 1])),
            *n,
        ));
    }
    rows
}

/// The text report.
pub fn render(total: &AllocStats, seconds: f64, sites: &[SiteReport], depth: usize) -> String {
    let per_s = |v: u64| v as f64 / seconds.max(1e-9);
    let mut out = format!(
        "{}/s allocated in {:.0} calls/s, {}/s freed in {:.0} calls/s; {} failed; {} not tracked\n",
        format_bytes(per_s(total.alloc_bytes) as u64),
        per_s(total.allocs),
        format_bytes(per_s(total.free_bytes) as u64),
        per_s(total.frees),
        total.failed,
        total.untracked
    );
    out.push_str("\nSIZE          CALLS\n");
    for (label, n) in size_rows(total).iter().filter(|(_, n)| *n > 0) {
        out.push_str(&format!("{label:<12}  {n:>5}\n"));
    }
    if !sites.is_empty() {
        out.push_str("\ntop allocating stacks:\n");
    }
    for (i, s) in sites.iter().enumerate() {
        out.push_str(&format!(
            "\n#{} {} in {} calls, service {}\n",
            i + 1,
            format_bytes(s.bytes),
            s.count,
            s.service
        ));
        for frame in s.stack.iter().take(depth) {
            out.push_str(&format!("    {}\n", frame.display()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_rows_label_le_bounds() {
        let mut stats = AllocStats::ZERO;
        stats.size_buckets[0] = 3;
        stats.size_buckets[4] = 2;
        stats.size_buckets[11] = 1;
        let rows = size_rows(&stats);
        assert_eq!(rows.len(), 12);
        assert_eq!(rows[0], ("<= 16 B".to_owned(), 3));
        assert_eq!(rows[4], ("<= 4.0 KiB".to_owned(), 2));
        assert_eq!(rows[11], ("> 16.0 MiB".to_owned(), 1));
        let text = render(&stats, 2.0, &[], 8);
        assert!(text.contains("<= 4.0 KiB        2\n"), "{text}");
        assert!(!text.contains("<= 64 B"), "empty rows are hidden: {text}");
    }
}
