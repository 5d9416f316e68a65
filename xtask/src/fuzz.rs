//! `cargo xtask fuzz`: every cargo-fuzz target of `tcptrace/fuzz`, each for
//! a bounded time.
//!
//! Why xtask drives it: a fresh machine has only the stable toolchain, and
//! neither `cargo-fuzz` nor nightly. cargo-fuzz needs nightly only for its
//! sanitizers (`-Zsanitizer`); the parsers under test are safe Rust, where
//! what a fuzzer finds is a panic (an overflow, an out-of-range index, a
//! broken property), which needs no sanitizer. So the targets are built
//! with `--sanitizer none` (plain `-C` flags: stable rustc takes them) and
//! `--debug-assertions` (overflow checks on, as in the unit tests).
//!
//! The agent's build script still builds the eBPF object for the fuzz
//! build (the library embeds it), with its own flags: aya-build hands the
//! nested cargo `CARGO_ENCODED_RUSTFLAGS`, which replaces cargo-fuzz's
//! RUSTFLAGS, so no coverage instrumentation reaches the BPF target. It
//! needs the same tools as `cargo xtask build`, checked first.
//!
//! Each target runs with its committed seeds (`fuzz/seeds/TARGET`, read
//! only) and a corpus of its own (`fuzz/corpus/TARGET`, kept between runs,
//! not committed), libFuzzer's own output going to a log file; xtask prints
//! one line per target and, for a crash, the panic, the input that caused
//! it and how to reproduce it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use crate::apt::Apt;
use crate::toolchain::BuildTools;
use crate::{run, say, workspace};

/// The fuzz targets (`tcptrace/fuzz/fuzz_targets/NAME.rs`), in run order.
pub const TARGETS: &[&str] = &[
    "decode",
    "sockdiag",
    "tracefs_format",
    "procfs",
    "config",
    "btf",
];

/// The cargo-fuzz release installed when none is: the one verified with
/// rustc 1.95. Pinned so that a new release cannot break a fresh machine.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The flags every build and run gets (they must match, or `cargo fuzz run`
/// rebuilds): no sanitizer (stable rustc), overflow checks and assertions on.
const BUILD_FLAGS: &[&str] = &["--sanitizer", "none", "--debug-assertions"];

/// Seconds one input may take before libFuzzer calls it a hang (a
/// `timeout-*` artifact): the parsers take microseconds.
const INPUT_TIMEOUT_SECS: u32 = 10;

/// Options of `cargo xtask fuzz`.
#[derive(Debug, Clone, clap::Args)]
pub struct FuzzOpts {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub seconds: u32,
    /// Fuzz only this target (repeat for several); all by default.
    #[arg(long = "target", value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
}

/// How one target's run ended.
struct Outcome {
    target: String,
    /// libFuzzer's "Done N runs" (None when it did not get that far).
    runs: Option<u64>,
    /// The last `cov:` and `corp:` figures libFuzzer printed.
    coverage: Option<String>,
    /// Crash, hang or out-of-memory inputs written.
    artifacts: Vec<String>,
    /// The panic (or libFuzzer error) lines, for the message.
    failure: Vec<String>,
    exit: i32,
    log: PathBuf,
    secs: f64,
}

/// `cargo xtask fuzz`: tools, one build of every target, then each target
/// in turn for `opts.seconds`; fails if any crashed, naming each.
pub fn fuzz(apt: &mut Apt, tools: &BuildTools, opts: &FuzzOpts) -> Result<i32> {
    ensure_cpp_compiler(apt)?;
    ensure_cargo_fuzz()?;
    let dir = fuzz_dir();
    let targets: Vec<String> = if opts.targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        opts.targets.clone()
    };

    say!("building the fuzz targets (first build: a few minutes)");
    let started = Instant::now();
    let mut build = cargo_fuzz(tools, "build")?;
    // cargo-fuzz builds one target or all; all is one cargo run anyway.
    if let [only] = targets.as_slice() {
        build.arg(only);
    }
    run::checked(&mut build).context(
        "building the fuzz targets failed; read the compiler errors above (a bpf-linker or \
         build-std error is the agent's eBPF build: see `cargo xtask build`)",
    )?;
    say!(
        "fuzz targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let logs = dir.join("target").join("xtask-fuzz");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut outcomes = Vec::new();
    for target in &targets {
        let outcome = run_target(tools, &dir, &logs, target, opts.seconds)?;
        say!("{}", summary(&outcome));
        outcomes.push(outcome);
    }

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.exit != 0).collect();
    if failed.is_empty() {
        say!(
            "fuzzing passed: {} targets, {} s each, no crash",
            outcomes.len(),
            opts.seconds
        );
        return Ok(0);
    }
    for o in &failed {
        report_failure(o, &dir);
    }
    bail!(
        "fuzz target{} {} crashed (see above; each crash input becomes a unit test once fixed)",
        if failed.len() > 1 { "s" } else { "" },
        failed
            .iter()
            .map(|o| o.target.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `tcptrace/fuzz`, the cargo-fuzz project.
fn fuzz_dir() -> PathBuf {
    workspace::root().join("tcptrace").join("fuzz")
}

/// `cargo fuzz SUBCOMMAND --fuzz-dir tcptrace/fuzz <flags>`, finding the
/// verified bpf-linker first (the agent's build script links with it).
fn cargo_fuzz(tools: &BuildTools, subcommand: &str) -> Result<Command> {
    let mut cmd = Command::new(workspace::cargo_program());
    cmd.current_dir(workspace::root())
        .env("PATH", tools.path_env()?)
        .arg("fuzz")
        .arg(subcommand)
        .arg("--fuzz-dir")
        .arg(fuzz_dir())
        .args(BUILD_FLAGS);
    Ok(cmd)
}

/// Runs one target for `seconds`, its output going to `logs/TARGET.log`.
fn run_target(
    tools: &BuildTools,
    dir: &Path,
    logs: &Path,
    target: &str,
    seconds: u32,
) -> Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    let seeds = dir.join("seeds").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    if !seeds.is_dir() {
        bail!("{} is missing (the committed seeds)", seeds.display());
    }
    let log = logs.join(format!("{target}.log"));
    let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("cannot reopen {}", log.display()))?;

    let mut cmd = cargo_fuzz(tools, "run")?;
    // New inputs go to the first directory: the corpus, never the seeds.
    cmd.arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    say!(
        "fuzzing {target} for {seconds} s: `{}` (output in {})",
        run::describe(&cmd),
        log.display()
    );
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", run::describe(&cmd)))?;
    let secs = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut outcome = parse_log(target, &text);
    outcome.exit = run::exit_code(status);
    outcome.log = log;
    outcome.secs = secs;
    Ok(outcome)
}

