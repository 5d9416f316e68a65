//! The tcptrace agent binary: parse the command line, run, report errors as
//! one line and an exit code (0 after a signal, 1 on error, 2 on bad usage).

use std::process::ExitCode;

use clap::Parser as _;
use tcptrace::{
    agent,
    cli::{Cli, Command},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let report = match &cli.command {
        Some(Command::Leaks {
            format,
            state_file,
            leak_after,
        }) => Some(tcptrace::report_cmd::leaks(
            *format,
            state_file,
            *leak_after,
        )),
        Some(Command::Timewait { format, state_file }) => {
            Some(tcptrace::report_cmd::timewait(*format, state_file))
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
    match runtime.block_on(agent::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
