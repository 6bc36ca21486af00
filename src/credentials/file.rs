//! File mode: the login credential comes from a JSON file that something else rewrites
//! (Vault Agent, a Kubernetes secret volume, a Secrets Manager sidecar).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::{CredentialStore, LoginCredential};
use crate::backend::{self, BackendTarget};

#[derive(serde::Deserialize)]
struct FileCredential {
    username: String,
    password: String,
}

/// Reads `{"username": …, "password": …}`; the error never quotes the file's content.
pub fn read(path: &Path) -> anyhow::Result<LoginCredential> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the credential file {}", path.display()))?;
    let parsed: FileCredential = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "the credential file {} is not JSON with username and password (line {}, column {})",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    Ok(LoginCredential {
        user: parsed.username,
        password: parsed.password,
    })
}

/// Polls the file; a changed credential is proved to log in (and reach the owner role)
/// before it is swapped in. A credential that fails stays out; the old one stays in use.
pub async fn watch(
    path: PathBuf,
    every: Duration,
    store: Arc<CredentialStore>,
    target: Arc<BackendTarget>,
    owner_role: String,
) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(every).await;
        let current = std::fs::read(&path).ok();
        if current.is_none() || current == last {
            continue;
        }
        last = current;
        let credential = match read(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "credential file changed but cannot be used; keeping the old login"
                );
                continue;
            }
        };
        match backend::prove_login(&target, &credential, &owner_role).await {
            Ok(()) => {
                let new_user = credential.user.clone();
                let old = store.swap(credential);
                tracing::info!(
                    old = old.user.as_str(),
                    new = new_user.as_str(),
                    "login switched from the credential file"
                );
            }
            Err(e) => tracing::error!(
                login = credential.user.as_str(),
                error = %e,
                "the new credential from the file does not log in; keeping the old login"
            ),
        }
    }
}
