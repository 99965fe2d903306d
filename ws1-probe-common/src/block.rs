//! Shared types of the block I/O probe: per-(service, device, operation) latency histograms
//! and byte counters, the in-flight request entry, and the operation decoding both hook kinds
//! use (`struct request`'s `cmd_flags` on the `tp_btf` path, the `rwbs` string on the
//! tracepoint path).

/// Operations the probe counts (the `op` label). Others (write-zeroes, zone management,
/// driver commands) are not counted.
pub const OP_READ: u32 = 0;
pub const OP_WRITE: u32 = 1;
pub const OP_FLUSH: u32 = 2;
pub const OP_DISCARD: u32 = 3;
/// Number of operations.
pub const OPS: u32 = 4;

/// The `op` label of an operation number.
pub const fn op_label(op: u32) -> &'static str {
    match op {
        OP_READ => "read",
        OP_WRITE => "write",
        OP_FLUSH => "flush",
        _ => "discard",
    }
}

/// `REQ_OP_MASK` of include/linux/blk_types.h: the low 8 bits of `cmd_flags` hold the
/// operation (`enum req_op`, whose values are fixed: they are part of the blktrace ABI).
pub const REQ_OP_MASK: u32 = 0xff;
const REQ_OP_READ: u32 = 0;
const REQ_OP_WRITE: u32 = 1;
const REQ_OP_FLUSH: u32 = 2;
const REQ_OP_DISCARD: u32 = 3;
const REQ_OP_SECURE_ERASE: u32 = 5;

/// The operation of a request from its `cmd_flags` and data length at creation. An empty
/// write is a cache flush (`blkdev_issue_flush` submits a write with `REQ_PREFLUSH` and no
/// data; the flag's bit number is not stable across kernels, the empty write is). `None`: not
/// counted.
#[inline(always)]
pub const fn op_from_cmd_flags(cmd_flags: u32, data_len: u32) -> Option<u32> {
    match cmd_flags & REQ_OP_MASK {
        REQ_OP_READ => Some(OP_READ),
        REQ_OP_WRITE if data_len == 0 => Some(OP_FLUSH),
        REQ_OP_WRITE => Some(OP_WRITE),
        REQ_OP_FLUSH => Some(OP_FLUSH),
        REQ_OP_DISCARD | REQ_OP_SECURE_ERASE => Some(OP_DISCARD),
        _ => None,
    }
}

/// The operation from the first two characters of a block tracepoint's `rwbs` string
/// (`blk_fill_rwbs`: an optional `F` for a preflush, then the operation letter `W`, `R`, `D`,
/// `F` or `N`) and the request's data length. As in [`op_from_cmd_flags`], an empty write is
/// a flush.
#[inline(always)]
pub const fn op_from_rwbs(first: u8, second: u8, bytes: u32) -> Option<u32> {
    let letter = if first == b'F' && matches!(second, b'W' | b'R' | b'D' | b'F' | b'N') {
        second
    } else {
        first
    };
    match letter {
        b'R' => Some(OP_READ),
        b'W' if bytes == 0 => Some(OP_FLUSH),
        b'W' => Some(OP_WRITE),
        b'F' => Some(OP_FLUSH),
        b'D' => Some(OP_DISCARD),
        _ => None,
    }
}

/// A device number as the block tracepoints print it (`MKDEV`: major << 20 | minor).
#[inline(always)]
pub const fn dev_from(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// Major and minor of a [`dev_from`] number.
pub const fn dev_parts(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & 0xf_ffff)
}

/// Key of `BLOCK_HIST` and `BLOCK_BYTES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    pub service: u32,
    /// Whole-disk device number ([`dev_from`]).
    pub dev: u32,
    pub op: u32,
    pub _pad: u32,
}

/// Key of `BLOCK_START`, the requests in flight: the `struct request` address on the `tp_btf`
/// path (`dev` 0), the start sector and device on the tracepoint path. The address is stored
/// whole: the verifier refuses shifts of a pointer, so it cannot be split into u32s.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReqKey {
    pub word: u64,
    pub dev: u32,
    pub _pad: u32,
}

impl ReqKey {
    #[inline(always)]
    pub const fn new(word: u64, dev: u32) -> Self {
        Self { word, dev, _pad: 0 }
    }
}

/// A request in flight, recorded where it is created (in the submitting task).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockStart {
    pub ts_ns: u64,
    pub service: u32,
    pub dev: u32,
    pub op: u32,
    pub _pad: u32,
}

