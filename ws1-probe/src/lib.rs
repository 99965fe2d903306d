//! ws1-probe library: everything the `ws1-probe` binary does, as testable pieces.

pub mod allocator;
pub mod btf;
pub mod check;
pub mod collectors;
pub mod drops;
pub mod ebpf;
pub mod histogram;
pub mod hostlabels;
pub mod metrics;
pub mod names;
pub mod preflight;
pub mod privileges;
pub mod probe;
pub mod profile;
pub mod report;
pub mod server;
pub mod slo;
pub mod symbolize;
pub mod targeting;
pub mod units;
pub mod untrusted;
pub mod webconfig;
