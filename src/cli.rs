//! The `opsagent` command line: `run` (the daemon), `apply` (one local round through
//! the helper), `check` (validate recipe files), `status`, `stop` and `upgrade`. This
//! file parses it; each subcommand is in `crate::cmd`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cmd;
use crate::config::{ConfigError, Overrides};

/// The parts of opsagent(8) that the command line does not say.
pub const MANUAL: crate::manual::Extra<'static> = crate::manual::Extra {
    description: &[
        "The unprivileged daemon (user opsagent) keeps one WebSocket to the backend, receives the recipe \
         (an ordered list of idempotent states), applies it in rounds through the root helper \
         opsagent-helper(8), and reports every state's result as a StateLog. `opsagent run` is what \
         opsagent.service starts; the other commands are for operators.",
        "Logs go to the journal: journalctl -u opsagent -u opsagent-helper; journalctl -x explains the \
         events that carry a catalog entry (a failed state, a ceased round, an unreachable backend, a \
         failed upgrade, unverified recipes).",
    ],
    files: &[
        (
            "/etc/opsagent.conf",
            "The configuration (`opsagent config-example` prints every key), also read in the original agent's format.",
        ),
        ("/var/lib/opsagent", "The state directory: persisted recipe, StateLog spool, status file, token."),
        ("/etc/opsagent/helper.policy", "What the root helper may do for the daemon; see opsagent-helper(8)."),
    ],
    environment: &[("RUST_LOG", "Log filter, e.g. opsagent=debug.")],
    see_also: &["opsagent-helper(8)", "opsagent-backend(8)", "systemctl(1)", "journalctl(1)"],
};

