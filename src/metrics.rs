//! Counters and gauges for GET /metrics (Prometheus text format, via prometheus-client).
//!
//! The relay adds to them once per read burst, not per message.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

const SHARDS: usize = 8;

/// One shard per cache line, so that threads adding to different shards never share one.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(AtomicU64);

/// A counter every session adds to on every round trip (`bytes`, `queries`). With one
/// atomic shared by all sessions, each add on one worker thread takes the cache line from
/// the other; here a thread adds to its own shard and only a scrape sums them.
#[derive(Debug, Clone, Default)]
pub struct ShardedCounter(Arc<[Shard; SHARDS]>);

impl ShardedCounter {
    pub fn inc_by(&self, v: u64) {
        static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
        }
        let shard = SHARD.with(|s| *s);
        self.0[shard].0.fetch_add(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Upper bounds of [`LatencyHistogram`]'s buckets, in microseconds: 100 µs to 10 s, the
/// range of a transaction, a wait for a backend connection and a backend login.
const LATENCY_BOUNDS_MICROS: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

#[derive(Debug, Default)]
struct LatencyCounts {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BOUNDS_MICROS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A Prometheus histogram of durations, observed on the relay's hot path (once or twice
/// per transaction). prometheus-client's own takes a lock per observation; this one is two
/// relaxed atomic adds and a search of 16 bounds.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram(Arc<LatencyCounts>);

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_MICROS.partition_point(|&bound| bound < micros);
        self.0.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0); LATENCY_BOUNDS_MICROS.len() + 1];
        for (i, (bound, count)) in buckets.iter_mut().enumerate() {
            *bound = LATENCY_BOUNDS_MICROS
                .get(i)
                .map_or(f64::MAX, |&micros| micros as f64 / 1e6);
            *count = self.0.buckets[i].load(Ordering::Relaxed);
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

type PerPool<M> = Family<PoolLabel, M>;

/// Transaction pooling, per pool (PgBouncer's SHOW POOLS columns).
#[derive(Default)]
pub struct PoolMetrics {
    pub clients_active: PerPool<Gauge>,
    pub clients_waiting: PerPool<Gauge>,
    pub clients_pinned: PerPool<Gauge>,
    pub backends_active: PerPool<Gauge>,
    pub backends_idle: PerPool<Gauge>,
    pub backends_opening: PerPool<Gauge>,
    pub longest_wait_seconds: PerPool<Gauge<f64, AtomicU64>>,
    pub checkouts: PerPool<Counter>,
    pub checkout_timeouts: PerPool<Counter>,
    pub prepares: PerPool<Counter>,
    pub resets: PerPool<Counter>,
    pub client_statement_bytes: PerPool<Gauge>,
    pub transaction_seconds: PerPool<LatencyHistogram>,
    pub checkout_wait_seconds: PerPool<LatencyHistogram>,
    pub backend_connect_seconds: PerPool<LatencyHistogram>,
}

impl PoolMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("pool");
        r.register(
            "clients_active",
            "Clients in transaction mode with a backend connection now",
            self.clients_active.clone(),
        );
        r.register(
            "clients_waiting",
            "Clients waiting for a backend connection",
            self.clients_waiting.clone(),
        );
        r.register(
            "clients_pinned",
            "Clients kept on one backend connection (LISTEN, session locks, WITH HOLD, PREPARE)",
            self.clients_pinned.clone(),
        );
        r.register(
            "backends_active",
            "Backend connections lent to a client",
            self.backends_active.clone(),
        );
        r.register(
            "backends_idle",
            "Backend connections waiting in the pool",
            self.backends_idle.clone(),
        );
        r.register(
            "backends_opening",
            "Backend connections being opened",
            self.backends_opening.clone(),
        );
        r.register(
            "longest_wait_seconds",
            "How long the longest-waiting client has waited for a backend connection",
            self.longest_wait_seconds.clone(),
        );
        r.register(
            "checkouts",
            "Backend connections lent to clients",
            self.checkouts.clone(),
        );
        r.register(
            "checkout_timeouts",
            "Clients that waited checkout_timeout without getting a backend connection",
            self.checkout_timeouts.clone(),
        );
        r.register(
            "prepares",
            "Prepared statements sent to a backend connection that lacked them",
            self.prepares.clone(),
        );
        r.register(
            "resets",
            "Settings queries sent to give a backend connection a client's settings",
            self.resets.clone(),
        );
        r.register(
            "client_statement_bytes",
            "Memory rolegate holds for the prepared statements of this pool's clients \
             (each client's share is bounded by [pool] max_client_prepared_bytes)",
            self.client_statement_bytes.clone(),
        );
        r.register(
            "transaction_seconds",
            "Transactions in transaction mode as the client sees them: from its first message \
             to the backend connection going back to the pool (waiting for it included; a pinned \
             client's whole pin counts as one)",
            self.transaction_seconds.clone(),
        );
        r.register(
            "checkout_wait_seconds",
            "How long clients waited for a backend connection (opening one included)",
            self.checkout_wait_seconds.clone(),
        );
        r.register(
            "backend_connect_seconds",
            "Backend logins: connecting, authenticating and setting the role \
             (session mode too, labelled like its transaction-mode pool)",
            self.backend_connect_seconds.clone(),
        );
    }
}

