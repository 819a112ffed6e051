//! Recipe signing (`--signing-key FILE`): every `RecipeMetadata` the backend pushes
//! carries a minisign signature of the recipe's canonical bytes
//! ([`opsagent_proto::signed`]), with a trusted comment naming the app and version, so
//! that an agent whose root helper has a `recipe_key` runs it.
//!
//! The key is a minisign secret key file (`minisign -G`); an encrypted one is opened
//! with the password in `OPSAGENT_SIGNING_KEY_PASSWORD` (none for `minisign -G -W`).
//! Signatures are made once per (app, recipe version) and kept.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;

use opsagent_proto::signed::{self, SignState};

use super::BackendError;
use crate::protocol::WireState;

/// The environment variable holding the password of an encrypted signing key.
pub const PASSWORD_ENV: &str = "OPSAGENT_SIGNING_KEY_PASSWORD";

pub(crate) struct RecipeSigner {
    sk: minisign::SecretKey,
    pk: minisign::PublicKey,
    /// app → (version, content hash, signature).
    made: BTreeMap<String, (u64, String, String)>,
}

impl std::fmt::Debug for RecipeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecipeSigner").field("public_key", &self.pk.to_base64()).finish_non_exhaustive()
    }
}

impl RecipeSigner {
    pub fn load(path: &Path) -> Result<Self, BackendError> {
        let bad = |what: String| BackendError::Config(format!("signing key {}: {what}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let password = std::env::var(PASSWORD_ENV).unwrap_or_default();
        let sk_box = minisign::SecretKeyBox::from_string(&text).map_err(|e| bad(e.to_string()))?;
        let sk = sk_box
            .into_secret_key(Some(password))
            .map_err(|e| bad(format!("{e} (an encrypted key needs its password in {PASSWORD_ENV})")))?;
        let pk = minisign::PublicKey::from_secret_key(&sk).map_err(|e| bad(e.to_string()))?;
        Ok(Self { sk, pk, made: BTreeMap::new() })
    }

    /// The public key's base64 line: what goes into `recipe_key`.
    pub fn public_key(&self) -> String {
        self.pk.to_base64()
    }

    /// The signature of `version` of `app`'s recipe (`hash`: its content hash, so that a
    /// changed recipe under a reused version number is signed again).
    pub fn sign(&mut self, app: &str, version: u64, hash: &str, states: &[WireState]) -> Result<String, String> {
        if let Some((v, h, sig)) = self.made.get(app) {
            if *v == version && h == hash {
                return Ok(sig.clone());
            }
        }
        let bytes = signed::canonical_bytes(
            version,
            states.iter().map(|s| SignState {
                id: &s.id,
                module: &s.module,
                parameter: &s.parameter,
                pins: s.fetch_sha256.as_ref(),
            }),
        )
        .map_err(|e| e.to_string())?;
        let comment = signed::trusted_comment(app, version);
        let sig = minisign::sign(Some(&self.pk), &self.sk, Cursor::new(bytes.as_bytes()), Some(&comment), None)
            .map_err(|e| e.to_string())?
            .into_string();
        self.made.insert(app.to_string(), (version, hash.to_string(), sig.clone()));
        Ok(sig)
    }
}
