//! The TOML config file, read into typed and validated structs.
//!
//! Every field a user may omit has a default here, so `Config` is always complete once
//! `Config::load` returned it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::scram::ScramVerifier;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Threads that serve clients: 1 runs every connection on one thread, as PgBouncer
    /// does; N > 1 spreads them over N threads, 0 over one per core. Unset: see
    /// [`Config::serve_threads`]. Read at start only.
    #[serde(default)]
    pub threads: Option<usize>,
    /// How the `threads` share their work: see [`Runtime`]. Read at start only.
    #[serde(default)]
    pub runtime: Runtime,
    /// HTTP admin endpoint (metrics, probes, status, rotation).
    #[serde(default)]
    pub admin_listen: Option<String>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub tls: ClientTlsConfig,
    pub backend: BackendConfig,
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub rotation: RotationConfig,
    #[serde(default)]
    pub pool: PoolConfig,
}

/// Who may use the admin endpoint's actions (`POST /rotate`, `GET /status`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Environment variable holding the bearer token.
    pub token_env: Option<String>,
    /// Or a file holding it (first line).
    pub token_file: Option<PathBuf>,
}

impl AdminConfig {
    /// The bearer token the actions need, if one is configured.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        let token = if let Some(var) = &self.token_env {
            std::env::var(var).map_err(|_| {
                ConfigError::Invalid(format!("[admin] token_env names {var}, which is not set"))
            })?
        } else if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            text.lines().next().unwrap_or_default().to_owned()
        } else {
            return Ok(None);
        };
        let token = token.trim().to_owned();
        if token.is_empty() {
            return Err(ConfigError::Invalid(
                "[admin] the admin token is empty".into(),
            ));
        }
        Ok(Some(token))
    }

    fn configured(&self) -> bool {
        self.token_env.is_some() || self.token_file.is_some()
    }
}

