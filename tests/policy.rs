//! The statement policy through a live rolegate and a real cluster.

mod support;

use support::*;

/// A rolegate in session mode, or (`pool`) in transaction mode with two backend sessions
/// per pool: every policy test runs both ways.
async fn start(db: &TestDb, pool: bool, mut options: Options) -> Rolegate {
    if pool {
        options
            .extra
            .push_str("\n[pool]\nmode = \"transaction\"\nsize = 2\n");
    }
    Rolegate::start_with(db, options).await
}

macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod session_mode {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(false).await
                }
            )*
        }
        mod transaction_mode {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(true).await
                }
            )*
        }
    };
}

/// Tables, a function and a procedure for the corpus to work on, made by the migrator.
async fn fixture(rg: &Rolegate, db: &TestDb) {
    rg.client("migrate", db)
        .await
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text, qty int DEFAULT 0);
             INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2);
             CREATE SEQUENCE seq;
             CREATE FUNCTION add_one(int) RETURNS int LANGUAGE sql AS 'SELECT $1 + 1';
             CREATE PROCEDURE noop() LANGUAGE sql AS 'SELECT 1';",
        )
        .await
        .expect("corpus fixture");
}

async fn corpus_verdicts_hold_for_every_class_and_protocol(pool: bool) {
    let db = TestDb::create("corpus").await;
    let rg = start(&db, pool, Options::default()).await;
    fixture(&rg, &db).await;
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/policy.txt");
    let (ok, out, err) = python(
        "policy_corpus.py",
        &[
            corpus,
            &cluster().admin_url(&db.name),
            &rg.port.to_string(),
            &db.name,
            &db.owner,
        ],
    )
    .await;
    assert!(ok, "corpus mismatches:\n{out}\n{err}");
    assert!(out.contains(" 0 failed"), "{out}");
    // Every refusal was audited: user, class, kind and fingerprint, never the text.
    let log = rg.log_text();
    assert!(log.contains("statement refused"), "{log}");
    assert!(
        !log.contains("drop table items"),
        "statement text leaked into the log"
    );
}

async fn a_refusal_says_what_and_why_and_the_session_goes_on(pool: bool) {
    let db = TestDb::create("refusal").await;
    let rg = start(&db, pool, Options::default()).await;
    let web = rg.client("web", &db).await;
    let err = web
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap_err();
    let db_error = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_error.code().code(), "42501");
    assert_eq!(db_error.severity(), "ERROR");
    assert_eq!(
        db_error.message(),
        "rolegate: DDL is not allowed for app clients (CREATE TABLE)"
    );
    assert!(db_error.hint().unwrap_or_default().contains("migrator"));
    // Same session, next statement.
    let row = web
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), db.owner);
    // Extended protocol: refused at Parse.
    let err = web.prepare("DROP TABLE nothing").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
    web.query_one("SELECT 1", &[]).await.unwrap();
}

async fn a_refusal_inside_a_transaction_fails_the_transaction(pool: bool) {
    let db = TestDb::create("txfail").await;
    let rg = start(&db, pool, Options::default()).await;
    fixture(&rg, &db).await;
    let web = rg.client("web", &db).await;
    web.batch_execute("BEGIN").await.unwrap();
    web.batch_execute("INSERT INTO items VALUES (77, 'tx', 1)")
        .await
        .unwrap();
    let err = web.batch_execute("DROP TABLE items").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
    // As after any error, the transaction is aborted: COMMIT rolls back.
    let err = web.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"));
    web.batch_execute("COMMIT").await.unwrap();
    let n: i64 = web
        .query_one("SELECT count(*) FROM items WHERE id = 77", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 0,
        "the insert before the refused statement must not commit"
    );
}

