//! Service level objectives and the alerting settings they turn into Prometheus rules
//! (`rules.rs`). Pure data and checks: the config file fills them, `ws1-probe rules` prints
//! them; nothing here reads the kernel or the network.

pub mod promapi;
pub mod rules;
pub mod status;

use std::fmt;

/// A latency objective: at least `target` of a service's server-side requests complete at or
/// under `latency_ns`, over `window`.
#[derive(Clone, Debug, PartialEq)]
pub struct Slo {
    pub service: String,
    /// A bound of the exported histogram (checked by the config), so the SLI is one `le` bucket.
    pub latency_ns: u64,
    /// Fraction of good requests, in (0, 1).
    pub target: f64,
    /// The compliance window the error budget is spent over.
    pub window: PromDuration,
}

impl Slo {
    /// The error budget: the fraction of requests allowed over the latency.
    pub fn budget(&self) -> f64 {
        1.0 - self.target
    }
}

/// The default SLO window (the SRE workbook's burn rates are given for 30 days).
pub const DEFAULT_WINDOW: PromDuration = PromDuration(30 * DAY_MS);

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;
const WEEK_MS: u64 = 7 * DAY_MS;

/// A duration in Prometheus' syntax (`30s`, `5m`, `1h30m`, `30d`), kept in milliseconds so it
/// prints back the way Prometheus reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PromDuration(pub u64);

impl PromDuration {
    pub const fn minutes(n: u64) -> Self {
        Self(n * MINUTE_MS)
    }

    pub const fn hours(n: u64) -> Self {
        Self(n * HOUR_MS)
    }

    pub const fn seconds(n: u64) -> Self {
        Self(n * SECOND_MS)
    }

    pub fn as_hours(self) -> f64 {
        self.0 as f64 / HOUR_MS as f64
    }

    /// Parses Prometheus' duration syntax: units `ms s m h d w` (largest first, each at most
    /// once), e.g. `90s`, `1h30m`. Hand-written because the grammar is this small and
    /// general duration crates accept forms Prometheus rejects (`5 min`).
    pub fn parse(text: &str) -> Result<Self, String> {
        const UNITS: [(&str, u64); 6] = [
            ("w", WEEK_MS),
            ("d", DAY_MS),
            ("h", HOUR_MS),
            ("m", MINUTE_MS),
            ("s", SECOND_MS),
            ("ms", 1),
        ];
        let bad = || format!("`{text}` is not a duration like 30s, 5m, 1h or 30d");
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        let mut total: u64 = 0;
        let mut next_unit = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit = &rest[..letters];
            rest = &rest[letters..];
            let at = UNITS[next_unit..]
                .iter()
                .position(|(u, _)| *u == unit)
                .ok_or_else(bad)?;
            let (_, ms) = UNITS[next_unit + at];
            next_unit += at + 1;
            total = n
                .checked_mul(ms)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(bad)?;
        }
        if total == 0 {
            return Err(format!("`{text}` is zero: give a positive duration"));
        }
        Ok(Self(total))
    }
}

impl fmt::Display for PromDuration {
    /// The shortest Prometheus form (`1h30m`, `30d`, `250ms`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0s");
        }
        let mut left = self.0;
        for (unit, ms) in [
            ("d", DAY_MS),
            ("h", HOUR_MS),
            ("m", MINUTE_MS),
            ("s", SECOND_MS),
            ("ms", 1),
        ] {
            if left >= ms {
                write!(f, "{}{unit}", left / ms)?;
                left %= ms;
            }
        }
        Ok(())
    }
}

/// Thresholds of the plan's four alerts and of the agent's own, with their `for` durations.
/// Defaults are the WS1 plan's: CPU > 80 % for 5 minutes, memory > 90 % for 2 minutes,
/// response time > 100 ms for 1 minute, error rate > 5 % for 30 seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertSettings {
    /// Percent of the host's CPU capacity (a service, or the host as a whole).
    pub cpu_percent: f64,
    pub cpu_for: PromDuration,
    /// Percent of the memory limit (a service's cgroup limit, or the host's memory).
    pub memory_percent: f64,
    pub memory_for: PromDuration,
    /// p99 of server-side request latency.
    pub latency_ns: u64,
    pub latency_for: PromDuration,
    /// Socket-level error ratio (see docs/runbook.md#ws1serviceerrorrate).
    pub error_ratio: f64,
    pub error_for: PromDuration,
    /// `for` of the burn-rate alerts: the page (14.4× over 1 h and 5 min) and the ticket (the
    /// slower pairs). Short values are for tests; the workbook's pairs already filter noise.
    pub slo_fast_for: PromDuration,
    pub slo_slow_for: PromDuration,
    /// The agent's own budgets: resident memory and CPU (fraction of one core).
    pub agent_memory_bytes: u64,
    pub agent_cpu_cores: f64,
    /// The Prometheus job that scrapes the agents.
    pub job: String,
    /// Where `runbook_url` annotations point; each alert appends `#<alert name in lowercase>`.
    pub runbook_base: String,
}

/// The default `runbook_url` base: the runbook in this repository.
pub const DEFAULT_RUNBOOK_BASE: &str = "https://github.com/ws1/ws1-probe/blob/main/docs/runbook.md";

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            cpu_percent: 80.0,
            cpu_for: PromDuration::minutes(5),
            memory_percent: 90.0,
            memory_for: PromDuration::minutes(2),
            latency_ns: 100_000_000,
            latency_for: PromDuration::minutes(1),
            error_ratio: 0.05,
            error_for: PromDuration::seconds(30),
            slo_fast_for: PromDuration::minutes(2),
            slo_slow_for: PromDuration::minutes(15),
            agent_memory_bytes: 100 << 20,
            agent_cpu_cores: 0.05,
            job: "ws1-probe".to_owned(),
            runbook_base: DEFAULT_RUNBOOK_BASE.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_as_prometheus_does() {
        for (text, ms) in [
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h30m", 5_400_000),
            ("30d", 30 * DAY_MS),
            ("250ms", 250),
            ("1w", WEEK_MS),
        ] {
            assert_eq!(PromDuration::parse(text), Ok(PromDuration(ms)), "{text}");
        }
        assert_eq!(PromDuration(5_400_000).to_string(), "1h30m");
        assert_eq!(PromDuration(30 * DAY_MS).to_string(), "30d");
        assert_eq!(PromDuration(250).to_string(), "250ms");
        for bad in ["", "5", "m", "5 min", "1m1h", "1h1h", "0s", "-1s", "1.5h"] {
            assert!(PromDuration::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
