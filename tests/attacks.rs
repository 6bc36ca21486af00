//! Attacks on rolegate's isolation guarantees (issues 19 and 20): each one that breaks a
//! guarantee asserts the correct behaviour and is `#[ignore = "attack: …"]` until fixed.

mod support;

use std::time::Duration;

use bytes::BufMut;

use support::*;

fn pooled(size: usize) -> Options {
    Options {
        extra: format!("[pool]\nmode = \"transaction\"\nsize = {size}\n"),
        ..Options::default()
    }
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
/// its own B gets 55000 "lastval is not yet defined in this session"). `currval` of the
/// table's sequence and `COPY orders (who) FROM STDIN` leak the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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

fn query(out: &mut bytes::BytesMut, sql: &str) {
    rolegate::wire::put_query(out, sql);
}

fn put_frame(out: &mut bytes::BytesMut, tag: u8, body: &[u8]) {
    rolegate::wire::put_message(out, tag, body);
}

/// What a victim gets for `SELECT 'victim <n>', current_user::text` on its own: each
/// answer must be its own row, no error, no extra rows.
async fn victim_answers(port: u16, db: &TestDb, rounds: usize) -> Result<(), String> {
    let (name, owner) = (db.name.clone(), db.owner.clone());
    match tokio::spawn(victim_rounds(port, name, owner, rounds)).await {
        Ok(result) => result,
        Err(e) => Err(format!("victim failed: {e}")),
    }
}

async fn victim_rounds(port: u16, db: String, owner: String, rounds: usize) -> Result<(), String> {
    let mut victim = RawClient::login(port, "web", "web-pw", &db).await;
    for n in 0..rounds {
        let mut out = bytes::BytesMut::new();
        query(
            &mut out,
            &format!("SELECT 'victim {n}', current_user::text"),
        );
        victim.send(&out).await;
        let mut rows = Vec::new();
        let mut errors = Vec::new();
        loop {
            let Some((tag, body)) = victim.read().await else {
                return Err(format!("round {n}: connection closed; rows {rows:?}"));
            };
            match tag {
                b'D' => rows.push(String::from_utf8_lossy(&body).into_owned()),
                b'E' => errors.push(rolegate::wire::error_fields(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        let expected = format!("victim {n}");
        if !errors.is_empty()
            || rows.len() != 1
            || !rows[0].contains(&expected)
            || !rows[0].contains(&owner)
        {
            return Err(format!("round {n}: rows {rows:?} errors {errors:?}"));
        }
    }
    Ok(())
}

/// The raw messages of one protocol attack, sent in one write by client A.
fn protocol_attack(name: &str) -> bytes::BytesMut {
    let mut out = bytes::BytesMut::new();
    let copy_row = b"1000\tA-secret\n";
    match name {
        // A Sync inside COPY IN is ignored by the server: one ReadyForQuery fewer.
        "sync_inside_simple_copy" => {
            query(&mut out, "COPY items FROM STDIN");
            put_frame(&mut out, b'S', b"");
            put_frame(&mut out, b'd', copy_row);
            put_frame(&mut out, b'c', b"");
            query(&mut out, "SELECT 'A-secret'");
        }
        "sync_before_copydata_extended" => {
            extended(&mut out, "COPY items FROM STDIN", &[]);
            put_frame(&mut out, b'S', b"");
            put_frame(&mut out, b'd', copy_row);
            put_frame(&mut out, b'c', b"");
            put_frame(&mut out, b'S', b"");
            query(&mut out, "SELECT 'A-secret'");
        }
        "bad_copydata_extended_then_stray" => {
            extended(&mut out, "COPY items FROM STDIN", &[]);
            put_frame(&mut out, b'd', b"not a number\tx\n");
            put_frame(&mut out, b'c', b"");
            put_frame(&mut out, b'S', b"");
            put_frame(&mut out, b'c', b"");
            put_frame(&mut out, b'd', copy_row);
            query(&mut out, "SELECT 'A-secret'");
        }
        "error_then_query_before_sync" => {
            extended(&mut out, "SELECT 1/0", &[]);
            query(&mut out, "SELECT 'A-secret'");
            put_frame(&mut out, b'S', b"");
        }
        "query_inside_extended_batch" => {
            extended(&mut out, "SELECT 'A-secret-1'", &[]);
            query(&mut out, "SELECT 'A-secret-2'");
            extended(&mut out, "SELECT 'A-secret-3'", &[]);
            put_frame(&mut out, b'S', b"");
        }
        "copy_in_query_then_copyfail_sync" => {
            query(&mut out, "COPY items FROM STDIN");
            put_frame(&mut out, b'f', b"abort\0");
            put_frame(&mut out, b'S', b"");
            put_frame(&mut out, b'f', b"again\0");
            query(&mut out, "SELECT 'A-secret'");
        }
        "copy_out_extended_row_limit" => {
            parse(
                &mut out,
                "",
                "COPY (SELECT 'A-secret' FROM generate_series(1,3)) TO STDOUT",
            );
            let mut bind = bytes::BytesMut::new();
            bind.extend_from_slice(b"\0\0\0\0\0\0\0\0");
            put_frame(&mut out, b'B', &bind);
            put_frame(&mut out, b'E', b"\0\0\0\0\x01");
            put_frame(&mut out, b'H', b"");
            put_frame(&mut out, b'S', b"");
            put_frame(&mut out, b'S', b"");
        }
        "flush_only_then_sleep" => {
            extended(&mut out, "SELECT pg_sleep(0.3), 'A-secret'", &[]);
            put_frame(&mut out, b'H', b"");
        }
        "two_copies_in_one_query" => {
            query(&mut out, "COPY items FROM STDIN; COPY items FROM STDIN");
            put_frame(&mut out, b'd', copy_row);
            put_frame(&mut out, b'c', b"");
            put_frame(&mut out, b'd', b"1001\tA-secret\n");
            put_frame(&mut out, b'c', b"");
        }
        "copy_both_names" => {
            query(&mut out, "COPY items FROM STDIN; SELECT 'A-secret'");
            put_frame(&mut out, b'c', b"");
            put_frame(&mut out, b'c', b"");
            put_frame(&mut out, b'S', b"");
        }
        "huge_copydata_half_sent" => {
            query(&mut out, "COPY items FROM STDIN");
            let row = b"2000\tA-secret\n".repeat(6 << 20 >> 4);
            put_frame(&mut out, b'd', &row);
            out.truncate(out.len() / 2);
        }
        "huge_query_then_copydata" => {
            query(&mut out, &format!("SELECT '{}'", "A".repeat(900_000)));
            query(&mut out, "COPY items FROM STDIN");
            let row = b"3000\tA-secret\n".repeat(6 << 20 >> 4);
            put_frame(&mut out, b'd', &row);
            put_frame(&mut out, b'c', b"");
        }
        "half_header" => {
            query(&mut out, "SELECT 'A-secret'");
            out.extend_from_slice(b"Q\0\0");
        }
        other => panic!("no attack {other}"),
    }
    out
}

const PROTOCOL_ATTACKS: &[&str] = &[
    "sync_inside_simple_copy",
    "sync_before_copydata_extended",
    "bad_copydata_extended_then_stray",
    "error_then_query_before_sync",
    "query_inside_extended_batch",
    "copy_in_query_then_copyfail_sync",
    "copy_out_extended_row_limit",
    "flush_only_then_sleep",
    "two_copies_in_one_query",
    "copy_both_names",
    "huge_copydata_half_sent",
    "huge_query_then_copydata",
    "half_header",
];

/// Held: after each pipelined protocol oddity (Sync or a Query inside COPY IN, stray
/// CopyDone/CopyData/CopyFail, a Query inside an extended batch, Flush without Sync,
/// huge and half-sent frames) and an abrupt disconnect, the next client on the same
/// backend session gets exactly its own answers. (While A stays connected, the
/// ambiguous ones keep A's backend session: a pool-wide wait, not a crossing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_oddities_then_an_abrupt_leave_never_reach_the_next_client() {
    let db = TestDb::create("att_proto").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    rg.client("migrate", &db)
        .await
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, owner text)")
        .await
        .unwrap();
    let mut crossed = Vec::new();
    for name in PROTOCOL_ATTACKS {
        let mut attacker = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
        attacker.send(&protocol_attack(name)).await;
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(150), attacker.read()).await
        {}
        drop(attacker);
        if let Err(e) = victim_answers(rg.port, &db, 2).await {
            crossed.push(format!("{name}: {e}"));
        }
    }
    assert!(crossed.is_empty(), "{crossed:#?}\n{}", rg.log_text());
}

/// A's `SET client_encoding` stays on the backend session when B borrows it, and
/// rolegate gives B its settings in one Query that the server decodes in A's encoding:
/// B's `app.tenant = 'Zürich'` becomes `ZÃ¼rich` (LATIN1) or `Z端rich` (EUC_JP), a
/// tenant of someone else's choosing under row-level security, and stays so on that
/// backend session (rolegate believes it applied B's value); a value the encoding cannot
/// hold (`😀` in EUC_JP) fails B's transaction with 08006 instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_encoding_of_another_client_garbles_settings() {
    let db = TestDb::create("att_enc").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let mut wrong = Vec::new();
    for (encoding, tenant) in [("LATIN1", "Zürich"), ("EUC_JP", "Zürich"), ("EUC_JP", "😀")] {
        let b = rg.client("web", &db).await;
        let a = rg.client("web", &db).await;
        b.batch_execute(&format!("SET app.tenant = '{tenant}'"))
            .await
            .unwrap();
        a.batch_execute(&format!("SET client_encoding = '{encoding}'"))
            .await
            .unwrap();
        let seen = b
            .query_one("SELECT current_setting('app.tenant')", &[])
            .await
            .map(|row| row.get::<_, String>(0))
            .map_err(|e| format!("{:?} {}", sqlstate(&e), message(&e)));
        if seen.as_deref() != Ok(tenant) {
            wrong.push(format!("A {encoding}, B {tenant}: B saw {seen:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// In transaction mode a Bind is renamed (its statement has rolegate's name on the
/// server), which once meant reading it whole into memory, twice over: one client's
/// 200 MiB Bind (PostgreSQL takes up to 1 GiB, and so does rolegate's default
/// `max_message_bytes`) cost about 400 MiB, so a handful of clients sending large
/// parameters at once could exhaust the host. Only the Bind's head (portal and statement
/// names) is held now; the parameters pass through. Unnamed and named statements alike,
/// and the server gets every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bind_is_not_held_in_memory() {
    let db = TestDb::create("att_mem").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let before = peak_rss_mib(rg.pid());
    let mut attacker = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let big = vec![b'x'; 200 << 20];
    for name in ["", "s_big"] {
        let mut out = bytes::BytesMut::new();
        parse(&mut out, name, "SELECT length($1::text)");
        bind_execute(&mut out, name, &[(0, &big)]);
        put_frame(&mut out, b'S', b"");
        attacker.send(&out).await;
        drop(out);
        assert_eq!(
            attacker.data_values().await,
            [(200 << 20).to_string()],
            "statement {name:?}: the server got the whole parameter"
        );
    }
    let after = peak_rss_mib(rg.pid());
    assert!(
        after < before + 100,
        "rolegate's peak memory grew from {before} MiB to {after} MiB for 200 MiB Binds"
    );
}

/// Held: functions the owner wrote (rolegate cannot look into them) that reset the role,
/// turn read-only off or set a tenant leave nothing for the next client of the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unseen_functions_leave_nothing_for_the_next_client() {
    let db = TestDb::create("att_unseen").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    rg.client("migrate", &db)
        .await
        .batch_execute(
            "CREATE FUNCTION drop_role() RETURNS text LANGUAGE sql
               AS $$ SELECT set_config('role', 'none', false) $$;
             CREATE FUNCTION read_write() RETURNS text LANGUAGE sql
               AS $$ SELECT set_config('default_transaction_read_only', 'off', false) $$;
             CREATE FUNCTION tenant() RETURNS text LANGUAGE sql
               AS $$ SELECT set_config('app.tenant', 'acme', false) $$;",
        )
        .await
        .unwrap();
    let check = "SELECT current_user::text, current_setting('default_transaction_read_only'), \
                 coalesce(current_setting('app.tenant', true), '')";
    for (class_user, call, read_only) in [
        ("web", "SELECT drop_role()", "off"),
        ("web", "SELECT tenant()", "off"),
        ("analyst", "SELECT read_write()", "on"),
    ] {
        let attacker = rg.client(class_user, &db).await;
        attacker.batch_execute(call).await.unwrap();
        let victim = rg.client(class_user, &db).await;
        let row = victim.query_one(check, &[]).await.unwrap();
        let seen: (String, String, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(
            seen,
            (db.owner.clone(), read_only.to_owned(), String::new()),
            "after another client's {call}"
        );
    }
}

/// A client that starts with `options=-c seed=0.5` has its seed set by rolegate on every
/// backend session it borrows (a startup setting), but the lease is not marked as having
/// set the seed, so rolegate does not reseed before lending the session: the next client's
/// `random()` is exactly the sequence after `setseed(0.5)`, known to A in advance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_seed_decides_another_clients_random() {
    let db = TestDb::create("att_seed").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let direct = admin("postgres").await;
    direct.batch_execute("SELECT setseed(0.5)").await.unwrap();
    let mut known = Vec::new();
    for _ in 0..3 {
        known.push(
            direct
                .query_one("SELECT random()", &[])
                .await
                .unwrap()
                .get::<_, f64>(0),
        );
    }
    let a = connect_url(&format!(
        "{} options='-c seed=0.5'",
        rg.url("web", "web-pw", &db.name)
    ))
    .await
    .unwrap();
    a.batch_execute("SELECT 1").await.unwrap();
    let b = rg.client("web", &db).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(
            b.query_one("SELECT random()", &[])
                .await
                .unwrap()
                .get::<_, f64>(0),
        );
    }
    assert_ne!(
        seen, known,
        "B's random() is the sequence A chose with its startup seed"
    );
}

/// The text `'now'::timestamptz` is read when it is parsed: B's prepared statement of it
/// answers the moment A prepared the same text, not B's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known difference (README): a server-side statement folds 'now' when it is first prepared, by whichever client"]
async fn prepared_now_of_another_client() {
    let db = TestDb::create("att_now").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let text = "SELECT 'now'::timestamptz::text";
    let a = rg.client("web", &db).await;
    let of_a = prepared_answers(&a, &[text]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let b = rg.client("web", &db).await;
    let before_b = simple_answers(&b, &[text]).await;
    let of_b = prepared_answers(&b, &[text]).await;
    assert!(
        of_b[0] >= before_b[0],
        "B prepared after {before_b:?} and got {of_b:?}, A's moment {of_a:?}"
    );
}

fn sync(out: &mut bytes::BytesMut) {
    put_frame(out, b'S', b"");
}

fn close_statement(out: &mut bytes::BytesMut, name: &str) {
    let mut body = b"S".to_vec();
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    put_frame(out, b'C', &body);
}

/// `current_user` as the client sees it.
async fn current_user(client: &mut RawClient) -> String {
    let mut out = bytes::BytesMut::new();
    query(&mut out, "SELECT current_user::text");
    client.send(&out).await;
    client.data_values().await.join(",")
}

/// A statement name that holds DISCARD ALL on the server keeps its check however
/// rolegate is told the name changed when the server did not change it: a second Parse
/// of the name (42P05), a Close or a simple Query that an earlier error made the server
/// skip. Each batch is sent after the one before was answered. The check is what a user
/// sees: anything after DISCARD ALL's Execute before Sync is refused (25001), as rolegate
/// must set the role again right after it (PostgreSQL keeps the role too, as rolegate
/// passes it at startup: this is the first of the two lines). On the code before this
/// test, the Bind ran unchecked and the pipeline after it went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_holds_discard_all_keeps_its_check() {
    let db = TestDb::create("att_discard_name").await;
    for (mode, options) in [("session", Options::default()), ("transaction", pooled(1))] {
        let rg = Rolegate::start_with(&db, options).await;
        let then_more = |out: &mut bytes::BytesMut, name: &str| {
            bind_execute(out, name, &[]);
            extended(out, "SELECT current_user", &[]);
            sync(out);
        };
        let mut attacks: Vec<(&str, Vec<bytes::BytesMut>)> = Vec::new();
        let (mut a, mut b, mut c) = Default::default();
        parse(&mut a, "s_discard", "DISCARD ALL");
        sync(&mut a);
        parse(&mut b, "s_discard", "SELECT 1");
        sync(&mut b);
        then_more(&mut c, "s_discard");
        attacks.push(("a failed second Parse", vec![a, b, c]));
        let (mut a, mut b, mut c) = Default::default();
        parse(&mut a, "s_discard", "DISCARD ALL");
        sync(&mut a);
        extended(&mut b, "SELECT 1 / 0", &[]);
        close_statement(&mut b, "s_discard");
        sync(&mut b);
        then_more(&mut c, "s_discard");
        attacks.push(("a skipped Close", vec![a, b, c]));
        if mode == "session" {
            // (Transaction mode re-parses the unnamed statement from its own record.)
            let (mut a, mut b, mut c) = Default::default();
            parse(&mut a, "", "DISCARD ALL");
            sync(&mut a);
            parse(&mut b, "s_fail", "SELECT 1 / 0");
            bind_execute(&mut b, "s_fail", &[]);
            query(&mut b, "SELECT 1");
            sync(&mut b);
            then_more(&mut c, "");
            attacks.push(("a skipped Query", vec![a, b, c]));
        }
        for (attack, batches) in attacks {
            let mut client = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
            let role = current_user(&mut client).await;
            let mut last_errors = Vec::new();
            for batch in batches {
                client.send(&batch).await;
                last_errors = client.until_ready().await.1;
            }
            let codes: Vec<&str> = last_errors
                .iter()
                .flatten()
                .filter(|(field, _)| *field == b'C')
                .map(|(_, code)| code.as_str())
                .collect();
            assert_eq!(
                codes,
                ["25001"],
                "{mode} mode, {attack}: what follows DISCARD ALL is refused"
            );
            assert_eq!(
                current_user(&mut client).await,
                role,
                "{mode} mode, {attack}: the session keeps its role"
            );
        }
    }
}

// From the outside attack review of the named-statement work (issue 20): the first three
// broke a guarantee before they were fixed (a text in bytes the client encoding does not
// allow fails before PostgreSQL drops anything; a function that runs DEALLOCATE ALL left
// rolegate's list of prepared statements stale for the next client).

/// Parse of `name` with raw (possibly non-UTF-8) text bytes.
fn parse_bytes(out: &mut bytes::BytesMut, name: &str, sql: &[u8]) {
    let mut body = bytes::BytesMut::new();
    body.put_slice(name.as_bytes());
    body.put_u8(0);
    body.put_slice(sql);
    body.put_u8(0);
    body.put_i16(0);
    rolegate::wire::put_message(out, b'P', &body);
}

fn codes(errors: &[Vec<(u8, String)>]) -> Vec<String> {
    errors
        .iter()
        .flatten()
        .filter(|(field, _)| *field == b'C')
        .map(|(_, code)| code.clone())
        .collect()
}

async fn batch(client: &mut RawClient, out: bytes::BytesMut) -> (Vec<u8>, Vec<String>) {
    client.send(&out).await;
    let (tags, errors) = client.until_ready().await;
    (tags, codes(&errors))
}

/// Session mode: the unnamed statement holds DISCARD ALL; `not_utf8` (a Parse or Query of
/// the unnamed statement whose text is not valid UTF-8) fails with 22021 before PostgreSQL
/// drops anything; then the pipeline after DISCARD ALL's Execute must still be refused.
async fn discard_all_check_survives(name: &str, not_utf8: bytes::BytesMut) {
    let db = TestDb::create(name).await;
    let rg = Rolegate::start_with(&db, Options::default()).await;
    let mut client = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut a = bytes::BytesMut::new();
    parse(&mut a, "", "DISCARD ALL");
    sync(&mut a);
    let (_, errs) = batch(&mut client, a).await;
    assert!(errs.is_empty(), "{errs:?}");
    let (_, errs) = batch(&mut client, not_utf8).await;
    assert_eq!(errs, ["22021"], "the server refuses the text's encoding");
    let mut c = bytes::BytesMut::new();
    bind_execute(&mut c, "", &[]);
    extended(&mut c, "SELECT current_user", &[]);
    sync(&mut c);
    let (tags, errs) = batch(&mut client, c).await;
    assert_eq!(
        errs,
        ["25001"],
        "what follows DISCARD ALL in the pipeline is refused (tags {:?})",
        String::from_utf8_lossy(&tags)
    );
}

/// rolegate counted a Parse of the unnamed statement first in its batch as certain to
/// replace it (and so to end a DISCARD ALL check); PostgreSQL reads and verifies the
/// text's encoding (pq_getmsgstring) before it drops the unnamed statement, and the policy
/// read the bytes as Latin-1 and let the SELECT through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_discard_all_check_survives_encoding_error_parse() {
    let mut b = bytes::BytesMut::new();
    parse_bytes(&mut b, "", b"SELECT '\xff'");
    sync(&mut b);
    discard_all_check_survives("rev_enc", b).await;
}

/// Same with a simple Query (counted as certain too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_discard_all_check_survives_encoding_error_query() {
    let mut b = bytes::BytesMut::new();
    rolegate::wire::put_message(&mut b, b'Q', b"SELECT '\xff'\0");
    discard_all_check_survives("rev_encq", b).await;
}

/// Bind and Execute of statement `name`, Sync: its values (panics on an error).
async fn runs_statement(client: &mut RawClient, name: &str) -> Vec<String> {
    let mut out = bytes::BytesMut::new();
    bind_execute(&mut out, name, &[]);
    sync(&mut out);
    client.send(&out).await;
    client.data_values().await
}

/// Transaction mode, pool of one: client A calls a (database) function that runs
/// DEALLOCATE ALL, which rolegate cannot see. B's statement must still answer (B got 26000
/// before the fix: rolegate's list of what the backend connection had prepared was
/// stale). Then A parses a second text under a name whose statement has B's text: the
/// server may accept it (it was deallocated), and B must still run its own text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_that_deallocates_all_never_reaches_another_client() {
    let db = TestDb::create("rev_dealloc").await;
    let admin = admin(&db.name).await;
    admin
        .batch_execute(
            "CREATE FUNCTION public.dealloc() RETURNS int LANGUAGE plpgsql AS \
             $$BEGIN EXECUTE 'DEALLOCATE ALL'; RETURN 1; END$$",
        )
        .await
        .unwrap();
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let mut b = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut a = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    for (client, name) in [(&mut b, "b"), (&mut a, "a")] {
        let mut out = bytes::BytesMut::new();
        parse(&mut out, name, "SELECT 'victim'::text");
        sync(&mut out);
        let (_, errs) = batch(client, out).await;
        assert!(errs.is_empty(), "{errs:?}");
    }
    let mut out = bytes::BytesMut::new();
    query(&mut out, "SELECT public.dealloc()");
    let (_, errs) = batch(&mut a, out).await;
    assert!(errs.is_empty(), "{errs:?}");
    assert_eq!(runs_statement(&mut b, "b").await, ["victim"]);
    let mut out = bytes::BytesMut::new();
    query(&mut out, "SELECT public.dealloc()");
    batch(&mut a, out).await;
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "a", "SELECT 'attacker'::text");
    sync(&mut out);
    batch(&mut a, out).await;
    assert_eq!(runs_statement(&mut b, "b").await, ["victim"]);
}

