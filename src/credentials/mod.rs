//! The backend login credential: where it comes from and how it is swapped.
//!
//! Every new backend connection reads the current credential once, at connect time, from
//! the [`CredentialStore`]; rotation only ever swaps what the store returns.

pub mod file;
pub mod rotate;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::{BackendConfig, ClientClass, Config, RotationMode, CLASSES};

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
    /// File mode: the credential file could not be used (the message never quotes it).
    #[error("{0}")]
    FileCredential(String),
}

/// One login role rolegate connects as, and what it is for: in the one-login layout one
/// slot serves every class; with `[backend.logins]` each class has its own.
#[derive(Debug, Clone)]
pub struct LoginSlot {
    /// `app`, `readonly`, `migrator`, or `all` (one login for every class).
    pub label: &'static str,
    pub classes: Vec<ClientClass>,
    /// The role its sessions are kept in (`ALTER ROLE … SET role`, proved at rotation).
    pub role: String,
    /// The roles a new login of this slot is granted.
    pub member_of: Vec<String>,
    /// Its own class login: NOINHERIT, CONNECT granted to the login itself.
    pub class_login: bool,
    /// Managed rotation: the names of this instance's logins start with this.
    pub own_prefix: String,
}

/// The login slots of `config`.
pub fn login_slots(config: &Config) -> Vec<LoginSlot> {
    if !config.class_logins() {
        let owner = config.backend.owner_role.clone();
        let mut member_of = vec![owner.clone()];
        member_of.extend(config.backend.app_role.clone());
        return vec![LoginSlot {
            label: "all",
            classes: CLASSES.to_vec(),
            role: owner,
            member_of,
            class_login: false,
            own_prefix: config.own_login_prefix(),
        }];
    }
    CLASSES
        .iter()
        .map(|&class| {
            let role = config.class_role(class);
            LoginSlot {
                label: class.as_str(),
                classes: vec![class],
                member_of: vec![role.clone()],
                role,
                class_login: true,
                own_prefix: config.own_class_login_prefix(class),
            }
        })
        .collect()
}

/// The credential of `slot` from the config (static mode) or its file (file mode).
pub fn initial_credential(
    config: &Config,
    slot: &LoginSlot,
) -> Result<LoginCredential, CredentialError> {
    let class_login = config
        .backend
        .logins
        .as_ref()
        .filter(|_| slot.class_login)
        .map(|logins| logins.get(slot.classes[0]));
    match (config.rotation.mode, class_login) {
        // Replaced by the start-up rotation before any client is served.
        (RotationMode::Managed, _) => Ok(LoginCredential {
            user: String::new(),
            password: String::new(),
        }),
        (RotationMode::Static, None) => LoginCredential::from_config(&config.backend),
        (RotationMode::Static, Some(login)) => {
            let user = login.user.clone().ok_or(CredentialError::NoLogin)?;
            let password = read_password(
                login.password_env.as_deref(),
                login.password_file.as_deref(),
            )?;
            Ok(LoginCredential { user, password })
        }
        (RotationMode::File, class_login) => {
            let path = match class_login {
                Some(login) => login.file.as_ref(),
                None => config.rotation.file.as_ref(),
            };
            let path = path.ok_or(CredentialError::NoLogin)?;
            file::read(path).map_err(|e| CredentialError::FileCredential(format!("{e:#}")))
        }
    }
}

fn read_password(
    env: Option<&str>,
    path: Option<&std::path::Path>,
) -> Result<String, CredentialError> {
    if let Some(var) = env {
        std::env::var(var).map_err(|_| CredentialError::MissingEnv(var.to_owned()))
    } else if let Some(path) = path {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialError::File {
            path: path.display().to_string(),
            source,
        })?;
        Ok(text.lines().next().unwrap_or_default().to_owned())
    } else {
        Err(CredentialError::NoLogin)
    }
}

