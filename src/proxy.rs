//! What every session shares: the config, TLS, the backend target, the credential store,
//! the policy and the cancel keys.

use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use rand::Rng;

use crate::backend::BackendTarget;
use crate::config::{ClientTlsMode, Config, RotationMode};
use crate::credentials::rotate::Rotator;
use crate::credentials::{file, initial_credential, login_slots, ClassCredentials};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::tls;

/// What SIGHUP can replace: the config, the TLS certificate, the policy. Sessions take
/// what is current when they start.
struct Live {
    config: Arc<Config>,
    /// The bearer token of the admin endpoint's actions (`[admin]`).
    admin_token: Option<Arc<str>>,
    tls_acceptor: Option<tls::Acceptor>,
    policy: Arc<Policy>,
}

impl Live {
    fn build(config: Config) -> anyhow::Result<Live> {
        use anyhow::Context;
        let tls_acceptor = match (config.tls.mode, &config.tls.cert, &config.tls.key) {
            (ClientTlsMode::Disable, _, _) => None,
            (_, Some(cert), Some(key)) => {
                Some(tls::acceptor(cert, key).context("loading the [tls] certificate")?)
            }
            _ => anyhow::bail!("[tls] needs cert and key unless mode = \"disable\""),
        };
        let admin_token = config
            .admin
            .token()
            .context("reading the [admin] token")?
            .map(Arc::from);
        Ok(Live {
            admin_token,
            tls_acceptor,
            policy: Arc::new(Policy::new(&config.policy)),
            config: Arc::new(config),
        })
    }
}

pub struct Proxy {
    live: RwLock<Arc<Live>>,
    pub backend: Arc<BackendTarget>,
    /// The login of each class.
    pub credentials: Arc<ClassCredentials>,
    /// Managed rotation: one rotator per login slot (one, or one per class).
    pub rotators: Vec<Arc<Rotator>>,
    pub cancel_keys: Arc<CancelKeys>,
    /// Transaction pooling's backend sessions (`[pool] mode = "transaction"`).
    pub pools: Arc<crate::pool::Pools>,
    /// The server's large-object functions, looked up by the first session.
    pub large_objects: std::sync::OnceLock<crate::policy::fastpath::LargeObjectFunctions>,
    pub metrics: Arc<Metrics>,
    /// Client connections open, in any state.
    pub open_connections: std::sync::atomic::AtomicUsize,
    /// Set once on SIGTERM/SIGINT: stop accepting, end sessions as they go idle.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// `limits.max_client_connections`, shared by every thread's accept loop.
    pub client_slots: Arc<tokio::sync::Semaphore>,
    /// True while the accept loop runs (`GET /livez`).
    pub accepting: std::sync::atomic::AtomicBool,
    /// The address the admin endpoint listens on (bound once; SIGHUP does not move it).
    pub admin_bound: std::sync::OnceLock<String>,
    /// Keys the mock SCRAM verifiers of unknown users; new at every start.
    instance_secret: [u8; 32],
}

