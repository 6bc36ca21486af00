//! Counters and gauges for GET /metrics (Prometheus text format, via prometheus-client).
//!
//! The relay adds to them once per read burst, not per message.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub class: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Sessions that reached the relay, by client class.
    pub client_sessions: Family<ClassLabel, Gauge>,
    /// Connections that have not (yet) become a session: TLS, startup, auth.
    pub client_connecting: Gauge,
    pub backend_connections: Gauge,
    /// Query and Sync messages relayed to the server.
    pub queries: Counter,
    pub refusals: Family<RefusalLabels, Counter>,
    pub auth_failures: Counter,
    pub bytes: Family<DirectionLabel, Counter>,
    pub rotations: Counter,
    pub rotation_failures: Counter,
    pub login_age_seconds: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            client_sessions: Family::default(),
            client_connecting: Gauge::default(),
            backend_connections: Gauge::default(),
            queries: Counter::default(),
            refusals: Family::default(),
            auth_failures: Counter::default(),
            bytes: Family::default(),
            rotations: Counter::default(),
            rotation_failures: Counter::default(),
            login_age_seconds: Gauge::default(),
            registry: Registry::with_prefix("rolegate"),
        };
        let registry = &mut m.registry;
        registry.register(
            "client_sessions",
            "Client sessions being relayed, by class",
            m.client_sessions.clone(),
        );
        registry.register(
            "client_connecting",
            "Client connections in TLS, startup or authentication",
            m.client_connecting.clone(),
        );
        registry.register(
            "backend_connections",
            "Backend connections open",
            m.backend_connections.clone(),
        );
        registry.register(
            "queries",
            "Query and Sync messages relayed to the server",
            m.queries.clone(),
        );
        registry.register(
            "refusals",
            "Statements refused by the policy, by class and kind",
            m.refusals.clone(),
        );
        registry.register(
            "auth_failures",
            "Failed client authentications",
            m.auth_failures.clone(),
        );
        registry.register("bytes", "Bytes relayed, by direction", m.bytes.clone());
        registry.register(
            "rotations",
            "Successful login rotations",
            m.rotations.clone(),
        );
        registry.register(
            "rotation_failures",
            "Failed login rotations",
            m.rotation_failures.clone(),
        );
        registry.register(
            "login_age_seconds",
            "Age of the current backend login",
            m.login_age_seconds.clone(),
        );
        m
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
