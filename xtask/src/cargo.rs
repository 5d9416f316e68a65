//! The nested cargo runs: building the agent and running the tests.
//!
//! Why a module: the agent's build script links the eBPF object with the
//! `bpf-linker` that [`crate::toolchain`] verified, so every nested cargo gets
//! a PATH that finds that one first; and the agent binary's location depends
//! on the target directory, which only cargo knows for sure (CARGO_TARGET_DIR,
//! `build.target-dir` in any config file), so it is asked, not guessed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::toolchain::BuildTools;
use crate::workspace::{cargo_program, root as workspace_root};
use crate::{run, say};

/// A cargo command in the workspace root whose PATH finds the verified
/// bpf-linker first.
fn cargo(tools: &BuildTools) -> Result<Command> {
    let mut cmd = Command::new(cargo_program());
    cmd.current_dir(workspace_root())
        .env("PATH", tools.path_env()?);
    Ok(cmd)
}

/// `cargo build --package tcptrace [--release]`; returns the agent binary.
pub fn build_agent(tools: &BuildTools, release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    say!("building the agent ({profile})");
    let mut cmd = cargo(tools)?;
    cmd.args(["build", "--package", "tcptrace"]);
    if release {
        cmd.arg("--release");
    }
    run::checked(&mut cmd).context(
        "building the agent failed; read the compiler errors above (a bpf-linker or \
         build-std error means the toolchain is broken: see `cargo xtask --help`)",
    )?;
    let bin = target_dir()?.join(profile).join("tcptrace");
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    say!("agent binary: {}", bin.display());
    Ok(bin)
}

/// `cargo build --package PKG --bin BIN [--release]`; returns the binary.
pub fn build_bin(tools: &BuildTools, package: &str, bin: &str, release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    say!("building {bin} ({profile})");
    let mut cmd = cargo(tools)?;
    cmd.args(["build", "--package", package, "--bin", bin]);
    if release {
        cmd.arg("--release");
    }
    run::checked(&mut cmd).with_context(|| format!("building {bin} failed"))?;
    let path = target_dir()?.join(profile).join(bin);
    if !path.is_file() {
        bail!("the build succeeded but {} does not exist", path.display());
    }
    Ok(path)
}

/// `cargo run --release --package tcptrace --example NAME -- ARGS`; returns
/// its stdout.
pub fn run_example(tools: &BuildTools, name: &str, args: &[&str]) -> Result<String> {
    say!("running the {name} example");
    let mut cmd = cargo(tools)?;
    cmd.args([
        "run",
        "--quiet",
        "--release",
        "--package",
        "tcptrace",
        "--example",
        name,
        "--",
    ])
    .args(args);
    run::capture_stdout(&mut cmd).with_context(|| format!("running the {name} example"))
}

/// `cargo test <args>` with TCPTRACE_BIN set to the agent binary; returns
/// cargo's exit code.
///
/// Not `--workspace`: the root manifest's default-members leave out the eBPF
/// crate, which only builds for the BPF target.
pub fn test(tools: &BuildTools, bin: &Path, args: &[OsString]) -> Result<i32> {
    say!("running the tests with TCPTRACE_BIN={}", bin.display());
    let mut cmd = cargo(tools)?;
    cmd.arg("test").args(args).env("TCPTRACE_BIN", bin);
    run::status(&mut cmd)
}

/// The target directory, as `cargo metadata` reports it.
pub fn target_dir() -> Result<PathBuf> {
    let json = run::capture_stdout(
        Command::new(cargo_program())
            .current_dir(workspace_root())
            .args(["metadata", "--format-version", "1", "--no-deps"]),
    )
    .context("cannot ask cargo for the target directory")?;
    target_directory(&json)
}

/// `target_directory` of `cargo metadata`'s JSON.
fn target_directory(json: &str) -> Result<PathBuf> {
    let metadata: serde_json::Value =
        serde_json::from_str(json).context("`cargo metadata` printed no JSON")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("`cargo metadata` printed no target_directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_target_directory() {
        let json = r#"{"packages":[{"name":"x","description":"\"target_directory\":\"nope\""}],"workspace_members":[],"target_directory":"/work/main/target","build_directory":"/b","version":1,"workspace_root":"/work/main"}"#;
        assert_eq!(
            target_directory(json).ok(),
            Some(PathBuf::from("/work/main/target"))
        );
        assert_eq!(
            target_directory(r#"{"target_directory": "/a \"q\"\\b\u00e9"}"#).ok(),
            Some(PathBuf::from("/a \"q\"\\b\u{e9}"))
        );
        assert!(target_directory("{}").is_err());
        assert!(target_directory(r#"{"target_directory":"/unterminated"#).is_err());
    }

    #[test]
    fn workspace_root_holds_the_agent() {
        assert!(workspace_root().join("tcptrace").is_dir());
    }
}