/// A large Bind (>= 64 KiB, sent in pieces) of a statement whose set_config name is
/// bound: the name is still judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bind_of_set_config_is_judged() {
    let db = TestDb::create("rev_bigbind").await;
    for options in [pooled(1), Options::default()] {
        let rg = Rolegate::start_with(&db, options).await;
        let mut client = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
        let mut out = bytes::BytesMut::new();
        parse(
            &mut out,
            "sc",
            "SELECT set_config($1, 'none', false), length($2)",
        );
        sync(&mut out);
        let (_, errs) = batch(&mut client, out).await;
        assert!(errs.is_empty(), "{errs:?}");
        let big = vec![b'x'; 200_000];
        let mut out = bytes::BytesMut::new();
        bind_execute(&mut out, "sc", &[(0, b"role"), (0, &big)]);
        sync(&mut out);
        for piece in out.chunks(20).take(3) {
            client.send(piece).await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        client.send(&out[60..]).await;
        let (_, errors) = client.until_ready().await;
        assert_eq!(
            codes(&errors),
            ["42501"],
            "a bound set_config('role', ...) is refused"
        );
    }
}

/// Transaction mode: a pipeline that prepares a statement, starts COPY FROM STDIN in the
/// same batch, sends the copy data and then uses the statement, all in one write, must
/// not hang (frames naming the statement wait for the first batch's answer, which itself
/// waits for the copy data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_copy_then_named_statement_does_not_hang() {
    let db = TestDb::create("rev_copy").await;
    let admin = admin(&db.name).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE public.t (x text); ALTER TABLE public.t OWNER TO \"{}\"",
            db.owner
        ))
        .await
        .unwrap();
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    let mut client = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "s", "SELECT count(*)::text FROM public.t");
    extended(&mut out, "COPY public.t FROM STDIN", &[]);
    sync(&mut out);
    rolegate::wire::put_message(&mut out, b'd', b"a\n");
    rolegate::wire::put_message(&mut out, b'c', b"");
    bind_execute(&mut out, "s", &[]);
    sync(&mut out);
    client.send(&out).await;
    // (The Sync inside COPY is ignored by PostgreSQL: one ReadyForQuery, at the end.)
    let (tags1, errs1) = client.until_ready().await;
    eprintln!("{:?} {errs1:?}", String::from_utf8_lossy(&tags1));
    let mut out = bytes::BytesMut::new();
    query(&mut out, "SELECT 'alive'");
    client.send(&out).await;
    assert_eq!(client.data_values().await, ["alive"]);
}

