//! ws1-probe library: everything the `ws1-probe` binary does, as testable pieces.

pub mod btf;
pub mod check;
pub mod collectors;
pub mod ebpf;
pub mod histogram;
pub mod metrics;
pub mod metrics_cache;
pub mod names;
pub mod preflight;
pub mod probe;
pub mod profile;
pub mod report;
pub mod selfmetrics;
pub mod server;
pub mod symbolize;
pub mod targeting;
pub mod units;
