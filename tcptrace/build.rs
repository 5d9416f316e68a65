//! Builds the kernel program (`tcptrace-ebpf`) for the BPF target and puts the
//! object in OUT_DIR, where `main.rs` embeds it.
//!
//! The build uses a stable toolchain: `RUSTC_BOOTSTRAP=1` (set here when the
//! caller did not) unlocks `-Z build-std=core`, which needs the `rust-src`
//! component; linking needs `bpf-linker`. `cargo xtask build` installs both.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // `cargo fuzz` builds the library for its parsers only: the targets
    // never load the kernel program, so an empty object saves building it.
    println!("cargo:rerun-if-env-changed=CARGO_CFG_FUZZING");
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR is not set"))?;
        let object = std::path::Path::new(&out).join("tcptrace");
        std::fs::write(&object, b"")
            .with_context(|| format!("writing the empty {}", object.display()))?;
        return Ok(());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("tcptrace-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non UTF-8 path {}", root.display()))?;
    // Build the kernel program with the toolchain building us (rustup sets
    // RUSTUP_TOOLCHAIN for its children): a machine may have no "stable" or
    // "nightly" alias installed, and nothing can be downloaded.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_string());
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    if std::env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    aya_build::build_ebpf(
        [Package {
            name: "tcptrace-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context("building the eBPF program failed; run `cargo xtask build` to install rust-src and bpf-linker")
}