/// Held: a client that leaves right after calling a function rolegate cannot look into
/// (it took a session advisory lock), before rolegate asked the server whether anything
/// is left, does not leave the lock to the next client of the backend session. The query
/// goes with the first bytes of a Terminate, so the lease is not given back when its
/// answer arrives (the client is in the middle of a message); the rest ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_by_an_unseen_function_does_not_outlive_its_client() {
    let db = TestDb::create("att_unseen_lock").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    rg.client("migrate", &db)
        .await
        .batch_execute(
            "CREATE FUNCTION hold_lock() RETURNS text LANGUAGE sql
               AS $$ SELECT pg_advisory_lock(4242)::text $$",
        )
        .await
        .unwrap();
    let held = || async {
        admin("postgres")
            .await
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let mut attacker = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_query(&mut out, "SELECT hold_lock()");
    out.extend_from_slice(&[b'X', 0, 0]);
    attacker.send(&out).await;
    let (tags, errors) = attacker.until_ready().await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(tags.contains(&b'D'), "{tags:?}");
    assert_eq!(held().await, 1, "the function took the lock");
    attacker.send(&[0, 4]).await;
    assert!(
        attacker.read().await.is_none(),
        "Terminate ends the session"
    );
    // Given back reset, or closed: either way the lock is gone.
    let mut left = 1;
    for _ in 0..50 {
        left = held().await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        left, 0,
        "the backend session went back to the pool still holding the client's lock"
    );
    let victim = rg.client("web", &db).await;
    let free: bool = admin("postgres")
        .await
        .query_one("SELECT pg_try_advisory_lock(4242)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(free);
    victim.batch_execute("SELECT 1").await.unwrap();
}

/// Held: rolegate's question whether anything is left in a pinned client's backend
/// session runs with the client's search_path; a schema that puts its own `+` (always 0)
/// before pg_catalog does not make a LISTEN look gone, so the session does not go to the
/// next client with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadowed_operator_does_not_hide_a_pin() {
    let db = TestDb::create("att_shadow").await;
    let rg = Rolegate::start_with(&db, pooled(1)).await;
    rg.client("migrate", &db)
        .await
        .batch_execute(
            "CREATE SCHEMA shadow;
             CREATE FUNCTION shadow.zero(bigint, bigint) RETURNS bigint LANGUAGE sql
               AS $$ SELECT 0::bigint $$;
             CREATE OPERATOR shadow.+ (LEFTARG = bigint, RIGHTARG = bigint,
               FUNCTION = shadow.zero);",
        )
        .await
        .unwrap();
    let attacker = rg.client("web", &db).await;
    let victim = rg.client("web", &db).await;
    attacker
        .batch_execute("SET search_path = shadow, pg_catalog")
        .await
        .unwrap();
    let shadowed: i64 = attacker
        .query_one("SELECT 1::bigint + 1::bigint", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shadowed, 0, "the schema's + comes first for this client");
    // Pinned by a LISTEN; the UNLISTEN of another channel makes rolegate ask.
    attacker.batch_execute("LISTEN kept").await.unwrap();
    attacker.batch_execute("UNLISTEN other").await.unwrap();
    let seen = tokio::time::timeout(
        Duration::from_secs(3),
        victim.query_one("SELECT count(*) FROM pg_listening_channels()", &[]),
    )
    .await;
    // Still pinned: the one backend session stays with the attacker (the victim waits
    // for it), or the victim's session listens to nothing.
    if let Ok(row) = seen {
        let channels: i64 = row.unwrap().get(0);
        assert_eq!(channels, 0, "the next client inherited the LISTEN");
    }
    drop(attacker);
}

