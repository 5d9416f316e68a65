//! Where the workspace is and which cargo drives it: the two facts every
//! other module of xtask starts from (so they sit below all of them).

use std::ffi::OsString;
use std::path::Path;

/// The workspace root (xtask lives in its `xtask/` folder).
pub fn root() -> &'static Path {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir)
}

/// The cargo that runs us (cargo sets CARGO for `cargo run`), so nested
/// builds use the same toolchain; plain `cargo` otherwise.
pub fn cargo_program() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}
