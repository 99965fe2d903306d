//! Block I/O latency, userspace half: attaches the block programs (`tp_btf` where the kernel's
//! BTF has the `struct request` members they read, the tracepoints otherwise), reads the
//! histograms and byte counters into a [`BlockSnapshot`], and names devices.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, IterableMap, MapData},
};
use ws1_probe_common::{
    block::{BlockKey, BlockOffsets, BlockStart, ReqKey, dev_parts},
    hist::LatencyHist,
};

use super::{MapUsage, take_map, typed};
use crate::{
    ebpf::{LoadError, attach_btf_tracepoints, attach_tracepoint, parse_format_offset},
    histogram::Histogram,
};

/// `WS1_PROBE_BLOCK_HOOKS=tracepoint` forces the tracepoint fallback (tests run both paths).
pub const BLOCK_HOOKS_ENV: &str = "WS1_PROBE_BLOCK_HOOKS";

/// The `tp_btf` programs, all or none: (program, tracepoint).
pub const BLOCK_BTF_PROGRAMS: [(&str, &str); 3] = [
    ("block_io_start_btf", "block_io_start"),
    ("block_rq_complete_btf", "block_rq_complete"),
    ("block_rq_merge_btf", "block_rq_merge"),
];

/// The tracepoint fallback: (program, tracepoint). `block_rq_merge` is optional.
pub const BLOCK_TRACEPOINTS: [(&str, &str); 3] = [
    ("block_io_start", "block_io_start"),
    ("block_rq_complete", "block_rq_complete"),
    ("block_rq_merge", "block_rq_merge"),
];

/// Most device names kept; further devices are labelled `MAJOR:MINOR`.
pub const DEVICE_NAMES_MAX: usize = 256;

/// The members and fields the block programs read: `struct request` and friends from the
/// kernel's BTF, tracepoint fields from tracefs.
pub fn offsets(tracefs: &Path) -> BlockOffsets {
    let wanted = [
        ("request", "q"),
        ("request", "cmd_flags"),
        ("request", "__data_len"),
        ("request_queue", "disk"),
        ("gendisk", "major"),
        ("gendisk", "first_minor"),
    ];
    let members = crate::btf::kernel_member_offsets(&wanted).unwrap_or_default();
    offsets_from(&members, |event| {
        std::fs::read_to_string(tracefs.join("events/block").join(event).join("format")).ok()
    })
}

/// [`offsets`] from the BTF members (in `offsets`' order; missing ones `None`) and the
/// tracepoint format texts (`format(event)`, `None` when the kernel lacks the event).
pub fn offsets_from(
    members: &[Option<u32>],
    format: impl Fn(&str) -> Option<String>,
) -> BlockOffsets {
    let member = |i: usize| members.get(i).copied().flatten().unwrap_or(u32::MAX);
    let mut off = BlockOffsets {
        rq_q: member(0),
        rq_cmd_flags: member(1),
        rq_data_len: member(2),
        queue_disk: member(3),
        disk_major: member(4),
        disk_first_minor: member(5),
        ..BlockOffsets::UNKNOWN
    };
    if let Some(text) = format("block_io_start") {
        let field = |name| parse_format_offset(&text, name).unwrap_or(u32::MAX);
        off.start_dev = field("dev");
        off.start_sector = field("sector");
        off.start_bytes = field("bytes");
        off.start_rwbs = field("rwbs");
    }
    if let Some(text) = format("block_rq_complete") {
        let field = |name| parse_format_offset(&text, name).unwrap_or(u32::MAX);
        off.done_dev = field("dev");
        off.done_sector = field("sector");
        off.done_nr_sector = field("nr_sector");
    }
    off
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlockHooks {
    Auto,
    Tracepoint,
}

fn parse_block_hooks(value: Option<&str>) -> Result<BlockHooks, LoadError> {
    match value {
        None | Some("") | Some("auto") => Ok(BlockHooks::Auto),
        Some("tracepoint") => Ok(BlockHooks::Tracepoint),
        Some(other) => Err(LoadError::Setting {
            name: BLOCK_HOOKS_ENV,
            value: other.to_owned(),
            expected: "auto (tp_btf where the kernel allows) or tracepoint",
        }),
    }
}

/// One (service, device, op) series.
#[derive(Clone, Debug, Default)]
pub struct BlockStats {
    /// Creation → completion of each request, in nanoseconds.
    pub latency: Histogram,
    /// Completed bytes.
    pub bytes: u64,
}

/// Everything the block probe has counted since it was attached: (service id, device name,
/// op) → stats. `op` is a `ws1_probe_common::block::OP_*`.
#[derive(Clone, Debug, Default)]
pub struct BlockSnapshot {
    pub series: BTreeMap<(u32, String, u32), BlockStats>,
}

impl BlockSnapshot {
    /// Completed requests per service.
    pub fn requests_by_service(&self) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        for ((service, ..), s) in &self.series {
            *out.entry(*service).or_insert(0) += s.latency.count;
        }
        out
    }
}

