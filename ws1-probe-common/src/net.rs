//! Shared types of the network probe (TCP connections, RTT, retransmits, resets, request
//! latency and connection reuse), built on tracepoints (`tp_btf` where the kernel allows).
//!
//! Sockets are owned by the service of the process that created them in process context: a
//! `connect()` caller (client side, keyed by remote port) or a targeted process listening on
//! the local port (server side, keyed by local port). The kernel remembers that owner per socket
//! from the connect/accept until the socket reaches TCP_CLOSE, in the socket's local storage
//! (`NET_SK`, the `tp_btf` programs) or in `NET_SOCKS` (keyed by the `struct sock` address, the
//! tracepoint fallback), so hooks that fire in softirq context can attribute their events.
//!
//! Services opted in to remote addresses (`remote_addresses = true`, `--remote-addresses`) also
//! split their series by the peer's address. The address is read once per socket, when it is
//! created, and interned as a small id (`NET_REMOTES`), so keys stay 12 bytes and the per-event
//! work is the same for every socket.

/// Which end of a connection the observed process is.
pub const SIDE_CLIENT: u8 = 0;
/// The observed process accepted the connection (its listening port is the key's port).
pub const SIDE_SERVER: u8 = 1;

/// Histogram kinds in `NetHistKey::kind`.
pub const KIND_CONNECT: u8 = 0;
/// Smoothed RTT sampled from `tcp:tcp_probe`.
pub const KIND_RTT: u8 = 1;
/// Request latency (see the per-socket state machine in the kernel module).
pub const KIND_REQUEST: u8 = 2;
/// Connection lifetime, ESTABLISHED → CLOSE.
pub const KIND_LIFETIME: u8 = 3;
/// Bytes a connection sent, observed when it closes.
pub const KIND_BYTES_SENT: u8 = 4;
/// Bytes a connection received, observed when it closes.
pub const KIND_BYTES_RECEIVED: u8 = 5;
/// Accept-side handshake: the round trip from the SYN-ACK to the client's ACK, as the kernel
/// measured it into `tcp_sock.srtt_us` when the accepted socket became ESTABLISHED.
pub const KIND_HANDSHAKE: u8 = 6;
/// Requests a connection carried after its handshake exchanges (see
/// [`SockState::handshake`]), observed when it closes: pooled clients show many per
/// connection, clients that connect per request one (or the statements of one transaction).
pub const KIND_CONNECTION_REQUESTS: u8 = 7;

/// `le` bounds of the requests-per-connection histogram. 0 is a bound of its own: connections
/// that closed without a request after their handshake (health checks, a client's set-up
/// connection) are told apart from those that carried one.
pub const REQUESTS_BOUNDS: [u64; 14] = [
    0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1_000, 10_000, 100_000,
];

/// Capacity of `NET_DEPS` (configured dependencies with handshake exchanges).
pub const DEP_ENTRIES: u32 = 256;
/// Service id of a dependency configured at the top level, which applies to every service.
pub const DEP_ANY_SERVICE: u32 = u32::MAX;

/// Key of `NET_DEPS`: a service id (or [`DEP_ANY_SERVICE`]) and a remote port.
#[inline(always)]
pub const fn dep_key(service: u32, port: u16) -> u64 {
    ((service as u64) << 16) | port as u64
}

/// `le` bounds of the bytes-per-connection histograms: 64 B to 1 GiB in ×4 steps. Powers of
/// two, so they are also edges of the fine buckets.
pub const BYTES_BOUNDS: [u64; 13] = [
    64,
    256,
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
    256 << 20,
    1 << 30,
];

/// Request state of a socket: no request in flight.
pub const PHASE_IDLE: u8 = 0;
/// A request is in flight (client: sent, no reply yet; server: received, no reply sent yet).
pub const PHASE_PENDING: u8 = 1;

/// TCP states from include/net/tcp_states.h (stable kernel ABI, printed by the tracepoint).
pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_SYN_SENT: i32 = 2;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_CLOSE: i32 = 7;
pub const TCP_LISTEN: i32 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;
/// `MSG_PEEK`: a peek does not consume data, so it is not a request boundary.
pub const MSG_PEEK: i32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// Offsets in `struct sock_common`, the start of every `struct sock`, that the `tp_btf` state
/// change reads (the classic tracepoint prints them as fields). They sit in anonymous unions
/// that BTF member lookup by name does not reach, and have not moved since Linux 2.6:
/// `skc_daddr` (IPv4 peer, network order), `skc_dport` (network order), `skc_num` (local port,
/// host order), `skc_family`.
pub const SKC_DADDR: u32 = 0;
pub const SKC_DPORT: u32 = 12;
pub const SKC_NUM: u32 = 14;
pub const SKC_FAMILY: u32 = 16;

