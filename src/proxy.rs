//! What every session shares: the config, TLS, the backend target, the credential store,
//! the policy and the cancel keys.

use std::sync::Arc;

use dashmap::DashMap;
use rand::Rng;

use crate::backend::BackendTarget;
use crate::config::{ClientTlsMode, Config, RotationMode};
use crate::credentials::rotate::Rotator;
use crate::credentials::{file, CredentialStore, LoginCredential};
use crate::policy::Policy;
use crate::tls;

pub struct Proxy {
    config: Arc<Config>,
    tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub backend: Arc<BackendTarget>,
    pub credentials: Arc<CredentialStore>,
    /// Present in managed rotation mode.
    pub rotator: Option<Arc<Rotator>>,
    pub policy: Policy,
    pub cancel_keys: Arc<CancelKeys>,
    /// Keys the mock SCRAM verifiers of unknown users; new at every start.
    instance_secret: [u8; 32],
}

impl Proxy {
    /// Builds the proxy and brings its credential source to life: the static login, the
    /// watched file, or (managed) a freshly rotated login, with the schedule running.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Proxy>> {
        let mode = config.rotation.mode;
        let mut proxy = Proxy::new(config)?;
        match mode {
            RotationMode::Static => {}
            RotationMode::File => {
                let rotation = &proxy.config.rotation;
                if let Some(path) = rotation.file.clone() {
                    tokio::spawn(file::watch(
                        path,
                        rotation.poll_interval,
                        proxy.credentials.clone(),
                        proxy.backend.clone(),
                        proxy.config.backend.owner_role.clone(),
                    ));
                }
            }
            RotationMode::Managed => {
                let rotator = Arc::new(Rotator::new(
                    proxy.config.clone(),
                    proxy.credentials.clone(),
                    proxy.backend.clone(),
                ));
                rotator.start().await?;
                tokio::spawn(rotator.clone().run_schedule());
                proxy.rotator = Some(rotator);
            }
        }
        Ok(Arc::new(proxy))
    }

    fn new(config: Config) -> anyhow::Result<Proxy> {
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
        let login = match config.rotation.mode {
            RotationMode::Static => LoginCredential::from_config(&config.backend)?,
            RotationMode::File => match &config.rotation.file {
                Some(path) => file::read(path)?,
                None => anyhow::bail!("[rotation] mode = \"file\" needs file"),
            },
            // Replaced by the start-up rotation before any client is served.
            RotationMode::Managed => LoginCredential {
                user: String::new(),
                password: String::new(),
            },
        };
        Ok(Proxy {
            tls_acceptor,
            backend: Arc::new(backend),
            rotator: None,
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