/// Whether `listen` (`host:port`) only accepts connections from this machine.
pub fn is_loopback_listen(listen: &str) -> bool {
    if let Ok(addr) = listen.parse::<std::net::SocketAddr>() {
        return addr.ip().is_loopback();
    }
    listen
        .rsplit_once(':')
        .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RotationMode {
    /// `[backend] login_user` with its password from the environment or a file.
    #[default]
    Static,
    /// rolegate creates, swaps and drops login roles itself, with the rotator role.
    Managed,
    /// The credential comes from a JSON file an external system rewrites.
    File,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainPolicy {
    /// At the drain deadline, end the old login's remaining sessions.
    #[default]
    Terminate,
    /// Keep waiting for them to end on their own.
    Wait,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    #[serde(default)]
    pub mode: RotationMode,
    /// Rotate on this schedule (managed mode); without it only on demand.
    #[serde(default, with = "humantime_serde::option")]
    pub every: Option<Duration>,
    /// How long sessions of an old login may go on after a rotation.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain: Duration,
    #[serde(default)]
    pub on_drain_timeout: DrainPolicy,
    /// Login role names start with this (default `<database>_login_`).
    pub login_prefix: Option<String>,
    /// Set a distinct one per instance when several rolegates share a database.
    pub instance_id: Option<String>,
    /// Or the environment variable that holds it (a pod's name, say).
    pub instance_id_env: Option<String>,
    /// Environment variable with the rotator's connection URL.
    #[serde(default = "default_rotator_url_env")]
    pub rotator_url_env: String,
    /// Or a file holding that URL.
    pub rotator_url_file: Option<PathBuf>,
    /// File mode: the JSON file `{"username": …, "password": …}` to watch.
    pub file: Option<PathBuf>,
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
}

fn default_drain() -> Duration {
    Duration::from_secs(300)
}
fn default_rotator_url_env() -> String {
    "ROLEGATE_ROTATOR_URL".to_owned()
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            mode: RotationMode::default(),
            every: None,
            drain: default_drain(),
            on_drain_timeout: DrainPolicy::default(),
            login_prefix: None,
            instance_id: None,
            instance_id_env: None,
            rotator_url_env: default_rotator_url_env(),
            rotator_url_file: None,
            file: None,
            poll_interval: default_poll_interval(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:6432".to_owned()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// Answer `N` to SSLRequest: plaintext only.
    Disable,
    /// Offer TLS, accept plaintext too.
    #[default]
    Prefer,
    /// Refuse a client that did not negotiate TLS.
    Require,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    #[serde(default)]
    pub mode: ClientTlsMode,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTlsMode {
    #[default]
    Disable,
    /// Encrypt, but do not verify the server certificate (libpq's `sslmode=require`).
    Require,
    /// Encrypt and verify the certificate chain against `ca_file` and the host name.
    VerifyFull,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    #[serde(default = "default_backend_host")]
    pub host: String,
    #[serde(default = "default_backend_port")]
    pub port: u16,
    /// The database clients ask for, and the one rolegate connects to.
    pub database: String,
    /// The NOLOGIN role that owns every object; every session runs `SET ROLE` to it.
    pub owner_role: String,
    #[serde(default)]
    pub tls: BackendTlsMode,
    /// CA certificates (PEM) for `tls = "verify-full"`.
    pub ca_file: Option<PathBuf>,
    /// The static login role (until rotation is configured).
    pub login_user: Option<String>,
    /// Name of the environment variable that holds the login password.
    pub login_password_env: Option<String>,
    /// A file that holds the login password (first line), e.g. written by `rolegate setup`.
    pub login_password_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The role `rolegate setup` makes for rotation (default `<database>_rotator`).
    pub rotator_role: Option<String>,
    /// The app class role (NOLOGIN; SELECT, INSERT, UPDATE, DELETE): app clients' sessions
    /// run in it. Default `<database>_app` with `[backend.logins]`; in the one-login layout
    /// optional (without it app clients run as the owner, as before).
    pub app_role: Option<String>,
    /// The readonly class role (NOLOGIN; SELECT only), default `<database>_readonly`;
    /// used with `[backend.logins]`.
    pub readonly_role: Option<String>,
    /// One login role per class (`[backend.logins.app]`, `.readonly`, `.migrator`): the
    /// layout in which PostgreSQL enforces every class. Without it, the one-login layout
    /// (`login_user` for every class).
    pub logins: Option<ClassLogins>,
}

/// `[backend.logins]`: the login role of each class.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassLogins {
    #[serde(default)]
    pub app: ClassLogin,
    #[serde(default)]
    pub readonly: ClassLogin,
    #[serde(default)]
    pub migrator: ClassLogin,
}

impl ClassLogins {
    pub fn get(&self, class: ClientClass) -> &ClassLogin {
        match class {
            ClientClass::App => &self.app,
            ClientClass::Readonly => &self.readonly,
            ClientClass::Migrator => &self.migrator,
        }
    }
}

/// One class's login: what each rotation mode needs of it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassLogin {
    /// Static mode: the login role.
    pub user: Option<String>,
    /// Static mode: the environment variable that holds its password…
    pub password_env: Option<String>,
    /// …or a file holding it (first line; `rolegate setup` writes it, mode 0600).
    pub password_file: Option<PathBuf>,
    /// Managed mode: login role names start with this (default `<database>_<class>_login_`).
    pub prefix: Option<String>,
    /// File mode: the JSON file `{"username": …, "password": …}` to watch.
    pub file: Option<PathBuf>,
}

/// The classes, in the order logins are listed and made.
pub const CLASSES: [ClientClass; 3] = [
    ClientClass::App,
    ClientClass::Readonly,
    ClientClass::Migrator,
];

fn default_backend_host() -> String {
    "127.0.0.1".to_owned()
}
fn default_backend_port() -> u16 {
    5432
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

/// What a client identity may do; see `policy::rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientClass {
    /// Data work only: no schema changes.
    App,
    /// Reads only, in read-only transactions.
    Readonly,
    /// Schema changes allowed (migrations).
    Migrator,
}

impl ClientClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientClass::App => "app",
            ClientClass::Readonly => "readonly",
            ClientClass::Migrator => "migrator",
        }
    }
}

