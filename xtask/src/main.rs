//! `cargo xtask`: the one entry point to build, run and test tcptrace.
//!
//! The agent embeds an eBPF object that is built by its build script with a
//! stable toolchain, the `rust-src` component and a `bpf-linker` linked
//! against the same LLVM major as rustc. None of that is there on a fresh
//! machine, and a mismatched `bpf-linker` fails with obscure bitcode errors,
//! so every command first makes sure the tools are right (installing what is
//! missing, and saying so), then does its job:
//!
//! - `build`: build the agent;
//! - `run`: build it and run it as root, passing its exit code through;
//! - `test`: build it and run the test suite (as root) against that binary;
//! - `fuzz`: run the cargo-fuzz targets of `tcptrace/fuzz`, each for a
//!   bounded time (installing cargo-fuzz when missing).
//!
//! Modules: [`toolchain`] checks and installs the build and test tools,
//! [`apt`] installs Debian packages, [`cargo`] drives the nested cargo, and
//! [`run`] spawns processes (errors with context, signal and exit-code
//! handling, root checks).

mod apt;
mod bench;
mod cargo;
mod fuzz;
mod run;
mod toolchain;
mod workspace;

use std::ffi::OsString;
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

/// Prints one progress line, prefixed with `xtask:`, on stderr (stdout stays
/// for the agent's own output under `cargo xtask run`).
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("xtask: {}", format_args!($($arg)*))
    };
}
pub(crate) use say;

/// Build, run and test tcptrace (an eBPF agent tracing TCP state changes).
///
/// Every command first makes sure the build tools are present and right: the
/// `rust-src` component (via rustup) and a `bpf-linker` built against the
/// LLVM major version that rustc uses (Debian's `llvm-NN-dev` plus
/// `cargo install bpf-linker`). What is missing is installed, and each step
/// is printed.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install missing build tools, then build the agent
    /// (`cargo build --package tcptrace`).
    Build {
        /// Build with the release profile (target/release/tcptrace).
        #[arg(long)]
        release: bool,
    },
    /// Build the agent, then run it as root and exit with its exit code.
    ///
    /// As root the agent is started directly; otherwise through `sudo -E`.
    /// SIGINT/SIGTERM (Ctrl-C) go to the agent, which detaches its programs,
    /// flushes its output and exits 0. Example:
    /// `cargo xtask run -- --format text --state close_wait`.
    Run {
        /// Build and run the release binary.
        #[arg(long)]
        release: bool,
        /// Arguments for the agent (after `--`), e.g. `-- --port 3306 -4`;
        /// `-- --help` lists them.
        #[arg(last = true, value_name = "AGENT_ARGS")]
        args: Vec<OsString>,
    },
    /// Install missing build and test tools, build the agent, then run
    /// `cargo test` with TCPTRACE_BIN set to the built agent.
    ///
    /// Needs root (the tests load BPF programs): when not root, the whole
    /// command is run again through `sudo -E`. Test tools installed when
    /// missing: `ip`, `ss` (iproute2), `unshare`, `setpriv` (util-linux),
    /// `mount`, `umount` (mount), `cc` (gcc, for the leaking C fixtures),
    /// `redis-server` (a real upstream that closes idle clients). Example:
    /// `cargo xtask test -- --package tcptrace-tests -- --nocapture`.
    Test {
        /// Arguments for `cargo test` (after `--`); a second `--` passes
        /// arguments on to the test binaries.
        #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
        args: Vec<OsString>,
    },
    /// Measure what the agent costs the host, side by side in one run (as root).
    ///
    /// Builds the release agent, then runs the workloads `--workload`
    /// chooses (`churn`, `redis` or `all`, the default), each in rounds
    /// alternating between tracers in a rotating order (9 per tracer by
    /// default; medians reported). Churn: a driver's loopback connection
    /// churn under no tracer, no-op programs on the same tracepoints (the
    /// floors), the agent in its default mode, the agent writing every
    /// transition as JSON, and libbpf-tools' tcpstates (installed if
    /// missing, when the package exists); it prints connections/s, the ratio
    /// to no tracer, lost records, CPU per million transitions, peak RSS and
    /// kernel ns per connection, then a scale run with 100 000 open
    /// connections and the tracker's memory with 1 000 000 sockets. Redis:
    /// `redis-benchmark -c 50 -t set,get -d 16` against a private
    /// `redis-server` (redis-server and redis-tools installed if missing)
    /// under no tracer, no-op programs on the socket send/receive
    /// tracepoints (the floor), the agent (last use on) and the agent with
    /// `--last-use off`; it prints requests/s, the ratio to no tracer, kernel
    /// ns per send and receive of the I/O programs against the floor's
    /// (`kernel.bpf_stats_enabled`), and stack walks/s. Each workload's
    /// tables are recorded in its own section of BENCHMARKS.md. On a
    /// 2-core VM the default run takes about 9 minutes (`--workload churn`
    /// about 5, `--workload redis` about 4).
    Bench(bench::BenchOpts),
    /// Fuzz the parsers of untrusted input, each target for a bounded time.
    ///
    /// Runs the cargo-fuzz targets of `tcptrace/fuzz` in turn (decode,
    /// sockdiag, tracefs_format, procfs, config, btf) with their committed
    /// seeds, on the stable toolchain (`--sanitizer none
    /// --debug-assertions`), and prints one line per target. Installs
    /// cargo-fuzz (`cargo install cargo-fuzz --locked`) and the agent's build
    /// tools when missing. Fails naming each target that crashed, its
    /// input (under `tcptrace/fuzz/artifacts/`) and how to reproduce it.
    /// Example: `cargo xtask fuzz --seconds 60 --target decode`.
    Fuzz(fuzz::FuzzOpts),
}

