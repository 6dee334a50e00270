//! Joining the cluster: a proxy or an agent trades its join token for an
//! identity once, and keeps it (mode 0600) in its data directory.

use std::path::{Path, PathBuf};

use portico_core::identity::IdentityFile;
use portico_core::{Error, SystemRole};

use crate::client::connect;

/// What joining needs: where, with what, and where to keep the identity.
pub struct JoinParams<'a> {
    pub auth_server: &'a str,
    pub join_token: Option<&'a str>,
    pub join_token_file: Option<&'a Path>,
    pub host_id: Option<&'a str>,
    pub role: SystemRole,
    pub identity_path: PathBuf,
}

/// Loads a saved identity, or joins with the join token and saves the result (0600).
pub async fn load_or_join(p: JoinParams<'_>) -> Result<(String, String), Error> {
    if let Ok(text) = std::fs::read_to_string(&p.identity_path)
        && let Ok(id) = yaml_serde::from_str::<IdentityFile>(&text)
    {
        return Ok((id.principal, id.token));
    }
    let section = p.role.config_section();
    let token = match (p.join_token, p.join_token_file) {
        (Some(t), _) => t.trim().to_string(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| {
                Error::bad_request(format!("{section}.join_token_file {}: {e}", f.display()))
            })?
            .trim()
            .to_string(),
        (None, None) => {
            return Err(Error::bad_request(format!(
                "{section}: no saved identity and no join_token or join_token_file; create one with pctl tokens add --type={}",
                p.role
            )));
        }
    };
    let mut client = connect(p.auth_server, None)
        .await
        .map_err(Error::unavailable)?;
    let resp = client
        .join(crate::v1::JoinRequest {
            token,
            host_id: p.host_id.unwrap_or_default().to_string(),
            role: p.role.as_str().into(),
        })
        .await
        .map_err(|s| crate::convert::from_status(&s))?
        .into_inner();
    let id = IdentityFile {
        auth_server: p.auth_server.to_string(),
        principal: resp.host_id.clone(),
        token: resp.identity_token.clone(),
    };
    let text = yaml_serde::to_string(&id).map_err(|e| Error::internal(e.to_string()))?;
    crate::files::write_private(&p.identity_path, text.as_bytes()).map_err(|e| {
        Error::unavailable(format!(
            "cannot save the identity to {}: {e}",
            p.identity_path.display()
        ))
    })?;
    tracing::info!(host_id = %resp.host_id, role = %p.role, path = %p.identity_path.display(), "joined the cluster");
    Ok((resp.host_id, resp.identity_token))
}