impl std::fmt::Display for ClientClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Extra allowances a client may be given beyond its class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Allowance {
    /// CREATE TEMPORARY TABLE (and SELECT INTO / CREATE TABLE AS of a temporary table).
    TempTables,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub user: String,
    /// A SCRAM-SHA-256 verifier (`rolegate hash-password`), never a plaintext password.
    pub password: String,
    pub class: ClientClass,
    #[serde(default)]
    pub allow: Vec<Allowance>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// Refuse what the class may not run.
    #[default]
    Enforce,
    /// Log what would be refused and let it through (for rolling out).
    Report,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default)]
    pub mode: PolicyMode,
    /// Longer statements are refused unjudged (fail closed).
    #[serde(default = "default_max_statement_bytes")]
    pub max_statement_bytes: usize,
    /// How many distinct statement texts keep their verdict cached.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// Functions of installed extensions that run SQL text they are given (dblink's):
    /// `"name"` (every argument may be SQL) or `"name:N"` (the N-th argument).
    #[serde(default)]
    pub sql_text_functions: Vec<crate::policy::SqlTextFunction>,
}

fn default_max_statement_bytes() -> usize {
    1 << 20
}
fn default_cache_entries() -> usize {
    10_000
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            mode: PolicyMode::default(),
            max_statement_bytes: default_max_statement_bytes(),
            cache_entries: default_cache_entries(),
            sql_text_functions: Vec::new(),
        }
    }
}

/// How `serve`'s threads share the clients (top-level `runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// One tokio runtime over every thread: any thread may serve any client, and a
    /// transaction-mode client borrows from pools all threads share.
    #[default]
    Shared,
    /// A current-thread runtime per thread, each with a listener of its own on the same
    /// address (`SO_REUSEPORT`: the kernel spreads new connections over them) and pools of
    /// its own (`[pool] size` and `min_idle` split between the threads): a client and the
    /// backend connections it borrows always meet on one thread.
    PerThread,
}

/// How client sessions share backend connections (`[pool]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Each client has a backend connection of its own for its whole session.
    #[default]
    Session,
    /// `app` and `readonly` clients borrow a backend connection per transaction.
    Transaction,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default)]
    pub mode: PoolMode,
    /// Backend connections per pool (one pool per role and read-only default).
    #[serde(default = "default_pool_size")]
    pub size: usize,
    /// Idle backend connections kept open per pool, even without clients.
    #[serde(default)]
    pub min_idle: usize,
    /// A client waits at most this long for a backend connection, then gets an error.
    #[serde(default = "default_checkout_timeout", with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// Close a pooled backend connection idle this long (above `min_idle`).
    #[serde(default = "default_server_idle_timeout", with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// Close a pooled backend connection this old when it is next given back.
    #[serde(default = "default_server_lifetime", with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// Prepared statements kept per backend connection; the least recently used is
    /// closed on the server when one more is needed.
    #[serde(default = "default_max_prepared_statements")]
    pub max_prepared_statements: usize,
    /// Named prepared statements one client may hold (rolegate keeps their text); one
    /// more is refused with 54000, as PostgreSQL refuses what exceeds its limits.
    #[serde(default = "default_max_client_prepared_statements")]
    pub max_client_prepared_statements: usize,
    /// Bytes of statement text one client's prepared statements may hold.
    #[serde(default = "default_max_client_prepared_bytes")]
    pub max_client_prepared_bytes: usize,
}

fn default_pool_size() -> usize {
    20
}
fn default_checkout_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_server_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_server_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_prepared_statements() -> usize {
    200
}
fn default_max_client_prepared_statements() -> usize {
    1000
}
fn default_max_client_prepared_bytes() -> usize {
    4 << 20
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::default(),
            size: default_pool_size(),
            min_idle: 0,
            checkout_timeout: default_checkout_timeout(),
            server_idle_timeout: default_server_idle_timeout(),
            server_lifetime: default_server_lifetime(),
            max_prepared_statements: default_max_prepared_statements(),
            max_client_prepared_statements: default_max_client_prepared_statements(),
            max_client_prepared_bytes: default_max_client_prepared_bytes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_clients")]
    pub max_client_connections: usize,
    /// A client must finish startup and authentication within this time.
    #[serde(default = "default_login_timeout", with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// Largest protocol message accepted from a client (PostgreSQL's own limit is 1 GB).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Close a client that sat idle (outside a transaction) this long; off when unset.
    #[serde(default, with = "humantime_serde::option")]
    pub idle_client_timeout: Option<Duration>,
    /// On SIGTERM/SIGINT, how long sessions get to finish their transactions.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_clients() -> usize {
    1000
}
fn default_login_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_max_message_bytes() -> usize {
    (1 << 30) - 1
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_client_connections: default_max_clients(),
            client_login_timeout: default_login_timeout(),
            max_message_bytes: default_max_message_bytes(),
            idle_client_timeout: None,
            shutdown_timeout: default_shutdown_timeout(),
        }
    }
}