fn main() {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("xtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("xtask:   caused by: {cause}");
            }
            std::process::exit(1);
        }
    }
}

/// Runs one command; returns the process exit code xtask should end with.
fn dispatch(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Build { release } => {
            let mut apt = apt::Apt::new();
            let tools = toolchain::ensure_build_tools(&mut apt)?;
            cargo::build_agent(&tools, release)?;
            say!("build finished");
            Ok(0)
        }
        Cmd::Run { release, args } => run_agent(release, args),
        Cmd::Test { args } => test(args),
        Cmd::Bench(opts) => {
            let mut apt = apt::Apt::new();
            let tools = toolchain::ensure_build_tools(&mut apt)?;
            toolchain::ensure_bench_tools(&mut apt);
            bench::bench(&tools, &opts)
        }
        Cmd::Fuzz(opts) => {
            let mut apt = apt::Apt::new();
            let tools = toolchain::ensure_build_tools(&mut apt)?;
            fuzz::fuzz(&mut apt, &tools, &opts)
        }
    }
}

/// `cargo xtask run`: build, then run the agent as root with its exit code.
fn run_agent(release: bool, args: Vec<OsString>) -> Result<i32> {
    let mut apt = apt::Apt::new();
    let tools = toolchain::ensure_build_tools(&mut apt)?;
    let bin = cargo::build_agent(&tools, release)?;
    let mut cmd = if run::is_root() {
        Command::new(&bin)
    } else {
        let Some(sudo) = run::find_in_path("sudo") else {
            bail!(
                "tcptrace needs root (or CAP_BPF+CAP_PERFMON); run as root \
                 (sudo is not installed, so xtask cannot do it for you)"
            );
        };
        say!("not root: running the agent through sudo -E");
        let mut cmd = Command::new(sudo);
        cmd.arg("-E").arg(&bin);
        cmd
    };
    cmd.args(&args);
    run::foreground(&mut cmd)
}

/// Environment variable set when `test` re-runs itself through sudo, so that
/// a sudo that does not give root cannot make it loop.
const SUDO_MARKER: &str = "XTASK_UNDER_SUDO";

/// `cargo xtask test`: as root, tools, agent build, then `cargo test`.
fn test(args: Vec<OsString>) -> Result<i32> {
    if !run::is_root() {
        return rerun_as_root();
    }
    let mut apt = apt::Apt::new();
    let tools = toolchain::ensure_build_tools(&mut apt)?;
    toolchain::ensure_test_tools(&mut apt)?;
    let bin = cargo::build_agent(&tools, false)?;
    let status = cargo::test(&tools, &bin, &args)?;
    if status != 0 {
        say!("tests failed (cargo test exited with {status})");
    } else {
        say!("tests passed");
    }
    Ok(status)
}

/// Re-runs this very xtask command through `sudo -E`, keeping the PATH and
/// the rustup/cargo homes of the caller so that root finds the same
/// toolchain (root's own HOME usually has none).
fn rerun_as_root() -> Result<i32> {
    if std::env::var_os(SUDO_MARKER).is_some() {
        bail!("still not root after sudo; run `cargo xtask test` as root");
    }
    let Some(sudo) = run::find_in_path("sudo") else {
        bail!(
            "cargo xtask test needs root (the tests load BPF programs) and sudo is \
             not installed; run it as root"
        );
    };
    let exe = std::env::current_exe().context("cannot find the xtask executable")?;
    say!("not root: running `cargo xtask test` again through sudo -E");
    let mut cmd = Command::new(sudo);
    cmd.arg("-E").arg("env");
    let mut set = |name: &str, value: OsString| {
        let mut assignment = OsString::from(format!("{name}="));
        assignment.push(value);
        cmd.arg(assignment);
    };
    set(SUDO_MARKER, "1".into());
    if let Some(path) = std::env::var_os("PATH") {
        set("PATH", path);
    }
    for (name, default) in [("CARGO_HOME", ".cargo"), ("RUSTUP_HOME", ".rustup")] {
        if let Some(dir) = toolchain::home_dir_var(name, default) {
            set(name, dir.into_os_string());
        }
    }
    cmd.arg(exe).args(std::env::args_os().skip(1));
    run::foreground(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_without_arguments_parses() {
        let cli = Cli::try_parse_from(["cargo xtask", "run"]).expect("parses");
        match cli.command {
            Cmd::Run { release, args } => {
                assert!(!release);
                assert!(args.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn arguments_after_double_dash_go_to_the_child() {
        let cli =
            Cli::try_parse_from(["x", "run", "--release", "--", "--help", "-4"]).expect("parses");
        match cli.command {
            Cmd::Run { release, args } => {
                assert!(release);
                assert_eq!(args, ["--help", "-4"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from(["x", "test", "--", "-p", "t", "--", "--nocapture"])
            .expect("parses");
        match cli.command {
            Cmd::Test { args } => assert_eq!(args, ["-p", "t", "--", "--nocapture"]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn fuzz_takes_seconds_and_known_targets() {
        let cli = Cli::try_parse_from(["x", "fuzz"]).expect("parses");
        match cli.command {
            Cmd::Fuzz(opts) => assert_eq!((opts.seconds, opts.targets.len()), (20, 0)),
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from([
            "x",
            "fuzz",
            "--seconds",
            "5",
            "--target",
            "btf",
            "--target",
            "decode",
        ])
        .expect("parses");
        match cli.command {
            Cmd::Fuzz(opts) => {
                assert_eq!(opts.seconds, 5);
                assert_eq!(opts.targets, ["btf", "decode"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(Cli::try_parse_from(["x", "fuzz", "--target", "nope"]).is_err());
        assert!(Cli::try_parse_from(["x", "fuzz", "--seconds", "0"]).is_err());
    }
}
