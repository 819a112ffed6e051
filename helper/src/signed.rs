//! Signed mode: with a `recipe_key` in `/etc/opsagent.conf`, the helper runs only states
//! of recipes that key signed, with its own verified copy of their parameters.
//!
//! The trust anchor comes from the file only root can write (owned by root, not
//! writable by group or others, opened without following a link); the daemon's word
//! is never used for it. The daemon hands over the signed bytes once per recipe
//! version ([`SignedStore::accept`]); the helper verifies the minisign signature and its
//! trusted comment (this instance's app id, the recipe version), refuses a version
//! older than the highest it verified for the app, and keeps the copy under `<state_dir>/recipes/` so that a restarted helper
//! applies it without the backend. States are then named by (version, index)
//! ([`SignedStore::request`]) and typed with the catalogue at their turn: a state that
//! cannot run is refused alone, named, as the daemon fails it alone.
//!
//! What a daemon that is not trustworthy can still do: not send a recipe, send an old
//! one that was already superseded (refused), skip, reorder or repeat states of the
//! verified recipe, refuse to download, cancel. What it cannot: run a state (or a
//! parameter) the backend did not sign, or run a download the signed state does not pin
//! by sha256.
// Root runs this code on the agent's input: no panics, no unchecked indexing (issue 15).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use minisign_verify::{PublicKey, Signature};
use nix::unistd::{Gid, Uid};
use opsagent_proto::catalogue::ModuleParams;
use opsagent_proto::request::{ApplyRequest, ApplySignedRequest, ErrorCode, HelperError, RecipeUpload};
use opsagent_proto::signed::{self, SignedRecipe};
use opsagent_shared::ini;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsutil;

pub const DEFAULT_CONFIG: &str = "/etc/opsagent.conf";
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// A signed recipe of 10,000 large states stays far below this.
const MAX_STORED_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {problem}")]
    Config { path: PathBuf, problem: String },
}

/// The keys recipes must be signed with, and the app this instance belongs to.
pub struct RecipeTrust {
    keys: Vec<(String, PublicKey)>,
    app_id: String,
}

impl std::fmt::Debug for RecipeTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("RecipeTrust").field("keys", &keys).field("app_id", &self.app_id).finish()
    }
}