/// `user` logged in while the login role is a member of the owner role, which is then
/// revoked: the session's role cannot be set again.
async fn logged_in_then_role_revoked(rg: &Rolegate, db: &TestDb, user: &str) -> RawClient {
    let admin = admin("postgres").await;
    let membership = format!("\"{}\" TO \"{}\"", db.owner, db.login);
    admin
        .batch_execute(&format!("GRANT {membership}"))
        .await
        .unwrap();
    let client = RawClient::login(rg.port, user, password_of(user), &db.name).await;
    let membership = format!("\"{}\" FROM \"{}\"", db.owner, db.login);
    admin
        .batch_execute(&format!("REVOKE {membership}"))
        .await
        .unwrap();
    client
}

/// When the role cannot be set again after DISCARD ALL (the login lost its membership
/// in the owner role), the session ends with FATAL 08006, and nothing that ran after
/// it, as the login role, reaches the client: not even when its reply arrives in one
/// read with rolegate's own failed SET ROLE and a refusal's marker (session and
/// transaction mode, 10 sessions each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_ran_after_the_role_was_lost_never_reaches_the_client() {
    for (name, options) in [
        ("role_lost", Options::default()),
        ("role_lost_pool", pooled(2)),
    ] {
        let db = TestDb::create(name).await;
        let rg = Rolegate::start_with(&db, options).await;
        for attempt in 0..10 {
            let mut client = logged_in_then_role_revoked(&rg, &db, "web").await;
            let mut out = bytes::BytesMut::new();
            query(&mut out, "DISCARD ALL");
            query(&mut out, "SELECT 'ran as ' || current_user");
            query(&mut out, "CREATE TABLE refused (id int)");
            client.send(&out).await;
            let mut last = None;
            while let Some((tag, body)) = client.read().await {
                assert_ne!(
                    tag,
                    b'D',
                    "{name} attempt {attempt}: a row from after the failed restore of the role: {}",
                    String::from_utf8_lossy(&body)
                );
                last = Some((tag, body));
            }
            let (tag, body) = last.expect("an answer");
            assert_fatal(tag, &body, "08006", name);
        }
        // Nor does it run: a migrator's statement sent right behind DISCARD ALL would
        // create a table owned by the login role, which rotation drops. (The login may
        // create in `public` of its own, so only the role decides.)
        admin(&db.name)
            .await
            .batch_execute(&format!(
                "GRANT CREATE ON SCHEMA public TO \"{}\"",
                db.login
            ))
            .await
            .unwrap();
        let mut migrator = logged_in_then_role_revoked(&rg, &db, "migrate").await;
        let mut out = bytes::BytesMut::new();
        query(&mut out, "DISCARD ALL");
        query(&mut out, "CREATE TABLE made_by_the_login (id int)");
        migrator.send(&out).await;
        let mut last = None;
        while let Some(message) = migrator.read().await {
            last = Some(message);
        }
        let (tag, body) = last.expect("an answer");
        assert_fatal(tag, &body, "08006", name);
        let created: bool = admin(&db.name)
            .await
            .query_one("SELECT to_regclass('made_by_the_login') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            !created,
            "{name}: the migrator's CREATE ran without the owner role"
        );
    }
}

