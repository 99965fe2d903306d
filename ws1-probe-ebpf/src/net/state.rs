//! Connection tracking: which sockets are observed and for whom (decided when a socket is
//! created by `connect()` or accepted on a port a targeted process listens on), the endpoint
//! slot each one carries, and what each TCP state change records (connect and handshake
//! latency, connections, lifetime, bytes per connection, failed connects).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, Queue},
    programs::{BtfTracePointContext, TracePointContext},
};
use ws1_probe_common::{
    net::{
        AF_INET6, DEP_ANY_SERVICE, DEP_ENTRIES, IPPROTO_TCP, KIND_BYTES_RECEIVED, KIND_BYTES_SENT,
        KIND_CONNECT, KIND_CONNECTION_REQUESTS, KIND_HANDSHAKE, KIND_LIFETIME, LISTEN_ENTRIES,
        NetKey, PHASE_IDLE, REMOTE_ENTRIES, REMOTE_NONE, REMOTE_OTHER, REMOTE_SERVICE_SLOTS,
        RemoteAddr, SIDE_CLIENT, SIDE_SERVER, SKC_DADDR, SKC_DPORT, SKC_FAMILY, SKC_NUM,
        SLOT_ENTRIES, SockState, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_RECV,
        TCP_SYN_SENT, dep_key,
    },
    targets::DropReason,
};

use super::{
    NET_BYTES_BOUNDS, NET_REQUESTS_BOUNDS, counters, current_service, key, now_ns, offsets,
    read_kernel, record, record_in, srtt_ns,
    store::{Hashed, Local, Store},
};
use crate::targets::count_drop;

/// Local port → service of a targeted process listening on it.
#[map]
static NET_LISTEN: HashMap<u32, u32> = HashMap::with_max_entries(LISTEN_ENTRIES, 0);

/// Service id → non-zero when its series split by remote address; filled by the agent at
/// start. An array, so the check at socket creation is a bounds check and a load.
#[map]
static NET_REMOTE_SERVICES: Array<u32> = Array::with_max_entries(REMOTE_SERVICE_SLOTS, 0);

/// Remote address id → address (see `RemoteAddr::id`). Entries are never removed, so an id
/// keeps its address for the agent's lifetime and every exported series stays monotonic; when
/// the map is full, new addresses count as `REMOTE_OTHER`.
#[map]
static NET_REMOTES: HashMap<u32, RemoteAddr> = HashMap::with_max_entries(REMOTE_ENTRIES, 0);

/// `dep_key(service or DEP_ANY_SERVICE, remote port)` → handshake exchanges of a configured
/// dependency (only those with a handshake); filled by the agent before the hooks attach and
/// read once per client socket, at connect.
#[map]
static NET_DEPS: HashMap<u64, u32> = HashMap::with_max_entries(DEP_ENTRIES, 0);

/// Handshake exchanges of connections `service` opens to `port`: the service's own dependency
/// on that port, else one configured for every service, else 0.
#[inline(always)]
fn handshake_of(service: u32, port: u16) -> u32 {
    if let Some(n) = NET_DEPS.get_ptr(&dep_key(service, port)) {
        // SAFETY: pointer from a successful lookup.
        return unsafe { *n };
    }
    match NET_DEPS.get_ptr(&dep_key(DEP_ANY_SERVICE, port)) {
        // SAFETY: as above.
        Some(n) => unsafe { *n },
        None => 0,
    }
}

/// Endpoint (service, side, port, remote; kind 0) → its slot in `NET_COUNTERS` and
/// `NET_REQUEST_HIST`. Looked up once per socket, when it is created; entries are never removed.
#[map]
static NET_SLOTS: HashMap<NetKey, u32> = HashMap::with_max_entries(SLOT_ENTRIES, 0);

/// Slots not handed out yet; the agent fills it with `0..SLOT_ENTRIES` before it attaches the
/// hooks. A pop is atomic, so two CPUs creating one endpoint at once never share a slot by
/// mistake: the one whose insert loses gives its slot back.
#[map]
static NET_FREE_SLOTS: Queue<u32> = Queue::with_max_entries(SLOT_ENTRIES, 0);

