//! Network families: TCP connections, RTT, retransmits, resets, bytes and request latency.

use std::collections::BTreeMap;

use prometheus::proto::{Metric, MetricFamily, MetricType};
use ws1_probe_common::net::{BYTES_BOUNDS, REQUESTS_BOUNDS};

use super::{counter, family, gauge, histogram, scaled_histogram};
use crate::collectors::net::{EndpointStats, NetSnapshot, Remote, Side, add_counters};

/// Network metric families. `label` maps a service id to its exported label. Series are keyed
/// by service, side and port (the remote port of connections a service opened, the local port
/// of connections it accepted) and, for services opted in to it, the remote address (a
/// `remote` label); the other services' series have no `remote` label, to bound cardinality.
/// `peer` names the remote port of a service id's connections when it is a configured
/// dependency: client-side series to it carry `peer="<name>"`, the others no `peer` label, so
/// the label's values are the configured names only.
pub fn families<'a>(
    snap: &NetSnapshot,
    label: impl Fn(u32) -> &'a str,
    peer: impl Fn(u32, u16) -> Option<&'a str>,
    bounds_ns: &[u64],
) -> Vec<MetricFamily> {
    type Merged<'a> = (&'a str, Side, u16, Option<Remote>, Option<&'a str>);
    let mut merged: BTreeMap<Merged<'a>, EndpointStats> = BTreeMap::new();
    for ((service, side, port, remote), e) in &snap.endpoints {
        let named = match side {
            Side::Client => peer(*service, *port),
            Side::Server => None,
        };
        let m = merged
            .entry((label(*service), *side, *port, *remote, named))
            .or_default();
        add_counters(&mut m.counters, &e.counters);
        m.active += e.active;
        m.connect.add(&e.connect);
        m.rtt.add(&e.rtt);
        m.request.add(&e.request);
        m.lifetime.add(&e.lifetime);
        m.handshake.add(&e.handshake);
        m.bytes_sent.add(&e.bytes_sent);
        m.bytes_received.add(&e.bytes_received);
        m.connection_requests.add(&e.connection_requests);
    }
    let mut out: Vec<(&str, &str, MetricType, Vec<Metric>)> = vec![
        (
            "ws1_probe_tcp_connect_duration_seconds",
            "TCP connect latency, SYN_SENT to ESTABLISHED, per service and remote port.",
            MetricType::HISTOGRAM,
            vec![],
        ),
        (
            "ws1_probe_tcp_connect_failures_total",
            "TCP connects that closed before ESTABLISHED (refused, reset, timed out).",
            MetricType::COUNTER,
            vec![],
        ),
        (
            "ws1_probe_tcp_rtt_seconds",
            "Smoothed TCP round-trip time (the kernel's srtt), sampled at most every 100 ms per active socket.",
            MetricType::HISTOGRAM,
            vec![],
        ),
        (
            "ws1_probe_tcp_connection_duration_seconds",
            "Lifetime of TCP connections, ESTABLISHED to CLOSE.",
            MetricType::HISTOGRAM,
            vec![],
        ),
        (
            "ws1_probe_tcp_connections_total",
            "TCP connections established.",
            MetricType::COUNTER,
            vec![],
        ),
        (
            "ws1_probe_tcp_connections_active",
            "TCP connections open now.",
            MetricType::GAUGE,
            vec![],
        ),
        (
            "ws1_probe_tcp_retransmits_total",
            "TCP segments retransmitted.",
            MetricType::COUNTER,
            vec![],
        ),
        (
            "ws1_probe_tcp_resets_total",
            "TCP resets sent and received.",
            MetricType::COUNTER,
            vec![],
        ),
        (
            "ws1_probe_tcp_bytes_total",
            "Bytes the service sent and received on TCP sockets.",
            MetricType::COUNTER,
            vec![],
        ),
        (
            "ws1_probe_request_duration_seconds",
            "Request latency at the socket: server side first bytes received to first bytes sent back, client side bytes sent to first bytes received back.",
            MetricType::HISTOGRAM,
            vec![],
        ),
        (
            "ws1_probe_connection_requests_reused_total",
            "Requests on a connection that had already carried a request.",
            MetricType::COUNTER,
            vec![],
        ),
        (
            "ws1_probe_connection_reuse_ratio",
            "Requests on already-used connections divided by all requests.",
            MetricType::GAUGE,
            vec![],
        ),
        (
            "ws1_probe_tcp_accept_handshake_duration_seconds",
            "Accept-side TCP handshake: the kernel's SYN-ACK to ACK round trip of each accepted connection, per service and local port.",
            MetricType::HISTOGRAM,
            vec![],
        ),
        (
            "ws1_probe_tcp_connection_bytes",
            "Bytes a TCP connection sent or received over its lifetime, observed when it closes.",
            MetricType::HISTOGRAM,
            vec![],
        ),
        (
            "ws1_probe_connection_requests",
            "Requests a TCP connection carried after its handshake exchanges, observed when it closes: many for pooled clients, one transaction's worth for clients that connect per transaction.",
            MetricType::HISTOGRAM,
            vec![],
        ),
        (
            "ws1_probe_connection_handshake_exchanges_total",
            "Request/response exchanges at the start of connections counted as the protocol's handshake (a dependency's handshake_exchanges), not as requests.",
            MetricType::COUNTER,
            vec![],
        ),
        (
            "ws1_probe_connections_per_request",
            "TCP connections established divided by requests: near 0 for pooled clients, 1 for a connection per request.",
            MetricType::GAUGE,
            vec![],
        ),
    ];
    for ((service, side, port, remote, named), e) in &merged {
        let port = port.to_string();
        let remote = remote.map(|r| r.to_string());
        // service, side, port[, remote]; `no_side` for the families of one side only.
        let mut l = vec![
            ("service", *service),
            ("side", side.label()),
            ("port", port.as_str()),
        ];
        if let Some(r) = &remote {
            l.push(("remote", r.as_str()));
        }
        if let Some(p) = named {
            l.push(("peer", p));
        }
        let no_side: Vec<(&str, &str)> = l.iter().copied().filter(|(k, _)| *k != "side").collect();
        let dir = |d: &'static str| {
            let mut v = l.clone();
            v.push(("direction", d));
            v
        };
        let c = &e.counters;
        let mut push = |i: usize, m: Metric| out[i].3.push(m);
        if *side == Side::Client {
            if e.connect.count > 0 {
                push(0, histogram(&no_side, &e.connect, bounds_ns));
            }
            push(1, counter(&no_side, c.connect_failures as f64));
        }
        if e.rtt.count > 0 {
            push(2, histogram(&l, &e.rtt, bounds_ns));
        }
        if e.lifetime.count > 0 {
            push(3, histogram(&l, &e.lifetime, bounds_ns));
        }
        push(4, counter(&l, c.connections as f64));
        push(5, gauge(&l, e.active as f64));
        push(6, counter(&l, c.retransmits as f64));
        for (d, n) in [("sent", c.resets_sent), ("received", c.resets_received)] {
            push(7, counter(&dir(d), n as f64));
        }
        for (d, n) in [("sent", c.bytes_sent), ("received", c.bytes_received)] {
            push(8, counter(&dir(d), n as f64));
        }
        if e.request.count > 0 {
            push(9, histogram(&l, &e.request, bounds_ns));
        }
        push(10, counter(&l, c.reused_requests as f64));
        if let Some(ratio) = e.reuse_ratio() {
            push(11, gauge(&l, ratio));
        }
        if *side == Side::Server && e.handshake.count > 0 {
            push(12, histogram(&no_side, &e.handshake, bounds_ns));
        }
        for (d, h) in [("sent", &e.bytes_sent), ("received", &e.bytes_received)] {
            if h.count > 0 {
                push(13, scaled_histogram(&dir(d), h, &BYTES_BOUNDS, 1.0));
            }
        }
        if e.connection_requests.count > 0 {
            push(
                14,
                scaled_histogram(&l, &e.connection_requests, &REQUESTS_BOUNDS, 1.0),
            );
        }
        if named.is_some() || c.handshake_exchanges > 0 {
            push(15, counter(&l, c.handshake_exchanges as f64));
        }
        if let Some(ratio) = e.connections_per_request() {
            push(16, gauge(&l, ratio));
        }
    }
    out.into_iter()
        .map(|(name, help, kind, metrics)| family(name, help, kind, metrics))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::metrics::encode;
    use ws1_probe_common::hist::DEFAULT_EXPORT_BOUNDS_NS;

    #[test]
    fn renders_net_families_merged_by_label() {
        let b = &DEFAULT_EXPORT_BOUNDS_NS;
        let mut snap = NetSnapshot::default();
        for id in [1, 2] {
            let mut e = EndpointStats::default();
            e.counters.requests = 10;
            e.counters.reused_requests = 9;
            e.counters.connections = 1;
            e.counters.resets_received = id.into();
            e.active = 1;
            for _ in 0..10 {
                e.request.observe(b, 6_000_000);
            }
            e.connect.observe(b, 40_000);
            snap.endpoints.insert((id, Side::Client, 8080, None), e);
        }
        let mut server = EndpointStats::default();
        server.counters.bytes_received = 123;
        snap.endpoints.insert((1, Side::Server, 80, None), server);
        let text = encode(&families(&snap, |_| "api", |_, _| None, b));
        let want = [
            "ws1_probe_tcp_connect_duration_seconds_count{service=\"api\",port=\"8080\"} 2",
            "ws1_probe_request_duration_seconds_bucket{service=\"api\",side=\"client\",port=\"8080\",le=\"0.005\"} 0",
            "ws1_probe_request_duration_seconds_bucket{service=\"api\",side=\"client\",port=\"8080\",le=\"0.01\"} 20",
            "ws1_probe_connection_reuse_ratio{service=\"api\",side=\"client\",port=\"8080\"} 0.9",
            "ws1_probe_tcp_connections_active{service=\"api\",side=\"client\",port=\"8080\"} 2",
            "ws1_probe_tcp_resets_total{service=\"api\",side=\"client\",port=\"8080\",direction=\"received\"} 3",
            "ws1_probe_tcp_bytes_total{service=\"api\",side=\"server\",port=\"80\",direction=\"received\"} 123",
        ];
        for line in want {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // No requests on the server endpoint: no ratio, no connect histogram for servers.
        assert!(!text.contains("ws1_probe_connection_reuse_ratio{service=\"api\",side=\"server\""));
        assert!(!text.contains("connect_duration_seconds_count{service=\"api\",port=\"80\"}"));
    }

    #[test]
    fn peer_label_on_client_series_of_named_dependencies_only() {
        let b = &DEFAULT_EXPORT_BOUNDS_NS;
        let mut snap = NetSnapshot::default();
        let client = |conns: u64, requests: u64, reused: u64, handshakes: u64| {
            let mut e = EndpointStats::default();
            e.counters.connections = conns;
            e.counters.requests = requests;
            e.counters.reused_requests = reused;
            e.counters.handshake_exchanges = handshakes;
            for _ in 0..requests {
                e.request.observe(b, 300_000);
            }
            for _ in 0..conns {
                e.connection_requests
                    .observe(&REQUESTS_BOUNDS, requests / conns);
            }
            e
        };
        // Two services' clients of port 5432 (one label in the end), one of port 6379, and
        // a server on 5432 (never a peer).
        snap.endpoints
            .insert((1, Side::Client, 5432, None), client(10, 10, 0, 20));
        snap.endpoints
            .insert((2, Side::Client, 5432, None), client(1, 100, 99, 2));
        snap.endpoints
            .insert((1, Side::Client, 6379, None), client(1, 4, 3, 0));
        snap.endpoints
            .insert((1, Side::Server, 5432, None), client(1, 1, 0, 0));
        let peer = |_: u32, port: u16| (port == 5432).then_some("postgres");
        let text = encode(&families(&snap, |_| "api", peer, b));
        let pg = "service=\"api\",side=\"client\",port=\"5432\",peer=\"postgres\"";
        let want = [
            format!("ws1_probe_request_duration_seconds_count{{{pg}}} 110"),
            format!("ws1_probe_connection_handshake_exchanges_total{{{pg}}} 22"),
            format!("ws1_probe_connection_reuse_ratio{{{pg}}} 0.9"),
            format!("ws1_probe_connections_per_request{{{pg}}} 0.1"),
            format!("ws1_probe_connection_requests_bucket{{{pg},le=\"1\"}} 10"),
            format!("ws1_probe_connection_requests_bucket{{{pg},le=\"50\"}} 10"),
            format!("ws1_probe_connection_requests_bucket{{{pg},le=\"100\"}} 11"),
            format!("ws1_probe_connection_requests_sum{{{pg}}} 110"),
            "ws1_probe_connection_reuse_ratio{service=\"api\",side=\"client\",port=\"6379\"} 0.75"
                .to_owned(),
            "ws1_probe_connections_per_request{service=\"api\",side=\"server\",port=\"5432\"} 1"
                .to_owned(),
        ];
        for line in &want {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Only configured names: no peer on other ports or on the server side, and no
        // handshake counter where no dependency is named and none was counted.
        for l in text.lines().filter(|l| l.contains("peer=")) {
            assert!(
                l.contains("peer=\"postgres\",") || l.contains("peer=\"postgres\"}"),
                "{l}"
            );
            assert!(
                l.contains("port=\"5432\"") && !l.contains("side=\"server\""),
                "{l}"
            );
        }
        assert!(
            !text.contains(
                "handshake_exchanges_total{service=\"api\",side=\"client\",port=\"6379\""
            )
        );
    }

    #[test]
    fn remote_label_only_on_series_of_opted_in_services() {
        let b = &DEFAULT_EXPORT_BOUNDS_NS;
        let mut octets = [0u8; 16];
        octets[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 5]);
        let v4 = Remote::from_octets(octets);
        assert_eq!(v4.to_string(), "10.0.0.5");
        let v6 = Remote::from_octets("2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(v6.to_string(), "2001:db8::7");
        let mut snap = NetSnapshot::default();
        for (remote, conns) in [(v4, 3u64), (v6, 2), (Remote::Other, 1)] {
            let mut e = EndpointStats::default();
            e.counters.connections = conns;
            e.counters.bytes_sent = 8 * conns;
            e.connect.observe(b, 40_000);
            snap.endpoints
                .insert((1, Side::Client, 5432, Some(remote)), e);
        }
        let mut plain = EndpointStats::default();
        plain.counters.connections = 4;
        plain.connect.observe(b, 40_000);
        snap.endpoints.insert((2, Side::Client, 5432, None), plain);
        let names = ["other", "api", "db"];
        let text = encode(&families(&snap, |id| names[id as usize], |_, _| None, b));
        let want = [
            "ws1_probe_tcp_connections_total{service=\"api\",side=\"client\",port=\"5432\",remote=\"10.0.0.5\"} 3",
            "ws1_probe_tcp_connections_total{service=\"api\",side=\"client\",port=\"5432\",remote=\"2001:db8::7\"} 2",
            "ws1_probe_tcp_connections_total{service=\"api\",side=\"client\",port=\"5432\",remote=\"other\"} 1",
            "ws1_probe_tcp_connect_duration_seconds_count{service=\"api\",port=\"5432\",remote=\"10.0.0.5\"} 1",
            "ws1_probe_tcp_bytes_total{service=\"api\",side=\"client\",port=\"5432\",remote=\"10.0.0.5\",direction=\"sent\"} 24",
            // The service without the option keeps today's label sets.
            "ws1_probe_tcp_connections_total{service=\"db\",side=\"client\",port=\"5432\"} 4",
            "ws1_probe_tcp_connect_duration_seconds_count{service=\"db\",port=\"5432\"} 1",
            "ws1_probe_tcp_bytes_total{service=\"db\",side=\"client\",port=\"5432\",direction=\"sent\"} 0",
        ];
        for line in want {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let db: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("service=\"db\""))
            .collect();
        assert!(!db.is_empty() && db.iter().all(|l| !l.contains("remote=")));
    }
}
