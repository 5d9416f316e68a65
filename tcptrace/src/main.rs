//! The tcptrace agent binary: parse the command line, run, report errors as
//! one line and an exit code (0 after a signal, 1 on error, 2 on bad usage).

use std::process::ExitCode;

use tcptrace::commands::cli::Command;
use tcptrace::commands::config::{self, ArgsError};
use tcptrace::commands::run;

/// Makes every thread allocate from glibc's one main arena, before any
/// thread starts. By default a thread that allocates gets an arena of its
/// own, which keeps what it freed: the thread that dumps every namespace's
/// TIME_WAIT sockets (megabytes per 100 000) then held its largest dump
/// resident, and the soak test saw the agent's RSS creep up 12 % over a
/// million connections. The agent's threads allocate little and rarely at
/// once, so sharing one arena costs nothing measurable.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt has no preconditions; called while one thread runs.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Exit status for bad usage: flags, values, config files.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    one_malloc_arena();
    let cli = match config::parse_args(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(ArgsError::Clap(e)) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line: what is wrong, and where to look.
            eprintln!("error: {}; see `tcptrace --help`", config::clap_reason(&e));
            return ExitCode::from(USAGE);
        }
        Err(ArgsError::Config(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(USAGE);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let report = match &cli.command {
        Some(Command::Leaks {
            format,
            state_file,
            leak_after,
            flamegraph,
            folded,
            identity,
        }) => Some(tcptrace::commands::snapshot::leaks(
            *format,
            state_file,
            *leak_after,
            &tcptrace::commands::snapshot::LeaksView {
                filter: identity.filter(),
                folded: *folded,
                flamegraph: flamegraph.clone(),
            },
        )),
        Some(Command::Timewait { format, state_file }) => {
            Some(tcptrace::commands::snapshot::timewait(*format, state_file))
        }
        Some(Command::BenchFloor {
            syscall_hooks,
            btf,
            io,
        }) => Some(bench_floor(*syscall_hooks, *btf, *io)),
        Some(Command::CheckConfig { file }) => {
            return match config::load(file) {
                Ok(settings) => {
                    println!("{}: OK, {} settings", file.display(), settings.len());
                    for s in settings {
                        println!("  line {}: {}", s.line, s.args.join(" "));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(USAGE)
                }
            };
        }
        None => None,
    };
    if let Some(result) = report {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `tcptrace bench-floor`: the no-op programs attached until a signal.
fn bench_floor(syscall_hooks: bool, btf: bool, io: bool) -> anyhow::Result<()> {
    tcptrace::host::privileges::check()?;
    tcptrace::kernel::tracefs::locate_or_mount()?;
    let (_attached, stats) = tcptrace::kernel::probe::attach_bench_floor(syscall_hooks, btf, io)?;
    log::info!(
        "ready: no-op programs attached (syscall hooks: {syscall_hooks}, BTF: {btf}, \
         socket I/O: {io})"
    );
    let mut signals = [libc::SIGINT, libc::SIGTERM];
    // SAFETY: a zeroed sigset is valid input for sigemptyset/sigaddset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset; blocking the signals lets sigwait take them.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in &mut signals {
            libc::sigaddset(&mut set, *s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mut got = 0;
    // SAFETY: valid set and out pointer.
    unsafe { libc::sigwait(&set, &mut got) };
    log::info!("signal {got}: detaching");
    // For `cargo xtask bench`'s kernel-time pass (zero without
    // kernel.bpf_stats_enabled).
    for p in stats.run_times() {
        log::info!(
            "program {}: {} runs, {} ns in the kernel",
            p.program,
            p.runs,
            p.run_ns
        );
    }
    Ok(())
}