/// What a libFuzzer log says: runs, coverage, artifacts, the panic.
fn parse_log(target: &str, text: &str) -> Outcome {
    let mut outcome = Outcome {
        target: target.to_string(),
        runs: None,
        coverage: None,
        artifacts: Vec::new(),
        failure: Vec::new(),
        exit: 0,
        log: PathBuf::new(),
        secs: 0.0,
    };
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        // "Done 1234567 runs in 21 second(s)"
        if let Some(rest) = line.strip_prefix("Done ") {
            outcome.runs = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        }
        // "#1234567\tDONE   cov: 512 ft: 1203 corp: 120/9876b lim: 4096 exec/s: ..."
        if line.starts_with('#') {
            if let Some(at) = line.find("cov: ") {
                let stats = &line[at..];
                let keep: Vec<&str> = stats
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .chunks(2)
                    .filter(|kv| matches!(kv.first(), Some(&"cov:" | &"corp:" | &"exec/s:")))
                    .flatten()
                    .copied()
                    .collect();
                outcome.coverage = Some(keep.join(" "));
            }
        }
        // "artifact_prefix='...'; Test unit written to /path/crash-abc"
        if let Some((_, path)) = line.split_once("Test unit written to ") {
            outcome.artifacts.push(path.trim().to_string());
        }
        // "thread '<unnamed>' panicked at src/x.rs:1:2:" and its message.
        if line.contains(" panicked at ") {
            outcome.failure.push(line.trim().to_string());
            while let Some(next) = lines.peek() {
                if next.starts_with("stack backtrace:") || next.starts_with("note: ") {
                    break;
                }
                outcome.failure.push(next.trim_end().to_string());
                lines.next();
                if outcome.failure.len() > 12 {
                    break;
                }
            }
        }
        // Hangs and memory: "==123== ERROR: libFuzzer: timeout after 10 seconds".
        if line.contains("ERROR: libFuzzer:") && !line.contains("deadly signal") {
            outcome.failure.push(line.trim().to_string());
        }
    }
    outcome
}

/// The one line printed per target.
fn summary(o: &Outcome) -> String {
    let runs = o
        .runs
        .map_or_else(|| "? runs".to_string(), |n| format!("{n} runs"));
    let cov = o
        .coverage
        .as_deref()
        .map(|c| format!(", {c}"))
        .unwrap_or_default();
    let verdict = if o.exit == 0 {
        "no crash".to_string()
    } else if o.artifacts.is_empty() {
        format!("FAILED (exit {})", o.exit)
    } else {
        format!("CRASHED: {}", o.artifacts.join(", "))
    };
    format!(
        "fuzz {}: {runs} in {:.0} s{cov}: {verdict}",
        o.target, o.secs
    )
}

/// The panic, the input and how to reproduce, for a failed target.
fn report_failure(o: &Outcome, dir: &Path) {
    say!("---- fuzz target {} failed ----", o.target);
    for line in &o.failure {
        say!("  {line}");
    }
    if o.artifacts.is_empty() {
        say!(
            "  no crash input was written (exit {}); the whole output is in {}",
            o.exit,
            o.log.display()
        );
        return;
    }
    for artifact in &o.artifacts {
        say!("  input: {artifact}");
        say!(
            "  reproduce: cargo fuzz run --fuzz-dir {} {} {} {artifact}",
            dir.display(),
            BUILD_FLAGS.join(" "),
            o.target
        );
    }
    say!("  full output: {}", o.log.display());
}

