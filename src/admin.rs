//! The admin endpoint on `admin_listen`.
//!
//! Open to anyone who can reach it: `GET /livez` (the process runs its accept loop),
//! `GET /readyz` and its alias `GET /healthz` (a backend login works; at most one check per
//! second, shared by every probe), `GET /metrics`. With `[admin] token_env`/`token_file`,
//! `GET /status` and `POST /rotate` need `Authorization: Bearer <token>`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use subtle::ConstantTimeEq;

use crate::backend;
use crate::proxy::Proxy;

/// A readiness answer is reused for this long, however many probes ask.
const READINESS_MAX_AGE: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct AdminState {
    proxy: Arc<Proxy>,
    readiness: Arc<Readiness>,
}

/// The last backend check: concurrent probes wait for the one running instead of
/// starting their own.
#[derive(Default)]
struct Readiness {
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Readiness {
    async fn check(&self, proxy: &Proxy) -> (Result<(), String>, Duration) {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = &*last {
            if at.elapsed() < READINESS_MAX_AGE {
                return (result.clone(), at.elapsed());
            }
        }
        proxy.metrics.readiness_checks.inc();
        // Every login in use must work: each class's, or the one of the one-login layout.
        let mut result = Ok(());
        for slot in crate::credentials::login_slots(&proxy.config()) {
            let login = proxy.credentials.get(slot.classes[0]).current();
            if let Err(e) = backend::prove_login(&proxy.backend, &login, &slot.role).await {
                result = Err(e.to_string());
                break;
            }
        }
        *last = Some((Instant::now(), result.clone()));
        (result, Duration::ZERO)
    }
}

pub fn router(proxy: Arc<Proxy>) -> Router {
    let state = AdminState {
        proxy,
        readiness: Arc::default(),
    };
    let actions = Router::new()
        .route("/status", get(status))
        .route("/rotate", post(rotate))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/healthz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(actions)
        .with_state(state)
}

pub async fn serve(proxy: Arc<Proxy>, listen: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (admin_listen)"))?;
    tracing::info!(address = %listen, "admin endpoint is listening");
    axum::serve(
        listener,
        router(proxy).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .await
    .context("admin endpoint")
}

/// With a token configured, the actions answer 401 unless the request carries it.
async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.proxy.admin_token() else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    // Compared in constant time: how long a refusal takes says nothing about the token.
    let authorized =
        presented.is_some_and(|token| bool::from(token.as_bytes().ct_eq(expected.as_bytes())));
    if authorized {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.to_string())
        .unwrap_or_default();
    tracing::warn!(
        path = request.uri().path(),
        peer,
        token_sent = presented.is_some(),
        "admin request refused: no valid bearer token"
    );
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(serde_json::json!({"error": "this action needs the admin bearer token"})),
    )
        .into_response()
}

/// 200 while the accept loop runs (or sessions drain after SIGTERM): the process works,
/// whatever the database does.
async fn livez(State(state): State<AdminState>) -> Response {
    let proxy = &state.proxy;
    if proxy.accepting.load(Ordering::Relaxed) || *proxy.shutdown.borrow() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not accepting\n").into_response()
    }
}

/// 200 when a backend login with the current credential works (checked at most once a
/// second), 503 when it does not or while shutting down.
async fn readyz(State(state): State<AdminState>) -> Response {
    if *state.proxy.shutdown.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reason": "shutting down"})),
        )
            .into_response();
    }
    let (result, age) = state.readiness.check(&state.proxy).await;
    let age_ms = age.as_millis() as u64;
    match result {
        Ok(()) => (
            StatusCode::OK,
            Json(serde_json::json!({"ready": true, "checked_ms_ago": age_ms})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "ready": false,
                "reason": format!("backend login failed: {e}"),
                "checked_ms_ago": age_ms,
            })),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let proxy = &state.proxy;
    proxy.metrics.login_age_seconds.set(
        crate::config::CLASSES
            .iter()
            .map(|c| proxy.credentials.get(*c).age_seconds())
            .max()
            .unwrap_or_default() as i64,
    );
    proxy.pools.publish_longest_waits();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        proxy.metrics.encode(),
    )
        .into_response()
}

async fn status(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let proxy = &state.proxy;
    let config = proxy.config();
    let mut logins = serde_json::Map::new();
    for class in crate::config::CLASSES {
        let store = proxy.credentials.get(class);
        logins.insert(
            class.as_str().into(),
            serde_json::json!({
                "login_role": store.current().user,
                "since_unix": store.since(),
                "role": config.class_role(class),
            }),
        );
    }
    let mut status = serde_json::json!({
        "logins": logins,
        "database": config.backend.database,
        "owner_role": config.backend.owner_role,
        "instance_id": config.rotation.instance_id,
        "layout": if config.class_logins() { "login per class" } else { "one login" },
    });
    if !config.class_logins() {
        let store = proxy.credentials.get(crate::config::ClientClass::Migrator);
        status["login_role"] = store.current().user.clone().into();
        status["login_since_unix"] = store.since().into();
    }
    if config.pool.mode == crate::config::PoolMode::Transaction {
        let pools = proxy.pools.status();
        status["pool_mode"] = "transaction".into();
        status["pools"] = pools.into();
    }
    if !proxy.rotators.is_empty() {
        let count = |f: fn(&crate::credentials::rotate::RotationStats) -> u64| {
            proxy.rotators.iter().map(|r| f(&r.stats)).sum::<u64>()
        };
        status["rotations"] = count(|s| s.rotations.load(Ordering::Relaxed)).into();
        status["rotation_failures"] = count(|s| s.failures.load(Ordering::Relaxed)).into();
    }
    Json(status)
}

/// Rotates every login rolegate manages: the one login, or each class's in turn. The
/// answer is the outcome (one login) or `{"rotations": [...]}` (a login per class).
async fn rotate(State(state): State<AdminState>) -> Response {
    let rotators = &state.proxy.rotators;
    if rotators.is_empty() {
        return (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": "rotation is not managed by rolegate ([rotation] mode)"})),
        )
            .into_response();
    }
    let mut outcomes = Vec::new();
    for rotator in rotators {
        match rotator.rotate().await {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(serde_json::json!({
                        "error": format!("{} login: {e:#}", rotator.label()),
                        "rotations": outcomes,
                    })),
                )
                    .into_response()
            }
        }
    }
    let body = match outcomes.as_slice() {
        [one] if one.class == "all" => serde_json::json!(one),
        _ => serde_json::json!({ "rotations": outcomes }),
    };
    (StatusCode::OK, Json(body)).into_response()
}

/// `rolegate rotate`: asks the running instance and waits for the outcome.
pub async fn request_rotation(
    admin_listen: &str,
    token: Option<&str>,
) -> anyhow::Result<(bool, String)> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(admin_listen)
        .await
        .with_context(|| format!("cannot reach the admin endpoint at {admin_listen}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = hyper::Request::post("/rotate").header("host", admin_listen);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Empty::<bytes::Bytes>::new())?)
        .await?;
    let ok = response.status().is_success();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((ok, String::from_utf8_lossy(&body).into_owned()))
}
