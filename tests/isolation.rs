//! Transaction mode: one client never reaches another. Each test is one of the holes an
//! outside attack found (replies crossing after a COPY, a backend lent while a write to
//! it was half done, cancels hitting the next client, settings and leftovers following
//! the backend instead of the client), written as a user would observe it.

mod support;

use std::time::Duration;

use bytes::BytesMut;
use rolegate::wire;
use support::*;

fn pooled(size: usize) -> Options {
    Options {
        extra: format!(
            "[pool]\nmode = \"transaction\"\nsize = {size}\ncheckout_timeout = \"20s\"\n"
        ),
        ..Options::default()
    }
}

async fn make_table(rg: &Rolegate, db: &TestDb) {
    rg.client("migrate", db)
        .await
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, owner text NOT NULL);
             CREATE SEQUENCE counter;",
        )
        .await
        .unwrap();
}

fn query(out: &mut BytesMut, sql: &str) {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    wire::put_message(out, b'Q', &body);
}

/// Every message up to and including the `n`-th ReadyForQuery, as tags (and the
/// SQLSTATE of errors, the value of one-column rows), so transcripts compare as text.
async fn transcript(client: &mut RawClient, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut ready = 0;
    while ready < n {
        let Some((tag, body)) = client.read().await else {
            seen.push("closed".into());
            break;
        };
        seen.push(match tag {
            b'E' => format!(
                "E {}",
                wire::field(&wire::error_fields(&body), b'C').unwrap_or("")
            ),
            b'D' if body.len() >= 6 => {
                let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                let value = if len < 0 {
                    "NULL".into()
                } else {
                    String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned()
                };
                format!("D {value}")
            }
            b'Z' => {
                ready += 1;
                format!("Z {}", body.first().map(|&b| b as char).unwrap_or('?'))
            }
            // Settings reports and notices depend on the server's own state.
            b'S' | b'N' => continue,
            other => (other as char).to_string(),
        });
    }
    seen
}

/// Another app client, V, that logs in now and runs `n` queries one after another (in
/// the background); its transcripts.
fn victim(
    rg: &Rolegate,
    db: &TestDb,
    n: usize,
    sql: fn(usize) -> String,
) -> tokio::task::JoinHandle<Vec<Vec<String>>> {
    let port = rg.port;
    let name = db.name.clone();
    tokio::spawn(async move {
        let mut v = RawClient::login(port, "web", password_of("web"), &name).await;
        let mut answers = Vec::new();
        for i in 0..n {
            let mut out = BytesMut::new();
            query(&mut out, &sql(i));
            v.send(&out).await;
            answers.push(transcript(&mut v, 1).await);
        }
        answers
    })
}

/// The same client program straight against PostgreSQL, as the login role in the owner
/// role (what rolegate does for app clients without an app role).
async fn direct(db: &TestDb) -> RawClient {
    let mut client = RawClient::login(cluster().port, &db.login, LOGIN_PASSWORD, &db.name).await;
    let mut out = BytesMut::new();
    query(&mut out, &format!("SET ROLE \"{}\"", db.owner));
    client.send(&out).await;
    client.until_ready().await;
    client
}

/// A COPY the server ends with an error, then Sync, CopyDone and a Query, pipelined: the
/// client hears exactly what PostgreSQL would say on a connection of its own, and the
/// next client on the pool's only backend connection hears only its own answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_never_cross_clients_after_a_failed_copy() {
    let db = TestDb::create("iso_copy").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    make_table(&rg, &db).await;

    let program = |out: &mut BytesMut| {
        wire::put_message(out, b'd', b"not-a-number\tx\n");
        wire::put_message(out, b'S', &[]);
        wire::put_message(out, b'c', &[]);
        // (Slow, so that rolegate reads the Sync's answer well before this one's.)
        query(out, "SELECT 'a-own' FROM pg_sleep(0.5)");
    };
    let mut transcripts = Vec::new();
    for through_rolegate in [false, true] {
        let mut a = if through_rolegate {
            RawClient::login(rg.port, "web", password_of("web"), &db.name).await
        } else {
            direct(&db).await
        };
        let mut out = BytesMut::new();
        query(&mut out, "COPY items (id, owner) FROM STDIN");
        a.send(&out).await;
        assert_eq!(a.read().await.map(|m| m.0), Some(b'G'));
        let mut out = BytesMut::new();
        program(&mut out);
        a.send(&out).await;
        if through_rolegate {
            // V asks while A's replies are still on their way.
            let v = victim(&rg, &db, 3, |i| format!("SELECT current_user || ' {i}'"));
            tokio::time::sleep(Duration::from_millis(200)).await;
            transcripts.push(transcript(&mut a, 3).await);
            drop(a);
            let answers = v.await.unwrap();
            for (i, answer) in answers.iter().enumerate() {
                assert_eq!(
                    answer,
                    &[
                        "T".to_owned(),
                        format!("D {} {i}", db.owner),
                        "C".into(),
                        "Z I".into()
                    ],
                    "{}",
                    rg.log_text()
                );
            }
        } else {
            transcripts.push(transcript(&mut a, 3).await);
        }
    }
    assert_eq!(
        transcripts[0],
        ["E 22P02", "Z I", "Z I", "T", "D a-own", "C", "Z I"],
        "PostgreSQL's own transcript"
    );
    assert_eq!(transcripts[1], transcripts[0], "through rolegate");
}