impl Config {
    /// The threads `serve` runs on (0 = one per core). Unset, the pool mode decides, as
    /// measured in benches/pgbench.sh (2026-12-02, 2 cores shared with PostgreSQL and
    /// pgbench): in transaction mode one thread cost 2–23 % less CPU per transaction than
    /// one per core at about the same TPS (clients and the backend connections they
    /// borrow meet on one thread, with no wake-ups across threads); in session mode, where
    /// each client has a backend connection of its own, one per core mostly served more
    /// (TPS 0.93–1.36 × one thread's over two runs) and does not cap a bigger machine at
    /// one core.
    pub fn serve_threads(&self) -> usize {
        self.threads.unwrap_or(match self.pool.mode {
            PoolMode::Transaction => 1,
            PoolMode::Session => 0,
        })
    }

    /// The threads `serve` really starts: [`Config::serve_threads`] with 0 resolved to the
    /// cores this process may use; with a runtime per thread in transaction mode, no more
    /// than `[pool] size` (each thread needs a backend connection of its own).
    pub fn thread_count(&self) -> usize {
        let threads = match self.serve_threads() {
            0 => {
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                match (self.runtime, self.pool.mode) {
                    (Runtime::PerThread, PoolMode::Transaction) => cores.min(self.pool.size),
                    _ => cores,
                }
            }
            n => n,
        };
        threads.max(1)
    }