/// RTT is sampled at most once per socket per this many nanoseconds, and a socket's byte counts
/// reach `NET_COUNTERS` at least this often while it sends or receives (besides at every completed
/// request and at close).
pub const RTT_SAMPLE_NS: u64 = 100_000_000;

/// Capacity of `NET_SOCKS` (observed TCP sockets alive at once).
pub const SOCK_ENTRIES: u32 = 65_536;
/// Capacity of `NET_LISTEN` (listening ports of targeted processes).
pub const LISTEN_ENTRIES: u32 = 4_096;
/// Endpoints (service × side × port × remote) with a slot of their own: the capacity of
/// `NET_SLOTS` and the length of the arrays indexed by slot, `NET_COUNTERS` (per CPU, 96 bytes
/// per slot) and `NET_REQUEST_HIST` (shared, 4.6 KB per slot: 4.7 MB). A socket's slot is found
/// once, when the socket is created, so the per-request work indexes arrays instead of hashing
/// keys. Slots are never given back, so every exported series stays monotonic; when they run
/// out, new endpoints are not observed and `net_stats_map_full` counts them.
pub const SLOT_ENTRIES: u32 = 1_024;
/// Capacity of `NET_HIST` (service × side × port × kind, every kind but requests, which have
/// their own array); preallocated and shared by all CPUs, so this is 2,048 × 4.6 KB = 9.4 MB of
/// kernel memory whatever the number of CPUs.
pub const NET_HIST_ENTRIES: u32 = 2_048;

/// `remote` of sockets whose service does not export remote addresses.
pub const REMOTE_NONE: u32 = 0;
/// `remote` of an address that got no id of its own: `NET_REMOTES` was full (the address
/// budget is spent) or its id was taken by another address. Exported as `remote="other"`.
pub const REMOTE_OTHER: u32 = 1;
/// Smallest id [`RemoteAddr::id`] hands out.
pub const REMOTE_FIRST_ID: u32 = 2;
/// Capacity of `NET_REMOTES`: distinct remote addresses exported over the agent's lifetime, for
/// all opted-in services together; later ones count as `remote="other"`. Every address can
/// take up to six histograms per endpoint in `NET_HIST` (2,048), so this keeps remote
/// addresses from crowding out the other services.
pub const REMOTE_ENTRIES: u32 = 128;
/// Slots of `NET_REMOTE_SERVICES` (service id → opted in): service ids stay below the
/// targeting's cap on names.
pub const REMOTE_SERVICE_SLOTS: u32 = crate::targets::COMM_ENTRIES;

/// A remote address as `sock:inet_sock_set_state` stores it in `daddr_v6`: IPv6, or IPv4 as
/// an IPv4-mapped address (`::ffff:a.b.c.d`). The 16 network-order bytes are kept as two
/// native-endian words, so that the kernel compares them with two loads (a byte array would
/// compile to a `memcmp` call, which BPF does not have).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteAddr {
    pub words: [u64; 2],
}

impl RemoteAddr {
    pub fn from_octets(octets: [u8; 16]) -> Self {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        let mut i = 0;
        while i < 8 {
            lo[i] = octets[i];
            hi[i] = octets[i + 8];
            i += 1;
        }
        Self {
            words: [u64::from_ne_bytes(lo), u64::from_ne_bytes(hi)],
        }
    }

    pub fn octets(&self) -> [u8; 16] {
        let (lo, hi) = (self.words[0].to_ne_bytes(), self.words[1].to_ne_bytes());
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 8 {
            out[i] = lo[i];
            out[i + 8] = hi[i];
            i += 1;
        }
        out
    }

    /// Whether two addresses are equal, as two word compares.
    #[inline(always)]
    pub fn same(&self, other: &Self) -> bool {
        self.words[0] == other.words[0] && self.words[1] == other.words[1]
    }

    /// The address's id in `NET_REMOTES` (its key): a multiplicative hash, at least
    /// [`REMOTE_FIRST_ID`]. Two addresses with one id are told apart by the value stored under
    /// it; the second one counts as [`REMOTE_OTHER`], never under the other's label.
    #[inline(always)]
    pub fn id(&self) -> u32 {
        let mixed = (self.words[0] ^ self.words[1].rotate_left(32))
            .wrapping_add(self.words[1])
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let id = (mixed >> 32) as u32;
        if id < REMOTE_FIRST_ID {
            id + REMOTE_FIRST_ID
        } else {
            id
        }
    }
}

