//! The backend login credential: where it comes from and how it is swapped.
//!
//! Every new backend connection reads the current credential once, at connect time, from
//! the [`CredentialStore`]; rotation only ever swaps what the store returns.

pub mod file;
pub mod rotate;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::BackendConfig;

/// A login role and its password. The password never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginCredential {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for LoginCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginCredential")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("environment variable {0} (the backend login password) is not set")]
    MissingEnv(String),
    #[error("cannot read the backend login password from {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("no backend login is configured")]
    NoLogin,
}

impl LoginCredential {
    /// The static login of `[backend]`: `login_user` with its password from the named
    /// environment variable or file.
    pub fn from_config(backend: &BackendConfig) -> Result<LoginCredential, CredentialError> {
        let user = backend.login_user.clone().ok_or(CredentialError::NoLogin)?;
        let password = if let Some(var) = &backend.login_password_env {
            std::env::var(var).map_err(|_| CredentialError::MissingEnv(var.clone()))?
        } else if let Some(path) = &backend.login_password_file {
            let text = std::fs::read_to_string(path).map_err(|source| CredentialError::File {
                path: path.display().to_string(),
                source,
            })?;
            text.lines().next().unwrap_or_default().to_owned()
        } else {
            return Err(CredentialError::NoLogin);
        };
        Ok(LoginCredential { user, password })
    }
}

/// The current backend login, swapped atomically.
#[derive(Debug)]
pub struct CredentialStore {
    current: RwLock<Arc<LoginCredential>>,
    /// Unix seconds when the current login was put in.
    since: AtomicU64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl CredentialStore {
    pub fn new(initial: LoginCredential) -> CredentialStore {
        CredentialStore {
            current: RwLock::new(Arc::new(initial)),
            since: AtomicU64::new(unix_now()),
        }
    }

    /// The credential a new backend connection must use.
    pub fn current(&self) -> Arc<LoginCredential> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            // A writer never panics while holding the lock, but stay usable if one did.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes `next` the credential for every backend connection opened from now on.
    pub fn swap(&self, next: LoginCredential) -> Arc<LoginCredential> {
        let next = Arc::new(next);
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.since.store(unix_now(), Ordering::Relaxed);
        std::mem::replace(&mut *guard, next)
    }

    /// Unix seconds when the current login was put in.
    pub fn since(&self) -> u64 {
        self.since.load(Ordering::Relaxed)
    }

    /// How long the current login has been in use.
    pub fn age_seconds(&self) -> u64 {
        unix_now().saturating_sub(self.since())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_password() {
        let c = LoginCredential {
            user: "login_1".into(),
            password: "hunter2".into(),
        };
        let text = format!("{c:?}");
        assert!(text.contains("login_1") && !text.contains("hunter2"));
    }

    #[test]
    fn swap_changes_what_new_connections_get() {
        let store = CredentialStore::new(LoginCredential {
            user: "a".into(),
            password: "x".into(),
        });
        let old = store.swap(LoginCredential {
            user: "b".into(),
            password: "y".into(),
        });
        assert_eq!(old.user, "a");
        assert_eq!(store.current().user, "b");
    }
}
