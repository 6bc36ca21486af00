//! One client connection from accept to close: startup, backend, relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use pgwire::messages::startup::Authentication;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::backend::{self, BackendError, BackendSession, SessionRole};
use crate::config::{ClientClass, PoolMode};
use crate::metrics::{ClassLabel, PoolLabel};
use crate::policy::fastpath::{self, LargeObjectFunctions};
use crate::policy::Requester;
use crate::pool::{CheckoutError, PoolKey};
use crate::proxy::{CancelTarget, Proxy};
use crate::relay::pooled::PooledClient;
use crate::relay::{self, RelayContext};
use crate::startup::{self, ClientIdentity, Opening, StartupError};
use crate::tls::MaybeTls;
use crate::wire::{self, ErrorFields, WireError};
use std::collections::BTreeMap;

/// A client connection from accept to close. Its task holds little more than two boxes,
/// one at a time: the login's (TLS, startup, SCRAM, or a cancel request) and the
/// session's; a task is as large as the largest state of its future, and a future built
/// in the statement that awaits it would take room in it too.
pub async fn run(proxy: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let _open = OpenConnection::new(&proxy);
    let login = Box::pin(log_in(&proxy, tcp, peer));
    let Some(Opening::Session {
        stream,
        identity,
        params,
        scram_final,
    }) = login.await
    else {
        return;
    };
    let session = serve(&proxy, stream, identity, params, scram_final, peer);
    session.await
}

/// TLS, startup and authentication within `client_login_timeout`; a cancel request is
/// carried out here, a refusal answered. `Some` only for a session to serve.
async fn log_in(proxy: &Arc<Proxy>, tcp: TcpStream, peer: SocketAddr) -> Option<Opening> {
    let login_timeout = proxy.config().limits.client_login_timeout;
    proxy.metrics.client_connecting.inc();
    let opened = tokio::time::timeout(login_timeout, startup::open(proxy, tcp)).await;
    proxy.metrics.client_connecting.dec();
    let opened = match opened {
        Ok(opened) => opened,
        Err(_) => {
            tracing::info!(%peer, "client did not log in within client_login_timeout; closed");
            return None;
        }
    };
    match opened {
        Ok(Opening::Cancel { pid, secret }) => {
            if let Some((target, in_flight)) = proxy.cancel_keys.lookup(pid, secret) {
                if let Err(e) = backend::send_cancel(&target.addr, target.pid, target.secret).await
                {
                    tracing::warn!(error = %e, "could not forward a cancel request");
                }
                drop(in_flight);
            }
            None
        }
        Err((StartupError::Wire(WireError::Closed), _)) => {
            tracing::debug!(%peer, "client closed the connection before startup");
            None
        }
        Err((error, stream)) => {
            if matches!(error, StartupError::Refused("28P01", _)) {
                proxy.metrics.auth_failures.inc();
            }
            if let (StartupError::Refused(code, message), Some(mut stream)) = (&error, stream) {
                let mut out = BytesMut::new();
                wire::put_error(&mut out, &ErrorFields::fatal(code, message));
                let _ = stream.write_all(&out).await;
                let _ = stream.shutdown().await;
            }
            tracing::info!(%peer, error = %error, "client connection refused");
            None
        }
        Ok(session) => Some(session),
    }
}

static EMPTY_LARGE_OBJECTS: std::sync::LazyLock<LargeObjectFunctions> =
    std::sync::LazyLock::new(LargeObjectFunctions::default);

/// The first session asks the server for its large-object functions' OIDs (FunctionCall
/// names functions by OID); they are the same for every session of the server.
async fn large_object_functions(
    proxy: &Proxy,
    backend: &mut BackendSession,
) -> Result<(), BackendError> {
    if proxy.large_objects.get().is_none() {
        let rows = backend.query(fastpath::LOOKUP_SQL).await?;
        let functions =
            LargeObjectFunctions::from_rows(rows.iter().filter_map(|row| match row.as_slice() {
                [Some(oid), Some(name)] => Some((oid.as_str(), name.as_str())),
                _ => None,
            }));
        let _ = proxy.large_objects.set(functions);
    }
    Ok(())
}

