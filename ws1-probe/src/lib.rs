//! ws1-probe library: everything the `ws1-probe` binary does, as testable pieces.

pub mod histogram;
pub mod names;
pub mod targeting;
