//! `opsagent run`: the daemon.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, Overrides};

pub fn cmd_run(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(path, overrides)?;
    crate::logging::init(&config.agent.log_level, "opsagent");
    let rt = super::runtime()?;
    rt.block_on(async {
        if config.require_backend().is_err() {
            fill_from_metadata(&mut config).await;
        }
        crate::daemon::run(config).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Instances installed from userdata may have no config file: read the userdata.
async fn fill_from_metadata(config: &mut Config) {
    let client = match crate::instance_identity::MetadataClient::new(
        &config.userdata.metadata_url,
        crate::instance_identity::RetryPolicy::default(),
    ) {
        Ok(c) => c,
        Err(e) => return tracing::warn!(error = %e, "no metadata client"),
    };
    match client.userdata().await {
        Ok(Some(ud)) => {
            let url = client.userdata_url();
            match crate::instance_identity::fill_from_userdata(config, &ud, &url) {
                Ok(filled) => {
                    tracing::info!(keys = ?filled, "configuration completed from the instance userdata")
                }
                Err(e) => tracing::warn!(error = %e, "instance userdata unusable"),
            }
        }
        Ok(None) => tracing::info!("no instance userdata"),
        Err(e) => tracing::warn!(error = %e, "cannot read the instance userdata"),
    }
}