#[derive(Debug, Parser)]
#[command(name = "opsagent", version, about = "VisualOps configuration agent (systemd-native)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: connect to the backend and apply its recipe in rounds, forever.
    Run {
        /// Configuration file [default: /etc/opsagent.conf if it exists]
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Apply a recipe file once, locally, through the root helper, and print each result.
    /// Without FILE, applies the built-in demo recipe (under /tmp/opsagent-demo).
    Apply {
        file: Option<PathBuf>,
        /// Use the helper listening here instead of starting a private one (needs root).
        #[arg(long, value_name = "PATH")]
        helper_socket: Option<PathBuf>,
        /// The helper binary to start [default: opsagent-helper next to this binary]
        #[arg(long, value_name = "PATH", env = "OPSAGENT_HELPER_BIN")]
        helper_bin: Option<PathBuf>,
        /// Do not install a state's missing tool first (`[agent] install_prerequisites =
        /// false` of the daemon): the state fails naming the package.
        #[arg(long)]
        no_prerequisites: bool,
        /// Print each state's StateLog as one line of JSON, exactly as the daemon would
        /// report it, instead of a line for a person (with --test: each state's plan).
        #[arg(long)]
        json: bool,
        /// Change nothing: ask the helper what each state would change and print it, one
        /// line per state. States after a meta.wait are planned as if it were satisfied,
        /// and say so. Exit status: 0 nothing would change, 3 something would, 1 a state
        /// could not be planned.
        #[arg(long)]
        test: bool,
        /// With --test: show each content change as a unified diff (capped; binary and
        /// secret content by checksums only).
        #[arg(long, requires = "test")]
        diff: bool,
    },
    /// Check recipe files against the state catalogue; one line per state.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show what the running agent is doing.
    Status {
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The daemon's state directory, when it was started with --state-dir.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Print the raw JSON status.
        #[arg(long)]
        json: bool,
    },
    /// Print a fully commented /etc/opsagent.conf with every key and its default.
    ConfigExample,
    /// Write the agent's, the helper's, the upgrades' and the states' log entries since a
    /// time into a gzipped bundle, bounded in size (the newest entries are kept and the
    /// bundle says what was cut): for attaching to a ticket.
    Logs {
        /// The bundle to write (gzipped text, mode 0600).
        #[arg(long, value_name = "FILE")]
        bundle: PathBuf,
        /// From when: 45s, 30m, 2h, 1d before now, or @SECONDS since the epoch.
        #[arg(long, value_name = "WHEN", default_value = "1d")]
        since: String,
        /// Which logs (agent, helper, upgrade, states) [default: all]
        #[arg(long, value_name = "PART", value_delimiter = ',')]
        what: Vec<String>,
        /// Log text the bundle holds at most, before compression, shared by the parts.
        #[arg(long, value_name = "BYTES", default_value_t = cmd::logs::DEFAULT_MAX_BYTES)]
        max_bytes: u64,
    },
    /// Upgrade this host's agent by hand (root): download the release and its
    /// signature, then run the same installer as a backend-ordered upgrade (signature
    /// check, switch, restart, health gate, automatic revert).
    Upgrade {
        /// The release archive, e.g. `https://releases.example.com/1.3.0/opsagent.tgz`;
        /// its signature is URL.minisig.
        #[arg(long, value_name = "URL")]
        url: String,
        /// The release version [default: the URL's parent directory name]
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Download and stage only; `systemctl start opsagent-upgrade` installs it.
        #[arg(long)]
        stage_only: bool,
    },
    /// Stop the running agent (SIGTERM: after the running state), or with
    /// --after-round once the current round has finished (SIGUSR1).
    Stop {
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The daemon's state directory, when it was started with --state-dir.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        after_round: bool,
    },
    /// Print a shell completion script: `opsagent completion bash >
    /// /usr/share/bash-completion/completions/opsagent`.
    Completion {
        #[arg(value_parser = ["bash"])]
        shell: String,
    },
    /// Write the manual page opsagent.8 into DIR (used by packaging/build-deb).
    #[command(hide = true)]
    Manual { dir: PathBuf },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, overrides } => cmd::run::cmd_run(config.as_deref(), &overrides),
        Command::Apply { file, helper_socket, helper_bin, no_prerequisites, json, test, diff } => {
            cmd::apply::cmd_apply(cmd::apply::ApplyArgs {
                file,
                helper_socket,
                helper_bin,
                prerequisites: !no_prerequisites,
                format: if json { cmd::apply::Format::Json } else { cmd::apply::Format::Lines },
                test,
                diff,
            })
        }
        Command::Check { files } => cmd::check::cmd_check(&files),
        Command::Status { config, state_dir, json } => cmd::status::cmd_status(config.as_deref(), state_dir, json),
        Command::Stop { config, state_dir, after_round } => {
            cmd::stop::cmd_stop(config.as_deref(), state_dir, after_round)
        }
        Command::Upgrade { url, version, config, stage_only } => {
            crate::upgrade::cli::cmd_upgrade(&url, version, config.as_deref(), stage_only)
        }
        Command::Logs { bundle, since, what, max_bytes } => cmd::logs::cmd_logs(&bundle, &since, &what, max_bytes),
        Command::ConfigExample => {
            print!("{}", crate::config::EXAMPLE);
            Ok(ExitCode::SUCCESS)
        }
        Command::Completion { shell: _ } => {
            print!("{}", crate::manual::bash_completion(&<Cli as clap::CommandFactory>::command()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Manual { dir } => crate::manual::write_page(&dir, &<Cli as clap::CommandFactory>::command(), &MANUAL)
            .map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("opsagent: error: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!("\n  caused by: {cause}"));
            }
            eprintln!("{msg}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(ConfigError::EXIT_CODE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The manual and the completion script, generated from this command line, say all of it.
#[cfg(test)]
mod tests {
    use crate::manual::{bash_completion, man_page, roff, visible_args, visible_subcommands, Extra};
    use clap::CommandFactory;

    #[test]
    fn the_page_names_every_subcommand_and_option_of_the_program() {
        let cmd = crate::cli::Cli::command();
        let page = man_page(&cmd, 8, &Extra::default());
        for sub in visible_subcommands(&cmd) {
            assert!(page.contains(&format!(".SS \\fBopsagent {}\\fR", roff(sub.get_name()))), "{}", sub.get_name());
            for a in visible_args(sub).filter(|a| !a.is_positional()) {
                let long = a.get_long().expect("every option has a long name");
                assert!(page.contains(&format!("\\-\\-{}", roff(long))), "{} --{long}", sub.get_name());
            }
        }
        // No line of the page starts a roff request it did not mean to.
        for line in page.lines() {
            if let Some(req) = line.strip_prefix('.') {
                let name = req.split_whitespace().next().unwrap_or("");
                assert!(["TH", "SH", "SS", "TP", "B", "I", "BR", "PP", "RS", "RE"].contains(&name), "{line}");
            }
        }
    }

    #[test]
    fn bash_completion_offers_subcommands_and_their_options() {
        let script = bash_completion(&crate::cli::Cli::command());
        assert!(script.contains("complete -F _opsagent opsagent"));
        assert!(script.contains("\"\") words=\""));
        assert!(
            script.contains(
                "\"apply\") words=\"--helper-socket --helper-bin --no-prerequisites --json --test --diff --help\""
            ),
            "{script}"
        );
    }

    /// What bash completes for the words typed so far (the last one being completed).
    fn complete(script: &str, words: &[&str]) -> Vec<String> {
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let program = format!(
            "{script}\nCOMP_WORDS=({})\nCOMP_CWORD={}\n_opsagent\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
            quoted.join(" "),
            words.len() - 1
        );
        let out = std::process::Command::new("bash").arg("-c").arg(program).output().expect("bash runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
    }

    #[test]
    fn bash_completes_subcommands_and_options_for_real() {
        let script = bash_completion(&crate::cli::Cli::command());
        assert_eq!(complete(&script, &["opsagent", "ap"]), ["apply"]);
        let mut opts = complete(&script, &["opsagent", "apply", "--he"]);
        opts.sort();
        assert_eq!(opts, ["--help", "--helper-bin", "--helper-socket"]);
        assert_eq!(complete(&script, &["opsagent", "status", "--js"]), ["--json"]);
        // The hidden `manual` command is not offered.
        assert!(complete(&script, &["opsagent", "manu"]).is_empty());
    }
}