/// libfuzzer-sys compiles libFuzzer (C++) in its build script.
fn ensure_cpp_compiler(apt: &mut Apt) -> Result<()> {
    if run::find_in_path("c++").is_some() || std::env::var_os("CXX").is_some() {
        return Ok(());
    }
    say!("no C++ compiler (libfuzzer-sys builds libFuzzer from C++); installing g++");
    apt.ensure_installed(&["g++".to_string()])
        .context("the fuzz targets need a C++ compiler")
}

/// Makes sure `cargo fuzz` runs, installing cargo-fuzz when it does not.
fn ensure_cargo_fuzz() -> Result<()> {
    let version = || {
        run::capture(Command::new(workspace::cargo_program()).args(["fuzz", "--version"]))
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    if let Some(found) = version() {
        say!("cargo-fuzz: {found}");
        return Ok(());
    }
    say!(
        "cargo-fuzz is missing; installing it with `cargo install cargo-fuzz --locked` \
         (version {CARGO_FUZZ_VERSION}; takes a minute or so) ..."
    );
    let mut cmd = Command::new(workspace::cargo_program());
    cmd.args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ])
    .current_dir(workspace::root());
    run::checked(&mut cmd)
        .context("installing cargo-fuzz failed; the compiler errors are above")?;
    match version() {
        Some(found) => {
            say!("cargo-fuzz: installed {found}");
            Ok(())
        }
        None => bail!(
            "cargo-fuzz was installed but `cargo fuzz --version` still fails; is \
             $CARGO_HOME/bin (~/.cargo/bin) where cargo looks for subcommands?"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRASH_LOG: &str = "\
INFO: Running with entropic power schedule (0xFF, 100).
INFO: seed corpus: files: 7 min: 24b max: 328b total: 776b rss: 55Mb
#8\tINITED cov: 181 ft: 190 corp: 7/776b exec/s: 0 rss: 56Mb
#95\tNEW    cov: 190 ft: 204 corp: 8/800b lim: 328 exec/s: 0 rss: 56Mb L: 24/24 MS: 1 ChangeBit-
thread '<unnamed>' (1291) panicked at /work/main/tcptrace/src/sockdiag.rs:189:79:
attempt to negate with overflow
stack backtrace:
   0: __rustc::rust_begin_unwind
==1291== ERROR: libFuzzer: deadly signal
artifact_prefix='/w/fuzz/artifacts/sockdiag/'; Test unit written to /w/fuzz/artifacts/sockdiag/crash-cc2a
Base64: JAAAAAIA
";

    #[test]
    fn a_crash_log_names_the_panic_and_the_input() {
        let o = parse_log("sockdiag", CRASH_LOG);
        assert_eq!(o.artifacts, ["/w/fuzz/artifacts/sockdiag/crash-cc2a"]);
        assert_eq!(
            o.failure,
            [
                "thread '<unnamed>' (1291) panicked at /work/main/tcptrace/src/sockdiag.rs:189:79:",
                "attempt to negate with overflow"
            ]
        );
        assert_eq!(o.runs, None);
        assert_eq!(
            o.coverage.as_deref(),
            Some("cov: 190 corp: 8/800b exec/s: 0")
        );
    }

    #[test]
    fn a_clean_log_gives_runs_and_coverage() {
        let log = "#1048576\tpulse  cov: 300 ft: 900 corp: 90/2Kb lim: 4096 exec/s: 52428 rss: 60Mb\n\
                   #1193046\tDONE   cov: 301 ft: 905 corp: 91/2Kb lim: 4096 exec/s: 56811 rss: 60Mb\n\
                   Done 1193046 runs in 21 second(s)\n";
        let mut o = parse_log("decode", log);
        assert_eq!(o.runs, Some(1_193_046));
        assert!(o.artifacts.is_empty() && o.failure.is_empty());
        o.secs = 21.2;
        assert_eq!(
            summary(&o),
            "fuzz decode: 1193046 runs in 21 s, cov: 301 corp: 91/2Kb exec/s: 56811: no crash"
        );
    }

    #[test]
    fn a_hang_is_a_failure() {
        let log = "==7== ERROR: libFuzzer: timeout after 10 seconds\n\
                   artifact_prefix='/a/'; Test unit written to /a/timeout-1\n";
        let o = parse_log("btf", log);
        assert_eq!(o.artifacts, ["/a/timeout-1"]);
        assert_eq!(
            o.failure,
            ["==7== ERROR: libFuzzer: timeout after 10 seconds"]
        );
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        let dir = fuzz_dir();
        for t in TARGETS {
            assert!(
                dir.join("fuzz_targets").join(format!("{t}.rs")).is_file(),
                "{t}"
            );
            assert!(dir.join("seeds").join(t).is_dir(), "{t}");
        }
    }
}
