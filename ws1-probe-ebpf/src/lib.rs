// This file exists so that `ws1-probe`'s build script can depend on this crate and be rerun when
// it changes; the programs themselves are in the `ws1-probe` binary target (src/main.rs).
#![no_std]
