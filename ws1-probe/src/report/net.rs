//! The `ws1-probe net` table: one row per (service, side, port[, remote]) endpoint, busiest
//! first.

use serde::Serialize;

use crate::{
    collectors::net::{EndpointStats, NetSnapshot},
    histogram::Histogram,
    units::format_ns,
};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NetRow {
    pub service: String,
    /// `client` (port is the remote port) or `server` (port is the local port).
    pub side: &'static str,
    pub port: u16,
    /// The peer's address (`other` beyond the address budget), for services that export it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    pub connections: u64,
    pub active: i64,
    pub connect_failures: u64,
    pub connect_p50_ns: Option<u64>,
    pub connect_p99_ns: Option<u64>,
    pub rtt_p50_ns: Option<u64>,
    pub rtt_p99_ns: Option<u64>,
    pub retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub requests: u64,
    pub request_p50_ns: Option<u64>,
    pub request_p99_ns: Option<u64>,
    pub reuse_ratio: Option<f64>,
}

fn q(h: &Histogram, q: f64) -> Option<u64> {
    h.quantile_ns(q)
}

fn row(
    service: String,
    side: &'static str,
    port: u16,
    remote: Option<String>,
    e: &EndpointStats,
) -> NetRow {
    let c = &e.counters;
    NetRow {
        service,
        side,
        port,
        remote,
        connections: c.connections,
        active: e.active,
        connect_failures: c.connect_failures,
        connect_p50_ns: q(&e.connect, 0.5),
        connect_p99_ns: q(&e.connect, 0.99),
        rtt_p50_ns: q(&e.rtt, 0.5),
        rtt_p99_ns: q(&e.rtt, 0.99),
        retransmits: c.retransmits,
        resets_sent: c.resets_sent,
        resets_received: c.resets_received,
        bytes_sent: c.bytes_sent,
        bytes_received: c.bytes_received,
        requests: c.requests,
        request_p50_ns: q(&e.request, 0.5),
        request_p99_ns: q(&e.request, 0.99),
        reuse_ratio: e.reuse_ratio(),
    }
}

/// Rows sorted by requests, then connections, then service, side, port and remote. `name` maps
/// a service id to its name.
pub fn rows<'a>(snap: &NetSnapshot, name: impl Fn(u32) -> &'a str) -> Vec<NetRow> {
    let mut rows: Vec<NetRow> = snap
        .endpoints
        .iter()
        .map(|((service, side, port, remote), e)| {
            let remote = remote.map(|r| r.to_string());
            row(name(*service).to_owned(), side.label(), *port, remote, e)
        })
        .collect();
    rows.sort_by(|a, b| {
        b.requests
            .cmp(&a.requests)
            .then(b.connections.cmp(&a.connections))
            .then(a.service.cmp(&b.service))
            .then(a.side.cmp(b.side))
            .then(a.port.cmp(&b.port))
            .then(a.remote.cmp(&b.remote))
    });
    rows
}

/// The ENDPOINT cell: `svc → :5432` (remote port it connects to), `svc ← :80` (local port it
/// serves); with the remote address `svc → 10.0.0.5:5432` and `svc ← :80 from 10.0.0.9`.
fn endpoint(r: &NetRow) -> String {
    let remote = r.remote.as_deref();
    // IPv6 addresses in brackets before a port, as in socket addresses.
    let host = |a: &str| {
        if a.contains(':') {
            format!("[{a}]")
        } else {
            a.to_owned()
        }
    };
    match (r.side, remote) {
        ("client", None) => format!("{} → :{}", r.service, r.port),
        ("client", Some(a)) => format!("{} → {}:{}", r.service, host(a), r.port),
        (_, None) => format!("{} ← :{}", r.service, r.port),
        (_, Some(a)) => format!("{} ← :{} from {a}", r.service, r.port),
    }
}

fn ns(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), format_ns)
}

