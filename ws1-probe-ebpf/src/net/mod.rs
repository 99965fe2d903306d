//! TCP connections, RTT, retransmits, resets and request latency, on tracepoints only (this
//! kernel has no kprobes and refuses fentry): `tp_btf` programs with the state in socket-local
//! storage where the kernel allows, classic and raw tracepoints with a socket hash otherwise
//! (see `Store`).
//!
//! Ownership is decided in process context, where the current task is the socket's user:
//! `inet_sock_set_state` CLOSE → SYN_SENT runs in the `connect()` caller, CLOSE → LISTEN in the
//! `listen()` caller. A connection accepted on a port a targeted process listens on is the
//! server side of that service (LISTEN → SYN_RECV clones the child socket). The owner is kept in
//! the socket's local storage (`NET_SK`) or in `NET_SOCKS` keyed by the socket's address until
//! the socket reaches TCP_CLOSE, where the entry is deleted, so hooks that fire in softirq
//! context (state changes, retransmits, resets) cost one lookup for sockets nobody observes.
//! Per event the work is O(1).
//!
//! Each socket also carries its endpoint's slot (`NET_SLOTS`, found once when the socket is
//! created): the counters and the request histogram are arrays indexed by it, so the per-request
//! path hashes nothing (on the `tp_btf` path not even the socket's address).
//!
//! Request latency comes from `sock_send_length`/`sock_recv_length` (process context, after
//! the call): a client request starts at the first send after the socket was idle and ends at
//! the first successful receive; a server request starts at the first receive after idle and
//! ends at the first send back. The same hooks count bytes and, at most every 100 ms per
//! socket, sample the smoothed RTT from the socket itself (see `sock_length`); `tcp_probe`,
//! which runs for every received segment of every socket on the host, is only the fallback
//! where BTF lacks `tcp_sock.srtt_us`.
//!
//! Remote addresses: for sockets of services opted in (`NET_REMOTE_SERVICES`), the peer's
//! address is read from the state change that creates the socket (CLOSE → SYN_SENT for a
//! client, LISTEN → SYN_RECV for an accepted child; the peer in both: the tracepoint's
//! `daddr_v6`, or the same address read from the socket on the `tp_btf` path) and
//! interned in `NET_REMOTES` as a 4-byte id that joins the socket's state and every key. The
//! later hooks do exactly the same work whether a socket has an address or not.

mod store;

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, Queue},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use ws1_probe_common::{
    hist::{DEFAULT_EXPORT_BOUNDS_NS, EXPORT_BOUND_SLOTS, LatencyHist, pad_bounds},
    net::{
        AF_INET6, BYTES_BOUNDS, IPPROTO_TCP, KIND_BYTES_RECEIVED, KIND_BYTES_SENT, KIND_CONNECT,
        KIND_HANDSHAKE, KIND_LIFETIME, KIND_RTT, LISTEN_ENTRIES, MSG_PEEK, NET_HIST_ENTRIES,
        NetCounters, NetKey, NetOffsets, PHASE_IDLE, PHASE_PENDING, REMOTE_ENTRIES, REMOTE_NONE,
        REMOTE_OTHER, REMOTE_SERVICE_SLOTS, RTT_SAMPLE_NS, RemoteAddr, SIDE_CLIENT, SIDE_SERVER,
        SKC_DADDR, SKC_DPORT, SKC_FAMILY, SKC_NUM, SLOT_ENTRIES, SockState, TCP_CLOSE,
        TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_RECV, TCP_SYN_SENT,
    },
    targets::DropReason,
};

use self::store::{Hashed, Local, Store, may_have_storage};
use crate::{
    hist,
    targets::{count_drop, service_of},
};

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

/// Endpoint (service, side, port, remote; kind 0) → its slot in `NET_COUNTERS` and
/// `NET_REQUEST_HIST`. Looked up once per socket, when it is created; entries are never removed.
#[map]
static NET_SLOTS: HashMap<NetKey, u32> = HashMap::with_max_entries(SLOT_ENTRIES, 0);

