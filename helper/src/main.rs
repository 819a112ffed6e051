#![forbid(unsafe_code)]
//! `opsagent-helper`: the root helper. All logic lives in the library so that it can be
//! tested; this only parses the command line and turns an error into an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = opsagent_helper::cli::Cli::parse();
    match opsagent_helper::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("opsagent-helper: {e:#}");
            ExitCode::FAILURE
        }
    }
}
