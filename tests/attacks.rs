//! Attacks on rolegate's isolation guarantees (issues 19 and 20): each one that breaks a
//! guarantee asserts the correct behaviour and is `#[ignore = "attack: …"]` until fixed.

mod support;

use std::time::Duration;

use support::*;

fn pooled(size: usize) -> Options {
    Options {
        extra: format!("[pool]\nmode = \"transaction\"\nsize = {size}\n"),
        ..Options::default()
    }
}

/// Not an attack: a rolegate in transaction mode left running for manual probing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "manual playground"]
async fn playground() {
    let db = TestDb::create("att_play").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let m = rg.client("migrate", &db).await;
    m.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE SEQUENCE s; INSERT INTO t VALUES (1,'a')")
        .await
        .unwrap();
    std::fs::write(
        "/tmp/att/env",
        format!("port={} db={} log={}\n", rg.port, db.name, rg.log.display()),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3000)).await;
}

/// Answers of `client` to `texts` through server-side prepared statements
/// (tokio-postgres prepares each under a name of its own).
async fn prepared_answers(client: &tokio_postgres::Client, texts: &[&str]) -> Vec<String> {
    let mut answers = Vec::new();
    for text in texts {
        let statement = client.prepare(text).await.unwrap();
        answers.push(client.query_one(&statement, &[]).await.unwrap().get(0));
    }
    answers
}

/// Answers of `client` to `texts` as simple queries (nothing prepared).
async fn simple_answers(client: &tokio_postgres::Client, texts: &[&str]) -> Vec<String> {
    let mut answers = Vec::new();
    for text in texts {
        let rows = client.simple_query(text).await.unwrap();
        let value = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
        answers.push(value.unwrap_or_default());
    }
    answers
}

/// A client's settings decide what another client's prepared statement of the same
/// text answers: `timezone_abbreviations` (read when the text is parsed: `IST` is India
/// or Israel), `bytea_output` and `extra_float_digits` (the output of an immutable cast is
/// folded into the plan when it is first made) are not part of the server-side statement
/// name, so B runs the statement A prepared and planned under A's settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "attack: prepared statement shared across clients with different timezone_abbreviations / bytea_output / extra_float_digits"]
async fn prepared_statement_keeps_meaning_of_other_clients_settings() {
    let db = TestDb::create("att_prep").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let texts = [
        "SELECT '2024-01-01 12:00 IST'::timestamptz::text",
        r"SELECT '\x41'::bytea::text",
        "SELECT 1.23456789::float8::text",
    ];
    let a = rg.client("web", &db).await;
    let b = rg.client("web", &db).await;
    let own = simple_answers(&b, &texts).await;
    a.batch_execute(
        "SET timezone_abbreviations = 'India'; SET bytea_output = 'escape'; SET extra_float_digits = -10",
    )
    .await
    .unwrap();
    let of_a = prepared_answers(&a, &texts).await;
    assert_ne!(
        of_a, own,
        "A's settings change the answers on its own session"
    );
    let of_b = prepared_answers(&b, &texts).await;
    assert_eq!(
        of_b, own,
        "B's prepared statements answer as B's own simple queries do, not as A's settings would"
    );
}

/// An INSERT into a table with a `serial` or identity column calls `nextval` from the
/// column default, where rolegate does not see a sequence function: the backend
/// session's `lastval()` then answers the next client with A's new id (on a session of
/// its own B gets 55000 "lastval is not yet defined in this session").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "attack: lastval() of another client after an INSERT into a serial / identity column"]
async fn lastval_of_another_clients_insert() {
    let db = TestDb::create("att_lastval").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    rg.client("migrate", &db)
        .await
        .batch_execute(
            "CREATE TABLE orders (id serial PRIMARY KEY, who text);
             CREATE TABLE invoices (id int GENERATED ALWAYS AS IDENTITY, who text)",
        )
        .await
        .unwrap();
    let a = rg.client("web", &db).await;
    let b = rg.client("web", &db).await;
    for insert in [
        "INSERT INTO orders (who) VALUES ('tenant a')",
        "INSERT INTO invoices (who) VALUES ('tenant a')",
    ] {
        a.batch_execute(insert).await.unwrap();
        let seen = b.query_one("SELECT lastval()", &[]).await;
        assert_eq!(
            seen.as_ref().err().and_then(sqlstate).as_deref(),
            Some("55000"),
            "after A's `{insert}`, B's lastval() is not defined; B got {:?}",
            seen.map(|row| row.get::<_, i64>(0))
        );
    }
}
