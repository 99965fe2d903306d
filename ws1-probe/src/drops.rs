//! No silent loss: when a kernel map fills, the agent says so in its log, once per map per
//! interval, with what was lost and the flag that raises the limit. The per-reason drop counters
//! (`ws1_probe_events_dropped_total`) stay the exact record; this turns their increases into
//! sentences.

use std::time::{Duration, Instant};

use ws1_probe_common::targets::DropReason;

/// At most one warning per map in this interval.
pub const WARN_EVERY: Duration = Duration::from_secs(60);

/// Maps whose capacity `--map-entries NAME=N` sets at load time: hash and stack maps whose size
/// no code depends on. Ring buffers and slot arrays are sized otherwise (see ARCHITECTURE.md).
pub const RESIZABLE: &[&str] = &[
    "TARGETS",
    "COMM_SERVICES",
    "SYSCALL_START",
    "SYSCALL_HIST",
    "SYSCALL_ERRORS",
    "NET_SOCKS",
    "NET_HIST",
    "NET_LISTEN",
    "ALLOC_PENDING",
    "ALLOC_SITES",
    "ALLOC_STACKS",
    "ALLOC_TOP_STACKS",
    "PAGE_FAULTS",
    "OFFCPU_START",
    "RUNQ_HIST",
    "PROC_EVENTS",
    "BLOCK_START",
    "BLOCK_HIST",
];

/// Largest capacity `--map-entries` accepts.
pub const MAX_ENTRIES: u32 = 1 << 24;

/// Parses `NAME=N` for `--map-entries`.
pub fn parse_map_entries(text: &str) -> Result<(String, u32), String> {
    let (name, n) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=ENTRIES, got {text:?}"))?;
    let name = name.trim();
    if !RESIZABLE.contains(&name) {
        return Err(format!(
            "map {name:?} cannot be resized: use one of {}",
            RESIZABLE.join(", ")
        ));
    }
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("invalid entry count {n:?} for {name}"))?;
    if n == 0 || n > MAX_ENTRIES {
        return Err(format!("{name}={n}: use 1 to {MAX_ENTRIES} entries"));
    }
    Ok((name.to_owned(), n))
}

/// The map behind a drop reason, what its drops lose, and whether `--map-entries` can raise it.
pub fn describe(reason: DropReason) -> Option<(&'static str, &'static str, bool)> {
    Some(match reason {
        DropReason::TargetsFull => ("TARGETS", "new processes were not observed", true),
        DropReason::ExecRingFull => (
            "EXEC_EVENTS",
            "execs were not decided (those processes keep the service they had)",
            false,
        ),
        DropReason::SyscallStartFull => ("SYSCALL_START", "syscalls were not timed", true),
        DropReason::SyscallHistFull => (
            "SYSCALL_HIST",
            "syscalls of new (service, syscall) pairs were not counted",
            true,
        ),
        DropReason::SyscallErrorsFull => (
            "SYSCALL_ERRORS",
            "failed syscalls of new (service, syscall, errno) triples were not counted",
            true,
        ),
        DropReason::NetSocksFull => ("NET_SOCKS", "new TCP connections were not observed", true),
        // Or all of NET_SLOTS' endpoints are taken, which is fixed; the message says so.
        DropReason::NetStatsFull => (
            "NET_HIST",
            "network events of new endpoints were not counted (or all 1024 NET_SLOTS endpoints are taken, a fixed limit)",
            true,
        ),
        DropReason::SchedMapFull => (
            "RUNQ_HIST",
            "run-queue waits of new services, starts and exits of new (service, reason) pairs, or crash lines (PROC_EVENTS, CRASH_EVENTS) were not counted",
            true,
        ),
        DropReason::NetListenFull => ("NET_LISTEN", "listening ports were not observed", true),
        DropReason::AllocPendingFull => {
            ("ALLOC_PENDING", "allocation calls were not observed", true)
        }
        DropReason::AllocStackLost => ("ALLOC_STACKS", "allocations lost their stack", true),
        DropReason::ProfileCountsFull => (
            "PROFILE_COUNTS",
            "profile samples or off-CPU blocks were not counted",
            false,
        ),
        DropReason::ProfileRingFull => (
            "PROFILE_SAMPLES",
            "stack samples of DWARF-mode processes were lost (lower --profile-frequency)",
            false,
        ),
        DropReason::OffCpuStartFull => ("OFFCPU_START", "off-CPU blocks were not measured", true),
        // Not a loss: the connection is counted under remote="other".
        DropReason::NetRemoteOther => return None,
        DropReason::BlockStartFull => ("BLOCK_START", "block I/O requests were not timed", true),
        // BLOCK_BYTES has the same keys and is resized with it.
        DropReason::BlockHistFull => (
            "BLOCK_HIST",
            "block I/O of new (service, device, op) triples was not counted",
            true,
        ),
    })
}