async fn the_grammar_follows_the_servers_standard_conforming_strings(pool: bool) {
    let db = TestDb::create("scs").await;
    let rg = start(&db, pool, Options::default()).await;
    fixture(&rg, &db).await;
    let web = rg.client("web", &db).await;
    // With standard_conforming_strings on, this is a SELECT and a DROP: refused.
    let tricky = r"SELECT 'a\'; DROP TABLE items; --'";
    let err = web.simple_query(tricky).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err:?}");
    // With it off, \' escapes the quote and the text is one SELECT, but rolegate cannot
    // know which value the server will read it with when a SET is in flight: a text
    // with a backslash must pass under both values.
    web.batch_execute("SET standard_conforming_strings = off")
        .await
        .unwrap();
    let err = web.simple_query(tricky).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err:?}");
    assert!(
        message(&err).contains("standard_conforming_strings = on"),
        "{err:?}"
    );
    web.batch_execute("SET standard_conforming_strings = on")
        .await
        .unwrap();
    // Backslashes that mean the same (or are a syntax error the other way) pass.
    for (sql, value) in [
        (r"SELECT 'C:\temp\'", r"C:\temp\"),
        (r"SELECT 'a\nb'", r"a\nb"),
    ] {
        let row = web.query_one(sql, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), value);
    }
    web.query_one("SELECT count(*) FROM items", &[])
        .await
        .expect("items still exists");
}

/// A SET of standard_conforming_strings and, before its answer, a statement whose string
/// hides `set_config('role', …)` with the setting on and exposes it with it off.
async fn a_pipelined_standard_conforming_strings_change_hides_nothing(pool: bool) {
    let db = TestDb::create("scsrace").await;
    let rg = start(&db, pool, Options::default()).await;
    // set_config('role', 'none', false) would put the session back in its login role.
    let escape = r"SELECT 'a\' || ', set_config($$role$$, $$none$$, false) --'";
    let mut raw = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_query(&mut out, "SET standard_conforming_strings = off");
    rolegate::wire::put_query(&mut out, escape);
    raw.send(&out).await;
    let (_, errors) = raw.until_ready().await;
    assert!(errors.is_empty(), "{errors:?}");
    let (_, errors) = raw.until_ready().await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(rolegate::wire::field(&errors[0], b'C'), Some("42501"));
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_query(&mut out, "SELECT current_user::text");
    raw.send(&out).await;
    assert_eq!(raw.data_values().await, vec![db.owner.clone()]);
}

async fn startup_settings_cannot_pick_a_role(pool: bool) {
    let db = TestDb::create("startup").await;
    let rg = start(&db, pool, Options::default()).await;
    for options in [
        "-c role=postgres",
        "-c session_authorization=postgres",
        "--role=postgres",
    ] {
        let url = format!(
            "{} options='{options}'",
            rg.url("migrate", "migrate-pw", &db.name)
        );
        let err = connect_url(&url).await.unwrap_err();
        assert_eq!(
            sqlstate(&err).as_deref(),
            Some("42501"),
            "{options}: {err:?}"
        );
    }
    // Replication connections never reach the server.
    let mut raw = RawClient::connect(rg.port).await;
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_startup(
        &mut out,
        &[
            ("user", "migrate"),
            ("database", &db.name),
            ("replication", "database"),
        ],
    );
    raw.send(&out).await;
    let (tag, body) = raw.read().await.expect("an error");
    assert_eq!(tag, b'E');
    let fields = rolegate::wire::error_fields(&body);
    assert!(rolegate::wire::field(&fields, b'M')
        .unwrap_or_default()
        .contains("replication"));
    let url = format!(
        "{} options='-c default_transaction_read_only=off'",
        rg.url("analyst", "analyst-pw", &db.name)
    );
    assert!(connect_url(&url).await.is_err());
    // Harmless settings pass through.
    let url = format!(
        "{} options='-c statement_timeout=1234'",
        rg.url("web", "web-pw", &db.name)
    );
    let client = connect_url(&url).await.unwrap();
    let row = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "1234ms");
}

async fn readonly_sessions_are_read_only_on_the_server(pool: bool) {
    let db = TestDb::create("readonly").await;
    let rg = start(&db, pool, Options::default()).await;
    fixture(&rg, &db).await;
    let analyst = rg.client("analyst", &db).await;
    let row = analyst
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "on");
    // A write hidden in a function is caught by PostgreSQL itself.
    let err = analyst
        .query_one("SELECT nextval('seq')", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25006"), "{err:?}");
}

