//! Managed rotation: create a login role, prove it, swap it in, drain and drop the old one.
//!
//! Every step that can fail happens before the swap; a failure leaves the old credential
//! in use and removes the half-made role. Roles are named `<own prefix><UTC timestamp>`,
//! and only roles with this instance's own prefix are ever dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio_postgres::Client;

use super::{login_slots, CredentialStore, LoginCredential, LoginSlot};
use crate::backend::{self, BackendTarget};
use crate::config::{Config, DrainPolicy};
use crate::metrics::Metrics;
use crate::provision::random_password;
use crate::scram::make_verifier;
use crate::sql::{quote_ident, quote_literal};

/// Counters for the admin endpoint.
#[derive(Debug, Default)]
pub struct RotationStats {
    pub rotations: AtomicU64,
    pub failures: AtomicU64,
}

/// What one rotation did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RotationOutcome {
    /// The login slot: `app`, `readonly`, `migrator`, or `all` in the one-login layout.
    pub class: &'static str,
    pub old_login: Option<String>,
    pub new_login: String,
    pub duration_ms: u64,
}

pub struct Rotator {
    /// Replaced on SIGHUP: schedule, drain and names take effect from the next rotation.
    config: std::sync::RwLock<Arc<Config>>,
    /// Which login slot this rotator keeps (see `login_slots`).
    label: &'static str,
    store: Arc<CredentialStore>,
    target: Arc<BackendTarget>,
    metrics: Arc<Metrics>,
    pub stats: Arc<RotationStats>,
    /// One rotation at a time.
    lock: tokio::sync::Mutex<()>,
}

impl Rotator {
    pub fn new(
        config: Arc<Config>,
        label: &'static str,
        store: Arc<CredentialStore>,
        target: Arc<BackendTarget>,
        metrics: Arc<Metrics>,
    ) -> Rotator {
        Rotator {
            config: std::sync::RwLock::new(config),
            label,
            store,
            target,
            metrics,
            stats: Arc::new(RotationStats::default()),
            lock: tokio::sync::Mutex::new(()),
        }
    }

    fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// SIGHUP: the rotation settings of a reloaded config.
    pub fn update_config(&self, config: Arc<Config>) {
        match self.config.write() {
            Ok(mut slot) => *slot = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }

    fn rotator_url(&self) -> anyhow::Result<String> {
        let config = self.config();
        let rotation = &config.rotation;
        if let Some(path) = &rotation.rotator_url_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the rotator URL from {}", path.display()))?;
            return Ok(text.trim().to_owned());
        }
        std::env::var(&rotation.rotator_url_env).with_context(|| {
            format!(
                "the rotator's connection URL: set {} (or [rotation] rotator_url_file)",
                rotation.rotator_url_env
            )
        })
    }

    async fn connect_rotator(&self) -> anyhow::Result<Client> {
        connect_rotator_at(&self.rotator_url()?).await
    }

    /// The slot this rotator keeps, as the config in force describes it.
    fn slot(&self) -> anyhow::Result<LoginSlot> {
        login_slots(&self.config())
            .into_iter()
            .find(|slot| slot.label == self.label)
            .with_context(|| format!("the config has no {} login any more", self.label))
    }

    /// A new login name: the own prefix and the UTC time to the millisecond.
    fn new_login_name(slot: &LoginSlot) -> String {
        let stamp: String = humantime::format_rfc3339_millis(SystemTime::now())
            .to_string()
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        format!("{}{stamp}", slot.own_prefix)
    }

