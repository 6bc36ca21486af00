//! What every session shares: the config, TLS, the backend target, the credential store,
//! the policy and the cancel keys.

use std::sync::Arc;

use dashmap::DashMap;
use rand::Rng;

use crate::backend::BackendTarget;
use crate::config::{ClientTlsMode, Config};
use crate::credentials::{CredentialStore, LoginCredential};
use crate::policy::Policy;
use crate::tls;

pub struct Proxy {
    config: Arc<Config>,
    tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub backend: BackendTarget,
    pub credentials: Arc<CredentialStore>,
    pub policy: Policy,
    pub cancel_keys: Arc<CancelKeys>,
    /// Keys the mock SCRAM verifiers of unknown users; new at every start.
    instance_secret: [u8; 32],
}

impl Proxy {
    pub fn new(config: Config) -> anyhow::Result<Proxy> {
        use anyhow::Context;
        let tls_acceptor = match (config.tls.mode, &config.tls.cert, &config.tls.key) {
            (ClientTlsMode::Disable, _, _) => None,
            (_, Some(cert), Some(key)) => {
                Some(tls::acceptor(cert, key).context("loading the [tls] certificate")?)
            }
            _ => anyhow::bail!("[tls] needs cert and key unless mode = \"disable\""),
        };
        let backend =
            BackendTarget::from_config(&config.backend).context("setting up backend TLS")?;
        let login = LoginCredential::from_config(&config.backend)?;
        Ok(Proxy {
            tls_acceptor,
            backend,
            credentials: Arc::new(CredentialStore::new(login)),
            policy: Policy::new(&config.policy),
            cancel_keys: Arc::new(CancelKeys::default()),
            instance_secret: rand::thread_rng().gen(),
            config: Arc::new(config),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.tls_acceptor.clone()
    }

    pub fn instance_secret(&self) -> &[u8; 32] {
        &self.instance_secret
    }
}

/// The backend connection a cancel key stands for.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: String,
    pub pid: i32,
    pub secret: i32,
}

/// rolegate's own BackendKeyData values, mapped to the backend's.
#[derive(Default)]
pub struct CancelKeys {
    keys: DashMap<(i32, i32), CancelTarget>,
}

impl CancelKeys {
    /// Hands out a fresh (pid, secret) for `target`; dropping the guard forgets it.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> CancelKeyGuard {
        let mut rng = rand::thread_rng();
        loop {
            let key = (rng.gen_range(1..i32::MAX), rng.gen::<i32>());
            if let dashmap::Entry::Vacant(slot) = self.keys.entry(key) {
                slot.insert(target);
                return CancelKeyGuard {
                    keys: self.clone(),
                    key,
                };
            }
        }
    }

    pub fn lookup(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        self.keys.get(&(pid, secret)).map(|t| t.clone())
    }
}

pub struct CancelKeyGuard {
    keys: Arc<CancelKeys>,
    pub key: (i32, i32),
}

impl Drop for CancelKeyGuard {
    fn drop(&mut self) {
        self.keys.keys.remove(&self.key);
    }
}