impl RecipeTrust {
    /// Reads `[userdata] recipe_key` and `app_id` from `path`. `Ok(None)`: no key is
    /// configured (the file is absent, or has no `recipe_key`): recipes are not verified.
    /// A key in a file that root does not own alone is an error: whoever could write the
    /// file could have put their own key there. `trusted_owner` is root in production.
    pub fn load(path: &Path, trusted_owner: u32) -> Result<Option<Self>, TrustError> {
        let bad = |problem: String| TrustError::Config { path: path.to_path_buf(), problem };
        let mut file = match fsutil::open_nofollow(path, false) {
            Ok(f) => f,
            Err(fsutil::FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        let mut text = String::new();
        file.by_ref().take(MAX_CONFIG_BYTES).read_to_string(&mut text).map_err(|e| bad(e.to_string()))?;
        let Some(trust) = Self::parse(&text).map_err(bad)? else {
            return Ok(None);
        };
        if meta.uid() != trusted_owner {
            return Err(bad(format!(
                "owned by uid {}, not uid {trusted_owner}: its recipe_key cannot be trusted",
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(bad(format!(
                "mode {:04o} lets group or others write it: its recipe_key cannot be trusted",
                meta.mode() & 0o7777
            )));
        }
        Ok(Some(trust))
    }

    /// `recipe_key` holds one or more minisign public keys (base64 key lines) separated
    /// by blanks or commas: more than one while keys are rotated.
    pub fn parse(text: &str) -> Result<Option<Self>, String> {
        let doc = ini::parse(text).map_err(|e| format!("line {}: {}", e.line, e.problem))?;
        let get = |key: &str| {
            doc.entries
                .iter()
                .filter(|e| e.section.as_ref().is_some_and(|(s, _)| s == "userdata") && e.key == key)
                .map(|e| (e.line, e.value.trim().to_string()))
                .next_back()
        };
        let Some((line, keys)) = get("recipe_key").filter(|(_, v)| !v.is_empty()) else {
            return Ok(None);
        };
        let keys = keys
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|k| !k.is_empty())
            .map(|k| {
                PublicKey::from_base64(k)
                    .map(|pk| (k.to_string(), pk))
                    .map_err(|e| format!("line {line}: [userdata] recipe_key {k:?} is not a minisign public key: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let app_id = match get("app_id") {
            Some((_, a)) if !a.is_empty() => a,
            _ => return Err("[userdata] recipe_key is set but app_id is not: a signed recipe names its app".into()),
        };
        Ok(Some(Self { keys, app_id }))
    }

    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Verifies `upload` and reads it: the signature of one of the keys over the bytes,
    /// a trusted comment naming this app and the version the bytes hold.
    pub fn verify(&self, upload: &RecipeUpload) -> Result<SignedRecipe, String> {
        let sig = Signature::decode(&upload.signature).map_err(|e| format!("the signature is not minisign: {e}"))?;
        let mut tried = Vec::new();
        let verified = self.keys.iter().any(|(text, pk)| match pk.verify(upload.bytes.as_bytes(), &sig, false) {
            Ok(()) => true,
            Err(e) => {
                tried.push(format!("{}…: {e}", &text[..text.len().min(12)]));
                false
            }
        });
        if !verified {
            return Err(format!(
                "the signature does not verify with any recipe_key ({}): the recipe was altered or signed by another key",
                tried.join("; ")
            ));
        }
        let (app, version) = signed::parse_trusted_comment(sig.trusted_comment()).map_err(|e| e.to_string())?;
        if app != self.app_id {
            return Err(format!(
                "the recipe is signed for app {app:?}, and this instance belongs to {:?}",
                self.app_id
            ));
        }
        let recipe = signed::decode(&upload.bytes).map_err(|e| e.to_string())?;
        if recipe.version != version {
            return Err(format!(
                "the signature names recipe version {version}, and the signed bytes hold version {}",
                recipe.version
            ));
        }
        Ok(recipe)
    }
}

/// What is kept on disk: the bytes as signed, verified again when read back.
#[derive(Serialize, Deserialize)]
struct Stored {
    app_id: String,
    recipe_version: u64,
    bytes: String,
    signature: String,
}

struct Current {
    upload: RecipeUpload,
    recipe: Arc<SignedRecipe>,
}

/// The verified recipe of this instance's app, in memory and under `<state_dir>/recipes`.
pub struct SignedStore {
    trust: RecipeTrust,
    dir: PathBuf,
    current: Mutex<Option<Current>>,
    /// The version (and bytes) of a kept recipe that no longer verifies (after a key
    /// rotation): not run, but older versions stay refused.
    floor: Option<(u64, String)>,
    /// Held while the kept copy is written, so that writes land in order.
    writing: Mutex<()>,
}

/// What [`SignedStore::accept`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub app_id: String,
    pub version: u64,
    pub states: usize,
}

impl SignedStore {
    /// Opens the store and reads back what an earlier run verified (verified again: a
    /// kept copy that no longer verifies, after a key rotation say, is not used).
    pub fn open(trust: RecipeTrust, state_dir: &Path) -> Self {
        let mut store = Self {
            trust,
            dir: state_dir.join("recipes"),
            current: Mutex::new(None),
            floor: None,
            writing: Mutex::new(()),
        };
        match store.read_kept() {
            Ok(Some((kept, kept_version))) => match store.trust.verify(&kept) {
                Ok(recipe) => {
                    tracing::info!(
                        app_id = store.trust.app_id,
                        recipe_version = recipe.version,
                        states = recipe.states.len(),
                        "verified recipe read back from the state directory"
                    );
                    *store.lock() = Some(Current { upload: kept, recipe: Arc::new(recipe) });
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        recipe_version = kept_version,
                        "the kept recipe no longer verifies; waiting for a new one (older versions stay refused)"
                    );
                    store.floor = Some((kept_version, kept.bytes));
                }
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the kept recipe; waiting for a new one"),
        }
        store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn app_id(&self) -> &str {
        self.trust.app_id()
    }

    pub fn version(&self) -> Option<u64> {
        self.lock().as_ref().map(|c| c.recipe.version)
    }

    /// One file per app (named by a hash of the app id): the highest version verified
    /// for an app survives a change of `app_id` and back.
    fn file_name(&self) -> String {
        let digest = Sha256::digest(self.trust.app_id.as_bytes());
        format!("app-{}.json", hex::encode(digest.get(..16).unwrap_or(&digest)))
    }

    fn read_kept(&self) -> Result<Option<(RecipeUpload, u64)>, String> {
        let dir = match crate::dirfd::Dir::open(&self.dir) {
            Ok(d) => d,
            Err(crate::dirfd::WalkError::Missing(_)) => return Ok(None),
            Err(crate::dirfd::WalkError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e.to_string()),
        };
        let name = self.file_name();
        let Some(f) = dir.open_file(OsStr::new(&name)).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let mut text = Vec::new();
        f.take(MAX_STORED_BYTES)
            .read_to_end(&mut text)
            .map_err(|e| format!("{}: {e}", dir.join(OsStr::new(&name)).display()))?;
        let kept: Stored = serde_json::from_slice(&text).map_err(|e| format!("{name}: {e}"))?;
        if kept.app_id != self.trust.app_id {
            return Err(format!("{name} holds app {:?}", kept.app_id));
        }
        Ok(Some((RecipeUpload { bytes: kept.bytes, signature: kept.signature }, kept.recipe_version)))
    }

    /// Writes the kept copy (temporary file, owner and mode, rename).
    fn keep(&self, upload: &RecipeUpload, version: u64) -> Result<(), String> {
        use std::io::Write;
        use std::os::fd::AsFd;
        let root = (Uid::from_raw(0), Gid::from_raw(0));
        let dir = fsutil::create_dir_all(&self.dir, 0o700, root, &mut Vec::new()).map_err(|e| e.to_string())?;
        let stored = Stored {
            app_id: self.trust.app_id.clone(),
            recipe_version: version,
            bytes: upload.bytes.clone(),
            signature: upload.signature.clone(),
        };
        let text = serde_json::to_vec(&stored).map_err(|e| e.to_string())?;
        let name = self.file_name();
        let (tmp, mut f) = dir.create_temp(OsStr::new(&name)).map_err(|e| e.to_string())?;
        let shown = dir.join(&tmp);
        let written = (|| {
            f.write_all(&text).map_err(|e| format!("{}: cannot write: {e}", shown.display()))?;
            crate::dirfd::set_attrs(f.as_fd(), &shown, 0, 0, Some(0o600)).map_err(|e| e.to_string())?;
            dir.rename(&tmp, OsStr::new(&name)).map_err(|e| e.to_string())
        })();
        if written.is_err() {
            let _ = dir.unlink(&tmp);
        }
        written
    }

    /// Writes the verified recipe to the state directory and flushes it to disk. The
    /// server runs it after answering [`SignedStore::accept`], off the path from a push to
    /// its first state: a file write there cost milliseconds (the daemon's own fsync of
    /// the recipe commits the same journal at that moment). Until it is done, a helper
    /// that dies reads back the previous recipe, and the daemon, which keeps its own
    /// durable copy, hands the current one over again.
    pub fn persist(&self) -> Result<(), String> {
        let _order = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((upload, version)) = self.lock().as_ref().map(|c| (c.upload.clone(), c.recipe.version)) else {
            return Ok(());
        };
        self.keep(&upload, version)?;
        let dir = crate::dirfd::Dir::open(&self.dir).map_err(|e| e.to_string())?;
        if let Some(f) = dir.open_file(OsStr::new(&self.file_name())).map_err(|e| e.to_string())? {
            f.sync_all().map_err(|e| format!("{}: cannot fsync: {e}", self.dir.display()))?;
        }
        dir.fsync().map_err(|e| e.to_string())
    }

    /// Verifies a recipe and makes it the one states are taken from ([`SignedStore::persist`]
    /// keeps it on disk). The same recipe again is accepted (a reconnected daemon sends it
    /// again); an older version, or the same version with other bytes, is refused.
    pub fn accept(&self, upload: &RecipeUpload) -> Result<Accepted, HelperError> {
        let unverified = |m: String| HelperError::new(ErrorCode::Unverified, m);
        let recipe = self.trust.verify(upload).map_err(unverified)?;
        let accepted =
            Accepted { app_id: self.trust.app_id.clone(), version: recipe.version, states: recipe.states.len() };
        let mut current = self.lock();
        let highest = match current.as_ref() {
            Some(c) => Some((c.recipe.version, c.upload.bytes.as_str())),
            None => self.floor.as_ref().map(|(v, b)| (*v, b.as_str())),
        };
        if let Some((version, bytes)) = highest {
            if bytes == upload.bytes {
                if current.is_none() {
                    // The kept recipe, signed again (after a key rotation).
                    *current = Some(Current { upload: upload.clone(), recipe: Arc::new(recipe) });
                }
                return Ok(accepted);
            }
            if recipe.version <= version {
                return Err(unverified(format!(
                    "recipe version {} is not newer than version {version} already verified for app {:?}: a replayed or rolled-back recipe is refused (a backend that rolls back signs a new, higher version)",
                    recipe.version, self.trust.app_id
                )));
            }
        }
        *current = Some(Current { upload: upload.clone(), recipe: Arc::new(recipe) });
        Ok(accepted)
    }

    /// The request for state `req.index` of the verified recipe `req.recipe_version`,
    /// with the helper's own parameters, after checking the downloads against the
    /// signed pins.
    pub fn request(&self, req: &ApplySignedRequest) -> Result<SignedApply, HelperError> {
        let unverified = |m: String| HelperError::new(ErrorCode::Unverified, m);
        let recipe = match self.lock().as_ref() {
            Some(c) if c.recipe.version == req.recipe_version => Arc::clone(&c.recipe),
            Some(c) => {
                return Err(unverified(format!(
                    "recipe version {} is not the verified one (version {}); send the signed recipe first",
                    req.recipe_version, c.recipe.version
                )))
            }
            None => {
                return Err(unverified(format!(
                    "no verified recipe yet for app {:?}; send the signed recipe first",
                    self.trust.app_id
                )))
            }
        };
        let index = usize::try_from(req.index).unwrap_or(usize::MAX);
        let Some(state) = recipe.states.get(index) else {
            return Err(unverified(format!(
                "recipe version {} has {} states: there is no state at index {}",
                recipe.version,
                recipe.states.len(),
                req.index
            )));
        };
        // Typed now, at its turn: the signature covered the whole recipe, and a state
        // that cannot run fails alone, named, while the others run.
        let typed = state.typed().map_err(|e| {
            let shown: String = state.id.chars().take(64).collect();
            HelperError::new(
                ErrorCode::InvalidParameter,
                format!("state #{} ({shown:?}) of recipe version {}: {e}", index + 1, recipe.version),
            )
        })?;
        let params = typed.parsed.params;
        for f in &req.fetched {
            match pin_for(&typed.pins, &params, &f.url) {
                Some(pin) if pin.eq_ignore_ascii_case(&f.sha256) => {}
                Some(pin) => {
                    return Err(unverified(format!(
                        "the download of {} has sha256 {}, and the signed state pins {pin}",
                        f.url, f.sha256
                    )))
                }
                None => return Err(unverified(unpinned(&f.url))),
            }
        }
        let apply = ApplyRequest {
            state_id: typed.id,
            recipe_version: recipe.version,
            params,
            fetched: req.fetched.clone(),
            plan: req.plan,
        };
        Ok(SignedApply { apply, pins: typed.pins })
    }
}

/// A state of a verified recipe, ready for [`crate::states::apply`].
pub struct SignedApply {
    pub apply: ApplyRequest,
    pins: BTreeMap<String, String>,
}

impl SignedApply {
    /// The first of `urls` that the signed state does not pin, if any: the state then
    /// fails instead of asking the daemon for content nobody signed.
    pub fn unpinned<'u>(&self, urls: &'u [String]) -> Option<&'u str> {
        urls.iter().find(|u| pin_for(&self.pins, &self.apply.params, u).is_none()).map(String::as_str)
    }
}

pub fn unpinned(url: &str) -> String {
    format!(
        "remote content {url} is not pinned by the signed recipe: with a recipe_key a download is used only when the signed state gives its sha256 (`fetch_sha256`, or a common.archive checksum sha256:…)"
    )
}

/// The sha256 the signed state pins for `url`: its `fetch_sha256` entry, or the
/// `checksum` of a `common.archive` whose `source` it is.
fn pin_for(pins: &BTreeMap<String, String>, params: &ModuleParams, url: &str) -> Option<String> {
    if let Some(p) = pins.get(url) {
        return Some(p.clone());
    }
    match params {
        ModuleParams::CommonArchive(a) if a.source.0 == url => a
            .checksum
            .as_ref()
            .and_then(|c| c.0.strip_prefix("sha256:"))
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_ascii_lowercase),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const KEY: &str = "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3";
    const KEY2: &str = "RWRSmEbiqTy9W5OvpMzH4pXDwrEHk5YMszVped45CrvatYgJ5KFvdyht";

    #[test]
    fn recipe_key_is_one_or_more_keys_and_needs_the_app_id() {
        assert!(RecipeTrust::parse("[userdata]\napp_id = a\n").unwrap().is_none());
        assert!(RecipeTrust::parse("[userdata]\napp_id = a\nrecipe_key =\n").unwrap().is_none());
        let t =
            RecipeTrust::parse(&format!("[userdata]\napp_id = a\nrecipe_key = \"{KEY}, {KEY2}\"\n")).unwrap().unwrap();
        assert_eq!((t.key_count(), t.app_id()), (2, "a"));
        let e = RecipeTrust::parse(&format!("[userdata]\nrecipe_key = {KEY}\n")).unwrap_err();
        assert!(e.contains("app_id is not"), "{e}");
        let e = RecipeTrust::parse("[userdata]\napp_id = a\nrecipe_key = RWQnot-a-key\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("not a minisign public key"), "{e}");
        // A key elsewhere than [userdata] is not the trust anchor.
        assert!(RecipeTrust::parse(&format!("[agent]\nrecipe_key = {KEY}\n")).unwrap().is_none());
    }

    #[test]
    fn a_key_in_a_file_others_could_write_stops_the_helper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opsagent.conf");
        assert!(RecipeTrust::load(&path, 0).unwrap().is_none(), "no file: no key");
        let me = nix::unistd::geteuid().as_raw();
        std::fs::write(&path, "[userdata]\napp_id = a\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(RecipeTrust::load(&path, me).unwrap().is_none(), "no key: nothing to trust");
        std::fs::write(&path, format!("[userdata]\napp_id = a\nrecipe_key = {KEY}\n")).unwrap();
        let e = RecipeTrust::load(&path, me).unwrap_err().to_string();
        assert!(e.contains("0666") && e.contains("cannot be trusted"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(RecipeTrust::load(&path, me).unwrap().is_some());
        let e = RecipeTrust::load(&path, me + 1).unwrap_err().to_string();
        assert!(e.contains("owned by uid"), "{e}");
        let link = dir.path().join("link.conf");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(RecipeTrust::load(&link, me).is_err(), "a link is not followed");
    }

    fn signed(kp: &minisign::KeyPair, app: &str, version: u64, content: &str) -> RecipeUpload {
        let p = serde_json::json!({"path": "/srv/x", "content": content});
        let bytes = signed::canonical_bytes(
            version,
            [signed::SignState { id: "s", module: "linux.file", parameter: &p, pins: None }],
        )
        .unwrap();
        let comment = signed::trusted_comment(app, version);
        let sig =
            minisign::sign(Some(&kp.pk), &kp.sk, std::io::Cursor::new(bytes.as_bytes()), Some(&comment), None).unwrap();
        RecipeUpload { bytes, signature: sig.into_string() }
    }

    fn trust(keys: &[&minisign::KeyPair]) -> RecipeTrust {
        let keys: Vec<String> = keys.iter().map(|k| k.pk.to_base64()).collect();
        RecipeTrust::parse(&format!("[userdata]\napp_id = a\nrecipe_key = {}\n", keys.join(" "))).unwrap().unwrap()
    }

    /// After a rotation the kept recipe no longer verifies and is not run, but the
    /// version it had still bounds what is accepted: the old key's successor cannot be
    /// used to replay an older version.
    #[test]
    fn the_highest_version_outlives_a_key_rotation() {
        let (old, new) = (
            minisign::KeyPair::generate_unencrypted_keypair().unwrap(),
            minisign::KeyPair::generate_unencrypted_keypair().unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let store = SignedStore::open(trust(&[&old]), dir.path());
        assert_eq!(store.accept(&signed(&old, "a", 5, "v5")).unwrap().version, 5);
        let e = store.accept(&signed(&old, "a", 4, "v4")).unwrap_err();
        assert!(e.message.contains("not newer than version 5"), "{e}");
        store.persist().unwrap();
        drop(store);

        let store = SignedStore::open(trust(&[&old]), dir.path());
        assert_eq!(store.version(), Some(5), "read back and verified again");
        drop(store);

        let store = SignedStore::open(trust(&[&new]), dir.path());
        assert_eq!(store.version(), None, "signed by a key no longer configured: not run");
        let e = store.accept(&signed(&new, "a", 3, "v3")).unwrap_err();
        assert!(e.message.contains("not newer than version 5"), "{e}");
        // The same recipe signed again with the new key is taken up.
        assert_eq!(store.accept(&signed(&new, "a", 5, "v5")).unwrap().version, 5);
        assert_eq!(store.version(), Some(5));
        assert_eq!(store.accept(&signed(&new, "a", 6, "v6")).unwrap().version, 6);
        store.persist().unwrap();
        drop(store);
        assert_eq!(SignedStore::open(trust(&[&new]), dir.path()).version(), Some(6));
    }
}
