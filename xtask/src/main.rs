//! `cargo xtask`: build, run and test tcptrace, installing what the build
//! needs first. See `cargo xtask --help`.

mod apt;
mod cmd;
mod toolchain;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{anyhow, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run and test tcptrace. Each command first installs what is missing \
             (rust-src, bpf-linker built against rustc's LLVM, and for tests iproute2 and \
             util-linux), saying what it installs."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel program and the agent.
    Build {
        /// Optimized build.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the agent as root (through `sudo -E` when not root).
    Run {
        /// Optimized build.
        #[arg(long)]
        release: bool,
        /// Arguments for the agent, after `--` (try `-- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run every test (unit and integration; needs root).
    Test {
        /// Arguments for `cargo test`, after `--` (e.g. `-- loopback`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("xtask has no parent directory"))
}

fn target_dir(root: &std::path::Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |d| root.join(d))
}

/// Builds the agent; returns the path of its binary.
fn build(release: bool) -> anyhow::Result<PathBuf> {
    toolchain::ensure_build_tools(&mut apt::Apt::default())?;
    let root = workspace_root()?;
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(&root)
        .args(["build", "--package", "tcptrace"]);
    if release {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo).context("building the agent")?;
    let bin = target_dir(&root)
        .join(if release { "release" } else { "debug" })
        .join("tcptrace");
    if !bin.is_file() {
        return Err(anyhow!("the build did not produce {}", bin.display()));
    }
    Ok(bin)
}

/// Ignores SIGINT/SIGTERM in xtask itself while `child` runs: Ctrl-C reaches
/// the agent (same process group), which flushes and exits 0.
fn wait_forwarding_exit(mut child: std::process::Child) -> anyhow::Result<ExitCode> {
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    let status = child.wait().context("waiting for the agent")?;
    Ok(match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// `sudo -E` in front of `program` unless we are root.
fn as_root(program: &std::path::Path) -> anyhow::Result<Command> {
    if cmd::is_root() {
        return Ok(Command::new(program));
    }
    if cmd::output(Command::new("sh").args(["-c", "command -v sudo"])).is_none() {
        return Err(anyhow!(
            "tcptrace needs root (or CAP_BPF+CAP_PERFMON) and sudo is not installed; run this as root"
        ));
    }
    let mut c = Command::new("sudo");
    c.arg("-E").arg(program);
    Ok(c)
}

fn run(release: bool, args: &[String]) -> anyhow::Result<ExitCode> {
    let bin = build(release)?;
    let mut agent = as_root(&bin)?;
    agent.args(args);
    eprintln!("xtask: running `{}`", cmd::display(&agent));
    let child = agent
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    wait_forwarding_exit(child)
}

fn test(args: &[String]) -> anyhow::Result<ExitCode> {
    if !cmd::is_root() {
        // The tests load BPF programs and create network namespaces.
        let me = std::env::current_exe().context("locating xtask")?;
        let mut again = as_root(&me)?;
        again.arg("test").args(args);
        eprintln!("xtask: tests need root; running `{}`", cmd::display(&again));
        let child = again.spawn().context("re-running xtask as root")?;
        return wait_forwarding_exit(child);
    }
    let mut apt = apt::Apt::default();
    toolchain::ensure_test_tools(&mut apt)?;
    let bin = build(false)?;
    let status = cmd::status(
        Command::new("cargo")
            .current_dir(workspace_root()?)
            .arg("test")
            .args(args)
            .env("TCPTRACE_BIN", &bin),
    )?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("xtask: tests failed ({status})");
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Build { release } => build(release).map(|bin| {
            eprintln!("xtask: built {}", bin.display());
            ExitCode::SUCCESS
        }),
        Cmd::Run { release, args } => run(release, &args),
        Cmd::Test { args } => test(&args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("xtask: error: {e:#}");
        ExitCode::FAILURE
    })
}
