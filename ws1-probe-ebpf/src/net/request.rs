//! Requests: the send and receive hooks count bytes, run the request state machine of each
//! observed socket and sample its smoothed RTT; `tcp_probe` samples the RTT where BTF lacks
//! `tcp_sock.srtt_us`.

use core::ffi::c_void;

use aya_ebpf::programs::{BtfTracePointContext, RawTracePointContext, TracePointContext};
use ws1_probe_common::net::{
    KIND_RTT, MSG_PEEK, PHASE_IDLE, PHASE_PENDING, RTT_SAMPLE_NS, SIDE_CLIENT, SockState,
};

use super::{
    NET_BOUNDS_NS, NET_OFFSETS, NET_REQUEST_HIST, counters, current_service, key, now_ns, offsets,
    record, srtt_ns,
    store::{Hashed, Local, Store, may_have_storage},
};
use crate::hist;

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
        // The connection's first `handshake` exchanges (a configured dependency's protocol
        // start-up) are counted apart and are not requests.
        if s.requests >= u64::from(s.handshake) {
            if let Some(hist) = NET_REQUEST_HIST.get_ptr_mut(s.slot) {
                // SAFETY: a global the loader may have rewritten.
                let bounds = unsafe { &*core::ptr::addr_of!(NET_BOUNDS_NS) };
                hist::observe(hist, bounds, now.saturating_sub(s.ts_ns));
            }
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
                let handshake = u64::from(s.handshake);
                if s.requests < handshake {
                    (*c).handshake_exchanges += 1;
                } else {
                    (*c).requests += 1;
                    if s.requests > handshake {
                        (*c).reused_requests += 1;
                    }
                }
            }
        }
    }
    Ok(0)
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