/// Slots not handed out yet; the agent fills it with `0..SLOT_ENTRIES` before it attaches the
/// hooks. A pop is atomic, so two CPUs creating one endpoint at once never share a slot by
/// mistake: the one whose insert loses gives its slot back.
#[map]
static NET_FREE_SLOTS: Queue<u32> = Queue::with_max_entries(SLOT_ENTRIES, 0);

/// Slot → counters of the endpoint, per CPU: the verifier inlines array lookups, so a completed
/// request costs no hashing.
#[map]
static NET_COUNTERS: PerCpuArray<NetCounters> = PerCpuArray::with_max_entries(SLOT_ENTRIES, 0);

/// Slot → request-latency histogram of the endpoint, shared by all CPUs (see hist.rs; per CPU
/// it would cost 4.7 MB per CPU).
#[map]
static NET_REQUEST_HIST: Array<LatencyHist> = Array::with_max_entries(SLOT_ENTRIES, 0);

/// (service, side, port, remote, kind) → histogram of the rarer kinds (connect, handshake, RTT
/// samples, lifetime, bytes per connection), shared by all CPUs (see hist.rs).
///
/// Not per CPU, and preallocated, on purpose: a per-CPU map of 4.6 KB values cannot be
/// preallocated (entries × 4.6 KB × CPUs), and a map that is not preallocated takes new elements
/// from the BPF memory allocator, whose per-CPU cache holds one large element and refills
/// asynchronously, so the second new key on a CPU within a short burst fails with ENOMEM and
/// its event is lost. Network events are per request, not per syscall, so the shared cache
/// line costs little.
#[map]
static NET_HIST: HashMap<NetKey, LatencyHist> = HashMap::with_max_entries(NET_HIST_ENTRIES, 0);

/// Prometheus `le` bounds in nanoseconds, padded with `u64::MAX`; the agent may override them.
#[unsafe(no_mangle)]
static NET_BOUNDS_NS: [u64; EXPORT_BOUND_SLOTS] = pad_bounds(&DEFAULT_EXPORT_BOUNDS_NS);

/// `le` bounds of the bytes-per-connection histograms, padded with `u64::MAX`.
static NET_BYTES_BOUNDS: [u64; EXPORT_BOUND_SLOTS] = pad_bounds(&BYTES_BOUNDS);

/// Tracepoint field offsets, read by the agent from tracefs at start-up.
#[unsafe(no_mangle)]
static NET_OFFSETS: NetOffsets = NetOffsets::FALLBACK;

#[inline(always)]
fn offsets() -> NetOffsets {
    // SAFETY: a plain read of a global the loader may have rewritten; volatile so the compiler
    // does not fold in the compile-time value.
    unsafe { core::ptr::read_volatile(&NET_OFFSETS) }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn current_service() -> Option<u32> {
    service_of((bpf_get_current_pid_tgid() >> 32) as u32)
}

#[inline(always)]
fn key(s: &SockState, kind: u8) -> NetKey {
    NetKey {
        service: s.service,
        port: s.port,
        side: s.side,
        kind,
        remote: s.remote,
    }
}

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

/// The counters of the socket's endpoint on this CPU: an array element, so no hashing.
#[inline(always)]
fn counters(s: &SockState) -> Option<*mut NetCounters> {
    NET_COUNTERS.get_ptr_mut(s.slot)
}

#[inline(always)]
fn record(key: &NetKey, value: u64) {
    // SAFETY: bounds are a global the loader may have rewritten.
    let bounds = unsafe { &*core::ptr::addr_of!(NET_BOUNDS_NS) };
    record_in(key, bounds, value);
}

#[inline(always)]
fn record_in(key: &NetKey, bounds: &[u64; EXPORT_BOUND_SLOTS], value: u64) {
    let Some(hist) = hist::get_or_create(&NET_HIST, key) else {
        count_drop(DropReason::NetStatsFull);
        return;
    };
    hist::observe(hist, bounds, value);
}

/// Reads a `T` at `off` bytes into the kernel object at `base`.
#[inline(always)]
fn read_kernel<T>(base: u64, off: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(u64::from(off)) as *const T) }.ok()
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

