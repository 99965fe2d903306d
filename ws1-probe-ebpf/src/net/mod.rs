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

mod request;
mod state;
mod store;

pub use self::{
    request::{try_sock_length, try_sock_length_btf, try_sock_length_raw, try_tcp_probe},
    state::{StateRun, try_inet_sock_set_state, try_inet_sock_set_state_btf},
};

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
    programs::{BtfTracePointContext, TracePointContext},
};
use ws1_probe_common::{
    hist::{DEFAULT_EXPORT_BOUNDS_NS, EXPORT_BOUND_SLOTS, LatencyHist, pad_bounds},
    net::{
        BYTES_BOUNDS, NET_HIST_ENTRIES, NetCounters, NetKey, NetOffsets, REQUESTS_BOUNDS,
        SLOT_ENTRIES, SockState,
    },
    targets::DropReason,
};

use self::store::{Hashed, Local, Store};
use crate::{
    hist,
    targets::{count_drop, service_of},
};

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

/// `le` bounds of the requests-per-connection histogram, padded with `u64::MAX`.
static NET_REQUESTS_BOUNDS: [u64; EXPORT_BOUND_SLOTS] = pad_bounds(&REQUESTS_BOUNDS);

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
        let segments = match event {
            SockEvent::Retransmit if off.retransmit_skbaddr != u32::MAX => {
                // SAFETY: as above.
                let skb: u64 = unsafe { ctx.read_at(off.retransmit_skbaddr as usize)? };
                retransmitted_segments(skb, off.skb_gso_segs)
            }
            _ => 1,
        };
        sock_event(entry, event, segments);
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
        let segments = match event {
            SockEvent::Retransmit => {
                let skb: *const c_void = ctx.arg(1);
                retransmitted_segments(skb as u64, offsets().skb_gso_segs)
            }
            _ => 1,
        };
        sock_event(entry, event, segments);
    }
    Ok(0)
}

/// The segments a retransmitted skb carries, `tcp_skb_pcount(skb)`: the kernel adds that to
/// `RetransSegs` (and `tcp_sock.total_retrans`) for each `tcp_retransmit_skb` event, and an
/// skb carries several when its data went out as one GSO packet (bulk data, or a loss
/// recovery that retransmits several segments at once). `off` is
/// [`NetOffsets::skb_gso_segs`]; when it is unknown, or the read fails, the skb counts as one
/// segment, and so does a count of 0 (never set on a data skb). The kernel's side is
/// `__tcp_retransmit_skb` in
/// <https://github.com/torvalds/linux/blob/v6.18/net/ipv4/tcp_output.c>.
#[inline(always)]
fn retransmitted_segments(skb: u64, off: u32) -> u64 {
    if off == u32::MAX || skb == 0 {
        return 1;
    }
    read_kernel::<u16>(skb, off).map_or(1, |segs| u64::from(segs.max(1)))
}

/// Counts `event` for the observed socket whose state is at `entry`: `n` retransmitted
/// segments, or one reset.
#[inline(always)]
fn sock_event(entry: *const SockState, event: SockEvent, n: u64) {
    // SAFETY: pointer from a successful lookup.
    let s = unsafe { *entry };
    if let Some(c) = counters(&s) {
        // SAFETY: per-CPU value of this CPU.
        unsafe {
            match event {
                SockEvent::Retransmit => (*c).retransmits += n,
                SockEvent::ResetSent => (*c).resets_sent += 1,
                SockEvent::ResetReceived => (*c).resets_received += 1,
            }
        }
    }
}
