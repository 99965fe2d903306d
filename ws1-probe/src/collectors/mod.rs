//! Userspace halves of the probes: attach the kernel programs, read their maps.
//! One file per probe, named like its kernel and shared-type counterparts.

pub mod alloc;
pub mod block;
pub mod host;
pub mod memory;
pub mod net;
pub mod profile;
pub mod resources;
pub mod sched;
pub mod syscalls;
pub mod targets;

use aya::{Ebpf, maps::MapData};

use crate::ebpf::LoadError;

/// Takes a map out of the object so a collector can own a typed handle to it.
pub(crate) fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, LoadError> {
    ebpf.take_map(name).ok_or_else(|| LoadError::MissingMap {
        map: name.to_owned(),
    })
}

/// Converts a taken map into its typed handle.
pub(crate) fn typed<T>(name: &str, map: aya::maps::Map) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(|source| LoadError::Map {
        map: name.to_owned(),
        source,
    })
}

/// Entries in use and capacity of a map, for `ws1_probe_bpf_map_entries`/`_capacity`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

impl MapUsage {
    /// Usage of `data` holding `entries` entries; the capacity comes from the kernel's map info.
    pub(crate) fn of(map: &'static str, entries: usize, data: &MapData) -> Self {
        Self {
            map,
            entries: entries as u64,
            capacity: data.info().map(|i| u64::from(i.max_entries())).unwrap_or(0),
        }
    }
}