pub struct Metrics {
    registry: Registry,
    pub pool: PoolMetrics,
    /// Sessions that reached the relay, by client class.
    pub client_sessions: Family<ClassLabel, Gauge>,
    /// Connections that have not (yet) become a session: TLS, startup, auth.
    pub client_connecting: Gauge,
    pub backend_connections: Gauge,
    /// Query and Sync messages relayed to the server.
    pub queries: ShardedCounter,
    pub refusals: Family<RefusalLabels, Counter>,
    pub auth_failures: Counter,
    pub bytes: Family<DirectionLabel, ShardedCounter>,
    pub rotations: Counter,
    pub rotation_failures: Counter,
    pub login_age_seconds: Gauge,
    /// Backend logins made to answer readiness probes.
    pub readiness_checks: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            client_sessions: Family::default(),
            client_connecting: Gauge::default(),
            backend_connections: Gauge::default(),
            queries: ShardedCounter::default(),
            refusals: Family::default(),
            auth_failures: Counter::default(),
            bytes: Family::default(),
            rotations: Counter::default(),
            rotation_failures: Counter::default(),
            login_age_seconds: Gauge::default(),
            readiness_checks: Counter::default(),
            pool: PoolMetrics::default(),
            registry: Registry::with_prefix("rolegate"),
        };
        m.pool.register(&mut m.registry);
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
        registry.register(
            "readiness_checks",
            "Backend logins made to answer readiness probes (at most one a second)",
            m.readiness_checks.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_counters_sum_what_every_thread_added() {
        let metrics = Metrics::default();
        std::thread::scope(|scope| {
            for _ in 0..SHARDS + 3 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        metrics.queries.inc_by(1);
                        metrics
                            .bytes
                            .get_or_create(&DirectionLabel {
                                direction: "client_to_server",
                            })
                            .inc_by(2);
                    }
                });
            }
        });
        let text = metrics.encode();
        let total = (SHARDS as u64 + 3) * 1000;
        assert!(
            text.contains(&format!("rolegate_queries_total {total}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "rolegate_bytes_total{{direction=\"client_to_server\"}} {}\n",
                2 * total
            )),
            "{text}"
        );
        assert!(text.contains("# TYPE rolegate_queries counter"), "{text}");
    }

    #[test]
    fn latency_histograms_count_each_duration_in_its_bucket() {
        let metrics = Metrics::default();
        let label = PoolLabel {
            pool: "app_owner".into(),
        };
        let histogram = metrics.pool.transaction_seconds.get_or_create(&label);
        for micros in [50, 100, 101, 2_000, 20_000_000] {
            histogram.observe(Duration::from_micros(micros));
        }
        assert_eq!(histogram.count(), 5);
        let text = metrics.encode();
        let line = |le: &str, n: u64| {
            format!(
                "rolegate_pool_transaction_seconds_bucket{{le=\"{le}\",pool=\"app_owner\"}} {n}\n"
            )
        };
        for expected in [
            line("0.0001", 2),
            line("0.00025", 3),
            line("0.0025", 4),
            line("10.0", 4),
            line("+Inf", 5),
            "rolegate_pool_transaction_seconds_count{pool=\"app_owner\"} 5\n".to_string(),
            "rolegate_pool_transaction_seconds_sum{pool=\"app_owner\"} 20.002251\n".to_string(),
        ] {
            assert!(text.contains(&expected), "{expected} not in\n{text}");
        }
        assert!(text.contains("# TYPE rolegate_pool_transaction_seconds histogram"));
    }
}
