//! What the transaction-mode histograms cost on the hot path: per transaction the relay
//! reads the clock twice (start, end) and observes twice (checkout wait, transaction time).

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use rolegate::metrics::{Metrics, PoolLabel};

fn histograms(c: &mut Criterion) {
    let metrics = Metrics::default();
    let label = PoolLabel {
        pool: "bench_owner".into(),
    };
    let transaction = metrics
        .pool
        .transaction_seconds
        .get_or_create(&label)
        .clone();
    let checkout = metrics
        .pool
        .checkout_wait_seconds
        .get_or_create(&label)
        .clone();
    c.bench_function("histogram observe", |b| {
        let mut micros = 0u64;
        b.iter(|| {
            micros = (micros + 997) % 2_000_000;
            transaction.observe(black_box(Duration::from_micros(micros)));
        })
    });
    c.bench_function("per transaction: two clock reads, two observations", |b| {
        b.iter(|| {
            let started = Instant::now();
            checkout.observe(started.elapsed());
            transaction.observe(black_box(started).elapsed());
        })
    });
}

criterion_group!(benches, histograms);
criterion_main!(benches);
