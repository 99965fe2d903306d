//! Builds the profiler's C workload, `workloads/burn.c`, twice: `ws1-burn-fp` with frame
//! pointers in every function and `ws1-burn-nofp` without them (only its `.eh_frame` describes
//! the stack), so the tests can check both unwinders on one known profile. The paths reach the
//! tests as `WS1_BURN_FP` and `WS1_BURN_NOFP` (see `burn_bin` in src/lib.rs).
//!
//! C rather than Rust because the frame-pointer flags of a C compiler apply to exactly this
//! program, while a Rust binary would also carry a prebuilt standard library compiled without
//! them; and the machines already have gcc, which the Rust toolchain needs for linking.

use std::{
    env,
    ffi::OsString,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{Command, exit},
};

const SOURCE: &str = "workloads/burn.c";

/// Flags of both builds: optimised like production code, with debug info for the symbolizer.
const COMMON: &[&str] = &["-O2", "-g", "-Wall", "-Wextra", "-pthread"];

/// GCC 12 keeps leaf frame pointers only in leaves that need a stack frame, so burn.c makes its
/// hot functions non-leaf; the flag still covers compilers that honour it.
const FRAME_POINTERS: &[&str] = &["-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer"];

/// Frame pointers off (the -O2 default on x86-64, stated anyway); unwind tables on (the default
/// too), since they are all a DWARF unwinder has to go on.
const NO_FRAME_POINTERS: &[&str] = &["-fomit-frame-pointer", "-fasynchronous-unwind-tables"];

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=CC");
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        fail("OUT_DIR is not set: build the tests with cargo");
    };
    let cc = env::var_os("CC")
        .filter(|cc| !cc.is_empty())
        .unwrap_or_else(|| OsString::from("cc"));

    for (name, flags, env_var) in [
        ("ws1-burn-fp", FRAME_POINTERS, "WS1_BURN_FP"),
        ("ws1-burn-nofp", NO_FRAME_POINTERS, "WS1_BURN_NOFP"),
    ] {
        let output = out_dir.join(name);
        compile(&cc, flags, &output);
        println!("cargo:rustc-env={env_var}={}", output.display());
    }
}

fn compile(cc: &OsString, flags: &[&str], output: &Path) {
    let mut cmd = Command::new(cc);
    cmd.args(COMMON)
        .args(flags)
        .arg("-o")
        .arg(output)
        .arg(SOURCE);
    match cmd.status() {
        Ok(status) if status.success() => {}
        // The compiler's own messages are already on stderr, above this line.
        Ok(status) => fail(&format!("`{cmd:?}` failed ({status}) compiling {SOURCE}")),
        Err(err) if err.kind() == ErrorKind::NotFound => fail(&format!(
            "no C compiler `{}` to build the {SOURCE} test workload: install gcc with `apt-get install gcc`",
            cc.to_string_lossy()
        )),
        Err(err) => fail(&format!(
            "cannot run the C compiler `{}`: {err}",
            cc.to_string_lossy()
        )),
    }
}

/// One line on stderr, which cargo shows under the failed build script, then a failed build.
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    exit(1);
}