/// Per CPU: the last state change `inet_sock_set_state_btf` began, as (socket, old state << 32
/// | new state).
///
/// The kernel runs a tracing program at most once per CPU at a time and skips (counts in the
/// program's `recursion_misses`) a run that would nest in its own. State changes nest: the
/// helpers that create socket storage or insert into a hash re-enable interrupts, a pending
/// interrupt then runs softirqs (loopback packets, timers) on top of the program, and those
/// change other sockets' states. Measured: 596 of about 200,000 state changes of 40,000
/// loopback connections were skipped, leaving 393 connections "active" forever. So a second
/// program on the same tracepoint, attached after the first and so run after it for every
/// state change, takes the state changes the first did not begin. A flag the first program
/// sets and clears would not do: between its last instruction and the kernel's end of the run
/// an interrupt still finds the first program busy.
#[map]
static NET_STATE_LAST: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The slot of an endpoint (`key.kind` 0), handed out on first use; `None` when every slot is
/// taken (counted as a drop).
#[inline(always)]
fn slot_of(key: &NetKey) -> Option<u32> {
    if let Some(slot) = NET_SLOTS.get_ptr(key) {
        // SAFETY: pointer from a successful lookup; entries are never removed.
        return Some(unsafe { *slot });
    }
    let Ok(Some(slot)) = NET_FREE_SLOTS.pop() else {
        count_drop(DropReason::NetStatsFull);
        return None;
    };
    if NET_SLOTS.insert(key, slot, BPF_NOEXIST as u64).is_ok() {
        return Some(slot);
    }
    // Another CPU gave this endpoint a slot meanwhile: use that one, give this one back.
    let _ = NET_FREE_SLOTS.push(slot, 0);
    // SAFETY: as above.
    NET_SLOTS.get_ptr(key).map(|slot| unsafe { *slot })
}

/// The remote address id of a socket being created by a state change, for a service that
/// exports remote addresses (`read` gives the peer's address); `REMOTE_NONE` for the others,
/// which pay one array lookup here and nothing later.
#[inline(always)]
fn remote_of(service: u32, read: impl FnOnce() -> Option<RemoteAddr>) -> u32 {
    match NET_REMOTE_SERVICES.get(service) {
        Some(&on) if on != 0 => {}
        _ => return REMOTE_NONE,
    }
    let Some(addr) = read() else {
        return REMOTE_OTHER;
    };
    let id = addr.id();
    if let Some(known) = NET_REMOTES.get_ptr(id) {
        // SAFETY: pointer from a successful lookup; entries are never removed.
        return if unsafe { (*known).same(&addr) } {
            id
        } else {
            count_drop(DropReason::NetRemoteOther);
            REMOTE_OTHER
        };
    }
    if NET_REMOTES.insert(id, addr, BPF_NOEXIST as u64).is_ok() {
        return id;
    }
    // Full, or another CPU stored this id meanwhile (maybe for this very address).
    match NET_REMOTES.get_ptr(id) {
        // SAFETY: as above.
        Some(known) if unsafe { (*known).same(&addr) } => id,
        _ => {
            count_drop(DropReason::NetRemoteOther);
            REMOTE_OTHER
        }
    }
}

/// Starts observing a socket of `endpoint` (`kind` 0), created at `now`, whose first
/// `handshake` exchanges are its protocol's handshake.
#[inline(always)]
fn track(store: &impl Store, endpoint: NetKey, now: u64, handshake: u32) {
    let Some(slot) = slot_of(&endpoint) else {
        return;
    };
    store.create(&SockState {
        service: endpoint.service,
        port: endpoint.port,
        side: endpoint.side,
        phase: PHASE_IDLE,
        remote: endpoint.remote,
        slot,
        handshake,
        _pad: 0,
        ts_ns: now,
        established_ns: 0,
        rtt_ns: 0,
        flushed_ns: 0,
        requests: 0,
        bytes_sent: 0,
        bytes_received: 0,
        flushed_sent: 0,
        flushed_received: 0,
    });
}

