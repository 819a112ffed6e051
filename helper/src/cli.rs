//! The command line. Operators rarely pass anything: the systemd units give the socket
//! and the default allowlist (the `opsagent` user) fits the packaged set-up.
//!
//! Parsed by hand rather than with clap: the helper has a handful of options, and
//! clap's parser is a sizeable part of the code every helper start runs and keeps
//! mapped (the helper's idle memory is budgeted; see benches/RESULTS.md). Both
//! `--option VALUE` and `--option=VALUE` are accepted, as clap does.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use opsagent_proto::codec::DEFAULT_MAX_FRAME;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/opsagent-helper";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    /// Bind this socket path instead of taking the socket passed by systemd
    /// (socket activation through opsagent-helper.socket).
    pub socket: Option<PathBuf>,
    /// Users allowed to connect (repeatable). Replaces the default, the user
    /// `opsagent`; root is always allowed.
    pub allow_user: Vec<String>,
    /// Largest request frame accepted, in bytes.
    pub max_frame: usize,
    /// Where the helper may keep state between requests.
    pub state_dir: PathBuf,
    /// The operator's policy file; without it /etc/opsagent/helper.policy is read if it
    /// exists.
    pub policy: Option<PathBuf>,
    /// Connections one uid may hold open at once; more are refused.
    pub max_connections_per_uid: usize,
    /// Seconds a connection may stay idle before it is closed; 0 never closes it.
    pub idle_timeout: u64,
    /// Seconds a reply may take to be written; a peer that does not read is dropped.
    pub reply_timeout: u64,
    /// `--storage` (or OPSAGENT_HELPER_STORAGE=yes) was given: accepted from the storage
    /// drop-in and cron supervisors of older releases, and without effect (the helper
    /// logs it): storage states need no switch any more (see crate::harden).
    pub storage: bool,
    /// `--direct-exec`: commands run as children of the helper even where systemd is
    /// PID 1 (benchmarks; hosts whose systemd refuses transient units).
    pub direct_exec: bool,
    /// Under socket activation: exit after this many seconds without a request (the
    /// socket starts the helper again on the next connection); 0 stays up.
    pub exit_idle: u64,
    /// The root-owned file whose `[userdata] recipe_key` (and `app_id`) put the helper
    /// in signed mode.
    pub config: PathBuf,
    /// Ignore `recipe_key`: the private helper of `opsagent apply`, run by root for
    /// root, verifies nothing (root is already root).
    pub no_recipe_key: bool,
}