/// The warning for `n` drops of `reason` over `span`; `capacity` is the map's current size.
pub fn warning(reason: DropReason, n: u64, span: Duration, capacity: Option<u64>) -> String {
    let Some((map, lost, resizable)) = describe(reason) else {
        return format!("{n} events dropped ({})", reason.label());
    };
    let size = capacity.map_or(String::new(), |c| format!(" ({c} entries)"));
    let fix = match (resizable, capacity) {
        (true, Some(c)) => format!(
            "raise it with --map-entries {map}={}",
            c.saturating_mul(2).min(u64::from(MAX_ENTRIES))
        ),
        (true, None) => format!("raise it with --map-entries {map}=N"),
        (false, _) => "its size is fixed at build time".to_owned(),
    };
    format!(
        "map {map} is full{size}: {n} {lost} in the last {} s; {fix} (ws1_probe_events_dropped_total{{reason=\"{}\"}})",
        span.as_secs().max(1),
        reason.label()
    )
}

/// Turns increases of the drop counters into at most one warning per map per interval.
#[derive(Clone, Debug)]
pub struct DropWatch {
    every: Duration,
    started: Instant,
    last_total: [u64; DropReason::COUNT as usize],
    pending: [u64; DropReason::COUNT as usize],
    warned: [Option<Instant>; DropReason::COUNT as usize],
    /// Service ids refused so far, and when that was last said.
    names: (u64, u64, Option<Instant>),
}

impl DropWatch {
    pub fn new(now: Instant, every: Duration) -> Self {
        Self {
            every,
            started: now,
            last_total: [0; DropReason::COUNT as usize],
            pending: [0; DropReason::COUNT as usize],
            warned: [None; DropReason::COUNT as usize],
            names: (0, 0, None),
        }
    }

    /// The warning due, if any, for command names that got no service id of their own
    /// (`refused` so far, out of `capacity` ids).
    pub fn check_names(&mut self, now: Instant, refused: u64, capacity: usize) -> Option<String> {
        let (last, pending, warned) = &mut self.names;
        *pending += refused.saturating_sub(*last);
        *last = refused;
        if *pending == 0 || warned.is_some_and(|at| now.saturating_duration_since(at) < self.every)
        {
            return None;
        }
        let since = warned.unwrap_or(self.started);
        let line = format!(
            "all {capacity} service ids are taken: {} processes with a command name that has no id were counted as service=\"other\" in the last {} s; such names cannot get a label of their own until the agent restarts",
            *pending,
            now.saturating_duration_since(since).as_secs().max(1)
        );
        *pending = 0;
        *warned = Some(now);
        Some(line)
    }