/// Starts observing a socket of `endpoint` (`kind` 0), created at `now`.
#[inline(always)]
fn track(store: &impl Store, endpoint: NetKey, now: u64) {
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

/// The same tracepoint as `tp_btf` (arguments `(const struct sock *sk, int oldstate, int
/// newstate)`): the fields the classic tracepoint prints are read from the socket, and the
/// state lives in the socket's local storage.
pub fn try_inet_sock_set_state_btf(ctx: &BtfTracePointContext) -> Result<u32, i64> {
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
        track(store, endpoint, now);
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
                track(store, endpoint, now);
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

/// Whether a send or receive that returned `ret` moved data: errors, EOF and peeks move none
/// and end no request (MSG_PEEK only means that on receive).
#[inline(always)]
fn moves_data(ret: i32, flags: i32, send: bool) -> bool {
    ret > 0 && (send || flags & MSG_PEEK == 0)
}

/// `sock:sock_send_length` (`send = true`) and `sock:sock_recv_length` as classic tracepoints:
/// fields read through tracefs offsets. Used where raw tracepoints cannot attach.
pub fn try_sock_length(ctx: &TracePointContext, send: bool) -> Result<u32, i64> {
    // The process filter first: untargeted processes cost this one lookup.
    if current_service().is_none() {
        return Ok(0);
    }
    let off = offsets();
    let (sk_off, ret_off, flags_off) = if send {
        (off.send_sk, off.send_ret, off.send_flags)
    } else {
        (off.recv_sk, off.recv_ret, off.recv_flags)
    };
    // SAFETY: the offsets were read from this tracepoint's format file.
    let (sk, ret, flags) = unsafe {
        (
            ctx.read_at::<u64>(sk_off as usize)?,
            ctx.read_at::<i32>(ret_off as usize)?,
            ctx.read_at::<i32>(flags_off as usize)?,
        )
    };
    hashed_length(sk, ret, flags, send)
}

/// The same hooks as raw tracepoints: the arguments `(struct sock *sk, int ret, int flags)` of
/// the `sock_msg_length` event class are read straight from the context, where the classic
/// tracepoint needs three helper calls.
pub fn try_sock_length_raw(ctx: &RawTracePointContext, send: bool) -> Result<u32, i64> {
    if current_service().is_none() {
        return Ok(0);
    }
    let sk: u64 = ctx.arg(0);
    let ret = ctx.arg::<i64>(1) as i32;
    let flags = ctx.arg::<i64>(2) as i32;
    hashed_length(sk, ret, flags, send)
}

/// A send or receive of the tracepoint programs, whose state is in `NET_SOCKS`.
#[inline(always)]
fn hashed_length(sk: u64, ret: i32, flags: i32, send: bool) -> Result<u32, i64> {
    if !moves_data(ret, flags, send) {
        return Ok(0);
    }
    match Hashed(sk).get() {
        Some(entry) => sock_length(entry, sk, ret, send),
        None => Ok(0),
    }
}

/// The same hooks as `tp_btf`, the fastest path: the socket's own storage says whether it is
/// observed, so neither the process filter nor a hash lookup runs (ownership was decided when
/// the socket was created). Inlined into both entry points: a BPF-to-BPF call costs a call and
/// a return on every socket call of the host.
#[inline(always)]
pub fn try_sock_length_btf(ctx: &BtfTracePointContext, send: bool) -> Result<u32, i64> {
    let sk: *mut c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    // SAFETY: a plain read of a loader-set global, volatile as in `offsets`.
    let storage_off =
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!(NET_OFFSETS.sock_bpf_storage)) };
    if !moves_data(ret, flags, send) || !may_have_storage(sk, storage_off) {
        return Ok(0);
    }
    match Local(sk).get() {
        Some(entry) => sock_length(entry, sk as u64, ret, send),
        None => Ok(0),
    }
}

