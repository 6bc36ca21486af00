//! The relay's framing: MB/s of result rows (server → client) and of pipelined queries
//! (client → server, verdicts cached) through in-memory pipes.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rolegate::config::{ClientClass, PolicyConfig};
use rolegate::metrics::Metrics;
use rolegate::policy::{Policy, Requester};
use rolegate::relay::{run_io, RelayContext};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAYLOAD: usize = 1 << 20;

/// ~1 MB of DataRow messages of `row` bytes each.
fn data_rows(row: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAYLOAD + row);
    while out.len() < PAYLOAD {
        out.push(b'D');
        out.extend_from_slice(&((row + 4) as i32).to_be_bytes());
        out.extend(std::iter::repeat_n(b'x', row));
    }
    out
}

/// ~1 MB of the same short Query message.
fn queries() -> Vec<u8> {
    let sql = b"SELECT abalance FROM pgbench_accounts WHERE aid = 42\0";
    let mut out = Vec::with_capacity(PAYLOAD + 64);
    while out.len() < PAYLOAD {
        out.push(b'Q');
        out.extend_from_slice(&((sql.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(sql);
    }
    out
}

fn relay(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let policy = Box::leak(Box::new(Policy::new(&PolicyConfig::default())));
    let metrics = Box::leak(Box::new(Metrics::default()));
    let (_shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let (mut client_app, client_proxy) = tokio::io::duplex(256 * 1024);
    let (server_proxy, mut server_app) = tokio::io::duplex(256 * 1024);
    runtime.spawn(async move {
        let ctx = RelayContext {
            policy,
            requester: Requester {
                user: "bench",
                class: ClientClass::App,
                allow: &[],
                role: "owner",
            },
            standard_conforming_strings: true,
            max_message_bytes: 1 << 30,
            idle_timeout: None,
            shutdown,
            metrics,
            large_objects: Box::leak(Box::default()),
            restore_sql: "SET ROLE owner",
            pooling: None,
        };
        run_io(client_proxy, server_proxy, &ctx).await
    });

    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Bytes(PAYLOAD as u64));
    for row in [64usize, 1024] {
        let rows = data_rows(row);
        group.bench_function(format!("server_to_client/rows_of_{row}_bytes"), |b| {
            let mut sink = vec![0u8; rows.len()];
            b.iter(|| {
                runtime.block_on(async {
                    let (w, r) = tokio::join!(
                        server_app.write_all(&rows),
                        client_app.read_exact(&mut sink)
                    );
                    w.unwrap();
                    r.unwrap();
                })
            })
        });
    }
    let queries = queries();
    group.bench_function("client_to_server/cached_queries", |b| {
        let mut sink = vec![0u8; queries.len()];
        b.iter(|| {
            runtime.block_on(async {
                let (w, r) = tokio::join!(
                    client_app.write_all(&queries),
                    server_app.read_exact(&mut sink)
                );
                w.unwrap();
                r.unwrap();
            })
        })
    });
    group.finish();
}

criterion_group!(benches, relay);
criterion_main!(benches);