/// A slow statement, then 32 MB of CopyData (which the server drops, outside COPY) in the
/// same write: the server stops reading while it sleeps, so rolegate's write to it is
/// half done when the statement's answer comes. The backend connection is not lent
/// until the write is complete, and nothing is sent twice: the client waiting for it
/// gets its own answers, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_is_not_lent_while_a_write_to_it_is_half_done() {
    let db = TestDb::create("iso_write").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let a = RawClient::login(rg.port, "web", password_of("web"), &db.name).await;

    let v = victim(&rg, &db, 20, |i| format!("SELECT 'v{i}'"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut out = BytesMut::new();
    query(&mut out, "SELECT 'a-slow' FROM pg_sleep(1)");
    let line = vec![b'7'; 4_000];
    while out.len() < 32 << 20 {
        wire::put_message(&mut out, b'd', &line);
    }
    // The client writes while it reads, as a driver would.
    let (reader, mut writer) = a.stream.into_split();
    let write = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        writer.write_all(&out).await.unwrap();
        writer
    });
    let mut a = RawClient {
        stream: reader.reunite(write.await.unwrap()).unwrap(),
    };
    assert_eq!(transcript(&mut a, 1).await, ["T", "D a-slow", "C", "Z I"]);
    let mut out = BytesMut::new();
    query(&mut out, "SELECT 'a-after'");
    a.send(&out).await;
    assert_eq!(transcript(&mut a, 1).await, ["T", "D a-after", "C", "Z I"]);
    for (i, answer) in v.await.unwrap().iter().enumerate() {
        assert_eq!(
            answer,
            &["T".to_owned(), format!("D v{i}"), "C".into(), "Z I".into()],
            "{}",
            rg.log_text()
        );
    }
}

/// A client that cancels right after each of its short queries (its own, finished ones)
/// never cancels the statements of the client that uses the backend connection next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_never_reaches_another_client() {
    let db = TestDb::create("iso_cancel").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let a = rg.client("web", &db).await;
    let v = rg.client("web", &db).await;
    let canceller = tokio::spawn(async move {
        for _ in 0..150 {
            // A driver's cancel does not wait for the server (tokio-postgres returns once
            // it has sent it): A's last cancel may still be on its way when A sends its
            // next query, which is then A's own to lose, as straight against PostgreSQL.
            if let Err(e) = a.simple_query("SELECT 1").await {
                assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
            }
            a.cancel_token()
                .cancel_query(tokio_postgres::NoTls)
                .await
                .unwrap();
        }
    });
    let mut canceled = 0;
    for _ in 0..150 {
        if let Err(e) = v.simple_query("SELECT pg_sleep(0.002)").await {
            assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
            canceled += 1;
        }
    }
    canceller.await.unwrap();
    assert_eq!(
        canceled, 0,
        "statements of V canceled by A's cancel requests"
    );
}