impl Proxy {
    /// Builds the proxy and brings its credential source to life: the static login, the
    /// watched file, or (managed) a freshly rotated login, with the schedule running.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Proxy>> {
        config.require_instance_id()?;
        if let Some(warning) = config.one_login_warning() {
            tracing::warn!("{warning}");
        }
        let mode = config.rotation.mode;
        let mut proxy = Proxy::new(config)?;
        let config = proxy.config();
        for slot in crate::credentials::login_slots(&config) {
            let store = proxy.credentials.get(slot.classes[0]).clone();
            match mode {
                RotationMode::Static => {}
                RotationMode::File => {
                    let path = match &config.backend.logins {
                        Some(logins) => logins.get(slot.classes[0]).file.clone(),
                        None => config.rotation.file.clone(),
                    };
                    if let Some(path) = path {
                        tokio::spawn(file::watch(
                            path,
                            config.rotation.poll_interval,
                            store,
                            proxy.backend.clone(),
                            slot.role.clone(),
                        ));
                    }
                }
                RotationMode::Managed => {
                    let rotator = Arc::new(Rotator::new(
                        config.clone(),
                        slot.label,
                        store,
                        proxy.backend.clone(),
                        proxy.metrics.clone(),
                    ));
                    rotator.start().await?;
                    tokio::spawn(rotator.clone().run_schedule());
                    proxy.rotators.push(rotator);
                }
            }
        }
        if proxy.config().pool.mode == crate::config::PoolMode::Transaction {
            tokio::spawn(proxy.pools.clone().maintain(0));
        }
        let proxy = Arc::new(proxy);
        tokio::spawn(crate::memory::trim_after_clients_leave(Arc::downgrade(
            &proxy,
        )));
        Ok(proxy)
    }

    fn new(config: Config) -> anyhow::Result<Proxy> {
        use anyhow::Context;
        let backend =
            BackendTarget::from_config(&config.backend).context("setting up backend TLS")?;
        if config.rotation.mode == RotationMode::File
            && !config.class_logins()
            && config.rotation.file.is_none()
        {
            anyhow::bail!("[rotation] mode = \"file\" needs file");
        }
        let mut slots = Vec::new();
        for slot in login_slots(&config) {
            let credential = initial_credential(&config, &slot)
                .with_context(|| format!("the {} login", slot.label))?;
            slots.push((slot, credential));
        }
        let backend = Arc::new(backend);
        let credentials = Arc::new(ClassCredentials::new(&slots));
        let metrics = Arc::new(Metrics::default());
        Ok(Proxy {
            pools: Arc::new(crate::pool::Pools::new(
                config.pool.clone(),
                config.pool_shards(),
                backend.clone(),
                metrics.clone(),
            )),
            client_slots: Arc::new(tokio::sync::Semaphore::new(
                config.limits.max_client_connections,
            )),
            backend,
            rotators: Vec::new(),
            credentials,
            cancel_keys: Arc::new(CancelKeys::default()),
            large_objects: std::sync::OnceLock::new(),
            metrics,
            open_connections: std::sync::atomic::AtomicUsize::new(0),
            shutdown: tokio::sync::watch::channel(false).0,
            accepting: std::sync::atomic::AtomicBool::new(false),
            admin_bound: std::sync::OnceLock::new(),
            instance_secret: rand::thread_rng().gen(),
            live: RwLock::new(Arc::new(Live::build(config)?)),
        })
    }

    fn live(&self) -> Arc<Live> {
        match self.live.read() {
            Ok(live) => live.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The config in force now.
    pub fn config(&self) -> Arc<Config> {
        self.live().config.clone()
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.live().policy.clone()
    }

    pub fn tls_acceptor(&self) -> Option<tls::Acceptor> {
        self.live().tls_acceptor.clone()
    }

    /// The token `POST /rotate` and `GET /status` need, if one is configured.
    pub fn admin_token(&self) -> Option<Arc<str>> {
        self.live().admin_token.clone()
    }

    /// SIGHUP: re-reads the config file. A config that does not load (or whose TLS
    /// certificate does not) is refused and the old one stays in force. Clients, TLS and
    /// the policy change for new sessions, managed-rotation settings (schedule, drain,
    /// names) from the next rotation; `[backend]`, `listen` and the rotation mode need a
    /// restart.
    pub fn reload(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let config = Config::load(path)?;
        config.require_instance_id()?;
        let current = self.config();
        if config.backend.database != current.backend.database
            || config.backend.host != current.backend.host
            || config.backend.port != current.backend.port
            || config.listen != current.listen
            || config.serve_threads() != current.serve_threads()
            || config.runtime != current.runtime
        {
            tracing::warn!(
                "[backend], listen, threads and runtime changes take effect only after a restart"
            );
        }
        // Which login each class uses and the role its sessions run in belong to the
        // credential stores, pools and rotators built at start: they change with a restart.
        let layout_changed = config.class_logins() != current.class_logins()
            || crate::config::CLASSES
                .iter()
                .any(|&class| config.class_role(class) != current.class_role(class));
        if layout_changed {
            anyhow::bail!(
                "[backend.logins] and the class roles (owner_role, app_role, readonly_role) \
                 change only with a restart"
            );
        }
        let live = Arc::new(Live::build(config)?);
        if let Some(bound) = self.admin_bound.get() {
            if !crate::config::is_loopback_listen(bound) && live.admin_token.is_none() {
                anyhow::bail!(
                    "the admin endpoint still listens on {bound} (admin_listen changes need a \
                     restart), so [admin] token_env or token_file must stay set"
                );
            }
        }
        for rotator in &self.rotators {
            rotator.update_config(live.config.clone());
        }
        match self.live.write() {
            Ok(mut slot) => *slot = live,
            Err(poisoned) => *poisoned.into_inner() = live,
        }
        Ok(())
    }

    pub fn instance_secret(&self) -> &[u8; 32] {
        &self.instance_secret
    }
}

/// The backend connection a cancel key stands for.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    /// Shared: a pooled client sets its target on every transaction.
    pub addr: Arc<str>,
    pub pid: i32,
    pub secret: i32,
}