/// Device numbers → kernel names (`DEVNAME` of `/sys/dev/block/MAJ:MIN/uevent`), read once per
/// device and kept for at most [`DEVICE_NAMES_MAX`] devices.
#[derive(Debug)]
pub struct DeviceNames {
    root: PathBuf,
    names: StdHashMap<u32, String>,
}

impl DeviceNames {
    /// Names read under `root` (`/sys/dev/block` on a real system).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            names: StdHashMap::new(),
        }
    }

    /// The name of device `dev` (`MAJOR << 20 | MINOR`); `MAJOR:MINOR` when sysfs does not
    /// know it.
    pub fn name(&mut self, dev: u32) -> String {
        if let Some(name) = self.names.get(&dev) {
            return name.clone();
        }
        let (major, minor) = dev_parts(dev);
        let id = format!("{major}:{minor}");
        let name = std::fs::read_to_string(self.root.join(&id).join("uevent"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("DEVNAME="))
                    .map(|n| n.trim().to_owned())
            })
            .filter(|n| !n.is_empty());
        match name {
            Some(name) => {
                if self.names.len() < DEVICE_NAMES_MAX {
                    self.names.insert(dev, name.clone());
                }
                name
            }
            // Not cached: the device may appear later.
            None => id,
        }
    }
}

pub struct BlockCollector {
    hist: HashMap<MapData, BlockKey, LatencyHist>,
    bytes: HashMap<MapData, BlockKey, u64>,
    start: HashMap<MapData, ReqKey, BlockStart>,
    devices: DeviceNames,
    /// How the collector is attached: `tp_btf`, `tracepoint`, or `off`.
    pub hooks: &'static str,
}

impl BlockCollector {
    /// Attaches the block programs. The `tp_btf` programs first (all or none), the
    /// tracepoints otherwise; a kernel with neither (before Linux 6.5 there is no
    /// `block_io_start`) runs without block metrics, with a warning. When `enabled` is false
    /// the maps are taken but nothing is attached.
    pub fn attach(ebpf: &mut Ebpf, enabled: bool) -> Result<Self, LoadError> {
        let hooks = if enabled {
            let setting = parse_block_hooks(std::env::var(BLOCK_HOOKS_ENV).ok().as_deref())?;
            attach_hooks(ebpf, setting)?
        } else {
            "off"
        };
        Ok(Self {
            hist: typed("BLOCK_HIST", take_map(ebpf, "BLOCK_HIST")?)?,
            bytes: typed("BLOCK_BYTES", take_map(ebpf, "BLOCK_BYTES")?)?,
            start: typed("BLOCK_START", take_map(ebpf, "BLOCK_START")?)?,
            devices: DeviceNames::new("/sys/dev/block"),
            hooks,
        })
    }

    /// Reads the histograms and byte counters. Entries that disappear mid-walk are skipped.
    pub fn snapshot(&mut self) -> BlockSnapshot {
        let mut snap = BlockSnapshot::default();
        for (key, hist) in self.hist.iter().flatten() {
            let device = self.devices.name(key.dev);
            snap.series
                .entry((key.service, device, key.op))
                .or_default()
                .latency
                .add_kernel(&hist);
        }
        for (key, bytes) in self.bytes.iter().flatten() {
            let device = self.devices.name(key.dev);
            snap.series
                .entry((key.service, device, key.op))
                .or_default()
                .bytes += bytes;
        }
        snap
    }

    /// Deletes the entries of `services` (gone, and read by the caller), as
    /// `SyscallCollector::reclaim` does. Returns how many were deleted.
    pub fn reclaim(&mut self, services: &BTreeSet<u32>) -> usize {
        if services.is_empty() {
            return 0;
        }
        let gone = |keys: Vec<BlockKey>| -> Vec<BlockKey> {
            keys.into_iter()
                .filter(|k| services.contains(&k.service))
                .collect()
        };
        let hist = gone(self.hist.keys().flatten().collect());
        let bytes = gone(self.bytes.keys().flatten().collect());
        let mut n = 0;
        for key in &hist {
            n += usize::from(self.hist.remove(key).is_ok());
        }
        for key in &bytes {
            n += usize::from(self.bytes.remove(key).is_ok());
        }
        n
    }

    pub fn usage(&self) -> Vec<MapUsage> {
        vec![
            MapUsage::of("BLOCK_START", self.start.keys().count(), self.start.map()),
            MapUsage::of("BLOCK_HIST", self.hist.keys().count(), self.hist.map()),
            MapUsage::of("BLOCK_BYTES", self.bytes.keys().count(), self.bytes.map()),
        ]
    }
}

