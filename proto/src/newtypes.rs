//! Validated values: once constructed, they are known to be well formed, so the helper
//! never acts on a relative path, a `..` escape, a NUL byte or a malformed unit name.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path {0:?} contains \"..\"; paths must not climb out of a directory")]
    DotDot(String),
    #[error("path {0:?} is longer than {1} bytes")]
    TooLong(String, usize),
    #[error("state id {0:?} is empty, too long or contains control characters")]
    StateId(String),
    #[error("unit name {0:?} is not a valid systemd unit name")]
    UnitName(String),
}

const PATH_MAX: usize = 4096;

/// An absolute, normalised path: no `.` or empty components, no `..`, no NUL.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AbsPath(PathBuf);

impl AbsPath {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        if raw.contains('\0') {
            return Err(InvalidValue::Nul(raw.to_string()));
        }
        if raw.len() > PATH_MAX {
            return Err(InvalidValue::TooLong(raw.chars().take(64).collect(), PATH_MAX));
        }
        if !raw.starts_with('/') {
            return Err(InvalidValue::NotAbsolute(raw.to_string()));
        }
        let mut out = PathBuf::from("/");
        for c in Path::new(raw).components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(part) => out.push(part),
                Component::ParentDir => return Err(InvalidValue::DotDot(raw.to_string())),
                Component::Prefix(_) => return Err(InvalidValue::NotAbsolute(raw.to_string())),
            }
        }
        Ok(Self(out))
    }

    pub fn as_path(&self) -> &Path {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.as_os_str() == "/"
    }

    /// The parent directory (the root is its own parent).
    pub fn parent(&self) -> AbsPath {
        Self(self.0.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf))
    }

    /// `self` is `prefix` or lies below it.
    pub fn starts_with(&self, prefix: &AbsPath) -> bool {
        self.0.starts_with(&prefix.0)
    }
}

impl AsRef<Path> for AbsPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl fmt::Display for AbsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.display(), f)
    }
}

impl TryFrom<String> for AbsPath {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<AbsPath> for String {
    fn from(p: AbsPath) -> String {
        p.0.to_string_lossy().into_owned()
    }
}

/// A recipe state's id as the backend sent it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StateId(String);

impl StateId {
    pub const MAX_LEN: usize = 512;

    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        if raw.is_empty() || raw.len() > Self::MAX_LEN || raw.chars().any(char::is_control) {
            return Err(InvalidValue::StateId(raw.chars().take(64).collect()));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for StateId {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<StateId> for String {
    fn from(s: StateId) -> String {
        s.0
    }
}

/// A systemd unit name (`nginx.service`, `getty@tty1.service`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UnitName(String);

const UNIT_SUFFIXES: &[&str] = &[
    ".service",
    ".socket",
    ".target",
    ".timer",
    ".path",
    ".mount",
    ".automount",
    ".swap",
    ".slice",
    ".scope",
    ".device",
];

impl UnitName {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let ok_chars = raw.chars().all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c));
        let has_suffix = UNIT_SUFFIXES.iter().any(|s| raw.ends_with(s) && raw.len() > s.len());
        if raw.len() > 255 || !ok_chars || !has_suffix || raw.starts_with('.') || raw.starts_with('-') {
            return Err(InvalidValue::UnitName(raw.to_string()));
        }
        Ok(Self(raw.to_string()))
    }

    /// A service as recipes name it: `nginx` means `nginx.service`.
    pub fn service(raw: &str) -> Result<Self, InvalidValue> {
        if UNIT_SUFFIXES.iter().any(|s| raw.ends_with(s)) {
            Self::parse(raw)
        } else {
            Self::parse(&format!("{raw}.service"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for UnitName {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<UnitName> for String {
    fn from(u: UnitName) -> String {
        u.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abs_paths_are_normalised_and_checked() {
        assert_eq!(AbsPath::parse("/etc//nginx/./x/").unwrap().to_string(), "/etc/nginx/x");
        assert!(AbsPath::parse("/").unwrap().is_root());
        assert_eq!(AbsPath::parse("etc/x"), Err(InvalidValue::NotAbsolute("etc/x".into())));
        assert!(matches!(AbsPath::parse("/srv/../etc/shadow"), Err(InvalidValue::DotDot(_))));
        assert!(matches!(AbsPath::parse("/a\0b"), Err(InvalidValue::Nul(_))));
        assert!(AbsPath::parse(&format!("/{}", "a".repeat(5000))).is_err());
        let p = AbsPath::parse("/srv/app/conf").unwrap();
        assert_eq!(p.parent().to_string(), "/srv/app");
        assert!(p.starts_with(&AbsPath::parse("/srv").unwrap()));
        assert!(!p.starts_with(&AbsPath::parse("/sr").unwrap()));
        // Deserialising validates too.
        assert!(serde_json::from_str::<AbsPath>("\"/ok\"").is_ok());
        assert!(serde_json::from_str::<AbsPath>("\"/../x\"").is_err());
    }

    #[test]
    fn state_ids_and_units() {
        assert!(StateId::parse("state-7E59").is_ok());
        assert!(StateId::parse("").is_err());
        assert!(StateId::parse("a\nb").is_err());
        assert_eq!(UnitName::service("nginx").unwrap().as_str(), "nginx.service");
        assert_eq!(UnitName::service("getty@tty1.service").unwrap().as_str(), "getty@tty1.service");
        assert!(UnitName::service("bad name").is_err());
        assert!(UnitName::service("../x").is_err());
        assert!(UnitName::parse("x").is_err());
    }
}