/// Where a cancel key points now: with transaction pooling, at the backend session the
/// client uses at this moment (none between transactions).
#[derive(Default)]
pub struct CancelSlot {
    target: std::sync::Mutex<Option<CancelTarget>>,
    /// Cancel requests looked up while the target was set and not yet carried out.
    in_flight: std::sync::atomic::AtomicUsize,
    carried_out: tokio::sync::Notify,
}

impl CancelSlot {
    fn with_target(target: Option<CancelTarget>) -> CancelSlot {
        CancelSlot {
            target: std::sync::Mutex::new(target),
            ..CancelSlot::default()
        }
    }

    pub fn set(&self, target: Option<CancelTarget>) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// The target, counted as in flight until the returned guard is dropped.
    fn take_for_cancel(self: &Arc<Self>) -> Option<(CancelTarget, InFlightCancel)> {
        let target = self.target.lock().unwrap_or_else(|p| p.into_inner());
        let target = target.clone()?;
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Some((target, InFlightCancel(self.clone())))
    }

    /// Points the key at nothing. True when cancel requests were already on their way to
    /// the backend session: the caller must then wait for them ([`CancelSlot::carried_out`])
    /// before the session serves anyone else.
    pub fn clear(&self) -> bool {
        self.set(None);
        // (None can start now that the target is gone.)
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst) != 0
    }

    /// Waits until every cancel request that was already on its way to the backend
    /// session has been carried out (the server closed the cancel connection), so none
    /// can reach the session's next client. Bounded by how long a cancel request may take.
    pub async fn carried_out(&self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(6);
        loop {
            let carried_out = self.carried_out.notified();
            if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, carried_out)
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// A cancel request on its way; dropping it marks it carried out.
pub struct InFlightCancel(Arc<CancelSlot>);

impl Drop for InFlightCancel {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.carried_out.notify_waiters();
    }
}

/// rolegate's own BackendKeyData values, mapped to the backend's.
#[derive(Default)]
pub struct CancelKeys {
    keys: DashMap<(i32, i32), Arc<CancelSlot>>,
}

impl CancelKeys {
    /// Hands out a key for `target`: the backend's real process id, so that what a
    /// driver reports agrees with `pg_stat_activity`, `pg_terminate_backend` and the pids
    /// in notifications, and a secret of rolegate's own (the backend's never leaves
    /// rolegate). Dropping the guard forgets it.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> CancelKeyGuard {
        let pid = target.pid;
        self.register_slot(pid, Some(target))
    }

    /// A key for a client in transaction mode: no backend process stands for it, so
    /// the process id is rolegate's own too; the slot follows the client's leases.
    pub fn register_pooled(self: &Arc<Self>) -> CancelKeyGuard {
        // Above Linux's largest process id (2^22), so it never names a real backend
        // process a client could signal.
        let pid = rand::thread_rng().gen_range((1 << 22) + 1..i32::MAX);
        self.register_slot(pid, None)
    }

    fn register_slot(self: &Arc<Self>, pid: i32, target: Option<CancelTarget>) -> CancelKeyGuard {
        let mut rng = rand::thread_rng();
        let slot = Arc::new(CancelSlot::with_target(target));
        loop {
            let key = (pid, rng.gen::<i32>());
            if let dashmap::Entry::Vacant(entry) = self.keys.entry(key) {
                entry.insert(slot.clone());
                return CancelKeyGuard {
                    keys: self.clone(),
                    key,
                    slot,
                };
            }
        }
    }

    /// The backend session a cancel key points at now; the guard keeps it from being
    /// lent to anyone else until the cancel has been carried out (see `CancelSlot::clear`).
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<(CancelTarget, InFlightCancel)> {
        let slot = self.keys.get(&(pid, secret))?.clone();
        slot.take_for_cancel()
    }
}

pub struct CancelKeyGuard {
    keys: Arc<CancelKeys>,
    pub key: (i32, i32),
    pub slot: Arc<CancelSlot>,
}

impl Drop for CancelKeyGuard {
    fn drop(&mut self) {
        self.keys.keys.remove(&self.key);
    }
}