impl Default for Cli {
    fn default() -> Self {
        Self {
            socket: None,
            allow_user: Vec::new(),
            max_frame: DEFAULT_MAX_FRAME,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            policy: None,
            max_connections_per_uid: 8,
            idle_timeout: 900,
            reply_timeout: 30,
            storage: false,
            direct_exec: false,
            exit_idle: 0,
            config: PathBuf::from(crate::signed::DEFAULT_CONFIG),
            no_recipe_key: false,
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    Run(Cli),
    Help,
    Version,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    #[error("unexpected argument {0:?}")]
    Unexpected(String),
    #[error("a value is required for '{0}'")]
    MissingValue(&'static str),
    #[error("'{0}' cannot be used multiple times")]
    Repeated(&'static str),
    #[error("invalid value {value:?} for '{option}': {reason}")]
    Invalid { option: &'static str, value: String, reason: String },
}

pub const USAGE: &str = "Usage: opsagent-helper [OPTIONS]";

pub fn help() -> String {
    format!(
        "The root helper of opsagent: applies states for the agent over a Unix socket

{USAGE}

Options:
      --socket <PATH>
          Bind this socket path instead of taking the socket passed by systemd (socket
          activation through opsagent-helper.socket)
      --allow-user <NAME>
          A user allowed to connect (repeatable). Replaces the default, the user
          `opsagent`; root is always allowed
      --max-frame <BYTES>
          Largest request frame accepted, in bytes [default: {DEFAULT_MAX_FRAME}]
      --state-dir <DIR>
          Where the helper may keep state between requests (used by modules that need
          memory across rounds) [default: {DEFAULT_STATE_DIR}]
      --policy <PATH>
          The operator's policy file (root-owned, not writable by others). Without this
          option /etc/opsagent/helper.policy is read if it exists; a file named here must
          exist. See the `policy` module documentation (helper/README.md) for its format
      --max-connections-per-uid <N>
          Connections one uid may hold open at once; more are refused [default: 8]
      --idle-timeout <SECONDS>
          Seconds a connection may stay idle (no request running, nothing received)
          before it is closed; 0 never closes it [default: 900]
      --reply-timeout <SECONDS>
          Seconds a reply may take to be written; a peer that does not read its
          replies is disconnected (and the request's end is logged) [default: 30]
      --exit-idle <SECONDS>
          Exit after this many seconds without a request; the listening socket stays
          with systemd, which starts the helper again on the next connection. Needs
          socket activation; 0 stays up [default: 0]
      --config <PATH>
          The configuration file whose [userdata] recipe_key (one or more minisign
          public keys) and app_id make the helper run only recipes signed by the
          backend; it must be owned by root and not writable by group or others
          [default: /etc/opsagent.conf]
      --no-recipe-key
          Ignore recipe_key (the private helper of `opsagent apply`, run by root)
      --direct-exec
          Run the commands of states as children of the helper (own process group)
          even where systemd is PID 1, instead of as transient units
      --storage
          No effect; accepted from older releases' storage drop-in and cron
          supervisor (storage states need no switch any more) [env: {STORAGE_ENV}=]
  -h, --help
          Print help
  -V, --version
          Print version
"
    )
}

/// The environment variable of `--storage` (set by older releases' storage drop-in).
pub const STORAGE_ENV: &str = "OPSAGENT_HELPER_STORAGE";

/// Anything but an empty or false-like value is true: what clap's falsey parser
/// accepted, so existing drop-ins keep their meaning.
fn truthy(value: &OsStr) -> bool {
    let text = value.to_string_lossy().to_ascii_lowercase();
    !matches!(text.as_str(), "" | "0" | "n" | "no" | "f" | "false" | "off")
}

/// The options that take a value, as help names them.
const SOCKET: &str = "--socket <PATH>";
const ALLOW_USER: &str = "--allow-user <NAME>";
const MAX_FRAME: &str = "--max-frame <BYTES>";
const STATE_DIR: &str = "--state-dir <DIR>";
const POLICY: &str = "--policy <PATH>";
const MAX_CONNECTIONS: &str = "--max-connections-per-uid <N>";
const IDLE_TIMEOUT: &str = "--idle-timeout <SECONDS>";
const EXIT_IDLE: &str = "--exit-idle <SECONDS>";
const REPLY_TIMEOUT: &str = "--reply-timeout <SECONDS>";
const CONFIG: &str = "--config <PATH>";

fn utf8<'a>(option: &'static str, value: &'a OsStr) -> Result<&'a str, CliError> {
    value.to_str().ok_or_else(|| CliError::Invalid {
        option,
        value: value.to_string_lossy().into_owned(),
        reason: "not UTF-8".into(),
    })
}

fn number<T: std::str::FromStr>(option: &'static str, value: &OsStr) -> Result<T, CliError>
where
    T::Err: fmt::Display,
{
    let text = utf8(option, value)?;
    text.parse().map_err(|e: T::Err| CliError::Invalid { option, value: text.to_string(), reason: e.to_string() })
}

impl Cli {
    /// Parses the arguments after the program name; `storage_env` is the value of
    /// [`STORAGE_ENV`], if set.
    pub fn parse_args(
        args: impl IntoIterator<Item = OsString>,
        storage_env: Option<&OsStr>,
    ) -> Result<Invocation, CliError> {
        let mut args = args.into_iter();
        // The options given so far: each but --allow-user may be given once.
        let mut seen = Vec::new();
        let mut cli = Cli { storage: storage_env.is_some_and(truthy), ..Cli::default() };
        while let Some(arg) = args.next() {
            let text = arg.to_string_lossy();
            match text.as_ref() {
                "-h" | "--help" => return Ok(Invocation::Help),
                "-V" | "--version" => return Ok(Invocation::Version),
                "--storage" => {
                    cli.storage = true;
                    continue;
                }
                "--no-recipe-key" => {
                    cli.no_recipe_key = true;
                    continue;
                }
                "--direct-exec" => {
                    cli.direct_exec = true;
                    continue;
                }
                _ => {}
            }
            // `--name=value` or `--name value`; the value may be any bytes (paths).
            let bytes = arg.as_bytes();
            let (name, inline) = match bytes.iter().position(|b| *b == b'=') {
                Some(eq) if bytes.starts_with(b"--") => (
                    String::from_utf8_lossy(&bytes[..eq]).into_owned(),
                    Some(OsString::from_vec(bytes[eq + 1..].to_vec())),
                ),
                _ => (text.into_owned(), None),
            };
            let option = match name.as_str() {
                "--socket" => SOCKET,
                "--allow-user" => ALLOW_USER,
                "--max-frame" => MAX_FRAME,
                "--state-dir" => STATE_DIR,
                "--policy" => POLICY,
                "--max-connections-per-uid" => MAX_CONNECTIONS,
                "--idle-timeout" => IDLE_TIMEOUT,
                "--exit-idle" => EXIT_IDLE,
                "--reply-timeout" => REPLY_TIMEOUT,
                "--config" => CONFIG,
                _ => return Err(CliError::Unexpected(name)),
            };
            let value = match inline {
                Some(v) => v,
                None => args.next().ok_or(CliError::MissingValue(option))?,
            };
            // The value is checked before the repetition: a bad value is named even when
            // its option is also repeated.
            match option {
                SOCKET => cli.socket = Some(PathBuf::from(value)),
                ALLOW_USER => cli.allow_user.push(utf8(option, &value)?.to_string()),
                MAX_FRAME => cli.max_frame = number(option, &value)?,
                STATE_DIR => cli.state_dir = PathBuf::from(value),
                POLICY => cli.policy = Some(PathBuf::from(value)),
                MAX_CONNECTIONS => cli.max_connections_per_uid = number(option, &value)?,
                IDLE_TIMEOUT => cli.idle_timeout = number(option, &value)?,
                REPLY_TIMEOUT => cli.reply_timeout = number(option, &value)?,
                CONFIG => cli.config = PathBuf::from(value),
                _ => cli.exit_idle = number(option, &value)?,
            }
            if option != ALLOW_USER && seen.contains(&option) {
                return Err(CliError::Repeated(option));
            }
            seen.push(option);
        }
        if cli.exit_idle > 0 && cli.socket.is_some() {
            // Nothing would start the helper again: the socket file goes with it.
            return Err(CliError::Invalid {
                option: EXIT_IDLE,
                value: cli.exit_idle.to_string(),
                reason: "needs socket activation (systemd passes the socket); not with --socket".into(),
            });
        }
        Ok(Invocation::Run(cli))
    }
}

#[cfg(test)]
mod tests {
    /// The hand-written manual page (packaging/man/opsagent-helper.8) documents every
    /// option `--help` lists, and no option the helper does not take.
    #[test]
    fn the_manual_page_names_every_option_and_no_other() {
        let page = include_str!("../../packaging/man/opsagent-helper.8");
        let in_help: Vec<String> = help()
            .lines()
            .filter_map(|l| l.trim_start().split([' ', ',']).find(|w| w.starts_with("--")).map(str::to_string))
            .collect();
        assert!(in_help.len() >= 14, "{in_help:?}");
        let in_page: Vec<String> = page
            .lines()
            .filter_map(|l| l.strip_prefix(".B "))
            .filter_map(|l| l.split([' ', ',']).find(|w| w.starts_with("\\-\\-")).map(|w| w.replace("\\-", "-")))
            .collect();
        for opt in &in_help {
            assert!(in_page.contains(opt), "{opt} is missing from opsagent-helper.8");
        }
        for opt in &in_page {
            assert!(in_help.contains(opt), "opsagent-helper.8 documents {opt}, which the helper does not take");
        }
    }

    use super::*;

    fn parse(args: &[&str]) -> Result<Invocation, CliError> {
        Cli::parse_args(args.iter().map(OsString::from), None)
    }

    fn run(args: &[&str]) -> Cli {
        match parse(args) {
            Ok(Invocation::Run(cli)) => cli,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn defaults_and_every_option_in_both_spellings() {
        assert_eq!(run(&[]), Cli::default());
        let cli = run(&[
            "--allow-user=alice",
            "--allow-user",
            "bob",
            "--max-frame=1024",
            "--state-dir",
            "/tmp/st",
            "--policy=/etc/p",
            "--max-connections-per-uid",
            "2",
            "--idle-timeout=0",
            "--exit-idle",
            "120",
        ]);
        assert_eq!(
            cli,
            Cli {
                socket: None,
                allow_user: vec!["alice".into(), "bob".into()],
                max_frame: 1024,
                state_dir: "/tmp/st".into(),
                policy: Some("/etc/p".into()),
                max_connections_per_uid: 2,
                idle_timeout: 0,
                reply_timeout: 30,
                storage: false,
                direct_exec: false,
                exit_idle: 120,
                ..Cli::default()
            }
        );
        assert!(run(&["--direct-exec"]).direct_exec);
        assert!(!run(&[]).direct_exec);
        // A value may itself contain '='.
        assert_eq!(run(&["--socket=/tmp/a=b"]).socket, Some("/tmp/a=b".into()));
        assert_eq!(parse(&["-V"]), Ok(Invocation::Version));
        assert_eq!(parse(&["--socket", "x", "--help"]), Ok(Invocation::Help));
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(parse(&["--sockett", "x"]), Err(CliError::Unexpected("--sockett".into())));
        assert_eq!(parse(&["extra"]), Err(CliError::Unexpected("extra".into())));
        assert_eq!(parse(&["--socket"]), Err(CliError::MissingValue(SOCKET)));
        assert_eq!(parse(&["--socket=a", "--socket", "b"]), Err(CliError::Repeated(SOCKET)));
        let err = parse(&["--max-frame", "big"]).unwrap_err();
        assert_eq!(err.to_string(), "invalid value \"big\" for '--max-frame <BYTES>': invalid digit found in string");
        assert!(help().contains("--max-connections-per-uid <N>"));
        let err = parse(&["--socket", "/run/h.sock", "--exit-idle", "5"]).unwrap_err();
        assert!(err.to_string().contains("needs socket activation"), "{err}");
        assert_eq!(run(&["--socket", "/run/h.sock", "--exit-idle", "0"]).socket, Some("/run/h.sock".into()));
        assert_eq!(parse(&["--storage=maybe"]), Err(CliError::Unexpected("--storage".into())), "a flag takes no value");
    }

    #[test]
    fn the_recipe_key_file_and_its_opt_out() {
        assert_eq!(run(&[]).config, PathBuf::from("/etc/opsagent.conf"));
        assert!(!run(&[]).no_recipe_key);
        let cli = run(&["--config=/srv/o.conf", "--no-recipe-key"]);
        assert_eq!((cli.config, cli.no_recipe_key), (PathBuf::from("/srv/o.conf"), true));
        assert_eq!(parse(&["--config", "a", "--config", "b"]), Err(CliError::Repeated(CONFIG)));
    }

    #[test]
    fn storage_is_off_unless_asked_for() {
        assert!(!run(&[]).storage);
        assert!(run(&["--storage"]).storage);
        let with_env = |v: &str| match Cli::parse_args(std::iter::empty(), Some(OsStr::new(v))) {
            Ok(Invocation::Run(cli)) => cli.storage,
            other => panic!("{v:?}: {other:?}"),
        };
        assert!(with_env("yes") && with_env("1") && with_env("true"));
        assert!(!with_env("") && !with_env("no") && !with_env("0") && !with_env("False") && !with_env("off"));
    }
}
