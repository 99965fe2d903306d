//! Block I/O latency per (service, device, operation), attributed to the process that
//! submitted the I/O.
//!
//! A request is recorded where it is created from a bio, `block:block_io_start`, which runs in
//! the submitting task (`blk_mq_submit_bio` → `blk_mq_bio_to_request` →
//! `blk_account_io_start`): the current tgid there is the process the I/O is for. The later
//! hooks are no good for that: `block_rq_insert` and `block_rq_issue` run wherever the queue is
//! run (seen on Linux 6.18: a flush issued by `kworker/1:1H`, completions in softirq). At
//! `block:block_rq_complete` the duration since creation (scheduler queueing plus device time,
//! what BCC's `biolatency -Q` measures) goes into the histogram of the request's (service,
//! device, op), and the completed bytes into its byte counter.
//!
//! The in-flight entry is keyed by the `struct request` address on the `tp_btf` path (the
//! default), by (device, sector) on the tracepoint fallback. Untargeted processes cost one
//! array lookup at creation (`service_of`) and one hash lookup that finds nothing at
//! completion. A request merged into another (`block:block_rq_merge`) is freed without
//! completing: its entry is deleted there, so a reused request address never inherits it.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::map,
    maps::HashMap,
    programs::{BtfTracePointContext, TracePointContext},
};
use ws1_probe_common::{
    block::{
        BlockKey, BlockOffsets, BlockStart, HIST_ENTRIES, ReqKey, START_ENTRIES, dev_from,
        op_from_cmd_flags, op_from_rwbs,
    },
    hist::{DEFAULT_EXPORT_BOUNDS_NS, EXPORT_BOUND_SLOTS, LatencyHist, pad_bounds},
    targets::DropReason,
};

use crate::{
    hist,
    targets::{count_drop, service_of},
};

/// Request in flight → where and when it was created (see [`ReqKey`]).
#[map]
static BLOCK_START: HashMap<ReqKey, BlockStart> = HashMap::with_max_entries(START_ENTRIES, 0);

/// (service, device, op) → latency histogram, shared by all CPUs (see hist.rs).
#[map]
static BLOCK_HIST: HashMap<BlockKey, LatencyHist> = HashMap::with_max_entries(HIST_ENTRIES, 0);

/// (service, device, op) → completed bytes, shared by all CPUs (atomic adds).
#[map]
static BLOCK_BYTES: HashMap<BlockKey, u64> = HashMap::with_max_entries(HIST_ENTRIES, 0);

/// Prometheus `le` bounds in nanoseconds (the agent writes the configured ones).
#[unsafe(no_mangle)]
static BLOCK_BOUNDS_NS: [u64; EXPORT_BOUND_SLOTS] = pad_bounds(&DEFAULT_EXPORT_BOUNDS_NS);

/// Field offsets, from BTF and tracefs at start-up.
#[unsafe(no_mangle)]
static BLOCK_OFFSETS: BlockOffsets = BlockOffsets::UNKNOWN;

#[inline(always)]
fn offsets() -> BlockOffsets {
    // SAFETY: a plain read of a global the loader may have rewritten; volatile so the compiler
    // does not fold in the compile-time value.
    unsafe { core::ptr::read_volatile(&BLOCK_OFFSETS) }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Reads a `T` at `off` bytes into the kernel object at `base`.
#[inline(always)]
fn read_kernel<T>(base: u64, off: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(u64::from(off)) as *const T) }
        .map_err(i64::from)
}

/// The service of the current process, or `None` when it is not observed.
#[inline(always)]
fn current_service() -> Option<u32> {
    service_of((bpf_get_current_pid_tgid() >> 32) as u32)
}

#[inline(always)]
fn record_start(key: ReqKey, service: u32, dev: u32, op: u32) {
    let start = BlockStart {
        ts_ns: now_ns(),
        service,
        dev,
        op,
        _pad: 0,
    };
    // Overwrites an entry left by a request that vanished without completing.
    if BLOCK_START.insert(&key, &start, 0).is_err() {
        count_drop(DropReason::BlockStartFull);
    }
}

#[inline(always)]
fn record_done(key: ReqKey, bytes: u64, last: bool) {
    let Some(start) = BLOCK_START.get_ptr(&key) else {
        return;
    };
    // SAFETY: pointer from a successful lookup; the entry is only deleted below, by the one
    // completion of this request.
    let start = unsafe { *start };
    let key_out = BlockKey {
        service: start.service,
        dev: start.dev,
        op: start.op,
        _pad: 0,
    };
    if bytes > 0 {
        add_bytes(&key_out, bytes);
    }
    if !last {
        return;
    }
    let _ = BLOCK_START.remove(&key);
    let Some(h) = hist::get_or_create(&BLOCK_HIST, &key_out) else {
        count_drop(DropReason::BlockHistFull);
        return;
    };
    // SAFETY: bounds are a global the loader may have rewritten; read once per event.
    let bounds = unsafe { &*core::ptr::addr_of!(BLOCK_BOUNDS_NS) };
    hist::observe(h, bounds, now_ns().saturating_sub(start.ts_ns));
}

