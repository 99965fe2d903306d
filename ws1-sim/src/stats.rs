//! What each simulated process counts, in the terms the agent counts: per side and port, the
//! request/response exchanges that completed (a request read and a reply written on the server;
//! a request written and reply bytes read on the client), connections, refused connects, resets
//! seen and handshake exchanges. Children print these blocks on stdout; the supervisor parses
//! and sums them.

use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex};

/// Counters of one (side, port) endpoint of one process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Exchanges that completed (handshake exchanges not included).
    pub requests: u64,
    /// Connections established (connected on the client side, accepted on the server side).
    pub connects: u64,
    /// Connects refused (client side).
    pub refused: u64,
    /// Resets: `ECONNRESET` seen by a client, connections aborted with RST by a server.
    pub resets: u64,
    /// Protocol start-up exchanges (PostgreSQL: SSL request and start-up packet).
    pub handshakes: u64,
    /// Server-side requests that took more than [`SLOW_MS`] from request to reply.
    pub slow: u64,
    /// Client calls that failed for good (after retries).
    pub failed: u64,
}

/// The SLO-independent "slow" bound the simulator counts against: the plan's 100 ms latency alert.
pub const SLOW_MS: u64 = 100;

const FIELDS: [&str; 7] = [
    "requests",
    "connects",
    "refused",
    "resets",
    "handshakes",
    "slow",
    "failed",
];

impl Counts {
    fn fields(&self) -> [u64; 7] {
        [
            self.requests,
            self.connects,
            self.refused,
            self.resets,
            self.handshakes,
            self.slow,
            self.failed,
        ]
    }

    fn field_mut(&mut self, name: &str) -> Option<&mut u64> {
        Some(match name {
            "requests" => &mut self.requests,
            "connects" => &mut self.connects,
            "refused" => &mut self.refused,
            "resets" => &mut self.resets,
            "handshakes" => &mut self.handshakes,
            "slow" => &mut self.slow,
            "failed" => &mut self.failed,
            _ => return None,
        })
    }

    pub fn add(&mut self, other: &Counts) {
        for (name, v) in FIELDS.iter().zip(other.fields()) {
            if let Some(f) = self.field_mut(name) {
                *f += v;
            }
        }
    }

    /// `requests=1 connects=2 ...`
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (i, (name, v)) in FIELDS.iter().zip(self.fields()).enumerate() {
            let sep = if i == 0 { "" } else { " " };
            let _ = write!(s, "{sep}{name}={v}");
        }
        s
    }

    /// Parses [`Counts::render`]'s output (unknown keys are ignored).
    pub fn parse(words: &[&str]) -> Counts {
        let mut c = Counts::default();
        for w in words {
            if let Some((k, v)) = w.split_once('=')
                && let (Some(f), Ok(v)) = (c.field_mut(k), v.parse())
            {
                *f = v;
            }
        }
        c
    }
}

/// Which end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }

    pub fn parse(s: &str) -> Option<Side> {
        match s {
            "client" => Some(Side::Client),
            "server" => Some(Side::Server),
            _ => None,
        }
    }
}

/// A process's endpoints: (side, port) → counts, where the port is the agent's `port` label
/// (the local listening port on the server side, the remote port on the client side).
#[derive(Default)]
pub struct Stats {
    map: Mutex<BTreeMap<(Side, u16), Counts>>,
}

impl Stats {
    pub fn add(&self, side: Side, port: u16, f: impl FnOnce(&mut Counts)) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        f(map.entry((side, port)).or_default());
    }

    pub fn snapshot(&self) -> BTreeMap<(Side, u16), Counts> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The lines of one report block's endpoints: `ep <side> <port> requests=...`.
pub fn render_endpoints(snap: &BTreeMap<(Side, u16), Counts>) -> Vec<String> {
    snap.iter()
        .map(|((side, port), c)| format!("ep {} {port} {}", side.label(), c.render()))
        .collect()
}

/// Latencies in 16 buckets per power of two (≤ 6.25 % apart), for the p50/p99 the load
/// benchmark compares with and without the agent.
pub struct Hist {
    buckets: Vec<std::sync::atomic::AtomicU64>,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            buckets: (0..64 * 16)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }
}

fn bucket(ns: u64) -> usize {
    let ns = ns.max(1);
    let log = 63 - ns.leading_zeros() as usize;
    let sub = if log >= 4 {
        (ns >> (log - 4)) & 15
    } else {
        ns & 15
    };
    log * 16 + sub as usize
}

/// The lower bound of a bucket.
fn bucket_floor(b: usize) -> u64 {
    let (log, sub) = (b / 16, (b % 16) as u64);
    if log >= 4 {
        (16 + sub) << (log - 4)
    } else {
        sub.max(1)
    }
}

impl Hist {
    pub fn record(&self, ns: u64) {
        self.buckets[bucket(ns).min(self.buckets.len() - 1)]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The `q` quantile in nanoseconds (the middle of its bucket), `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let lo = bucket_floor(i) as f64;
                let hi = bucket_floor(i + 1) as f64;
                return Some((lo + hi) / 2.0);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hist_quantiles_within_a_bucket() {
        let h = Hist::default();
        for ns in 1..=1000u64 {
            h.record(ns * 1000);
        }
        let p99 = h.quantile(0.99).unwrap();
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.07, "{p99}");
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.07, "{p50}");
        assert_eq!(Hist::default().quantile(0.5), None);
    }

    #[test]
    fn counts_round_trip() {
        let c = Counts {
            requests: 5,
            connects: 2,
            refused: 1,
            resets: 3,
            handshakes: 4,
            slow: 6,
            failed: 7,
        };
        let text = c.render();
        let words: Vec<&str> = text.split(' ').collect();
        assert_eq!(Counts::parse(&words), c);
        let mut sum = c;
        sum.add(&c);
        assert_eq!(sum.requests, 10);
        assert_eq!(sum.failed, 14);
    }
}
