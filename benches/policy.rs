//! The policy verdict, the one piece of work rolegate adds per statement:
//! a cached hit (shared cache, and a session's own memory), an uncached short statement,
//! an uncached 2 KB ORM statement.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use rolegate::config::{ClientClass, PolicyConfig};
use rolegate::policy::{classify, Policy, Requester, SessionVerdicts};

fn orm_statement() -> String {
    let columns: Vec<String> = (0..60)
        .map(|i| format!("\"orders\".\"column_{i}\" AS \"orders_column_{i}\""))
        .collect();
    format!(
        "SELECT {} FROM \"orders\" LEFT OUTER JOIN \"customers\" ON \"customers\".\"id\" = \"orders\".\"customer_id\" WHERE \"orders\".\"status\" = $1 AND \"orders\".\"created_at\" > $2 ORDER BY \"orders\".\"id\" DESC LIMIT $3",
        columns.join(", ")
    )
}

fn verdicts(c: &mut Criterion) {
    let policy = Policy::new(&PolicyConfig::default());
    let who = Requester {
        user: "web",
        class: ClientClass::App,
        allow: &[],
        role: "owner",
    };
    let short = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    let orm = orm_statement();
    assert!(orm.len() > 2000);

    let _ = policy.check(&who, short.as_bytes(), true, None);
    c.bench_function("verdict/cached", |b| {
        b.iter(|| policy.check(&who, black_box(short.as_bytes()), true, None))
    });
    // pgbench -M simple: the same statement with a new literal every time.
    let mut aid = 0u64;
    c.bench_function("verdict/new_literal_short", |b| {
        b.iter(|| {
            aid += 1;
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};");
            policy.check(&who, black_box(sql.as_bytes()), true, None)
        })
    });
    // What the relay does: judged in a session that sent these before, so the verdict
    // comes from the session's own memory, not from the cache all sessions share.
    let mut session = SessionVerdicts::default();
    c.bench_function("verdict/cached_in_session", |b| {
        b.iter(|| policy.check(&who, black_box(short.as_bytes()), true, Some(&mut session)))
    });
    c.bench_function("verdict/new_literal_in_session", |b| {
        b.iter(|| {
            aid += 1;
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};");
            policy.check(&who, black_box(sql.as_bytes()), true, Some(&mut session))
        })
    });
    // The same with a string in it: the numbers are found by pg_query's scanner.
    c.bench_function("verdict/new_literal_scanned", |b| {
        b.iter(|| {
            aid += 1;
            let sql = format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {aid} AND filler <> 'x'"
            );
            policy.check(&who, black_box(sql.as_bytes()), true, None)
        })
    });
    c.bench_function("verdict/uncached_short", |b| {
        b.iter(|| classify(black_box(short), true))
    });
    c.bench_function("verdict/uncached_orm_2kb", |b| {
        b.iter(|| classify(black_box(&orm), true))
    });
}

criterion_group!(benches, verdicts);
criterion_main!(benches);