    pub fn label(&self) -> &'static str {
        self.label
    }

    /// Rotates once. `first` is the start-up rotation, which also sweeps stale roles.
    pub async fn rotate(&self) -> anyhow::Result<RotationOutcome> {
        let _one_at_a_time = self.lock.lock().await;
        let started = Instant::now();
        let result = self.rotate_locked().await;
        match &result {
            Ok(outcome) => {
                self.stats.rotations.fetch_add(1, Ordering::Relaxed);
                self.metrics.rotations.inc();
                tracing::info!(
                    class = self.label,
                    old = outcome.old_login.as_deref().unwrap_or("-"),
                    new = outcome.new_login.as_str(),
                    duration_ms = started.elapsed().as_millis() as u64,
                    "login rotated"
                );
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                self.metrics.rotation_failures.inc();
                tracing::error!(
                    class = self.label,
                    error = format!("{e:#}"),
                    "login rotation failed; the old login stays in use"
                );
            }
        }
        result
    }

    async fn rotate_locked(&self) -> anyhow::Result<RotationOutcome> {
        let started = Instant::now();
        let rotator = self.connect_rotator().await?;
        let config = self.config();
        let slot = self.slot()?;
        let name = Self::new_login_name(&slot);
        let password = random_password();
        let valid_for = config.rotation.every.unwrap_or(Duration::from_secs(86_400)) * 2;
        let valid_until = humantime::format_rfc3339_seconds(SystemTime::now() + valid_for);
        // A class login holds nothing itself (NOINHERIT): a session whose role is reset
        // by SQL rolegate never sees has no privilege at all.
        let create = format!(
            "CREATE ROLE {role} LOGIN{noinherit} PASSWORD {verifier} VALID UNTIL {until} IN ROLE {roles}",
            role = quote_ident(&name),
            noinherit = if slot.class_login { " NOINHERIT" } else { "" },
            verifier = quote_literal(&make_verifier(&password)),
            until = quote_literal(&valid_until.to_string()),
            roles = slot
                .member_of
                .iter()
                .map(|r| quote_ident(r))
                .collect::<Vec<_>>()
                .join(", "),
        );
        rotator
            .batch_execute(&create)
            .await
            .with_context(|| format!("creating login role {name}"))?;
        let new = LoginCredential {
            user: name.clone(),
            password,
        };
        // From here on a failure must remove the role again.
        if let Err(e) = self.prepare_and_prove(&rotator, &new, &slot).await {
            if slot.class_login {
                let _ = revoke_connect(&rotator, &config, &name).await;
            }
            let _ = rotator
                .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(&name)))
                .await;
            return Err(e);
        }
        let old = self.store.swap(new);
        // (At start-up in managed mode the store holds an empty placeholder.)
        let old_login = (!old.user.is_empty() && old.user != name).then(|| old.user.clone());
        if let Some(old_user) = &old_login {
            // No new sessions for the old login; its open sessions go on until drained.
            if let Err(e) = rotator
                .batch_execute(&format!("ALTER ROLE {} NOLOGIN", quote_ident(old_user)))
                .await
            {
                tracing::warn!(login = old_user.as_str(), error = %e, "could not disable the old login");
            }
            self.spawn_drain(old_user.clone(), slot.class_login);
        }
        Ok(RotationOutcome {
            class: self.label,
            old_login,
            new_login: name,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    async fn prepare_and_prove(
        &self,
        rotator: &Client,
        new: &LoginCredential,
        slot: &LoginSlot,
    ) -> anyhow::Result<()> {
        let config = self.config();
        rotator
            .batch_execute(&format!(
                "ALTER ROLE {} SET role = {}",
                quote_ident(&new.user),
                quote_literal(&slot.role)
            ))
            .await
            .context("setting the new login's default role")?;
        if slot.class_login {
            // A NOINHERIT login does not get CONNECT from its class role: it needs its own,
            // granted through the grantor role setup made (the rotator itself may not
            // connect to the database).
            let grant = format!(
                "GRANT CONNECT ON DATABASE {} TO {}",
                quote_ident(&config.backend.database),
                quote_ident(&new.user)
            );
            change_database_acl(rotator, &config, &grant)
                .await
                .context("granting the new login CONNECT on the database")?;
        }
        backend::prove_login(&self.target, new, &slot.role)
            .await
            .context("the new login could not open a session")?;
        Ok(())
    }

    /// Waits for the old login's sessions to end (or ends them at the deadline, by
    /// policy), then drops the role.
    fn spawn_drain(&self, old_user: String, class_login: bool) {
        let config = self.config();
        let grant = class_login.then(|| config.clone());
        let rotation = config.rotation.clone();
        let owner = config.backend.owner_role.clone();
        let rotator_url = self.rotator_url();
        tokio::spawn(async move {
            let result = async {
                let client = connect_rotator_at(&rotator_url?).await?;
                drain_and_drop(
                    &client,
                    &old_user,
                    &owner,
                    rotation.drain,
                    rotation.on_drain_timeout,
                    grant.as_deref(),
                )
                .await
            }
            .await;
            match result {
                Ok(drained) => tracing::info!(
                    login = old_user.as_str(),
                    terminated = drained,
                    "old login dropped"
                ),
                Err(e) => tracing::warn!(
                    login = old_user.as_str(),
                    error = format!("{e:#}"),
                    "could not drop the old login"
                ),
            }
        });
    }

    /// Start-up in managed mode: a fresh login, and stale roles of this instance's prefix
    /// that have no sessions dropped.
    pub async fn start(&self) -> anyhow::Result<RotationOutcome> {
        let outcome = self.rotate().await?;
        let rotator = self.connect_rotator().await?;
        let config = self.config();
        let slot = self.slot()?;
        let prefix = slot.own_prefix.clone();
        let stale = rotator
            .query(
                "SELECT rolname::text FROM pg_roles r
                 WHERE starts_with(r.rolname, $1) AND r.rolname <> $2
                   AND NOT EXISTS (SELECT FROM pg_stat_activity a WHERE a.usename = r.rolname)",
                &[&prefix, &outcome.new_login],
            )
            .await?;
        for row in stale {
            let role: String = row.get(0);
            // Only names this instance made: the prefix followed by a timestamp.
            if !role[prefix.len()..].chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            let owner = &config.backend.owner_role;
            match drain_and_drop(
                &rotator,
                &role,
                owner,
                Duration::ZERO,
                DrainPolicy::Terminate,
                slot.class_login.then_some(&*config),
            )
            .await
            {
                Ok(_) => tracing::info!(login = role.as_str(), "stale login dropped"),
                Err(e) => tracing::warn!(
                    login = role.as_str(),
                    error = format!("{e:#}"),
                    "could not drop a stale login"
                ),
            }
        }
        Ok(outcome)
    }

    /// Rotates on the schedule, retrying a failed rotation with backoff. The schedule is
    /// read again after every wait, so a SIGHUP that sets or changes `every` takes effect.
    pub async fn run_schedule(self: Arc<Self>) {
        loop {
            let Some(every) = self.config().rotation.every else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            tokio::time::sleep(every).await;
            if self.config().rotation.every.is_none() {
                continue;
            }
            let mut backoff = Duration::from_secs(5);
            while self.rotate().await.is_err() {
                tokio::time::sleep(backoff.min(every)).await;
                backoff = (backoff * 2).min(Duration::from_secs(600));
            }
        }
    }
}

/// A connection as the rotator role, from its connection URL.
async fn connect_rotator_at(url: &str) -> anyhow::Result<Client> {
    let config = url
        .parse()
        .context("parsing the rotator's connection URL")?;
    crate::provision::connect(&config)
        .await
        .context("connecting as the rotator")
}

/// Drops a login role once its sessions are gone. Returns how many sessions had to be
/// terminated.
async fn drain_and_drop(
    client: &Client,
    role: &str,
    owner: &str,
    drain: Duration,
    policy: DrainPolicy,
    class_login_of: Option<&Config>,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + drain;
    let sessions = || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                &[&role],
            )
            .await
            .map(|row| row.get::<_, i64>(0))
    };
    let mut terminated = 0;
    loop {
        if sessions().await? == 0 {
            break;
        }
        if Instant::now() >= deadline && policy == DrainPolicy::Terminate {
            const TERMINATE: &str = "SELECT count(*) FROM (SELECT pg_terminate_backend(pid)
                 FROM pg_stat_activity WHERE usename = $1) t";
            let row = match client.query_one(TERMINATE, &[&role]).await {
                Ok(row) => row,
                // The rotator holds pg_signal_backend without inheriting it (NOINHERIT):
                // it has to take the role for the call.
                Err(_) => {
                    client.batch_execute("SET ROLE pg_signal_backend").await?;
                    let row = client.query_one(TERMINATE, &[&role]).await;
                    client.batch_execute("RESET ROLE").await?;
                    row?
                }
            };
            terminated += row.get::<_, i64>(0) as u64;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A safety net: every session ran as the owner, so nothing should be owned by the
    // login, but a stray object must not block the drop.
    if let Some(config) = class_login_of {
        // Its CONNECT grant would keep the role from being dropped.
        if let Err(e) = revoke_connect(client, config, role).await {
            tracing::debug!(login = role, error = %e, "could not revoke CONNECT");
        }
    }
    let quoted = quote_ident(role);
    if let Err(e) = client
        .batch_execute(&format!(
            "REASSIGN OWNED BY {quoted} TO {}; DROP OWNED BY {quoted}",
            quote_ident(owner)
        ))
        .await
    {
        tracing::debug!(login = role, error = %e, "REASSIGN/DROP OWNED not possible for the rotator");
    }
    client
        .batch_execute(&format!("DROP ROLE IF EXISTS {quoted}"))
        .await
        .with_context(|| format!("dropping {role}"))?;
    Ok(terminated)
}