/// Per-socket state in `NET_SOCKS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockState {
    pub service: u32,
    /// Remote port (client side) or local port (server side).
    pub port: u16,
    pub side: u8,
    /// `PHASE_*`.
    pub phase: u8,
    /// Id of the peer's address in `NET_REMOTES`, `REMOTE_OTHER`, or `REMOTE_NONE` when the
    /// service does not export remote addresses.
    pub remote: u32,
    /// The endpoint's index in `NET_COUNTERS` and `NET_REQUEST_HIST` (see `SLOT_ENTRIES`).
    pub slot: u32,
    /// The connection's first this many exchanges are its protocol's handshake (a configured
    /// dependency's `handshake_exchanges`, e.g. PostgreSQL's SSL request and start-up): they
    /// are counted in `NetCounters::handshake_exchanges`, not as requests, so neither the
    /// request latency nor the reuse ratio sees them. 0 for every other socket.
    pub handshake: u32,
    pub _pad: u32,
    /// Client: SYN_SENT time until established; then the start of the pending request.
    pub ts_ns: u64,
    /// ESTABLISHED time (0 until then).
    pub established_ns: u64,
    /// Time of the last RTT sample.
    pub rtt_ns: u64,
    /// Time `NET_COUNTERS` last got this socket's byte counts (0: never).
    pub flushed_ns: u64,
    /// Requests completed on this connection.
    pub requests: u64,
    /// Bytes sent and received on this connection so far.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The part of `bytes_sent`/`bytes_received` already added to `NET_COUNTERS`: the send and
    /// receive hooks keep counting in the socket's own entry and add the difference to the
    /// per-CPU counters only when a request completes, every `RTT_SAMPLE_NS` and at close,
    /// which saves a map lookup on every other call.
    pub flushed_sent: u64,
    pub flushed_received: u64,
}

/// Key of `NET_SLOTS` (an endpoint) and, with `kind`, of `NET_HIST`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetKey {
    pub service: u32,
    pub port: u16,
    pub side: u8,
    /// `KIND_*` in `NET_HIST`; 0 in `NET_SLOTS`.
    pub kind: u8,
    /// `SockState::remote` of the socket the event belongs to.
    pub remote: u32,
}

/// Per-CPU counters of one endpoint (service, side, port, remote), at its slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Connections that reached ESTABLISHED.
    pub connections: u64,
    /// Client connects that went SYN_SENT → CLOSE (refused, reset or timed out).
    pub connect_failures: u64,
    /// Connections that closed after being established.
    pub closed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub retransmits: u64,
    /// Completed requests.
    pub requests: u64,
    /// Completed requests that were not the first on their connection (after its handshake).
    pub reused_requests: u64,
    /// Completed exchanges counted as a connection's handshake (see `SockState::handshake`),
    /// not as requests.
    pub handshake_exchanges: u64,
    /// Connections open: +1 at ESTABLISHED, -1 (wrapping) at CLOSE, on whichever CPU, so only
    /// the sum over CPUs is meaningful (two's complement).
    pub active: u64,
}

/// Tracepoint field offsets of the network hooks, read from tracefs at start-up. `u32::MAX`
/// marks a hook whose format could not be read; the agent does not attach it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetOffsets {
    /// `sock:inet_sock_set_state`.
    pub state_skaddr: u32,
    pub state_oldstate: u32,
    pub state_newstate: u32,
    pub state_sport: u32,
    pub state_dport: u32,
    pub state_protocol: u32,
    /// `daddr_v6` (16 bytes: the peer, IPv4 as IPv4-mapped); `u32::MAX` when absent, and then
    /// remote addresses are not exported.
    pub state_daddr_v6: u32,
    /// `sock:sock_send_length`.
    pub send_sk: u32,
    pub send_ret: u32,
    pub send_flags: u32,
    /// `sock:sock_recv_length`.
    pub recv_sk: u32,
    pub recv_ret: u32,
    pub recv_flags: u32,
    /// `tcp:tcp_probe`.
    pub probe_skaddr: u32,
    pub probe_srtt: u32,
    /// `tcp:tcp_retransmit_skb`.
    pub retransmit_skaddr: u32,
    /// `tcp:tcp_retransmit_skb` → `err` (recent kernels); `u32::MAX` when absent, and then every
    /// attempt counts. Attempts with an error (e.g. EBUSY: the original is still queued in the
    /// host) send nothing and are not counted, as the kernel's `RetransSegs` does not count them.
    pub retransmit_err: u32,
    /// `tcp:tcp_retransmit_skb` → `skbaddr`, the retransmitted `struct sk_buff`, whose
    /// segment count ([`NetOffsets::skb_gso_segs`]) is what the event adds; `u32::MAX` when
    /// absent, and then each event counts one segment.
    pub retransmit_skbaddr: u32,
    /// `tcp:tcp_send_reset`.
    pub send_reset_skaddr: u32,
    /// `tcp:tcp_receive_reset`.
    pub receive_reset_skaddr: u32,
    /// Byte offset of `srtt_us` in `struct tcp_sock`, from the kernel's BTF (no tracepoint
    /// carries it at the SYN_RECV → ESTABLISHED change); `u32::MAX` when unknown, and then
    /// accept-side handshakes are not measured.
    pub tcp_sock_srtt_us: u32,
    /// Byte offset of `sk_protocol` (u16) in `struct sock`, from BTF: the `tp_btf` state change
    /// tells TCP from other protocols with it; `u32::MAX` when unknown, and then the agent
    /// does not use the `tp_btf` programs.
    pub sock_protocol: u32,
    /// Byte offset of `skc_v6_daddr` in `struct sock_common`, from BTF (the IPv6 peer for the
    /// `tp_btf` state change); `u32::MAX` when unknown, and then IPv6 peers of services that
    /// export remote addresses count as `remote="other"` on that path.
    pub sock_v6_daddr: u32,
    /// Byte offset of `sk_bpf_storage` in `struct sock`, from BTF: the `tp_btf` send/receive
    /// hooks read it directly and return at once when it is NULL (the socket has no local
    /// storage at all, so it is not observed), which spares the sockets of every other process
    /// the `bpf_sk_storage_get` call; `u32::MAX` when unknown (then the helper always runs).
    pub sock_bpf_storage: u32,
    /// Byte offset of `tcp_gso_segs` (u16) from the start of a `struct sk_buff` on TCP's write
    /// queue: `sk_buff.cb` plus `tcp_skb_cb.tcp_gso_segs`, from BTF. It is the skb's segment
    /// count (`tcp_skb_pcount`), which the kernel adds to `RetransSegs` for each retransmitted
    /// skb, while `tcp_retransmit_skb` fires once per skb; `u32::MAX` when unknown, and then
    /// each retransmitted skb counts one segment.
    pub skb_gso_segs: u32,
}