/// A function that switches the session to an encoding rolegate cannot judge in ends
/// the session with FATAL 08006, written between frames: a large row that came before
/// the switch reaches the client whole, never cut off by the FATAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoding_switch_ends_the_session_between_frames() {
    let db = TestDb::create("encoding_cut").await;
    let rg = Rolegate::start(&db).await;
    rg.client("migrate", &db)
        .await
        .batch_execute(
            "CREATE FUNCTION to_sjis() RETURNS text LANGUAGE sql \
             AS $$ SELECT set_config('client_encoding', 'SJIS', false) $$",
        )
        .await
        .unwrap();
    let mut client = RawClient::login(rg.port, "web", password_of("web"), &db.name).await;
    let mut out = bytes::BytesMut::new();
    query(&mut out, "SELECT repeat('x', 1000000) AS big, to_sjis()");
    client.send(&out).await;
    let mut messages = Vec::new();
    while let Some((tag, body)) = client.read().await {
        if tag == b'D' {
            assert!(
                body.len() > 1_000_000,
                "a row cut short: {} bytes",
                body.len()
            );
        }
        messages.push((tag, body));
    }
    let (tag, body) = messages.last().expect("an answer");
    let tags: Vec<char> = messages.iter().map(|(t, _)| *t as char).collect();
    assert_fatal(*tag, body, "08006", &format!("after {tags:?}"));
}
