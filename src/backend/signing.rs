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

/// sig_alg, kdf_alg, chk_alg (2 each), kdf salt (32), opslimit, memlimit (8 each),
/// key id (8), secret key (64), checksum (32).
const SECRET_KEY_BYTES: usize = 158;

/// Standard base64 with padding, as minisign writes it.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let body = text.trim_end_matches('=');
    if !text.len().is_multiple_of(4) || text.len() - body.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in body.bytes() {
        acc = (acc << 6) | u32::from(value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

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
        let raw = text
            .lines()
            .nth(1)
            .and_then(|line| base64_decode(line.trim()))
            .filter(|raw| raw.len() == SECRET_KEY_BYTES)
            .ok_or_else(|| bad("not a minisign secret key file (minisign -G)".into()))?;
        let sk = if raw[2..4] == [0, 0] {
            // `minisign -G -W`: not encrypted, and minisign leaves its checksum empty,
            // which the crate's box reader takes for a wrong password. Read the bytes;
            // the test signature below shows the key is whole.
            minisign::SecretKey::from_bytes(&raw).map_err(|e| bad(e.to_string()))?
        } else {
            let password = std::env::var(PASSWORD_ENV).unwrap_or_default();
            let sk_box = minisign::SecretKeyBox::from_string(&text).map_err(|e| bad(e.to_string()))?;
            sk_box
                .into_secret_key(Some(password))
                .map_err(|e| bad(format!("{e} (an encrypted key needs its password in {PASSWORD_ENV})")))?
        };
        let pk = minisign::PublicKey::from_secret_key(&sk).map_err(|e| bad(e.to_string()))?;
        // Sign once and verify with the derived public key: a damaged key fails here,
        // at start-up, not at the first push.
        minisign::sign(Some(&pk), &sk, Cursor::new(b"opsagent-backend key check"), None, None)
            .map_err(|e| bad(format!("the key does not sign: {e}")))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_of_minisign_lines() {
        assert_eq!(base64_decode("RWQ=").unwrap(), b"Ed");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert!(base64_decode("a$==").is_none());
        assert!(base64_decode("abc").is_none());
    }
}