/// The NOLOGIN role that holds CONNECT on the database WITH GRANT OPTION, so that the
/// rotator can give each new class login its CONNECT without being able to connect itself.
pub fn connect_grantor(config: &Config) -> String {
    let rotator = config
        .backend
        .rotator_role
        .clone()
        .unwrap_or_else(|| format!("{}_rotator", config.backend.database));
    format!("{rotator}_connect")
}

async fn revoke_connect(client: &Client, config: &Config, login: &str) -> anyhow::Result<()> {
    let revoke = format!(
        "REVOKE CONNECT ON DATABASE {} FROM {}",
        quote_ident(&config.backend.database),
        quote_ident(login)
    );
    change_database_acl(client, config, &revoke).await
}

/// Runs a GRANT or REVOKE on the database as the grantor role. Every such statement
/// rewrites the database's one catalog row, so two at once (a new login's grant while an
/// old one's drain revokes, or another instance rotating) fail with "tuple concurrently
/// updated": this process runs one at a time and retries what another process raced.
async fn change_database_acl(client: &Client, config: &Config, sql: &str) -> anyhow::Result<()> {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    let grantor = quote_ident(&connect_grantor(config));
    let mut attempt = 0;
    loop {
        let result = client
            .batch_execute(&format!("SET ROLE {grantor}; {sql}"))
            .await;
        client.batch_execute("RESET ROLE").await?;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 5 && e.to_string().contains("tuple concurrently updated") => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