async fn the_function_call_message_is_refused_and_the_session_goes_on(pool: bool) {
    let db = TestDb::create("fcall").await;
    let rg = start(&db, pool, Options::default()).await;
    let mut raw = RawClient::login(rg.port, "migrate", "migrate-pw", &db.name).await;
    // FunctionCall for set_config (OID 2078): 'F', oid, 0 arg formats, 0 args, text result.
    let mut body = Vec::new();
    body.extend_from_slice(&2078i32.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_message(&mut out, b'F', &body);
    raw.send(&out).await;
    let (tags, errors) = raw.until_ready().await;
    assert_eq!(tags, vec![b'E', b'Z']);
    assert_eq!(rolegate::wire::field(&errors[0], b'C'), Some("42501"));
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_query(&mut out, "SELECT current_user");
    raw.send(&out).await;
    let (tags, errors) = raw.until_ready().await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(tags.contains(&b'D'));
}

async fn a_migrator_runs_a_real_migration_owned_by_the_owner(pool: bool) {
    let db = TestDb::create("migration").await;
    let rg = start(&db, pool, Options::default()).await;
    let migrate = rg.client("migrate", &db).await;
    migrate
        .batch_execute(
            "BEGIN;
             CREATE TABLE authors (id bigserial PRIMARY KEY, name text NOT NULL);
             CREATE TABLE books (id bigserial PRIMARY KEY,
                                 author_id bigint REFERENCES authors(id), title text);
             CREATE INDEX books_by_author ON books (author_id);
             CREATE VIEW book_titles AS SELECT b.title, a.name FROM books b JOIN authors a ON a.id = b.author_id;
             CREATE FUNCTION book_count() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM books';
             COMMIT;",
        )
        .await
        .unwrap();
    let web = rg.client("web", &db).await;
    web.batch_execute("INSERT INTO authors (name) VALUES ('Le Guin')")
        .await
        .unwrap();
    let admin = admin(&db.name).await;
    let not_owned: i64 = admin
        .query_one(
            "SELECT count(*) FROM (
               SELECT relowner AS owner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = 'public'
               UNION ALL
               SELECT proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = 'public') o
             WHERE owner <> (SELECT oid FROM pg_roles WHERE rolname = $1)",
            &[&db.owner],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(not_owned, 0, "objects not owned by the owner role");
}

async fn report_mode_logs_and_lets_through(pool: bool) {
    let db = TestDb::create("report").await;
    let rg = start(
        &db,
        pool,
        Options {
            extra: "[policy]\nmode = \"report\"\n".into(),
            ..Options::default()
        },
    )
    .await;
    let web = rg.client("web", &db).await;
    web.batch_execute("CREATE TABLE reported (id int)")
        .await
        .expect("report mode lets DDL through");
    // Leaving the owner role is refused even in report mode.
    let err = web.batch_execute("SET ROLE postgres").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
    let log = rg.log_text();
    assert!(log.contains("would be refused"), "{log}");
    assert!(log.contains("CREATE TABLE"), "{log}");
}

async fn a_refused_parse_in_a_pipeline_keeps_the_driver_in_step(pool: bool) {
    let db = TestDb::create("pipeline").await;
    let rg = start(&db, pool, Options::default()).await;
    fixture(&rg, &db).await;
    let (ok, out, err) = python("psycopg_pipeline.py", &[&rg.url("web", "web-pw", &db.name)]).await;
    assert!(
        ok,
        "pipeline checks failed:\n{out}\n{err}\n{}",
        rg.log_text()
    );
    assert!(out.contains("pipeline ok"), "{out}");
}

/// What each class's backend sessions are in: `current_user` and
/// `default_transaction_read_only` on every backend connection of the class's pool (two
/// clients in a transaction at once hold both of them in transaction mode).
async fn sessions_are_untouched(rg: &Rolegate, db: &TestDb) {
    for (user, read_only) in [("web", "off"), ("analyst", "on"), ("migrate", "off")] {
        let first = rg.client(user, db).await;
        let second = rg.client(user, db).await;
        for client in [&first, &second] {
            client.batch_execute("BEGIN").await.unwrap();
        }
        for client in [&first, &second] {
            let row = client
                .query_one(
                    "SELECT current_user::text, current_setting('default_transaction_read_only')",
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), db.owner, "{user}");
            assert_eq!(row.get::<_, String>(1), read_only, "{user}");
        }
        for client in [&first, &second] {
            client.batch_execute("COMMIT").await.unwrap();
        }
    }
}