/// Byte counts and the request state machine of one send or receive.
///
/// The common call costs the socket lookup and the clock: bytes are counted in the socket's
/// own entry and reach the per-CPU counters (an array element at the socket's slot) only when
/// a request completes, at most every `RTT_SAMPLE_NS`, and at close. On that timer the smoothed RTT is sampled too,
/// from `tcp_sock.srtt_us` at its BTF offset, so no hook has to run per received segment
/// (`tcp_probe` is attached only where BTF lacks the offset).
#[inline(always)]
fn sock_length(entry: *mut SockState, sk: u64, ret: i32, send: bool) -> Result<u32, i64> {
    // The clock first: the helper call clobbers registers, so reading the state after it
    // saves spilling every field to the stack around the call.
    let now = now_ns();
    // SAFETY: pointer from a successful lookup (hash or socket storage); calls on one socket are
    // serialised by its lock in the common case, and a race costs at most one miscounted
    // request.
    let s = unsafe { *entry };
    let (mut sent, mut received) = (s.bytes_sent, s.bytes_received);
    // Only this direction's count is written: a thread sending while another receives on the
    // same socket (full duplex) then cannot undo the other's count.
    // SAFETY: as above.
    unsafe {
        if send {
            sent += ret as u64;
            (*entry).bytes_sent = sent;
        } else {
            received += ret as u64;
            (*entry).bytes_received = received;
        }
    }
    // Client requests begin with a send, server requests with a receive.
    let starts = send == (s.side == SIDE_CLIENT);
    let mut done = false;
    if starts {
        if s.phase == PHASE_IDLE {
            // SAFETY: as above.
            unsafe {
                (*entry).phase = PHASE_PENDING;
                (*entry).ts_ns = now;
            }
        }
    } else if s.phase == PHASE_PENDING {
        // SAFETY: as above.
        unsafe {
            (*entry).phase = PHASE_IDLE;
            (*entry).requests = s.requests + 1;
        }
        if let Some(hist) = NET_REQUEST_HIST.get_ptr_mut(s.slot) {
            // SAFETY: a global the loader may have rewritten.
            let bounds = unsafe { &*core::ptr::addr_of!(NET_BOUNDS_NS) };
            hist::observe(hist, bounds, now.saturating_sub(s.ts_ns));
        }
        done = true;
    }
    let due = s.flushed_ns == 0 || now.saturating_sub(s.flushed_ns) >= RTT_SAMPLE_NS;
    if !done && !due {
        return Ok(0);
    }
    if due {
        sample_rtt(sk, &s);
    }
    // SAFETY: as above.
    unsafe {
        (*entry).flushed_ns = now;
        (*entry).flushed_sent = sent;
        (*entry).flushed_received = received;
    }
    if let Some(c) = counters(&s) {
        // SAFETY: per-CPU value of this CPU.
        unsafe {
            // Saturating: with both directions busy on two CPUs, the other call may have
            // flushed past this call's view of the socket; a few bytes may then be counted
            // twice or late, but a counter never jumps by a wrapped difference.
            (*c).bytes_sent += sent.saturating_sub(s.flushed_sent);
            (*c).bytes_received += received.saturating_sub(s.flushed_received);
            if done {
                (*c).requests += 1;
                if s.requests > 0 {
                    (*c).reused_requests += 1;
                }
            }
        }
    }
    Ok(0)
}

/// The smoothed RTT of a live TCP socket in nanoseconds, from `tcp_sock.srtt_us` (8 ×
/// microseconds) at `off`, the offset the agent found in BTF (`u32::MAX`: none); `None` when
/// unknown or not measured yet.
#[inline(always)]
fn srtt_ns(sk: u64, off: u32) -> Option<u64> {
    if off == u32::MAX {
        return None;
    }
    let at = sk.wrapping_add(u64::from(off)) as *const u32;
    // SAFETY: bpf_probe_read_kernel checks the address; `sk` is a live tcp_sock here.
    let srtt8 = unsafe { bpf_probe_read_kernel(at) }.ok()?;
    (srtt8 != 0).then(|| u64::from(srtt8 >> 3) * 1_000)
}

/// One smoothed-RTT observation of an observed socket (nothing without the BTF offset).
#[inline(always)]
fn sample_rtt(sk: u64, s: &SockState) {
    // SAFETY: a plain read of a loader-set global, volatile as in `offsets`.
    let off =
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!(NET_OFFSETS.tcp_sock_srtt_us)) };
    if let Some(ns) = srtt_ns(sk, off) {
        record(&key(s, KIND_RTT), ns);
    }
}

