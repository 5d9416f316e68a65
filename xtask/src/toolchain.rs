//! What building the kernel program needs, installed when missing:
//! `rust-src` (for `-Z build-std=core`) and `bpf-linker` linked against the
//! same LLVM major as rustc (it reads rustc's bitcode). Test runs also need
//! iproute2 (`ip`, `ss`) and util-linux (`unshare`, `setpriv`).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, Context as _};

use crate::apt::Apt;
use crate::cmd;

/// bpf-linker release known to build and work with LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The LLVM major version in `rustc -vV` output (`LLVM version: 22.1.2`).
pub fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|major| major.parse().ok())
}

/// True when `ldd` output shows a dynamic libLLVM of `major`.
pub fn ldd_links_llvm(ldd: &str, major: u32) -> bool {
    ldd.lines().any(|l| {
        let lib = l.trim();
        lib.starts_with(&format!("libLLVM.so.{major}"))
            || lib.starts_with(&format!("libLLVM-{major}"))
    })
}

fn cargo_bin_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"))
}

fn find_bpf_linker() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    on_path
        .chain(cargo_bin_dir())
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
}

fn rust_src_present() -> anyhow::Result<bool> {
    let sysroot = cmd::output(Command::new("rustc").args(["--print", "sysroot"]))
        .ok_or_else(|| anyhow!("`rustc --print sysroot` failed; is Rust installed with rustup?"))?;
    Ok(PathBuf::from(sysroot.trim())
        .join("lib/rustlib/src/rust/library/core")
        .is_dir())
}

/// Makes sure `rust-src` and a matching `bpf-linker` are installed.
pub fn ensure_build_tools(apt: &mut Apt) -> anyhow::Result<()> {
    if !rust_src_present()? {
        eprintln!("xtask: installing rust-src (the BPF target builds `core` from source)");
        cmd::run(Command::new("rustup").args(["component", "add", "rust-src"]))
            .context("installing the rust-src component")?;
    }

    let vv = cmd::output(Command::new("rustc").arg("-vV"))
        .ok_or_else(|| anyhow!("`rustc -vV` failed"))?;
    let major = parse_llvm_major(&vv)
        .ok_or_else(|| anyhow!("cannot find the LLVM version in `rustc -vV`:\n{vv}"))?;

    if let Some(linker) = find_bpf_linker() {
        let runs = cmd::output(Command::new(&linker).arg("--version")).is_some();
        let ldd = cmd::output(Command::new("ldd").arg(&linker)).unwrap_or_default();
        if runs && ldd_links_llvm(&ldd, major) {
            return Ok(());
        }
        eprintln!(
            "xtask: {} is not linked against LLVM {major} (rustc's); rebuilding it",
            linker.display()
        );
    }

    apt.ensure(
        &[
            &format!("llvm-{major}-dev"),
            &format!("libpolly-{major}-dev"),
        ],
        &format!("bpf-linker links against LLVM {major}, rustc's LLVM"),
    )?;
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} built against LLVM {major} (about a minute)");
    let prefix = format!("/usr/lib/llvm-{major}");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![PathBuf::from(&prefix).join("bin")];
    paths.extend(std::env::split_paths(&path));
    cmd::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            .env(
                "PATH",
                std::env::join_paths(paths).context("building PATH")?,
            ),
    )
    .context("installing bpf-linker")?;
    if find_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker was installed but is not on PATH; add {} to PATH",
            cargo_bin_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        ));
    }
    Ok(())
}

/// Makes sure the commands the integration tests call exist.
pub fn ensure_test_tools(apt: &mut Apt) -> anyhow::Result<()> {
    let needed = [
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("unshare", "util-linux"),
        ("setpriv", "util-linux"),
        ("mount", "mount"),
    ];
    let mut pkgs: Vec<&str> = needed
        .iter()
        .filter(|(bin, _)| {
            cmd::output(Command::new("sh").args(["-c", &format!("command -v {bin}")])).is_none()
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    pkgs.dedup();
    apt.ensure(&pkgs, "the integration tests use them")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc() {
        let vv = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.95.0\nLLVM version: 22.1.2\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0"), None);
    }

    #[test]
    fn ldd_detection() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f39)\n";
        assert!(ldd_links_llvm(ldd, 22));
        assert!(!ldd_links_llvm(ldd, 23));
        assert!(ldd_links_llvm("\tlibLLVM-21.so => /x (0x1)", 21));
        assert!(!ldd_links_llvm("\tnot a dynamic executable", 22));
    }
}
