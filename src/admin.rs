//! The admin endpoint on `admin_listen`: GET /healthz, GET /metrics, GET /status,
//! POST /rotate.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::backend;
use crate::proxy::Proxy;

pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/rotate", post(rotate))
        .with_state(proxy)
}

pub async fn serve(proxy: Arc<Proxy>, listen: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (admin_listen)"))?;
    tracing::info!(address = %listen, "admin endpoint is listening");
    axum::serve(listener, router(proxy))
        .await
        .context("admin endpoint")
}

/// 200 only when a backend login with the current credential works.
async fn healthz(State(proxy): State<Arc<Proxy>>) -> Response {
    let login = proxy.credentials.current();
    let owner_role = &proxy.config().backend.owner_role;
    match backend::prove_login(&proxy.backend, &login, owner_role).await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("backend login failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(proxy): State<Arc<Proxy>>) -> Response {
    proxy
        .metrics
        .login_age_seconds
        .set(proxy.credentials.age_seconds() as i64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        proxy.metrics.encode(),
    )
        .into_response()
}

async fn status(State(proxy): State<Arc<Proxy>>) -> Json<serde_json::Value> {
    let login = proxy.credentials.current();
    let mut status = serde_json::json!({
        "login_role": login.user,
        "login_since_unix": proxy.credentials.since(),
        "database": proxy.config().backend.database,
        "owner_role": proxy.config().backend.owner_role,
    });
    if let Some(rotator) = &proxy.rotator {
        let stats = &rotator.stats;
        status["rotations"] = stats.rotations.load(Ordering::Relaxed).into();
        status["rotation_failures"] = stats.failures.load(Ordering::Relaxed).into();
    }
    Json(status)
}

async fn rotate(State(proxy): State<Arc<Proxy>>) -> Response {
    let Some(rotator) = &proxy.rotator else {
        return (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": "rotation is not managed by rolegate ([rotation] mode)"})),
        )
            .into_response();
    };
    match rotator.rotate().await {
        Ok(outcome) => (StatusCode::OK, Json(serde_json::json!(outcome))).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"error": format!("{e:#}")})),
        )
            .into_response(),
    }
}

/// `rolegate rotate`: asks the running instance and waits for the outcome.
pub async fn request_rotation(admin_listen: &str) -> anyhow::Result<(bool, String)> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(admin_listen)
        .await
        .with_context(|| format!("cannot reach the admin endpoint at {admin_listen}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::post("/rotate")
        .header("host", admin_listen)
        .body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let ok = response.status().is_success();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((ok, String::from_utf8_lossy(&body).into_owned()))
}