/// The credential store of each class: one shared store in the one-login layout, one per
/// class with `[backend.logins]`.
#[derive(Debug)]
pub struct ClassCredentials {
    /// Indexed like [`CLASSES`].
    stores: [Arc<CredentialStore>; 3],
}

fn class_index(class: ClientClass) -> usize {
    match class {
        ClientClass::App => 0,
        ClientClass::Readonly => 1,
        ClientClass::Migrator => 2,
    }
}

impl ClassCredentials {
    /// A store per slot, each class pointing at its slot's.
    pub fn new(slots: &[(LoginSlot, LoginCredential)]) -> ClassCredentials {
        let mut stores: [Option<Arc<CredentialStore>>; 3] = [None, None, None];
        let mut first = None;
        for (slot, credential) in slots {
            let store = Arc::new(CredentialStore::new(credential.clone()));
            first.get_or_insert_with(|| store.clone());
            for class in &slot.classes {
                stores[class_index(*class)] = Some(store.clone());
            }
        }
        let fallback = first.unwrap_or_else(|| {
            Arc::new(CredentialStore::new(LoginCredential {
                user: String::new(),
                password: String::new(),
            }))
        });
        ClassCredentials {
            stores: stores.map(|s| s.unwrap_or_else(|| fallback.clone())),
        }
    }

    /// The store new backend connections for `class` take their login from.
    pub fn get(&self, class: ClientClass) -> &Arc<CredentialStore> {
        &self.stores[class_index(class)]
    }
}

impl LoginCredential {
    /// The static login of `[backend]`: `login_user` with its password from the named
    /// environment variable or file.
    pub fn from_config(backend: &BackendConfig) -> Result<LoginCredential, CredentialError> {
        let user = backend.login_user.clone().ok_or(CredentialError::NoLogin)?;
        let password = read_password(
            backend.login_password_env.as_deref(),
            backend.login_password_file.as_deref(),
        )?;
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

    fn config(extra_backend: &str) -> Config {
        let verifier = crate::scram::make_verifier("x");
        Config::parse(&format!(
            "[tls]\nmode = \"disable\"\n[backend]\ndatabase = \"shop\"\nowner_role = \"shop_owner\"\n\
             {extra_backend}\n[[clients]]\nuser = \"w\"\npassword = \"{verifier}\"\nclass = \"app\"\n\
             [rotation]\nmode = \"managed\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn one_login_serves_every_class_or_each_class_has_its_own() {
        let credential = |user: &str| LoginCredential {
            user: user.into(),
            password: String::new(),
        };
        let shared = config("app_role = \"shop_dml\"\n");
        let slots = login_slots(&shared);
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].member_of, ["shop_owner", "shop_dml"]);
        assert!(!slots[0].class_login);
        let stores = ClassCredentials::new(&[(slots[0].clone(), credential("l"))]);
        assert!(Arc::ptr_eq(
            stores.get(ClientClass::App),
            stores.get(ClientClass::Readonly)
        ));

        let per_class = config("[backend.logins]\n");
        let slots = login_slots(&per_class);
        let roles: Vec<_> = slots.iter().map(|s| s.role.as_str()).collect();
        assert_eq!(roles, ["shop_app", "shop_readonly", "shop_owner"]);
        assert!(slots
            .iter()
            .all(|s| s.class_login && s.member_of == [s.role.clone()]));
        assert_eq!(slots[1].own_prefix, "shop_readonly_login_");
        let stores = ClassCredentials::new(
            &slots
                .iter()
                .map(|s| (s.clone(), credential(s.label)))
                .collect::<Vec<_>>(),
        );
        assert_eq!(stores.get(ClientClass::Readonly).current().user, "readonly");
        assert_eq!(stores.get(ClientClass::Migrator).current().user, "migrator");
        stores.get(ClientClass::App).swap(credential("app2"));
        assert_eq!(stores.get(ClientClass::Readonly).current().user, "readonly");
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
