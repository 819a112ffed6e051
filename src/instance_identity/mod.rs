//! Who this instance is, for the Handshake: `instance_id` (cloud metadata service, or the
//! config), `app_id` (config, or the instance userdata) and `instance_token` (a local secret).
//!
//! [`Identity::resolve`] does all of it in order; the pieces are public for the CLI.

mod metadata;
mod token;
mod userdata;

#[cfg(test)]
mod test_server;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;

pub use metadata::{MetadataClient, RetryPolicy, SourceAnswer};
pub use token::load_or_create_token;
pub use userdata::{fill_from_userdata, parse_userdata, Userdata};

use crate::config::{identifier, Config, ConfigError};

/// The three identity fields of a Handshake.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub instance_id: String,
    pub app_id: String,
    pub instance_token: String,
}

// The token is a secret: keep it out of logs.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("instance_id", &self.instance_id)
            .field("app_id", &self.app_id)
            .field("instance_token", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot set up an HTTP client for the metadata service {base}: {error}")]
    Client { base: String, error: String },

    #[error(
        "no instance id from the metadata service at {base} after {attempts} attempt(s) \
         (set [userdata] instance_id or --instance-id to skip it); last answers: {}",
        join(.answers)
    )]
    NoInstanceId { base: String, attempts: u32, answers: Vec<SourceAnswer> },

    #[error("cannot read the instance userdata at {url} after {attempts} attempt(s): {answer}")]
    Userdata { url: String, attempts: u32, answer: String },

    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error("{}: cannot read the instance token: {error}", .path.display())]
    TokenRead { path: PathBuf, error: std::io::Error },

    #[error("{}: malformed instance token file: {problem}", .path.display())]
    TokenMalformed { path: PathBuf, problem: String },

    #[error("{}: cannot write the instance token: {error}", .path.display())]
    TokenWrite { path: PathBuf, error: std::io::Error },

    #[error("{}: app id {app_id:?} cannot be stored in the token file: {problem}", .path.display())]
    TokenAppId { path: PathBuf, app_id: String, problem: String },

    #[error("no randomness available for the instance token: {0}")]
    Random(String),
}

fn join(answers: &[SourceAnswer]) -> String {
    answers.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Checks an instance id (surrounding blanks, e.g. a final newline, are removed): non-empty,
/// printable ASCII without spaces, at most 255 characters.
pub fn validate_instance_id(text: &str) -> Result<String, String> {
    identifier(text.trim())
}

impl Identity {
    /// Completes `config` from the instance userdata when `ws_uri` or `app_id` is unset,
    /// then finds the instance id (config override, else the metadata service) and loads or
    /// creates the instance token.
    pub async fn resolve(config: &mut Config, retry: &RetryPolicy) -> Result<Identity, IdentityError> {
        let client = MetadataClient::new(&config.userdata.metadata_url, retry.clone())?;
        if config.require_backend().is_err() {
            complete_from_userdata(config, &client).await?;
        }
        let app_id = config.require_backend()?.1.to_string();
        let instance_id = match &config.userdata.instance_id {
            Some(id) => id.clone(),
            None => client.instance_id().await?,
        };
        let instance_token = load_or_create_token(&config.agent.token_file, &app_id)?;
        Ok(Identity { instance_id, app_id, instance_token })
    }
}

/// The instance id alone: the config override, else the metadata service.
pub async fn resolve_instance_id(config: &Config, retry: &RetryPolicy) -> Result<String, IdentityError> {
    match &config.userdata.instance_id {
        Some(id) => Ok(id.clone()),
        None => MetadataClient::new(&config.userdata.metadata_url, retry.clone())?.instance_id().await,
    }
}

/// An unreachable userdata is only logged: the caller's "not set" error, which lists every
/// way to set the key, is the more useful message.
async fn complete_from_userdata(config: &mut Config, client: &MetadataClient) -> Result<(), IdentityError> {
    match client.userdata().await {
        Ok(Some(userdata)) => {
            let filled = fill_from_userdata(config, &userdata, &client.userdata_url())?;
            let url = client.userdata_url();
            tracing::info!(?filled, %url, "configuration completed from the instance userdata");
        }
        Ok(None) => tracing::info!(url = %client.userdata_url(), "the instance has no userdata"),
        Err(e) => tracing::warn!("{e}"),
    }
    Ok(())
}