/// The aligned text table, at most `top` rows, with a summary line.
pub fn render(rows: &[NetRow], top: usize) -> String {
    let header = [
        "ENDPOINT", "CONNS", "FAILED", "CONN P50", "CONN P99", "RTT P50", "RTT P99", "RETRANS",
        "RST S/R", "REQS", "REQ P50", "REQ P99", "REUSE",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .take(top)
        .map(|r| {
            vec![
                endpoint(r),
                r.connections.to_string(),
                r.connect_failures.to_string(),
                ns(r.connect_p50_ns),
                ns(r.connect_p99_ns),
                ns(r.rtt_p50_ns),
                ns(r.rtt_p99_ns),
                r.retransmits.to_string(),
                format!("{}/{}", r.resets_sent, r.resets_received),
                r.requests.to_string(),
                ns(r.request_p50_ns),
                ns(r.request_p99_ns),
                r.reuse_ratio
                    .map_or_else(|| "-".to_owned(), |x| format!("{:.1}%", x * 100.0)),
            ]
        })
        .collect();
    let mut out = super::table(&header, &cells);
    let requests: u64 = rows.iter().map(|r| r.requests).sum();
    let connections: u64 = rows.iter().map(|r| r.connections).sum();
    out.push_str(&format!(
        "{requests} requests, {connections} connections, {} endpoints (→ :port = remote port it connects to, ← :port = local port it serves){}\n",
        rows.len(),
        super::hidden_note(rows.len(), top)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collectors::net::Side;
    use ws1_probe_common::hist::DEFAULT_EXPORT_BOUNDS_NS;

    #[test]
    fn busiest_first_with_quantiles_and_reuse() {
        let b = &DEFAULT_EXPORT_BOUNDS_NS;
        let mut snap = NetSnapshot::default();
        let mut pooled = EndpointStats::default();
        pooled.counters.connections = 1;
        pooled.counters.requests = 20;
        pooled.counters.reused_requests = 19;
        for _ in 0..20 {
            pooled.request.observe(b, 5_000_000);
        }
        pooled.connect.observe(b, 50_000);
        snap.endpoints.insert((1, Side::Client, 5432, None), pooled);
        let mut idle = EndpointStats::default();
        idle.counters.connections = 3;
        snap.endpoints.insert((2, Side::Server, 80, None), idle);
        let names = ["other", "risk", "web"];
        let rows = rows(&snap, |id| names[id as usize]);
        assert_eq!(rows[0].service, "risk");
        assert_eq!(rows[0].reuse_ratio, Some(0.95));
        assert_eq!(rows[1].side, "server");
        assert_eq!(rows[1].request_p50_ns, None);
        let text = render(&rows, 10);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ENDPOINT"), "{text}");
        assert!(lines[1].starts_with("risk → :5432"), "{text}");
        assert!(
            lines[1].contains("95.0%") && lines[1].contains("5.00ms"),
            "{text}"
        );
        assert!(lines[2].starts_with("web ← :80"), "{text}");
        assert!(
            lines[3].starts_with("20 requests, 4 connections, 2 endpoints"),
            "{text}"
        );
        assert!(render(&rows, 1).contains("(1 not shown; use --top)"));
    }

    #[test]
    fn endpoint_shows_the_remote_address_when_exported() {
        use crate::collectors::net::Remote;
        let mut snap = NetSnapshot::default();
        let v4 = Remote::from_octets([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 5]);
        let v6 = Remote::from_octets(std::net::Ipv6Addr::LOCALHOST.octets());
        for (key, conns) in [
            ((1, Side::Client, 5432, Some(v4)), 5),
            ((1, Side::Client, 5432, Some(v6)), 4),
            ((1, Side::Server, 80, Some(v4)), 3),
            ((1, Side::Client, 6379, Some(Remote::Other)), 2),
            ((2, Side::Client, 5432, None), 1),
        ] {
            let mut e = EndpointStats::default();
            e.counters.connections = conns;
            snap.endpoints.insert(key, e);
        }
        let names = ["other", "api", "db"];
        let rows = rows(&snap, |id| names[id as usize]);
        assert_eq!(rows[0].remote.as_deref(), Some("10.0.0.5"));
        assert_eq!(rows[4].remote, None);
        let text = render(&rows, 10);
        let cells: Vec<&str> = text
            .lines()
            .skip(1)
            .take(5)
            .map(|l| l.split("  ").next().unwrap_or(""))
            .collect();
        assert_eq!(
            cells,
            [
                "api → 10.0.0.5:5432",
                "api → [::1]:5432",
                "api ← :80 from 10.0.0.5",
                "api → other:6379",
                "db → :5432",
            ]
        );
        // JSON: the field only on rows that have it.
        let json = serde_json::to_string(&rows).unwrap();
        assert!(json.contains("\"remote\":\"10.0.0.5\""), "{json}");
        assert_eq!(json.matches("\"remote\"").count(), 4, "{json}");
    }
}