impl NetOffsets {
    /// Offsets on Linux 6.x, the starting point that tracefs overrides field by field.
    pub const FALLBACK: Self = Self {
        state_skaddr: 8,
        state_oldstate: 16,
        state_newstate: 20,
        state_sport: 24,
        state_dport: 26,
        state_protocol: 30,
        state_daddr_v6: 56,
        send_sk: 8,
        send_ret: 20,
        send_flags: 24,
        recv_sk: 8,
        recv_ret: 20,
        recv_flags: 24,
        probe_skaddr: 128,
        probe_srtt: 100,
        retransmit_skaddr: 16,
        retransmit_err: 76,
        retransmit_skbaddr: 8,
        send_reset_skaddr: 16,
        receive_reset_skaddr: 8,
        tcp_sock_srtt_us: u32::MAX,
        sock_protocol: u32::MAX,
        sock_v6_daddr: u32::MAX,
        sock_bpf_storage: u32::MAX,
        skb_gso_segs: u32::MAX,
    };
}

#[cfg(feature = "user")]
crate::impl_pod!(SockState, NetKey, NetCounters, NetOffsets, RemoteAddr);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_types_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<NetKey>(), 4 + 2 + 1 + 1 + 4);
        assert_eq!(
            size_of::<SockState>(),
            4 + 2 + 1 + 1 + 4 + 4 + 4 + 4 + 9 * 8
        );
        assert_eq!(size_of::<RemoteAddr>(), 16);
        assert_eq!(size_of::<NetOffsets>(), 25 * 4);
    }

    #[test]
    fn remote_addresses_round_trip_and_get_distinct_ids() {
        let mapped = |d: u8| {
            let mut o = [0u8; 16];
            o[10] = 0xff;
            o[11] = 0xff;
            o[12..].copy_from_slice(&[10, 0, 0, d]);
            RemoteAddr::from_octets(o)
        };
        let a = mapped(5);
        assert_eq!(a.octets()[12..], [10, 0, 0, 5]);
        assert!(a.same(&mapped(5)) && !a.same(&mapped(6)));
        // Every IPv4 address of a /16 and a few IPv6 ones: ids are never the reserved values,
        // and (for this sample) never shared.
        let mut ids = [0u32; 256 * 256 + 3];
        let mut n = 0;
        for c in 0..=255u8 {
            for d in 0..=255u8 {
                let mut o = [0u8; 16];
                o[10] = 0xff;
                o[11] = 0xff;
                o[12..].copy_from_slice(&[10, 0, c, d]);
                ids[n] = RemoteAddr::from_octets(o).id();
                n += 1;
            }
        }
        for last in [1u8, 2, 3] {
            let mut o = [0u8; 16];
            o[15] = last;
            ids[n] = RemoteAddr::from_octets(o).id();
            n += 1;
        }
        assert!(ids.iter().all(|id| *id >= REMOTE_FIRST_ID));
        ids.sort_unstable();
        let shared = ids.windows(2).filter(|w| w[0] == w[1]).count();
        assert_eq!(shared, 0);
    }
}