    /// The pools each [`Pool`](crate::pool::Pool) key has: one per thread with
    /// `runtime = "per_thread"`, else one. Read once, by [`Pools`](crate::pool::Pools),
    /// which the threads started then follow.
    pub fn pool_shards(&self) -> usize {
        match self.runtime {
            Runtime::Shared => 1,
            Runtime::PerThread => self.thread_count(),
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        // Relative paths in the file are relative to the file, as users expect.
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut Option<PathBuf>| {
            if let Some(p) = p {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        };
        rebase(&mut config.tls.cert);
        rebase(&mut config.tls.key);
        rebase(&mut config.backend.ca_file);
        rebase(&mut config.backend.login_password_file);
        if let Some(logins) = &mut config.backend.logins {
            for login in [&mut logins.app, &mut logins.readonly, &mut logins.migrator] {
                rebase(&mut login.password_file);
                rebase(&mut login.file);
            }
        }
        rebase(&mut config.rotation.rotator_url_file);
        rebase(&mut config.rotation.file);
        rebase(&mut config.admin.token_file);
        // Only `serve` needs the instance id (see `require_instance_id`): setup, check and
        // rotate also run where the variable is not set, such as an operator's shell.
        if let Some(id) = config
            .rotation
            .instance_id_env
            .as_ref()
            .and_then(|var| std::env::var(var).ok())
        {
            config.rotation.instance_id = Some(id);
            config.check_login_name_length()?;
        }
        Ok(config)
    }

    /// `serve` with `instance_id_env`: the variable must be set, or this instance would
    /// sweep the login roles of every other one.
    pub fn require_instance_id(&self) -> Result<(), ConfigError> {
        match (&self.rotation.instance_id_env, &self.rotation.instance_id) {
            (Some(var), None) => Err(ConfigError::Invalid(format!(
                "[rotation] instance_id_env names {var}, which is not set"
            ))),
            _ => Ok(()),
        }
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.tls.mode != ClientTlsMode::Disable
            && (self.tls.cert.is_none() || self.tls.key.is_none())
        {
            return invalid(format!(
                "[tls] mode = \"{}\" needs cert and key (or set mode = \"disable\")",
                match self.tls.mode {
                    ClientTlsMode::Prefer => "prefer",
                    _ => "require",
                }
            ));
        }
        if self.pool.mode == PoolMode::Transaction
            && self.runtime == Runtime::PerThread
            && self.pool.size < self.serve_threads()
        {
            return invalid(format!(
                "runtime = \"per_thread\" gives each of the {} threads a pool of its own: [pool] size ({}) must be at least that",
                self.serve_threads(),
                self.pool.size
            ));
        }
        if self.backend.tls == BackendTlsMode::VerifyFull && self.backend.ca_file.is_none() {
            return invalid("[backend] tls = \"verify-full\" needs ca_file".into());
        }
        let password_sources = usize::from(self.backend.login_password_env.is_some())
            + usize::from(self.backend.login_password_file.is_some());
        if let Some(logins) = &self.backend.logins {
            self.validate_class_logins(logins, password_sources)?;
        }
        // Managed rotation makes its own logins and file rotation reads the login from its
        // file: only a static login must be named here.
        if self.backend.logins.is_some() {
            // Checked above, per class.
        } else if self.rotation.mode == RotationMode::Static {
            if self.backend.login_user.is_none() {
                return invalid(
                    "[backend] login_user is required (or let rolegate make its logins: \
                     [rotation] mode = \"managed\")"
                        .into(),
                );
            }
            if password_sources != 1 {
                return invalid(
                    "[backend] needs exactly one of login_password_env and login_password_file"
                        .into(),
                );
            }
        } else if password_sources > 1 {
            return invalid(
                "[backend] needs at most one of login_password_env and login_password_file".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for client in &self.clients {
            if !seen.insert(client.user.as_str()) {
                return invalid(format!("client \"{}\" is listed twice", client.user));
            }
            if let Err(e) = ScramVerifier::parse(&client.password) {
                return invalid(format!(
                    "client \"{}\": password must be a SCRAM-SHA-256 verifier from `rolegate hash-password` ({e})",
                    client.user
                ));
            }
        }
        if self.admin.token_env.is_some() && self.admin.token_file.is_some() {
            return invalid("[admin] needs at most one of token_env and token_file".into());
        }
        if let Some(listen) = &self.admin_listen {
            if !is_loopback_listen(listen) && !self.admin.configured() {
                return invalid(format!(
                    "admin_listen = {listen:?} is reachable from other machines, so POST /rotate \
                     and GET /status need a token: set [admin] token_env or token_file \
                     (or listen on 127.0.0.1)"
                ));
            }
        }
        if self.rotation.instance_id.is_some() && self.rotation.instance_id_env.is_some() {
            return invalid(
                "[rotation] needs at most one of instance_id and instance_id_env".into(),
            );
        }
        self.check_login_name_length()?;
        if self.pool.size == 0 || self.pool.min_idle > self.pool.size {
            return invalid("[pool] size must be positive and min_idle at most size".into());
        }
        if self.pool.max_prepared_statements == 0 {
            return invalid("[pool] max_prepared_statements must be positive".into());
        }
        if self.policy.max_statement_bytes == 0 {
            return invalid("[policy] max_statement_bytes must be positive".into());
        }
        Ok(())
    }

    /// `[backend.logins]`: each class names what its rotation mode needs, nothing of the
    /// one-login layout is left beside it.
    fn validate_class_logins(
        &self,
        logins: &ClassLogins,
        legacy_password_sources: usize,
    ) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.backend.login_user.is_some() || legacy_password_sources > 0 {
            return invalid(
                "[backend] login_user and login_password_* are the one-login layout: with \
                 [backend.logins] each class names its own login"
                    .into(),
            );
        }
        if self.rotation.mode == RotationMode::File && self.rotation.file.is_some() {
            return invalid(
                "[rotation] file is the one-login layout: with [backend.logins] set file per class"
                    .into(),
            );
        }
        for class in CLASSES {
            let login = logins.get(class);
            let sources = usize::from(login.password_env.is_some())
                + usize::from(login.password_file.is_some());
            let static_fields = login.user.is_some() || sources > 0;
            match self.rotation.mode {
                RotationMode::Static if login.user.is_none() || sources != 1 => {
                    return invalid(format!(
                        "[backend.logins.{class}] needs user and exactly one of password_env \
                         and password_file (static rotation)"
                    ));
                }
                RotationMode::Managed if static_fields || login.file.is_some() => {
                    return invalid(format!(
                        "[backend.logins.{class}]: managed rotation makes its own logins (only \
                         prefix may be set)"
                    ));
                }
                RotationMode::File if login.file.is_none() => {
                    return invalid(format!(
                        "[backend.logins.{class}] needs file (file rotation)"
                    ));
                }
                RotationMode::File if static_fields => {
                    return invalid(format!(
                        "[backend.logins.{class}]: file rotation reads the login from file"
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Rotated login names are the own prefix and a 17-digit UTC timestamp; PostgreSQL
    /// would silently cut a name longer than 63 bytes, and with it the timestamp.
    fn check_login_name_length(&self) -> Result<(), ConfigError> {
        let mut prefixes = vec![self.own_login_prefix()];
        if self.class_logins() {
            prefixes = CLASSES
                .iter()
                .map(|c| self.own_class_login_prefix(*c))
                .collect();
        }
        for prefix in prefixes {
            if prefix.len() + 17 > 63 {
                return Err(ConfigError::Invalid(format!(
                    "login role names would start with {prefix:?} and be longer than \
                     PostgreSQL's 63 bytes: shorten the login prefix or instance_id"
                )));
            }
        }
        Ok(())
    }

    /// Whether each class has a login role of its own (`[backend.logins]`).
    pub fn class_logins(&self) -> bool {
        self.backend.logins.is_some()
    }

    /// The role sessions of `class` are kept in. With `[backend.logins]`: the app and
    /// readonly class roles (default `<database>_app`, `<database>_readonly`) and the owner
    /// for migrators; in the one-login layout the owner, or `app_role` for app clients.
    pub fn class_role(&self, class: ClientClass) -> String {
        let backend = &self.backend;
        let default = |suffix: &str| format!("{}_{suffix}", backend.database);
        match (class, self.class_logins()) {
            (ClientClass::Migrator, _) => backend.owner_role.clone(),
            (ClientClass::App, true) => backend.app_role.clone().unwrap_or_else(|| default("app")),
            (ClientClass::Readonly, true) => backend
                .readonly_role
                .clone()
                .unwrap_or_else(|| default("readonly")),
            (ClientClass::App, false) => backend
                .app_role
                .clone()
                .unwrap_or_else(|| backend.owner_role.clone()),
            (ClientClass::Readonly, false) => backend.owner_role.clone(),
        }
    }

    /// The managed-rotation prefix of `class`'s logins, shared by every instance
    /// (default `<database>_<class>_login_`).
    pub fn class_login_prefix(&self, class: ClientClass) -> String {
        self.backend
            .logins
            .as_ref()
            .and_then(|l| l.get(class).prefix.clone())
            .unwrap_or_else(|| format!("{}_{class}_login_", self.backend.database))
    }

    /// The prefix of `class`'s login roles this instance creates and may drop.
    pub fn own_class_login_prefix(&self, class: ClientClass) -> String {
        let prefix = self.class_login_prefix(class);
        match &self.rotation.instance_id {
            Some(id) => format!("{prefix}{id}_"),
            None => prefix,
        }
    }

    /// What the one-login layout lacks, for the warning at start (`None` when each class
    /// has its own login).
    pub fn one_login_warning(&self) -> Option<String> {
        if self.class_logins() {
            return None;
        }
        Some(format!(
            "one login role serves every class ([backend] login_user or one managed login), so \
             PostgreSQL does not enforce the classes: SQL that rolegate cannot see (function \
             bodies, text handed to query_to_xml, DO) can reset the role and act with the \
             owner's privileges. To convert: add [backend.logins] (a login per class; \
             app_role/readonly_role default to {db}_app/{db}_readonly), run `rolegate setup`, \
             restart, then `rolegate check` (README: \"Upgrade from one login\")",
            db = self.backend.database
        ))
    }

    /// The prefix of the login roles this instance creates and may drop.
    pub fn own_login_prefix(&self) -> String {
        let prefix = self
            .rotation
            .login_prefix
            .clone()
            .unwrap_or_else(|| format!("{}_login_", self.backend.database));
        match &self.rotation.instance_id {
            Some(id) => format!("{prefix}{id}_"),
            None => prefix,
        }
    }

    pub fn client(&self, user: &str) -> Option<&ClientConfig> {
        self.clients.iter().find(|c| c.user == user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERIFIER: &str = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$ZHVtbXlkdW1teWR1bW15ZHVtbXlkdW1teWR1bW15ZHU=:ZHVtbXlkdW1teWR1bW15ZHVtbXlkdW1teWR1bW15ZHU=";

    fn sample() -> String {
        format!(
            r#"
listen = "127.0.0.1:6432"
[tls]
mode = "disable"
[backend]
database = "bookstore"
owner_role = "bookstore_owner"
login_user = "bookstore_login_0001"
login_password_env = "ROLEGATE_LOGIN_PASSWORD"
[[clients]]
user = "web"
password = "{VERIFIER}"
class = "app"
"#
        )
    }

    #[test]
    fn parses_the_readme_shape_with_defaults() {
        let config = Config::parse(&sample()).unwrap();
        assert_eq!(config.backend.port, 5432);
        assert_eq!(config.clients[0].class, ClientClass::App);
        assert_eq!(config.policy.mode, PolicyMode::Enforce);
    }

    #[test]
    fn a_runtime_per_thread_needs_a_backend_connection_per_thread() {
        let with = |top: &str, pool: &str| {
            let text = sample().replace(
                "[tls]",
                &format!("{top}\n[pool]\nmode = \"transaction\"\n{pool}\n[tls]"),
            );
            Config::parse(&text)
        };
        let err = with("threads = 4\nruntime = \"per_thread\"", "size = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("size (3) must be at least that"), "{err}");
        // Split as evenly as can be, four threads on four.
        let config = with("threads = 4\nruntime = \"per_thread\"", "size = 4").unwrap();
        assert_eq!((config.thread_count(), config.pool_shards()), (4, 4));
        // One per core, but never more threads than backend connections.
        let config = with("threads = 0\nruntime = \"per_thread\"", "size = 1").unwrap();
        assert_eq!((config.thread_count(), config.pool_shards()), (1, 1));
        // The shared runtime has one pool per key, however many threads.
        let config = with("threads = 4", "size = 1").unwrap();
        assert_eq!((config.thread_count(), config.pool_shards()), (4, 1));
    }

    #[test]
    fn refuses_a_plaintext_client_password() {
        let text = sample().replace(VERIFIER, "hunter2");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("SCRAM-SHA-256 verifier"), "{err}");
        assert!(!err.contains("hunter2"), "secret leaked into: {err}");
    }

    #[test]
    fn an_admin_endpoint_reachable_from_elsewhere_needs_a_token() {
        for listen in [
            "0.0.0.0:6433",
            "10.0.0.5:6433",
            "[::]:6433",
            "admin.example:6433",
        ] {
            let text = sample().replace("[tls]", &format!("admin_listen = {listen:?}\n[tls]"));
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains("token_env or token_file"), "{listen}: {err}");
            let text = text.replace("[tls]", "[admin]\ntoken_env = \"T\"\n[tls]");
            assert!(Config::parse(&text).is_ok(), "{listen}");
        }
        for listen in ["127.0.0.1:6433", "[::1]:6433", "localhost:6433"] {
            let text = sample().replace("[tls]", &format!("admin_listen = {listen:?}\n[tls]"));
            assert!(Config::parse(&text).is_ok(), "{listen}");
        }
    }

    #[test]
    fn serve_needs_the_instance_id_variable_to_be_set() {
        let text = format!(
            "{}[rotation]\ninstance_id_env = \"ROLEGATE_TEST_NEVER_SET_VARIABLE\"\n",
            sample()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rolegate.toml");
        std::fs::write(&path, text).unwrap();
        // setup, check and rotate load it where the variable is not set…
        let config = Config::load(&path).unwrap();
        assert_eq!(config.rotation.instance_id, None);
        // …serve does not start without it.
        let err = config.require_instance_id().unwrap_err().to_string();
        assert!(err.contains("ROLEGATE_TEST_NEVER_SET_VARIABLE"), "{err}");
    }

    #[test]
    fn managed_rotation_needs_no_login() {
        let text = sample()
            .replace("login_user = \"bookstore_login_0001\"\n", "")
            .replace("login_password_env = \"ROLEGATE_LOGIN_PASSWORD\"\n", "");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("login_user is required"), "{err}");
        let managed = format!("{text}[rotation]\nmode = \"managed\"\n");
        assert!(Config::parse(&managed).is_ok());
    }

    fn class_logins_sample(logins: &str, rotation: &str) -> String {
        sample()
            .replace("login_user = \"bookstore_login_0001\"\n", "")
            .replace("login_password_env = \"ROLEGATE_LOGIN_PASSWORD\"\n", "")
            .replace("[[clients]]", &format!("{logins}\n{rotation}\n[[clients]]"))
    }

    #[test]
    fn a_login_per_class_names_each_class_for_its_rotation_mode() {
        let static_logins = "[backend.logins]\n\
            app = { user = \"a\", password_env = \"A\" }\n\
            readonly = { user = \"r\", password_file = \"r.secret\" }\n\
            migrator = { user = \"m\", password_env = \"M\" }\n";
        let config = Config::parse(&class_logins_sample(static_logins, "")).unwrap();
        assert!(config.class_logins());
        assert!(config.one_login_warning().is_none());
        assert_eq!(config.class_role(ClientClass::App), "bookstore_app");
        assert_eq!(
            config.class_role(ClientClass::Readonly),
            "bookstore_readonly"
        );
        assert_eq!(config.class_role(ClientClass::Migrator), "bookstore_owner");

        // Static: a class without its login is refused, and so is login_user beside it.
        let missing =
            static_logins.replace("migrator = { user = \"m\", password_env = \"M\" }\n", "");
        let err = Config::parse(&class_logins_sample(&missing, ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[backend.logins.migrator]"), "{err}");
        let both = sample().replace("[[clients]]", &format!("{static_logins}\n[[clients]]"));
        let err = Config::parse(&both).unwrap_err().to_string();
        assert!(err.contains("one-login layout"), "{err}");

        // Managed: an empty table; a static field is refused.
        let managed = "[rotation]\nmode = \"managed\"\n";
        let config = Config::parse(&class_logins_sample("[backend.logins]\n", managed)).unwrap();
        assert_eq!(
            config.own_class_login_prefix(ClientClass::Readonly),
            "bookstore_readonly_login_"
        );
        assert!(Config::parse(&class_logins_sample(static_logins, managed)).is_err());

        // File: a file per class.
        let file = "[rotation]\nmode = \"file\"\n";
        assert!(Config::parse(&class_logins_sample("[backend.logins]\n", file)).is_err());
        let files = "[backend.logins]\napp = { file = \"a.json\" }\n\
            readonly = { file = \"r.json\" }\nmigrator = { file = \"m.json\" }\n";
        assert!(Config::parse(&class_logins_sample(files, file)).is_ok());
    }

    #[test]
    fn the_one_login_layout_keeps_working_and_says_how_to_convert() {
        let config = Config::parse(&sample()).unwrap();
        assert!(!config.class_logins());
        assert_eq!(config.class_role(ClientClass::App), "bookstore_owner");
        assert_eq!(config.class_role(ClientClass::Readonly), "bookstore_owner");
        let warning = config.one_login_warning().unwrap();
        assert!(warning.contains("[backend.logins]"), "{warning}");
    }

    #[test]
    fn tls_prefer_needs_a_certificate() {
        let text = sample().replace("mode = \"disable\"", "mode = \"prefer\"");
        assert!(Config::parse(&text).is_err());
    }
}