#[inline(always)]
fn add_bytes(key: &BlockKey, bytes: u64) {
    if BLOCK_BYTES.get_ptr_mut(key).is_none() {
        // BPF_NOEXIST: another CPU may have created it meanwhile; the lookup below finds it.
        let _ = BLOCK_BYTES.insert(key, &0, u64::from(BPF_NOEXIST));
    }
    match BLOCK_BYTES.get_ptr_mut(key) {
        // SAFETY: a map value that lives as long as the map; only updated atomically.
        Some(total) => hist::atomic_add(unsafe { &mut *total }, bytes),
        None => count_drop(DropReason::BlockHistFull),
    }
}

// --- tp_btf: the argument is the `struct request *` ---

/// `block_io_start(struct request *rq)`, in the submitting task.
#[inline(always)]
pub fn try_io_start_btf(ctx: &BtfTracePointContext) -> Result<u32, i64> {
    let Some(service) = current_service() else {
        return Ok(0);
    };
    let rq: u64 = ctx.arg(0);
    let off = offsets();
    let flags: u32 = read_kernel(rq, off.rq_cmd_flags)?;
    let len: u32 = read_kernel(rq, off.rq_data_len)?;
    let Some(op) = op_from_cmd_flags(flags, len) else {
        return Ok(0);
    };
    // The whole disk, as the tracepoints print it: `disk_devt(rq->q->disk)`.
    let queue: u64 = read_kernel(rq, off.rq_q)?;
    let disk: u64 = read_kernel(queue, off.queue_disk)?;
    let major: i32 = read_kernel(disk, off.disk_major)?;
    let minor: i32 = read_kernel(disk, off.disk_first_minor)?;
    record_start(
        ReqKey::new(rq, 0),
        service,
        dev_from(major as u32, minor as u32),
        op,
    );
    Ok(0)
}

/// `block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes)`, where
/// the driver completes (often softirq). A request completed in parts (`blk_update_request`
/// with fewer bytes than remain) fires once per part; its bytes count at each, its latency at
/// the last, recognised by `nr_bytes` covering what remains (`__data_len` is reduced after
/// the tracepoint).
#[inline(always)]
pub fn try_rq_complete_btf(ctx: &BtfTracePointContext) -> Result<u32, i64> {
    let rq: u64 = ctx.arg(0);
    let key = ReqKey::new(rq, 0);
    if BLOCK_START.get_ptr(&key).is_none() {
        return Ok(0);
    }
    let nr_bytes = ctx.arg::<u64>(2) as u32;
    let remaining: u32 = read_kernel(rq, offsets().rq_data_len)?;
    record_done(key, u64::from(nr_bytes), nr_bytes >= remaining);
    Ok(0)
}

/// `block_rq_merge(struct request *rq)`: `rq` was merged into another request and is freed
/// without completing.
#[inline(always)]
pub fn try_rq_merge_btf(ctx: &BtfTracePointContext) -> Result<u32, i64> {
    let rq: u64 = ctx.arg(0);
    let _ = BLOCK_START.remove(&ReqKey::new(rq, 0));
    Ok(0)
}

// --- the tracepoint fallback: fields at tracefs offsets, requests keyed by (dev, sector) ---

pub fn try_io_start(ctx: &TracePointContext) -> Result<u32, i64> {
    let Some(service) = current_service() else {
        return Ok(0);
    };
    let off = offsets();
    // SAFETY: offsets read from this tracepoint's format file.
    let rwbs: [u8; 2] = unsafe { ctx.read_at(off.start_rwbs as usize)? };
    // SAFETY: as above.
    let bytes: u32 = unsafe { ctx.read_at(off.start_bytes as usize)? };
    let Some(op) = op_from_rwbs(rwbs[0], rwbs[1], bytes) else {
        return Ok(0);
    };
    // SAFETY: as above.
    let dev: u32 = unsafe { ctx.read_at(off.start_dev as usize)? };
    // SAFETY: as above.
    let sector: u64 = unsafe { ctx.read_at(off.start_sector as usize)? };
    record_start(ReqKey::new(sector, dev), service, dev, op);
    Ok(0)
}

pub fn try_rq_complete(ctx: &TracePointContext) -> Result<u32, i64> {
    let off = offsets();
    // SAFETY: offsets read from this tracepoint's format file.
    let dev: u32 = unsafe { ctx.read_at(off.done_dev as usize)? };
    // SAFETY: as above.
    let sector: u64 = unsafe { ctx.read_at(off.done_sector as usize)? };
    let key = ReqKey::new(sector, dev);
    if BLOCK_START.get_ptr(&key).is_none() {
        return Ok(0);
    }
    // SAFETY: as above.
    let nr_sector: u32 = unsafe { ctx.read_at(off.done_nr_sector as usize)? };
    // The tracepoint does not say whether the request is done; like biolatency, the first
    // completion ends it (partial completions are rare: virtio and NVMe complete whole
    // requests).
    record_done(key, u64::from(nr_sector) << 9, true);
    Ok(0)
}

pub fn try_rq_merge(ctx: &TracePointContext) -> Result<u32, i64> {
    let off = offsets();
    // SAFETY: `block_rq_merge` is of `block_io_start`'s event class: same fields, same offsets.
    let dev: u32 = unsafe { ctx.read_at(off.start_dev as usize)? };
    // SAFETY: as above.
    let sector: u64 = unsafe { ctx.read_at(off.start_sector as usize)? };
    let _ = BLOCK_START.remove(&ReqKey::new(sector, dev));
    Ok(0)
}