/// Issue 19's escapes through SQL handed to functions as text: each refused by rolegate
/// as the same statement sent plainly is, over both protocols, and nothing changed after,
/// for the client nor for the next one on the same backend connection.
async fn sql_handed_to_functions_is_judged_as_the_clients_own(pool: bool) {
    let db = TestDb::create("sqltext").await;
    let rg = start(&db, pool, Options::default()).await;
    fixture(&rg, &db).await;
    let owner = &db.owner;
    let escapes = [
        "SELECT query_to_xml('SELECT set_config(''role'', ''none'', false)', true, false, '')".to_string(),
        format!("SELECT query_to_xml('SELECT set_config(''role'', ''{owner}'', false)', true, false, '')"),
        "SELECT query_to_xml_and_xmlschema('SELECT set_config(''role'', ''none'', false)', true, false, '')".into(),
        "SELECT query_to_xmlschema($$SELECT set_config('role', 'none', false)$$, true, false, '')".into(),
        "SELECT * FROM ts_stat('SELECT set_config(''role'', ''none'', false)::tsvector')".into(),
        "SELECT ts_rewrite('a'::tsquery, 'SELECT set_config(''role'', ''none'', false)::tsquery, ''b''::tsquery')".into(),
        "SELECT query_to_xml('SELECT query_to_xml(''SELECT set_config(''''role'''', ''''none'''', false)'', true, false, '''')', true, false, '')".into(),
    ];
    for user in ["web", "analyst", "migrate"] {
        let client = rg.client(user, &db).await;
        for sql in &escapes {
            let simple = client.simple_query(sql).await.unwrap_err();
            let extended = client.query(sql.as_str(), &[]).await.unwrap_err();
            for err in [simple, extended] {
                assert_eq!(
                    sqlstate(&err).as_deref(),
                    Some("42501"),
                    "{user}: {sql}: {err:?}"
                );
                assert!(
                    message(&err).contains("changing the session role is not allowed"),
                    "{user}: {sql}: {err:?}"
                );
            }
            let row = client
                .query_one("SELECT current_user::text", &[])
                .await
                .unwrap();
            assert_eq!(&row.get::<_, String>(0), owner, "{user}: {sql}");
        }
        // The same text with a read in it is a read, for every class.
        let row = client
            .query_one(
                "SELECT query_to_xml('SELECT 1 AS one', true, false, '')::text",
                &[],
            )
            .await
            .unwrap();
        assert!(row.get::<_, String>(0).contains("<one>1</one>"), "{user}");
    }
    // readonly: leaving read-only inside the text is refused; what PostgreSQL itself lets
    // a read-only transaction do (large objects) is refused by rolegate.
    let analyst = rg.client("analyst", &db).await;
    let err = analyst
        .simple_query("SELECT query_to_xml('SELECT set_config(''default_transaction_read_only'', ''off'', false)', true, false, '')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err:?}");
    let err = analyst
        .query_one("SELECT setval('seq', 5)", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25006"), "{err:?}");
    let err = analyst
        .query_one("SELECT lo_create(0)", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err:?}");
    let large_objects: i64 = admin(&db.name)
        .await
        .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(large_objects, 0);
    sessions_are_untouched(&rg, &db).await;
}

/// SQL text computed when the statement runs cannot be judged: refused for app and
/// readonly clients with a message that says so, run for migrators.
async fn computed_sql_text_is_refused_with_the_reason(pool: bool) {
    let db = TestDb::create("sqlcomputed").await;
    let rg = start(&db, pool, Options::default()).await;
    fixture(&rg, &db).await;
    let computed =
        "SELECT query_to_xml(q, true, false, '')::text FROM (VALUES ('SELECT 1 AS one')) v(q)";
    for user in ["web", "analyst"] {
        let client = rg.client(user, &db).await;
        let err = client.query_one(computed, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err:?}");
        assert!(
            message(&err)
                .contains("query_to_xml is given SQL text computed when the statement runs"),
            "{err:?}"
        );
        let err = client
            .query_one(
                "SELECT query_to_xml($1, true, false, '')::text",
                &[&"SELECT 1"],
            )
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err:?}");
        client.query_one("SELECT 1", &[]).await.unwrap();
    }
    let migrate = rg.client("migrate", &db).await;
    let row = migrate.query_one(computed, &[]).await.unwrap();
    assert!(row.get::<_, String>(0).contains("<one>1</one>"));
    sessions_are_untouched(&rg, &db).await;
}