/// Custom settings (how row-level security is usually fed), settings changed in SQL text
/// and client_encoding follow their client: the next client on the pool's only backend
/// connection never has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_follow_their_client_custom_ones_too() {
    let db = TestDb::create("iso_settings").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let a = rg.client("web", &db).await;
    let b = rg.client("web", &db).await;
    a.batch_execute("SET app.tenant = 'acme'").await.unwrap();
    a.query_one("SELECT set_config('app.user', 'alice', false)", &[])
        .await
        .unwrap();
    // (A name another client set may exist, empty, on the backend connection: PostgreSQL
    // cannot forget a placeholder. Its value never crosses.)
    let unset = |value: Option<String>| value.is_none_or(|v| v.is_empty());
    assert!(unset(setting(&b, "app.tenant").await));
    assert!(unset(setting(&b, "app.user").await));
    assert_eq!(setting(&a, "app.tenant").await.as_deref(), Some("acme"));
    assert_eq!(setting(&a, "app.user").await.as_deref(), Some("alice"));
    assert!(unset(setting(&b, "app.tenant").await));
    b.batch_execute("SET app.tenant = 'globex'").await.unwrap();
    assert_eq!(setting(&a, "app.tenant").await.as_deref(), Some("acme"));
    assert_eq!(setting(&b, "app.tenant").await.as_deref(), Some("globex"));

    // client_encoding: the next client's transaction runs in its own encoding.
    let mut raw = RawClient::login(rg.port, "web", password_of("web"), &db.name).await;
    let mut out = BytesMut::new();
    query(&mut out, "SET client_encoding = 'EUC_JP'");
    raw.send(&out).await;
    assert!(raw.until_ready().await.1.is_empty());
    let encoding: String = b
        .query_one("SELECT current_setting('client_encoding')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(encoding, "UTF8");
    let mut out = BytesMut::new();
    query(&mut out, "SHOW client_encoding");
    raw.send(&out).await;
    assert_eq!(raw.data_values().await, ["EUC_JP"]);
}

/// A statement prepared by a client with another DateStyle, TimeZone or
/// standard_conforming_strings means for each client what its own simple query means.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_mean_what_they_mean_for_their_client() {
    let db = TestDb::create("iso_prepared").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let a = rg.client("web", &db).await;
    let b = rg.client("web", &db).await;
    a.batch_execute(
        "SET DateStyle = 'ISO, DMY'; SET TimeZone = 'Asia/Tokyo'; \
         SET standard_conforming_strings = off",
    )
    .await
    .unwrap();
    for sql in [
        "SELECT '01/02/2024'::date::text",
        "SELECT '2024-01-01 00:00'::timestamptz::text",
        "SELECT length('a\\b')::text",
    ] {
        let mut answers = Vec::new();
        for client in [&a, &b, &a, &b] {
            let statement = client.prepare(sql).await.unwrap();
            let prepared: String = client.query_one(&statement, &[]).await.unwrap().get(0);
            let simple = client
                .simple_query(sql)
                .await
                .unwrap()
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                    _ => None,
                })
                .unwrap();
            assert_eq!(prepared, simple, "{sql}");
            answers.push(prepared);
        }
        assert_ne!(
            answers[0], answers[1],
            "{sql}: the two clients parse it differently"
        );
    }
}

/// What sequence functions and setseed leave in a session is not the next client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_and_the_random_seed_are_not_left_to_the_next_client() {
    let db = TestDb::create("iso_leftovers").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    make_table(&rg, &db).await;
    let a = rg.client("web", &db).await;
    let b = rg.client("web", &db).await;
    a.query_one("SELECT nextval('counter')", &[]).await.unwrap();
    let e = b
        .query_one("SELECT currval('counter')", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");
    let e = b.query_one("SELECT lastval()", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");
    // (A's own value is A's: through rolegate it needs the same transaction.)
    let seeded: f64 = a
        .query_one("SELECT random() FROM (SELECT setseed(0.5)) s", &[])
        .await
        .unwrap()
        .get(0);
    a.query_one("SELECT setseed(0.5)", &[]).await.unwrap();
    let next: f64 = b.query_one("SELECT random()", &[]).await.unwrap().get(0);
    assert_ne!(next, seeded, "B's random() follows A's seed");
}

/// One client's prepared statements are bounded: past the bound it gets PostgreSQL's
/// kind of error (54000), its session goes on, and nobody else notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_prepared_statements_are_bounded() {
    let db = TestDb::create("iso_bounds").await;
    let options = Options {
        extra: "[pool]\nmode = \"transaction\"\nsize = 1\nmax_client_prepared_statements = 5\n\
                max_client_prepared_bytes = 100000\n"
            .into(),
        ..Options::default()
    };
    let rg = Rolegate::start_with(&db, options).await;
    let a = rg.client("web", &db).await;
    let b = rg.client("web", &db).await;
    let mut kept = Vec::new();
    for i in 0..5 {
        kept.push(a.prepare(&format!("SELECT {i}")).await.unwrap());
    }
    let e = a.prepare("SELECT 5").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("54000"), "{e}");
    let big = format!("SELECT '{}'", "x".repeat(200_000));
    let e = b.prepare(&big).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("54000"), "{e}");
    let n: i32 = a.query_one(&kept[4], &[]).await.unwrap().get(0);
    assert_eq!(n, 4);
    assert_eq!(
        b.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );
}

async fn setting(client: &tokio_postgres::Client, name: &str) -> Option<String> {
    client
        .query_one("SELECT current_setting($1, true)", &[&name])
        .await
        .unwrap()
        .get(0)
}
