//! Journal message ids of the events an operator looks up, and the catalog that explains
//! them (`units/opsagent.catalog`, installed to `/usr/lib/systemd/catalog/`, so that
//! `journalctl -x` prints what the event means and what to do).
//!
//! A call site attaches one as a field: `tracing::warn!(message_id = catalog::STATE_FAILED,
//! …)`. The journal writer turns that field into `MESSAGE_ID=` (and the text output leaves
//! it out); nothing else about the event changes.

/// A state of the recipe failed (daemon).
pub const STATE_FAILED: &str = "725be3897bb24a11b4b5c3508eebb0cc";
/// A state failed twice in one round: the round ceased and waits for the retry (daemon).
pub const ROUND_CEASED: &str = "87d230a853514d63be4cacbe8fd27b27";
/// The backend connection was lost or cannot be made (daemon).
pub const BACKEND_UNREACHABLE: &str = "54e2e3e297044807ac045fd6e1ffba3b";
/// A self-upgrade failed; the running release stays (daemon).
pub const UPGRADE_FAILED: &str = "a502f09032d84b8bbe598fa5f92ecd54";
/// The helper has no `recipe_key`: recipes are not verified (daemon, at start).
pub const RECIPES_NOT_VERIFIED: &str = "777f651060c14c789dfd9d1d9aa0c00a";
/// The root helper refused a request: policy, parameters or signature (helper).
pub const REQUEST_REFUSED: &str = "2432fe86d0544ff5a709cb8abb9048fe";
/// The root helper refused a signed recipe (helper).
pub const SIGNED_RECIPE_REFUSED: &str = "efe14f34286641348a81496c17f6ae2e";
/// The root helper refused a connection: uid not allowed or too many (helper).
pub const CONNECTION_REFUSED: &str = "f4bcfe08b57a41edbe19bf79de309e5a";

/// Every id above, with its constant's name (the catalog test checks the file against it).
pub const ALL: &[(&str, &str)] = &[
    ("STATE_FAILED", STATE_FAILED),
    ("ROUND_CEASED", ROUND_CEASED),
    ("BACKEND_UNREACHABLE", BACKEND_UNREACHABLE),
    ("UPGRADE_FAILED", UPGRADE_FAILED),
    ("RECIPES_NOT_VERIFIED", RECIPES_NOT_VERIFIED),
    ("REQUEST_REFUSED", REQUEST_REFUSED),
    ("SIGNED_RECIPE_REFUSED", SIGNED_RECIPE_REFUSED),
    ("CONNECTION_REFUSED", CONNECTION_REFUSED),
];

/// The name of the field that carries a message id.
pub const FIELD: &str = "message_id";

/// A journal MESSAGE_ID: 128 bits as 32 lower-case hex digits.
pub fn is_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const CATALOG: &str = include_str!("../../units/opsagent.catalog");

    /// The entries of the catalog file: id → (subject, body).
    fn entries() -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for block in CATALOG.split("\n-- ").skip(1) {
            let (id, rest) = block.split_once('\n').expect("an id line");
            let subject = rest
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or_else(|| panic!("catalog entry {id} has no Subject"));
            let body = rest.split_once("\n\n").map(|(_, b)| b.trim().to_string()).unwrap_or_default();
            out.push((id.trim().to_string(), subject.to_string(), body));
        }
        out
    }

    #[test]
    fn every_id_is_well_formed_unique_and_explained_in_the_catalog() {
        let ids: HashSet<&str> = ALL.iter().map(|(_, id)| *id).collect();
        assert_eq!(ids.len(), ALL.len(), "two events share an id");
        let entries = entries();
        let in_file: HashSet<&str> = entries.iter().map(|(id, _, _)| id.as_str()).collect();
        assert_eq!(in_file.len(), entries.len(), "an id is twice in the catalog");
        for (name, id) in ALL {
            assert!(is_id(id), "{name}: {id} is not 32 lower-case hex digits");
            assert!(in_file.contains(id), "{name} ({id}) has no catalog entry");
        }
        for (id, subject, body) in &entries {
            assert!(ids.contains(id.as_str()), "catalog entry {id} names no event");
            assert!(!subject.is_empty() && body.len() > 80, "catalog entry {id} says too little");
            assert!(CATALOG.contains(&format!("-- {id}\nSubject: ")), "{id}: Subject must follow the id line");
        }
    }

    #[test]
    fn ids_are_recognised() {
        assert!(is_id(STATE_FAILED));
        assert!(!is_id("725BE3897BB24A11B4B5C3508EEBB0CC"));
        assert!(!is_id("725be3897bb24a11b4b5c3508eebb0c"));
        assert!(!is_id("725be3897bb24a11b4b5c3508eebb0c\n"));
    }
}