/// `sock:inet_sock_set_state` as a classic tracepoint: fields read through tracefs offsets,
/// state in `NET_SOCKS`.
pub fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<u32, i64> {
    let off = offsets();
    // SAFETY: the offsets were read from this tracepoint's format file.
    let (protocol, sk, old, new) = unsafe {
        (
            ctx.read_at::<u16>(off.state_protocol as usize)?,
            ctx.read_at::<u64>(off.state_skaddr as usize)?,
            ctx.read_at::<i32>(off.state_oldstate as usize)?,
            ctx.read_at::<i32>(off.state_newstate as usize)?,
        )
    };
    if protocol != IPPROTO_TCP {
        return Ok(0);
    }
    // SAFETY: as above.
    let (sport, dport) = unsafe {
        (
            ctx.read_at::<u16>(off.state_sport as usize)?,
            ctx.read_at::<u16>(off.state_dport as usize)?,
        )
    };
    let daddr = || {
        if off.state_daddr_v6 == u32::MAX {
            return None;
        }
        // SAFETY: the offset was read from this tracepoint's format file (16 bytes:
        // `daddr_v6`, the peer, IPv4 as IPv4-mapped).
        unsafe { ctx.read_at::<RemoteAddr>(off.state_daddr_v6 as usize) }.ok()
    };
    state_change(&Hashed(sk), old, new, sport, dport, daddr);
    Ok(0)
}

/// Which of the two `tp_btf` programs on `inet_sock_set_state` runs (see `NET_STATE_LAST`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum StateRun {
    /// `inet_sock_set_state_btf`: every state change.
    First,
    /// `inet_sock_set_state_btf_nested`: only a state change the first program did not
    /// begin, because it interrupted that program on this CPU.
    Nested,
}

/// The same tracepoint as `tp_btf`, by either of its two programs (see `NET_STATE_LAST`).
pub fn try_inet_sock_set_state_btf(ctx: &BtfTracePointContext, run: StateRun) -> Result<u32, i64> {
    let Some(last) = NET_STATE_LAST.get_ptr_mut(0) else {
        return Ok(0);
    };
    let sk: u64 = ctx.arg(0);
    let states = (u64::from(ctx.arg::<u32>(1)) << 32) | u64::from(ctx.arg::<u32>(2));
    // SAFETY: this CPU's value; only these two programs touch it, and the kernel does not run
    // one of them twice at once on a CPU.
    unsafe {
        if run == StateRun::Nested {
            if (*last)[0] == sk && (*last)[1] == states {
                // The first program took this state change.
                return Ok(0);
            }
        } else {
            *last = [sk, states];
        }
    }
    state_change_btf(ctx)
}

/// One state change read from the `tp_btf` arguments `(const struct sock *sk, int oldstate,
/// int newstate)`: the fields the classic tracepoint prints are read from the socket, and the
/// state lives in the socket's local storage.
#[inline(always)]
fn state_change_btf(ctx: &BtfTracePointContext) -> Result<u32, i64> {
    let sk: *mut c_void = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let at = sk as u64;
    let off = offsets();
    if read_kernel::<u16>(at, off.sock_protocol) != Some(IPPROTO_TCP) {
        return Ok(0);
    }
    let sport = read_kernel::<u16>(at, SKC_NUM).ok_or(1i64)?;
    let dport = u16::from_be(read_kernel::<u16>(at, SKC_DPORT).ok_or(1i64)?);
    let daddr = || {
        // The tracepoint's `daddr_v6`: the IPv6 peer, or the IPv4 one as IPv4-mapped.
        if read_kernel::<u16>(at, SKC_FAMILY)? == AF_INET6 {
            if off.sock_v6_daddr == u32::MAX {
                return None;
            }
            return read_kernel::<RemoteAddr>(at, off.sock_v6_daddr);
        }
        let v4 = read_kernel::<u32>(at, SKC_DADDR)?.to_ne_bytes();
        Some(RemoteAddr::from_octets([
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
        ]))
    };
    state_change(&Local(sk), old, new, sport, dport, daddr);
    Ok(0)
}

