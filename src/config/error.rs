//! Errors of the configuration: each one says where the bad value came from (file and line,
//! command-line flag, or instance userdata), which `[section] key` it is, and what is wrong,
//! so an operator can fix it without reading code.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line of the configuration file.
    File { path: PathBuf, line: usize },
    /// A command-line flag (its name is derived from the key: `round_delay` → `--round-delay`).
    Flag,
    /// A variable of the instance userdata (`WS_URI=…`), fetched from `url`.
    Userdata { url: String, var: String },
}

/// A configuration key together with where its value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub origin: Origin,
    pub section: &'static str,
    pub key: &'static str,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (section, key) = (self.section, self.key);
        match &self.origin {
            Origin::File { path, line } => {
                write!(f, "{}:{line}: [{section}] {key}", path.display())
            }
            Origin::Flag => write!(f, "command line: --{}", key.replace('_', "-")),
            Origin::Userdata { url, var } => write!(f, "userdata {url}: {var} ([{section}] {key})"),
        }
    }
}

/// Why the configuration cannot be used. The CLI exits with [`ConfigError::EXIT_CODE`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: configuration file not found", .path.display())]
    NotFound { path: PathBuf },

    // The I/O error is part of the message (not a `source`) so that printing the error
    // chain does not repeat it.
    #[error("{}: cannot read the configuration file: {error}", .path.display())]
    Read { path: PathBuf, error: std::io::Error },

    #[error("{}:{line}: {problem}", .path.display())]
    Syntax { path: PathBuf, line: usize, problem: String },

    #[error("{}:{line}: unknown section [{section}] (known sections: {known})", .path.display())]
    UnknownSection { path: PathBuf, line: usize, section: String, known: String },

    #[error("{}:{line}: [{section}] {key}: unknown key (keys of [{section}]: {known})", .path.display())]
    UnknownKey { path: PathBuf, line: usize, section: String, key: String, known: String },

    #[error("{}:{line}: {key}: key outside any section (known sections: {known})", .path.display())]
    OutsideSection { path: PathBuf, line: usize, key: String, known: String },

    #[error("{}:{line}: [{section}] {key}: set twice (first on line {first_line})", .path.display())]
    Duplicate { path: PathBuf, line: usize, first_line: usize, section: String, key: String },

    /// A value that does not fit its key, e.g.
    /// `/etc/opsagent.conf:7: [agent] round_delay: "ten" is not a whole number of seconds`.
    #[error("{at}: {problem}")]
    Invalid { at: Location, problem: String },

    /// Two values that are valid alone but not together (`retry_delay` > `retry_delay_max`).
    /// `origin` is the file read, or "command line and defaults".
    #[error("{origin}: {problem}")]
    Inconsistent { origin: String, problem: String },

    /// A key needed by the command at hand is set nowhere.
    #[error(
        "[{section}] {key} is not set: set `{key} = …` under [{section}] in {}, pass --{flag}, \
         or put {var}=… in the instance userdata",
        .file.display()
    )]
    Missing { file: PathBuf, section: &'static str, key: &'static str, flag: &'static str, var: &'static str },
}

impl ConfigError {
    /// Exit status of the CLI when the configuration is invalid (like EX_USAGE-style tools,
    /// distinct from 1 = runtime failure).
    pub const EXIT_CODE: u8 = 2;

    pub(super) fn invalid(at: Location, problem: impl Into<String>) -> Self {
        ConfigError::Invalid { at, problem: problem.into() }
    }

    pub(super) fn read(path: &Path, error: std::io::Error) -> Self {
        if error.kind() == std::io::ErrorKind::NotFound {
            ConfigError::NotFound { path: path.to_path_buf() }
        } else {
            ConfigError::Read { path: path.to_path_buf(), error }
        }
    }
}