/// `tcp:tcp_probe` (per received segment, softirq): samples the smoothed RTT on kernels whose
/// BTF does not give `tcp_sock.srtt_us` (elsewhere the send/receive hooks sample it).
pub fn try_tcp_probe(ctx: &TracePointContext) -> Result<u32, i64> {
    let off = offsets();
    // SAFETY: the offset was read from this tracepoint's format file.
    let sk: u64 = unsafe { ctx.read_at(off.probe_skaddr as usize)? };
    let Some(entry) = Hashed(sk).get() else {
        return Ok(0);
    };
    let now = now_ns();
    // SAFETY: pointer from a successful lookup.
    let s = unsafe { *entry };
    if s.rtt_ns != 0 && now.saturating_sub(s.rtt_ns) < RTT_SAMPLE_NS {
        return Ok(0);
    }
    // SAFETY: as above.
    unsafe { (*entry).rtt_ns = now };
    // SAFETY: as above; the tracepoint stores `srtt_us >> 3`, i.e. microseconds.
    let srtt_us: u32 = unsafe { ctx.read_at(off.probe_srtt as usize)? };
    if srtt_us != 0 {
        record(&key(&s, KIND_RTT), u64::from(srtt_us) * 1_000);
    }
    Ok(0)
}

/// Which per-socket counter a softirq event bumps.
#[derive(Clone, Copy)]
pub enum SockEvent {
    Retransmit,
    ResetSent,
    ResetReceived,
}

/// `tcp:tcp_retransmit_skb`, `tcp:tcp_send_reset`, `tcp:tcp_receive_reset`.
pub fn try_sock_event(ctx: &TracePointContext, event: SockEvent) -> Result<u32, i64> {
    let off = offsets();
    let sk_off = match event {
        SockEvent::Retransmit => off.retransmit_skaddr,
        SockEvent::ResetSent => off.send_reset_skaddr,
        SockEvent::ResetReceived => off.receive_reset_skaddr,
    };
    // SAFETY: the offset was read from this tracepoint's format file.
    let sk: u64 = unsafe { ctx.read_at(sk_off as usize)? };
    if sk == 0 {
        // A reset sent for a packet no socket owns.
        return Ok(0);
    }
    if matches!(event, SockEvent::Retransmit) && off.retransmit_err != u32::MAX {
        // SAFETY: as above.
        let err: i32 = unsafe { ctx.read_at(off.retransmit_err as usize)? };
        if err != 0 {
            // Nothing was sent (the original is still queued in the host, or no route).
            return Ok(0);
        }
    }
    if let Some(entry) = Hashed(sk).get() {
        sock_event(entry, event);
    }
    Ok(0)
}

/// `tcp:tcp_retransmit_skb` (`(sk, skb, err)`), `tcp:tcp_send_reset` (`(sk, skb, reason)`,
/// `sk` may be NULL) and `tcp:tcp_receive_reset` (`(sk)`) as `tp_btf`, for sockets whose state is
/// in their local storage.
pub fn try_sock_event_btf(ctx: &BtfTracePointContext, event: SockEvent) -> Result<u32, i64> {
    let sk: *mut c_void = ctx.arg(0);
    if matches!(event, SockEvent::Retransmit) && ctx.arg::<i32>(2) != 0 {
        // Nothing was sent, as in `try_sock_event`.
        return Ok(0);
    }
    if let Some(entry) = Local(sk).get() {
        sock_event(entry, event);
    }
    Ok(0)
}

/// Counts `event` for the observed socket whose state is at `entry`.
#[inline(always)]
fn sock_event(entry: *const SockState, event: SockEvent) {
    // SAFETY: pointer from a successful lookup.
    let s = unsafe { *entry };
    if let Some(c) = counters(&s) {
        // SAFETY: per-CPU value of this CPU.
        unsafe {
            match event {
                SockEvent::Retransmit => (*c).retransmits += 1,
                SockEvent::ResetSent => (*c).resets_sent += 1,
                SockEvent::ResetReceived => (*c).resets_received += 1,
            }
        }
    }
}
