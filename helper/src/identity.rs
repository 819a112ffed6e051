//! Users and groups, by name, as the host's NSS knows them.
//!
//! Recipes and the operator name users; the kernel checks numbers. Every name is
//! resolved at the moment it is used, so an unknown name fails the one state (or the
//! start-up) that names it, never silently maps to root.

use std::fmt;

use nix::unistd::{Gid, Group, Uid, User};

/// The user the packaging creates for the daemon; allowed to connect by default.
pub const DEFAULT_AGENT_USER: &str = "opsagent";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("cannot look up {kind} {name:?}: {source}")]
    Lookup { kind: &'static str, name: String, source: nix::Error },
}

pub fn user(name: &str) -> Result<User, IdentityError> {
    User::from_name(name)
        .map_err(|source| IdentityError::Lookup { kind: "user", name: name.to_string(), source })?
        .ok_or_else(|| IdentityError::UnknownUser(name.to_string()))
}

pub fn group(name: &str) -> Result<Group, IdentityError> {
    Group::from_name(name)
        .map_err(|source| IdentityError::Lookup { kind: "group", name: name.to_string(), source })?
        .ok_or_else(|| IdentityError::UnknownGroup(name.to_string()))
}

/// The owner a state asks for. `None` leaves that half as it is on an existing object;
/// a new object gets root for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner {
    pub uid: Option<Uid>,
    pub gid: Option<Gid>,
}

impl Owner {
    pub fn resolve(user_name: Option<&str>, group_name: Option<&str>) -> Result<Self, IdentityError> {
        Ok(Self {
            uid: user_name.map(user).transpose()?.map(|u| u.uid),
            gid: group_name.map(group).transpose()?.map(|g| g.gid),
        })
    }

    /// Owner of something this helper creates.
    pub fn for_new(&self) -> (Uid, Gid) {
        (self.uid.unwrap_or(Uid::from_raw(0)), self.gid.unwrap_or(Gid::from_raw(0)))
    }

    /// What the owner of an object now owned by `uid:gid` should become.
    pub fn applied_to(&self, uid: u32, gid: u32) -> (u32, u32) {
        (self.uid.map_or(uid, Uid::as_raw), self.gid.map_or(gid, Gid::as_raw))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Who may connect. Root always may (the operator, debugging); everyone else only when
/// named here, so a compromised unrelated service account gets nothing.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    users: Vec<AllowedUser>,
}

impl Allowlist {
    /// `names` empty means the default: the agent user if the host has one. Named
    /// users must all exist: a typo should stop the start, not lock the agent out.
    pub fn resolve(names: &[String]) -> Result<Self, IdentityError> {
        if names.is_empty() {
            return match user(DEFAULT_AGENT_USER) {
                Ok(u) => Ok(Self::from_users([u])),
                Err(IdentityError::UnknownUser(_)) => {
                    tracing::warn!(user = DEFAULT_AGENT_USER, "the agent user does not exist; only root may connect");
                    Ok(Self::default())
                }
                Err(e) => Err(e),
            };
        }
        let users = names.iter().map(|n| user(n)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_users(users))
    }

    pub fn from_users(users: impl IntoIterator<Item = User>) -> Self {
        Self { users: users.into_iter().map(|u| AllowedUser { name: u.name, uid: u.uid, gid: u.gid }).collect() }
    }

    pub fn allows(&self, uid: u32) -> bool {
        uid == 0 || self.users.iter().any(|u| u.uid.as_raw() == uid)
    }

    /// The group that owns the socket file: the first allowed user's primary group,
    /// so that the socket mode 0660 lets exactly that user in besides root.
    pub fn socket_group(&self) -> Gid {
        self.users.first().map_or(Gid::from_raw(0), |u| u.gid)
    }
}

impl fmt::Display for Allowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("root (0)")?;
        for u in &self.users {
            write!(f, ", {} ({})", u.name, u.uid)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_unknown_names_are_named() {
        assert_eq!(user("root").unwrap().uid.as_raw(), 0);
        let err = user("no-such-user-xyz").unwrap_err();
        assert_eq!(err.to_string(), "unknown user \"no-such-user-xyz\"");
        let err = Owner::resolve(None, Some("no-such-group-xyz")).unwrap_err();
        assert_eq!(err.to_string(), "unknown group \"no-such-group-xyz\"");
        let o = Owner::resolve(Some("nobody"), None).unwrap();
        assert_eq!(o.applied_to(0, 5), (65534, 5));
        assert_eq!(Owner::default().for_new(), (Uid::from_raw(0), Gid::from_raw(0)));
    }

    #[test]
    fn allowlist_always_admits_root_and_only_named_users() {
        let a = Allowlist::resolve(&["nobody".to_string()]).unwrap();
        assert!(a.allows(0));
        assert!(a.allows(65534));
        assert!(!a.allows(1));
        assert_eq!(a.socket_group().as_raw(), 65534);
        assert!(Allowlist::resolve(&["no-such-user-xyz".to_string()]).is_err());
        assert_eq!(Allowlist::default().socket_group().as_raw(), 0);
    }
}