    /// Folds in the counters (`totals` per reason, as read now) and returns the warnings due.
    /// `capacity` gives a map's current capacity by name.
    pub fn check(
        &mut self,
        now: Instant,
        totals: &[(DropReason, u64)],
        capacity: impl Fn(&str) -> Option<u64>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        for (reason, total) in totals {
            let i = *reason as usize;
            let (Some(last), Some(pending), Some(warned)) = (
                self.last_total.get_mut(i),
                self.pending.get_mut(i),
                self.warned.get_mut(i),
            ) else {
                continue;
            };
            *pending += total.saturating_sub(*last);
            *last = *total;
            if *pending == 0 || describe(*reason).is_none() {
                *pending = 0;
                continue;
            }
            if warned.is_some_and(|at| now.saturating_duration_since(at) < self.every) {
                continue;
            }
            let since = warned.unwrap_or(self.started);
            let map = describe(*reason).map(|(m, _, _)| m).unwrap_or_default();
            out.push(warning(
                *reason,
                *pending,
                now.saturating_duration_since(since),
                capacity(map),
            ));
            *pending = 0;
            *warned = Some(now);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_map_entries() {
        assert_eq!(
            parse_map_entries("SYSCALL_HIST=8192"),
            Ok(("SYSCALL_HIST".to_owned(), 8192))
        );
        assert!(parse_map_entries("SYSCALL_HIST").is_err());
        assert!(parse_map_entries("SYSCALL_HIST=0").is_err());
        assert!(parse_map_entries("SYSCALL_HIST=x").is_err());
        let err = parse_map_entries("EXEC_EVENTS=4").unwrap_err();
        assert!(err.contains("cannot be resized"), "{err}");
    }

    #[test]
    fn one_warning_per_map_per_interval() {
        let t0 = Instant::now();
        let mut w = DropWatch::new(t0, Duration::from_secs(60));
        let cap = |m: &str| (m == "SYSCALL_HIST").then_some(4096);
        let at = |s| t0 + Duration::from_secs(s);
        assert!(
            w.check(at(5), &[(DropReason::SyscallHistFull, 0)], cap)
                .is_empty()
        );
        let first = w.check(at(10), &[(DropReason::SyscallHistFull, 7)], cap);
        assert_eq!(
            first,
            vec![
                "map SYSCALL_HIST is full (4096 entries): 7 syscalls of new (service, syscall) pairs were not counted in the last 10 s; raise it with --map-entries SYSCALL_HIST=8192 (ws1_probe_events_dropped_total{reason=\"syscall_hist_map_full\"})"
                    .to_owned()
            ]
        );
        // More drops within the interval: held back, then reported together.
        assert!(
            w.check(at(30), &[(DropReason::SyscallHistFull, 10)], cap)
                .is_empty()
        );
        assert!(
            w.check(at(60), &[(DropReason::SyscallHistFull, 12)], cap)
                .is_empty()
        );
        let second = w.check(at(70), &[(DropReason::SyscallHistFull, 12)], cap);
        assert_eq!(second.len(), 1);
        assert!(
            second[0].contains(": 5 syscalls") && second[0].contains("last 60 s"),
            "{second:?}"
        );
        // No new drops: silence.
        assert!(
            w.check(at(200), &[(DropReason::SyscallHistFull, 12)], cap)
                .is_empty()
        );
        // Each map has its own interval; budgets are not losses.
        let other = w.check(
            at(201),
            &[
                (DropReason::SyscallHistFull, 13),
                (DropReason::TargetsFull, 1),
                (DropReason::NetRemoteOther, 9),
            ],
            cap,
        );
        assert_eq!(other.len(), 2, "{other:?}");
        assert!(other[1].contains("--map-entries TARGETS=N"), "{other:?}");
    }

    #[test]
    fn names_without_an_id_are_said_once_per_interval() {
        let t0 = Instant::now();
        let mut w = DropWatch::new(t0, Duration::from_secs(60));
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(w.check_names(at(1), 0, 4096), None);
        let line = w.check_names(at(2), 3, 4096).unwrap_or_default();
        assert!(
            line.starts_with("all 4096 service ids are taken: 3 processes"),
            "{line}"
        );
        assert_eq!(w.check_names(at(30), 9, 4096), None);
        let line = w.check_names(at(62), 9, 4096).unwrap_or_default();
        assert!(line.contains(": 6 processes"), "{line}");
    }
}