/// Connection tracking of one TCP state change, whichever program read it: `sport`/`dport`
/// are the local and remote ports in host order.
#[inline(always)]
fn state_change(
    store: &impl Store,
    old: i32,
    new: i32,
    sport: u16,
    dport: u16,
    daddr: impl FnOnce() -> Option<RemoteAddr>,
) {
    let now = now_ns();
    if new == TCP_SYN_SENT {
        // connect(): runs in the caller, so the current process owns the socket.
        let Some(service) = current_service() else {
            return;
        };
        let endpoint = NetKey {
            service,
            port: dport,
            side: SIDE_CLIENT,
            kind: 0,
            remote: remote_of(service, daddr),
        };
        track(store, endpoint, now, handshake_of(service, dport));
        return;
    }
    if new == TCP_LISTEN {
        // listen(): runs in the caller.
        let Some(service) = current_service() else {
            return;
        };
        if NET_LISTEN.insert(u32::from(sport), service, 0).is_err() {
            count_drop(DropReason::NetListenFull);
        }
        return;
    }
    if old == TCP_LISTEN {
        if new == TCP_SYN_RECV {
            // A child socket cloned from a listener (softirq): owned by the listener's service.
            if let Some(service) = NET_LISTEN.get_ptr(u32::from(sport)) {
                // SAFETY: pointer from a successful lookup.
                let service = unsafe { *service };
                let endpoint = NetKey {
                    service,
                    port: sport,
                    side: SIDE_SERVER,
                    kind: 0,
                    // The child's peer is the connecting client.
                    remote: remote_of(service, daddr),
                };
                track(store, endpoint, now, 0);
            }
        } else if new == TCP_CLOSE {
            // The listener itself closed (no other state follows LISTEN for it).
            let _ = NET_LISTEN.remove(u32::from(sport));
        }
        return;
    }
    let Some(entry) = store.get() else {
        return;
    };
    // SAFETY: pointer from a successful lookup; the entry is only removed below, by this
    // socket's own CLOSE transition, which the socket lock serialises with its other state
    // changes.
    let s = unsafe { *entry };
    if new == TCP_ESTABLISHED {
        if old == TCP_SYN_SENT {
            record(&key(&s, KIND_CONNECT), now.saturating_sub(s.ts_ns));
        } else if old == TCP_SYN_RECV {
            // The kernel measured the SYN-ACK round trip into srtt_us just before this state
            // change (tcp_rcv_state_process, case TCP_SYN_RECV).
            if let Some(ns) = srtt_ns(store.addr(), offsets().tcp_sock_srtt_us) {
                record(&key(&s, KIND_HANDSHAKE), ns);
            }
        }
        // SAFETY: as above.
        unsafe {
            (*entry).established_ns = now;
            (*entry).ts_ns = 0;
        }
        if let Some(c) = counters(&s) {
            // SAFETY: per-CPU value of this CPU.
            unsafe {
                (*c).connections += 1;
                (*c).active = (*c).active.wrapping_add(1);
            }
        }
    } else if new == TCP_CLOSE {
        if s.established_ns != 0 {
            record(
                &key(&s, KIND_LIFETIME),
                now.saturating_sub(s.established_ns),
            );
            record_in(&key(&s, KIND_BYTES_SENT), &NET_BYTES_BOUNDS, s.bytes_sent);
            record_in(
                &key(&s, KIND_BYTES_RECEIVED),
                &NET_BYTES_BOUNDS,
                s.bytes_received,
            );
            record_in(
                &key(&s, KIND_CONNECTION_REQUESTS),
                &NET_REQUESTS_BOUNDS,
                s.requests.saturating_sub(u64::from(s.handshake)),
            );
            if let Some(c) = counters(&s) {
                // SAFETY: per-CPU value of this CPU.
                unsafe {
                    (*c).active = (*c).active.wrapping_sub(1);
                    (*c).closed += 1;
                    (*c).bytes_sent += s.bytes_sent.saturating_sub(s.flushed_sent);
                    (*c).bytes_received += s.bytes_received.saturating_sub(s.flushed_received);
                }
            }
        } else if old == TCP_SYN_SENT {
            if let Some(c) = counters(&s) {
                // SAFETY: per-CPU value of this CPU.
                unsafe { (*c).connect_failures += 1 };
            }
        }
        store.remove();
    }
}