/// Field offsets the block programs read, passed as the global `BLOCK_OFFSETS`: `struct
/// request` and friends from BTF for the `tp_btf` programs, tracepoint fields from tracefs
/// for the fallback. `u32::MAX`: unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockOffsets {
    /// `request.q`, `request.cmd_flags`, `request.__data_len`.
    pub rq_q: u32,
    pub rq_cmd_flags: u32,
    pub rq_data_len: u32,
    /// `request_queue.disk`, `gendisk.major`, `gendisk.first_minor`.
    pub queue_disk: u32,
    pub disk_major: u32,
    pub disk_first_minor: u32,
    /// `block:block_io_start`: `dev`, `sector`, `bytes`, `rwbs`.
    pub start_dev: u32,
    pub start_sector: u32,
    pub start_bytes: u32,
    pub start_rwbs: u32,
    /// `block:block_rq_complete`: `dev`, `sector`, `nr_sector`. (`block_rq_merge` is of
    /// `block_io_start`'s class and uses its offsets.)
    pub done_dev: u32,
    pub done_sector: u32,
    pub done_nr_sector: u32,
    pub _pad: u32,
}

impl BlockOffsets {
    /// Everything unknown: neither hook kind can run.
    pub const UNKNOWN: Self = Self {
        rq_q: u32::MAX,
        rq_cmd_flags: u32::MAX,
        rq_data_len: u32::MAX,
        queue_disk: u32::MAX,
        disk_major: u32::MAX,
        disk_first_minor: u32::MAX,
        start_dev: u32::MAX,
        start_sector: u32::MAX,
        start_bytes: u32::MAX,
        start_rwbs: u32::MAX,
        done_dev: u32::MAX,
        done_sector: u32::MAX,
        done_nr_sector: u32::MAX,
        _pad: 0,
    };

    /// Whether the `tp_btf` programs have every member they read.
    pub const fn btf_usable(&self) -> bool {
        self.rq_q != u32::MAX
            && self.rq_cmd_flags != u32::MAX
            && self.rq_data_len != u32::MAX
            && self.queue_disk != u32::MAX
            && self.disk_major != u32::MAX
            && self.disk_first_minor != u32::MAX
    }

    /// Whether the tracepoint programs have every field they read.
    pub const fn tracepoints_usable(&self) -> bool {
        self.start_dev != u32::MAX
            && self.start_sector != u32::MAX
            && self.start_bytes != u32::MAX
            && self.start_rwbs != u32::MAX
            && self.done_dev != u32::MAX
            && self.done_sector != u32::MAX
            && self.done_nr_sector != u32::MAX
    }
}

/// Capacity of `BLOCK_START`: requests in flight from observed processes at once (a device
/// queue holds at most a few hundred; 8192 covers many busy devices).
pub const START_ENTRIES: u32 = 8_192;
/// Capacity of `BLOCK_HIST` and `BLOCK_BYTES`: services × devices × operations
/// (preallocated: 4.6 KB per histogram, 2.4 MB in all).
pub const HIST_ENTRIES: u32 = 512;

#[cfg(feature = "user")]
crate::impl_pod!(BlockKey, ReqKey, BlockStart, BlockOffsets);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_from_cmd_flags() {
        // REQ_SYNC and other flag bits above the operation byte are ignored.
        assert_eq!(op_from_cmd_flags(0, 4096), Some(OP_READ));
        assert_eq!(op_from_cmd_flags(1 | 1 << 11, 4096), Some(OP_WRITE));
        // An empty preflush write (fdatasync's cache flush) and the flush operation itself.
        assert_eq!(op_from_cmd_flags(1 | 1 << 18, 0), Some(OP_FLUSH));
        assert_eq!(op_from_cmd_flags(2, 0), Some(OP_FLUSH));
        assert_eq!(op_from_cmd_flags(3, 1 << 20), Some(OP_DISCARD));
        assert_eq!(op_from_cmd_flags(5, 1 << 20), Some(OP_DISCARD));
        // Write-zeroes, zone append, driver commands: not counted.
        for op in [7, 9, 10, 34, 35] {
            assert_eq!(op_from_cmd_flags(op, 4096), None, "{op}");
        }
    }

    #[test]
    fn ops_from_rwbs() {
        let op = |s: &[u8], bytes| op_from_rwbs(s[0], *s.get(1).unwrap_or(&0), bytes);
        assert_eq!(op(b"RS", 4096), Some(OP_READ));
        assert_eq!(op(b"RA", 16384), Some(OP_READ));
        assert_eq!(op(b"WS", 4096), Some(OP_WRITE));
        assert_eq!(op(b"WFS", 4096), Some(OP_WRITE), "write with FUA");
        assert_eq!(op(b"FWS", 0), Some(OP_FLUSH), "fdatasync's empty preflush");
        assert_eq!(
            op(b"FWFS", 4096),
            Some(OP_WRITE),
            "journal commit: preflush + data"
        );
        assert_eq!(op(b"FF", 0), Some(OP_FLUSH));
        assert_eq!(op(b"F", 0), Some(OP_FLUSH));
        assert_eq!(op(b"D", 4096), Some(OP_DISCARD));
        assert_eq!(op(b"DE", 4096), Some(OP_DISCARD));
        assert_eq!(op(b"N", 0), None);
    }

    #[test]
    fn device_numbers() {
        assert_eq!(dev_from(254, 0), 254 << 20);
        assert_eq!(dev_parts(dev_from(259, 3)), (259, 3));
        assert_eq!(op_label(OP_DISCARD), "discard");
    }
}