/// A session advisory lock taken inside query_to_xml's text pins its client to its
/// backend connection, as the plain `SELECT pg_advisory_lock(1)` does: no other client
/// can take it over (on the same backend connection it would be granted again).
async fn an_advisory_lock_in_sql_text_stays_with_its_client(pool: bool) {
    let db = TestDb::create("sqllock").await;
    let rg = start(&db, pool, Options::default()).await;
    let holder = rg.client("web", &db).await;
    holder
        .query_one(
            "SELECT query_to_xml('SELECT pg_advisory_lock(4242)', true, false, '')::text",
            &[],
        )
        .await
        .unwrap();
    for _ in 0..4 {
        let other = rg.client("web", &db).await;
        let taken: bool = other
            .query_one("SELECT pg_try_advisory_lock(4242)", &[])
            .await
            .unwrap()
            .get(0);
        assert!(!taken, "another client took the lock over");
    }
    let released: bool = holder
        .query_one("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(released);
}

/// Functions of extensions listed in `[policy] sql_text_functions` are judged like
/// query_to_xml (refused before the server would look for the extension).
async fn listed_extension_functions_are_judged_too(pool: bool) {
    let db = TestDb::create("sqldblink").await;
    let rg = start(
        &db,
        pool,
        Options {
            extra: "[policy]\nsql_text_functions = [\"dblink\", \"dblink_exec\"]\n".into(),
            ..Options::default()
        },
    )
    .await;
    let web = rg.client("web", &db).await;
    for (sql, says) in [
        (
            "SELECT * FROM dblink('dbname=x', 'SELECT set_config(''role'', ''none'', false)') AS t(a text)",
            "changing the session role is not allowed (set_config('role') in dblink's SQL text)",
        ),
        (
            "SELECT dblink_exec('dbname=x', 'DROP TABLE items')",
            "DDL is not allowed for app clients (DROP TABLE in dblink_exec's SQL text)",
        ),
        (
            "SELECT dblink_exec('dbname=x', 'DROP TABLE ' || 'items')",
            "dblink_exec is given SQL text computed when the statement runs",
        ),
    ] {
        let err = web.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{sql}: {err:?}");
        assert!(message(&err).contains(says), "{sql}: {err:?}");
    }
}

/// A setting changed inside query_to_xml's text, or by an UPDATE of pg_settings however
/// its name is spelled, follows its client as a plain `set_config` does: the next clients
/// on the same backend connections do not get it.
async fn a_setting_changed_in_sql_text_stays_with_its_client(pool: bool) {
    let db = TestDb::create("sqlsetting").await;
    let rg = start(&db, pool, Options::default()).await;
    for (sql, value) in [
        (
            "SELECT query_to_xml('SELECT set_config(''statement_timeout'', ''4242'', false)', true, false, '')::text",
            "4242ms",
        ),
        (
            r#"UPDATE U&"pg\005fsettings" SET setting = '4343' WHERE name = 'statement_timeout'"#,
            "4343ms",
        ),
    ] {
        let setter = rg.client("web", &db).await;
        setter.simple_query(sql).await.unwrap();
        for _ in 0..4 {
            let other = rg.client("web", &db).await;
            let timeout: String = other
                .query_one("SHOW statement_timeout", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(timeout, "0", "another client got the setting of {sql}");
        }
        let timeout: String = setter
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(timeout, value, "{sql}");
    }
}

in_both_modes!(
    corpus_verdicts_hold_for_every_class_and_protocol,
    a_refusal_says_what_and_why_and_the_session_goes_on,
    a_refusal_inside_a_transaction_fails_the_transaction,
    the_grammar_follows_the_servers_standard_conforming_strings,
    a_pipelined_standard_conforming_strings_change_hides_nothing,
    startup_settings_cannot_pick_a_role,
    readonly_sessions_are_read_only_on_the_server,
    the_function_call_message_is_refused_and_the_session_goes_on,
    a_migrator_runs_a_real_migration_owned_by_the_owner,
    report_mode_logs_and_lets_through,
    a_refused_parse_in_a_pipeline_keeps_the_driver_in_step,
    sql_handed_to_functions_is_judged_as_the_clients_own,
    computed_sql_text_is_refused_with_the_reason,
    an_advisory_lock_in_sql_text_stays_with_its_client,
    listed_extension_functions_are_judged_too,
    a_setting_changed_in_sql_text_stays_with_its_client,
);
