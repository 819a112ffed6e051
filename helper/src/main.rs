#![forbid(unsafe_code)]
//! `opsagent-helper`: the root helper. All logic lives in the library so that it can be
//! tested; this only parses the command line and turns an error into an exit code.

use std::process::ExitCode;

use opsagent_helper::cli::{help, Cli, Invocation, STORAGE_ENV, USAGE};

fn main() -> ExitCode {
    let cli = match Cli::parse_args(std::env::args_os().skip(1), std::env::var_os(STORAGE_ENV).as_deref()) {
        Ok(Invocation::Run(cli)) => cli,
        Ok(Invocation::Help) => {
            print!("{}", help());
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            println!("opsagent-helper {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("opsagent-helper: error: {e}\n\n{USAGE}\n\nFor more information, try '--help'.");
            return ExitCode::from(2);
        }
    };
    match opsagent_helper::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("opsagent-helper: {e:#}");
            ExitCode::FAILURE
        }
    }
}