/// Attaches the `tp_btf` programs or the tracepoints; returns which.
fn attach_hooks(ebpf: &mut Ebpf, setting: BlockHooks) -> Result<&'static str, LoadError> {
    let off = offsets(Path::new(crate::ebpf::TRACEFS));
    if setting == BlockHooks::Auto {
        let attached = if off.btf_usable() {
            aya::Btf::from_sys_fs()
                .map_err(|e| format!("cannot read kernel BTF: {e}"))
                .and_then(|btf| attach_btf_tracepoints(ebpf, &BLOCK_BTF_PROGRAMS, &btf))
        } else {
            Err("kernel BTF lacks a struct request, request_queue or gendisk member".to_owned())
        };
        match attached {
            Ok(()) => return Ok("tp_btf"),
            Err(reason) => tracing::info!(
                "block: tp_btf programs unavailable ({reason}); using the tracepoints"
            ),
        }
    }
    if !off.tracepoints_usable() {
        tracing::warn!(
            "block: this kernel lacks tracepoint block:block_io_start or block:block_rq_complete (or their fields; block_io_start is Linux 6.5+); block I/O is not measured (leave block out of --collectors to silence this)"
        );
        return Ok("off");
    }
    for (i, &(program, tp)) in BLOCK_TRACEPOINTS.iter().enumerate() {
        match attach_tracepoint(ebpf, program, "block", tp) {
            Ok(()) => {}
            // Without the merge hook a merged request's entry stays until its slot is reused
            // or the map fills (counted as drops).
            Err(LoadError::Attach { reason, .. }) if i == 2 => {
                tracing::warn!(
                    "block: cannot attach block:{tp}: {reason}; skipped, the other block hooks run (`ws1-probe check` lists what this kernel allows)"
                );
            }
            Err(err) => return Err(err),
        }
    }
    Ok("tracepoint")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `block:block_io_start` and `block:block_rq_complete` as Linux 6.18 prints them.
    const IO_START: &str = "format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:unsigned int bytes;\toffset:28;\tsize:4;\tsigned:0;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
";
    const COMPLETE: &str = "format:
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
";

    #[test]
    fn offsets_from_btf_and_formats() {
        let members = [Some(0), Some(24), Some(44), Some(72), Some(0), Some(4)];
        let off = offsets_from(&members, |event| match event {
            "block_io_start" => Some(IO_START.to_owned()),
            "block_rq_complete" => Some(COMPLETE.to_owned()),
            _ => None,
        });
        assert!(off.btf_usable() && off.tracepoints_usable());
        assert_eq!((off.rq_cmd_flags, off.rq_data_len), (24, 44));
        assert_eq!(
            (
                off.start_dev,
                off.start_sector,
                off.start_bytes,
                off.start_rwbs
            ),
            (8, 16, 28, 34)
        );
        assert_eq!((off.done_dev, off.done_nr_sector), (8, 24));
        // A kernel before 6.5 (no block_io_start) and without BTF: neither path.
        let old = offsets_from(&[], |event| {
            (event == "block_rq_complete").then(|| COMPLETE.to_owned())
        });
        assert!(!old.btf_usable() && !old.tracepoints_usable());
    }

    #[test]
    fn block_hooks_setting() {
        assert_eq!(parse_block_hooks(None).ok(), Some(BlockHooks::Auto));
        assert_eq!(
            parse_block_hooks(Some("tracepoint")).ok(),
            Some(BlockHooks::Tracepoint)
        );
        let err = parse_block_hooks(Some("kprobe"))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "WS1_PROBE_BLOCK_HOOKS=\"kprobe\" is not a known setting: use auto (tp_btf where the kernel allows) or tracepoint"
            )
        );
    }

    #[test]
    fn device_names_from_sysfs_cached_and_bounded() {
        let root = std::env::temp_dir().join(format!("ws1-block-names-{}", std::process::id()));
        let dir = root.join("254:0");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("uevent"),
            "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n",
        )
        .unwrap();
        let mut names = DeviceNames::new(&root);
        let vda = ws1_probe_common::block::dev_from(254, 0);
        assert_eq!(names.name(vda), "vda");
        // Cached: the file is no longer read.
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(names.name(vda), "vda");
        // Unknown to sysfs: major:minor.
        assert_eq!(names.name(ws1_probe_common::block::dev_from(8, 17)), "8:17");
        // Bounded: past DEVICE_NAMES_MAX devices, names are read each time, not kept.
        for minor in 0..=DEVICE_NAMES_MAX as u32 {
            let dir = root.join(format!("1:{minor}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("uevent"), format!("DEVNAME=ram{minor}\n")).unwrap();
        }
        let mut names = DeviceNames::new(&root);
        for minor in 0..=DEVICE_NAMES_MAX as u32 {
            let dev = ws1_probe_common::block::dev_from(1, minor);
            assert_eq!(names.name(dev), format!("ram{minor}"));
        }
        assert_eq!(names.names.len(), DEVICE_NAMES_MAX);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