/// The server's `client_encoding` for the session must be one rolegate can judge
/// statements in (the client's own choice was checked at startup; this catches a
/// role's or database's default).
fn judgeable_encoding(backend: &BackendSession) -> Result<(), BackendError> {
    for (name, frame) in &backend.parameter_status {
        if name != "client_encoding" {
            continue;
        }
        let value = frame
            .get(5 + name.len() + 1..frame.len().saturating_sub(1))
            .unwrap_or_default();
        if let Some(refusal) =
            crate::policy::unsupported_client_encoding(&String::from_utf8_lossy(value))
        {
            return Err(BackendError::Server(vec![
                (b'S', "FATAL".into()),
                (b'C', refusal.code.into()),
                (b'M', refusal.message),
            ]));
        }
    }
    Ok(())
}

/// Counts a connection as open for as long as it lives (shutdown waits for zero).
struct OpenConnection<'a>(&'a Proxy);

impl<'a> OpenConnection<'a> {
    fn new(proxy: &'a Proxy) -> Self {
        proxy
            .open_connections
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        OpenConnection(proxy)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0
            .open_connections
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Where a backend session for a client of `class` must stay: its class role (with
/// `[backend.logins]`: the app or readonly class role, the owner for migrators; in the
/// one-login layout the owner, or `app_role` for app clients), read-only for readonly
/// clients.
pub fn session_role(config: &crate::config::Config, class: ClientClass) -> (String, bool) {
    (config.class_role(class), class == ClientClass::Readonly)
}

/// The session's future, boxed: each mode's is large in its own way, and a session's
/// task would otherwise be as large as the larger of the two.
fn serve<'a>(
    proxy: &'a Proxy,
    client: MaybeTls,
    identity: ClientIdentity,
    params: Vec<(String, String)>,
    scram_final: String,
    peer: SocketAddr,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    // Migrations take locks and set session state for their whole run: a migrator
    // keeps one backend session.
    let pooled = proxy.config().pool.mode == PoolMode::Transaction
        && identity.class != ClientClass::Migrator;
    if pooled {
        Box::pin(serve_pooled(
            proxy,
            client,
            identity,
            params,
            scram_final,
            peer,
        ))
    } else {
        Box::pin(serve_session(
            proxy,
            client,
            identity,
            params,
            scram_final,
            peer,
        ))
    }
}

async fn serve_session(
    proxy: &Proxy,
    mut client: MaybeTls,
    identity: ClientIdentity,
    params: Vec<(String, String)>,
    scram_final: String,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let config = proxy.config();
    let credentials = proxy.credentials.get(identity.class);
    let mut login = credentials.current();
    let (role_name, read_only) = session_role(&config, identity.class);
    let role = SessionRole {
        role: &role_name,
        read_only,
    };
    let connecting = Instant::now();
    let mut attempt = backend::connect(&proxy.backend, &login, &params, role).await;
    if attempt.is_err() {
        // A rotation may have swapped (and disabled or dropped) the login while this
        // session was logging in with it: one more try with the new one.
        let current = credentials.current();
        if current.user != login.user {
            login = current;
            attempt = backend::connect(&proxy.backend, &login, &params, role).await;
        }
    }
    if attempt.is_ok() {
        let pool = PoolKey {
            role: role_name.clone(),
            read_only,
        };
        let label = PoolLabel { pool: pool.label() };
        proxy
            .metrics
            .pool
            .backend_connect_seconds
            .get_or_create(&label)
            .observe(connecting.elapsed());
    }
    let attempt = match attempt {
        Ok(mut backend) => match large_object_functions(proxy, &mut backend).await {
            Ok(()) => judgeable_encoding(&backend).map(|()| backend),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let backend = match attempt {
        Ok(backend) => backend,
        Err(e) => {
            tracing::warn!(user = identity.user.as_str(), login = login.user.as_str(), error = %e, "backend session failed");
            refuse_session(client, &e).await;
            return;
        }
    };
    proxy.metrics.backend_connections.inc();
    let cancel_key = proxy.cancel_keys.register(CancelTarget {
        addr: proxy.backend.addr().into(),
        pid: backend.pid,
        secret: backend.secret,
    });

    let Some(standard_conforming_strings) = greet(
        &mut client,
        scram_final,
        &backend.parameter_status,
        cancel_key.key,
    )
    .await
    else {
        return;
    };
    tracing::info!(
        user = identity.user.as_str(),
        class = identity.class.as_str(),
        %peer,
        login = login.user.as_str(),
        tls = client.is_tls(),
        "session started"
    );

    let policy = proxy.policy();
    let restore_sql = role.setup_sql();
    let sessions_gauge = sessions_gauge(proxy, identity.class);
    let ctx = relay_context(
        proxy,
        &config,
        &identity,
        role,
        (&policy, &restore_sql),
        standard_conforming_strings,
        None,
    );
    let (stats, end) = relay::run(client, backend.stream, &ctx).await;
    sessions_gauge.dec();
    proxy.metrics.backend_connections.dec();
    drop(cancel_key);
    log_session_end(&identity, peer, started, &stats, &end);
}

/// Ends a client's login with the server's (or rolegate's) reason the backend session
/// could not be had.
async fn refuse_session(mut client: MaybeTls, e: &BackendError) {
    let mut out = BytesMut::new();
    let fields = e.client_fields();
    let field = |c| wire::field(&fields, c).unwrap_or_default();
    wire::put_error(
        &mut out,
        &ErrorFields {
            detail: Some(field(b'D')).filter(|d| !d.is_empty()),
            hint: Some(field(b'H')).filter(|h| !h.is_empty()),
            ..ErrorFields::fatal(field(b'C'), field(b'M'))
        },
    );
    let _ = client.write_all(&out).await;
    let _ = client.shutdown().await;
}

/// The end of the login: SCRAM's final message, AuthenticationOk, the server's
/// parameters, rolegate's cancel key, ReadyForQuery. Returns the session's
/// `standard_conforming_strings`, or `None` when the client left.
async fn greet(
    client: &mut MaybeTls,
    scram_final: String,
    parameter_status: &[(String, Bytes)],
    cancel_key: (i32, i32),
) -> Option<bool> {
    let mut greeting = BytesMut::new();
    wire::put_authentication(
        &mut greeting,
        &Authentication::SASLFinal(Bytes::from(scram_final)),
    );
    wire::put_authentication(&mut greeting, &Authentication::Ok);
    let mut standard_conforming_strings = true;
    for (name, frame) in parameter_status {
        if name == "standard_conforming_strings" {
            standard_conforming_strings = frame.ends_with(b"on\0");
        }
        greeting.extend_from_slice(frame);
    }
    wire::put_backend_key_data(&mut greeting, cancel_key.0, cancel_key.1);
    wire::put_ready_for_query(&mut greeting, b'I');
    if let Err(e) = client.write_all(&greeting).await {
        tracing::info!(error = %e, "client left before the session started");
        return None;
    }
    let _ = client.flush().await;
    Some(standard_conforming_strings)
}

/// A client's startup settings as session settings (lower-case name → value): what
/// each backend session it borrows is given.
fn startup_settings(params: &[(String, String)]) -> BTreeMap<String, String> {
    let mut settings = BTreeMap::new();
    for (name, value) in params {
        if name == "options" {
            for (name, value) in startup::option_settings(value).unwrap_or_default() {
                settings.insert(name.replace('-', "_").to_ascii_lowercase(), value);
            }
        } else {
            settings.insert(name.to_ascii_lowercase(), value.clone());
        }
    }
    settings
}

/// Transaction mode: the client borrows a backend session per transaction.
async fn serve_pooled(
    proxy: &Proxy,
    mut client: MaybeTls,
    identity: ClientIdentity,
    params: Vec<(String, String)>,
    scram_final: String,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let config = proxy.config();
    let (role_name, read_only) = session_role(&config, identity.class);
    let role = SessionRole {
        role: &role_name,
        read_only,
    };
    let pool = proxy.pools.get(role, proxy.credentials.get(identity.class));
    let settings = startup_settings(&params);
    let client_id = crate::pool::next_client_id();
    // A backend session with the client's settings says what the server makes of them
    // (and refuses the ones it does not know) for the greeting.
    let login = Box::pin(async {
        let mut lease = pool.checkout().await.map_err(|e| match e {
            CheckoutError::Backend(e) => e,
            timeout => BackendError::Server(vec![
                (b'S', "FATAL".into()),
                (b'C', "53300".into()),
                (b'M', format!("rolegate: {timeout}")),
            ]),
        })?;
        let conn = lease.conn();
        conn.apply_settings(&settings).await?;
        large_object_functions(proxy, &mut conn.session).await?;
        judgeable_encoding(&conn.session)?;
        let parameter_status = conn.session.parameter_status.clone();
        lease.release();
        Ok::<_, BackendError>(parameter_status)
    });
    let parameter_status = match login.await {
        Ok(parameter_status) => parameter_status,
        Err(e) => {
            tracing::warn!(user = identity.user.as_str(), error = %e, "backend session failed");
            let refusal = Box::pin(refuse_session(client, &e));
            refusal.await;
            return;
        }
    };
    let cancel_key = proxy.cancel_keys.register_pooled();
    let greeted = greet(&mut client, scram_final, &parameter_status, cancel_key.key).await;
    // (What only the greeting needed is not kept for the whole session.)
    drop(parameter_status);
    drop(params);
    let Some(standard_conforming_strings) = greeted else {
        return;
    };
    tracing::info!(
        user = identity.user.as_str(),
        class = identity.class.as_str(),
        %peer,
        pool = pool.key.label(),
        tls = client.is_tls(),
        "session started (transaction mode)"
    );
    let policy = proxy.policy();
    let restore_sql = role.setup_sql();
    let sessions_gauge = sessions_gauge(proxy, identity.class);
    let ctx = relay_context(
        proxy,
        &config,
        &identity,
        role,
        (&policy, &restore_sql),
        standard_conforming_strings,
        Some(&pool),
    );
    let client = PooledClient {
        stream: client,
        settings: crate::pool::shared_settings(settings),
        cancel: &cancel_key.slot,
        backend_addr: proxy.backend.addr().into(),
        client_id,
    };
    // Boxed apart from the rest of the session's future, which rustc would otherwise lay
    // out beside it (measured: 3.4 KB in all, against 2.1 KB so).
    let relay = Box::pin(relay::pooled::run(client, &ctx));
    let (stats, end) = relay.await;
    sessions_gauge.dec();
    drop(cancel_key);
    log_session_end(&identity, peer, started, &stats, &end);
}

/// The gauge of sessions of `class`, raised for this one.
fn sessions_gauge(proxy: &Proxy, class: ClientClass) -> prometheus_client::metrics::gauge::Gauge {
    let gauge = proxy
        .metrics
        .client_sessions
        .get_or_create(&ClassLabel {
            class: class.as_str().to_owned(),
        })
        .clone();
    gauge.inc();
    gauge
}

/// What the relay of one client session needs.
fn relay_context<'a>(
    proxy: &'a Proxy,
    config: &'a crate::config::Config,
    identity: &'a ClientIdentity,
    role: SessionRole<'a>,
    (policy, restore_sql): (&'a crate::policy::Policy, &'a str),
    standard_conforming_strings: bool,
    pooling: Option<&'a Arc<crate::pool::Pool>>,
) -> RelayContext<'a> {
    RelayContext {
        policy,
        idle_timeout: config.limits.idle_client_timeout,
        shutdown: proxy.shutdown.subscribe(),
        metrics: &proxy.metrics,
        requester: Requester {
            user: &identity.user,
            class: identity.class,
            allow: &identity.allow,
            role: role.role,
        },
        large_objects: proxy.large_objects.get().unwrap_or(&EMPTY_LARGE_OBJECTS),
        restore_sql,
        standard_conforming_strings,
        max_message_bytes: config.limits.max_message_bytes,
        pooling,
    }
}

fn log_session_end(
    identity: &ClientIdentity,
    peer: SocketAddr,
    started: Instant,
    stats: &relay::RelayStats,
    end: &relay::RelayEnd,
) {
    tracing::info!(
        user = identity.user.as_str(),
        class = identity.class.as_str(),
        %peer,
        duration_ms = started.elapsed().as_millis() as u64,
        client_bytes = stats.client_bytes,
        server_bytes = stats.server_bytes,
        refused = stats.refused,
        outcome = %end,
        "session ended"
    );
}
