//! What real drivers and tools send on their own, through a live rolegate: session
//! resets, same-role SET ROLE, large objects, bound set_config names, the backend's pid,
//! client encodings other than UTF8.

mod support;

use bytes::BufMut;
use support::*;

/// Npgsql's reset strings, Rails' `reset!`, asyncpg's pool release, as they send them.
const NPGSQL_RESET: &str = "SET SESSION AUTHORIZATION DEFAULT;RESET ALL;CLOSE ALL;UNLISTEN *;SELECT pg_advisory_unlock_all();DISCARD SEQUENCES;DISCARD TEMP";
const ASYNCPG_RESET: &str = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;";

async fn current_user(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("SELECT current_user")
        .get(0)
}

async fn setting(client: &tokio_postgres::Client, name: &str) -> String {
    client
        .query_one("SELECT current_setting($1)", &[&name])
        .await
        .expect("current_setting")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resets_from_drivers_keep_the_role() {
    let db = TestDb::create("resets").await;
    let rg = Rolegate::start(&db).await;
    for user in ["web", "analyst", "migrate"] {
        let client = rg.client(user, &db).await;
        let statement = client.prepare("SELECT 1").await.unwrap();
        client
            .batch_execute("SET application_name = 'before'")
            .await
            .unwrap();
        // Npgsql: DISCARD ALL before the first command of a pooled open (simple protocol).
        client
            .batch_execute("DISCARD ALL")
            .await
            .unwrap_or_else(|e| panic!("{user}: DISCARD ALL: {e}\n{}", rg.log_text()));
        assert_eq!(current_user(&client).await, db.owner, "{user}");
        assert_eq!(
            setting(&client, "application_name").await,
            "",
            "{user}: RESET ALL ran"
        );
        // The client's prepared statements are gone, as after PostgreSQL's DISCARD ALL.
        let err = client.query(&statement, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("26000"), "{user}: {err}");
        // The same over the extended protocol.
        client.execute("DISCARD ALL", &[]).await.unwrap();
        assert_eq!(current_user(&client).await, db.owner, "{user}");
        // Npgsql with prepared statements; Rails' reset!; asyncpg's release.
        client.batch_execute(NPGSQL_RESET).await.unwrap();
        assert_eq!(current_user(&client).await, db.owner, "{user}");
        client.batch_execute("BEGIN; SELECT 1").await.unwrap();
        client.batch_execute("ROLLBACK").await.unwrap();
        client.batch_execute("DISCARD ALL").await.unwrap();
        client.batch_execute(ASYNCPG_RESET).await.unwrap();
        for reset in [
            "RESET ROLE",
            "SET ROLE NONE",
            "RESET SESSION AUTHORIZATION",
            "SET SESSION AUTHORIZATION DEFAULT",
        ] {
            client.batch_execute(reset).await.unwrap();
            assert_eq!(current_user(&client).await, db.owner, "{user}: {reset}");
            client.execute(reset, &[]).await.unwrap();
            assert_eq!(
                current_user(&client).await,
                db.owner,
                "{user}: {reset} (extended)"
            );
        }
        if user == "analyst" {
            assert_eq!(
                setting(&client, "default_transaction_read_only").await,
                "on"
            );
            let err = client
                .batch_execute("CREATE TEMP TABLE t (a int)")
                .await
                .unwrap_err();
            assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
            let err = client.query("SELECT nextval('x')", &[]).await.unwrap_err();
            assert!(sqlstate(&err).is_some());
        }
        // DISCARD ALL inside a transaction block fails as PostgreSQL's does.
        client.batch_execute("BEGIN").await.unwrap();
        let err = client.batch_execute("DISCARD ALL").await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("25001"), "{err}");
        client.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(current_user(&client).await, db.owner, "{user}");
    }
    let log = rg.log_text();
    assert!(!log.contains("terminating connection"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flyway_restores_the_role_it_found() {
    let db = TestDb::create("flyway").await;
    let rg = Rolegate::start(&db).await;
    let migrate = rg.client("migrate", &db).await;
    let found = current_user(&migrate).await;
    assert_eq!(found, db.owner);
    migrate
        .batch_execute(&format!("SET ROLE '{found}'"))
        .await
        .unwrap();
    migrate
        .batch_execute("CREATE TABLE flyway_made (id int)")
        .await
        .unwrap();
    migrate
        .batch_execute(&format!("SET ROLE \"{found}\""))
        .await
        .unwrap();
    // Spring's JDBC template sends it over the extended protocol.
    migrate
        .execute(&format!("SET ROLE '{found}'"), &[])
        .await
        .unwrap();
    let owner: String = migrate
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'flyway_made'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, db.owner);
    // Any other role stays refused, for every class.
    for user in ["web", "analyst", "migrate"] {
        let client = rg.client(user, &db).await;
        for escape in [
            "SET ROLE postgres".to_owned(),
            "SET SESSION AUTHORIZATION postgres".to_owned(),
            format!("SET ROLE '{}'", db.login),
            format!("SET SESSION AUTHORIZATION '{}'", db.login),
            format!("SELECT set_config('role', '{}', false)", db.owner),
        ] {
            let err = client.batch_execute(&escape).await.unwrap_err();
            assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{user}: {escape}");
            let err = client.execute(escape.as_str(), &[]).await.unwrap_err();
            assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{user}: {escape}");
        }
        assert_eq!(current_user(&client).await, db.owner);
    }
}

/// DISCARD ALL over the extended protocol must be followed by Sync: nothing runs before
/// rolegate sets the role again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_runs_between_discard_all_and_the_role() {
    let db = TestDb::create("discardpipe").await;
    let rg = Rolegate::start(&db).await;
    let mut raw = RawClient::login(rg.port, "migrate", "migrate-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    extended(&mut out, "DISCARD ALL", &[]);
    extended(&mut out, "CREATE TABLE after_discard (id int)", &[]);
    rolegate::wire::put_message(&mut out, b'S', &[]);
    raw.send(&out).await;
    let (_, errors) = raw.until_ready().await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(rolegate::wire::field(&errors[0], b'C'), Some("25001"));
    let mut out = bytes::BytesMut::new();
    extended(&mut out, "SELECT current_user::text", &[]);
    rolegate::wire::put_message(&mut out, b'S', &[]);
    raw.send(&out).await;
    assert_eq!(raw.data_values().await, vec![db.owner.clone()]);
    let admin = admin(&db.name).await;
    let made = admin
        .query(
            "SELECT 1 FROM pg_tables WHERE tablename = 'after_discard'",
            &[],
        )
        .await
        .unwrap();
    assert!(made.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_with_a_bound_name_is_judged_at_bind() {
    let db = TestDb::create("boundname").await;
    let rg = Rolegate::start(&db).await;
    let sql = "SELECT set_config($1, $2, false)";
    for format in [0i16, 1] {
        let mut raw = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
        let mut out = bytes::BytesMut::new();
        extended(
            &mut out,
            sql,
            &[(format, b"TimeZone"), (format, b"Asia/Tokyo")],
        );
        rolegate::wire::put_message(&mut out, b'S', &[]);
        raw.send(&out).await;
        assert_eq!(raw.data_values().await, vec!["Asia/Tokyo".to_owned()]);
        for name in [&b"role"[..], b"ROLE", b"session_authorization"] {
            let mut out = bytes::BytesMut::new();
            extended(&mut out, sql, &[(format, name), (format, b"postgres")]);
            rolegate::wire::put_message(&mut out, b'S', &[]);
            raw.send(&out).await;
            let (_, errors) = raw.until_ready().await;
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(rolegate::wire::field(&errors[0], b'C'), Some("42501"));
        }
        let mut out = bytes::BytesMut::new();
        extended(&mut out, "SELECT current_user::text", &[]);
        rolegate::wire::put_message(&mut out, b'S', &[]);
        raw.send(&out).await;
        assert_eq!(raw.data_values().await, vec![db.owner.clone()]);
    }
    // A driver: tokio-postgres binds &str in binary format, a prepared statement reused.
    let web = rg.client("web", &db).await;
    let statement = web.prepare(sql).await.unwrap();
    let row = web
        .query_one(&statement, &[&"TimeZone", &"UTC"])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "UTC");
    let err = web
        .query_one(&statement, &[&"role", &"postgres"])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
    assert_eq!(current_user(&web).await, db.owner);
    // psycopg's own tests set client_encoding so: the bound value is judged like a
    // literal one (accepted when rolegate can read it, 0A000 where it is set otherwise).
    let encoding = "SELECT set_config('client_encoding', $1, false)";
    let row = web.query_one(encoding, &[&"UTF8"]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "UTF8");
    let err = web.query_one(encoding, &[&"SJIS"]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err}");
    assert_eq!(setting(&web, "client_encoding").await, "UTF8");
    // readonly may not leave read-only mode that way.
    let analyst = rg.client("analyst", &db).await;
    let err = analyst
        .query_one(sql, &[&"default_transaction_read_only", &"off"])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
    assert_eq!(
        setting(&analyst, "default_transaction_read_only").await,
        "on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pid_a_driver_reports_is_the_backends() {
    let db = TestDb::create("pids").await;
    let rg = Rolegate::start(&db).await;
    admin(&db.name)
        .await
        .batch_execute(&format!("GRANT pg_signal_backend TO \"{}\"", db.owner))
        .await
        .unwrap();
    let (ok, out, err) = python(
        "backend_pid.py",
        &[
            &rg.url("web", "web-pw", &db.name),
            &rg.url("migrate", "migrate-pw", &db.name),
        ],
    )
    .await;
    assert!(ok && out.contains("ok"), "{out}\n{err}\n{}", rg.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latin9_clients_are_judged_in_their_encoding() {
    let db = TestDb::create("latin9").await;
    let rg = Rolegate::start(&db).await;
    let (ok, out, err) = python("encodings.py", &[&rg.url("web", "web-pw", &db.name)]).await;
    assert!(ok && out.contains("ok"), "{out}\n{err}\n{}", rg.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_pool_release_keeps_the_role() {
    let db = TestDb::create("asyncpg").await;
    let rg = Rolegate::start(&db).await;
    for (user, mode) in [("web", "app"), ("analyst", "readonly")] {
        let dsn = format!(
            "postgresql://{user}:{}@127.0.0.1:{}/{}?sslmode=disable",
            password_of(user),
            rg.port,
            db.name
        );
        let (ok, out, err) = python("asyncpg_pool.py", &[&dsn, &db.owner, mode]).await;
        assert!(
            ok && out.contains("ok"),
            "{user}: {out}\n{err}\n{}",
            rg.log_text()
        );
    }
}

/// FunctionCall for a function by OID, with int4 arguments in binary.
async fn function_call(raw: &mut RawClient, oid: u32, args: &[i32]) -> Vec<Vec<(u8, String)>> {
    let mut body = bytes::BytesMut::new();
    body.put_u32(oid);
    body.put_i16(1);
    body.put_i16(1);
    body.put_i16(args.len() as i16);
    for arg in args {
        body.put_i32(4);
        body.put_i32(*arg);
    }
    body.put_i16(1);
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_message(&mut out, b'F', &body);
    raw.send(&out).await;
    raw.until_ready().await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_work_through_real_drivers() {
    let db = TestDb::create("lobjects").await;
    let rg = Rolegate::start(&db).await;
    let migrate = rg.client("migrate", &db).await;
    migrate
        .batch_execute("CREATE TABLE docs (id int PRIMARY KEY, data oid)")
        .await
        .unwrap();
    // psycopg2's lobject: libpq's lo_* calls, as FunctionCall messages.
    for user in ["web", "migrate"] {
        let (ok, out, err) = python(
            "lo_psycopg2.py",
            &[&rg.url(user, password_of(user), &db.name), "rw"],
        )
        .await;
        assert!(
            ok && out.starts_with("ok"),
            "{user}: {out}\n{err}\n{}",
            rg.log_text()
        );
    }
    let oid: u32 = migrate
        .query_one("SELECT lo_from_bytea(0, 'readable')", &[])
        .await
        .unwrap()
        .get(0);
    let (ok, out, err) = python(
        "lo_psycopg2.py",
        &[
            &rg.url("analyst", "analyst-pw", &db.name),
            "read",
            &oid.to_string(),
        ],
    )
    .await;
    assert_eq!((ok, out.trim()), (true, "ok 8"), "{err}");
    let (ok, out, err) = python(
        "lo_psycopg2.py",
        &[
            &rg.url("analyst", "analyst-pw", &db.name),
            "write-refused",
            &oid.to_string(),
        ],
    )
    .await;
    assert!(ok && out.contains("ok refused"), "{out}\n{err}");
    // pgjdbc's Blob API.
    let url = format!(
        "jdbc:postgresql://127.0.0.1:{}/{}?sslmode=disable",
        rg.port, db.name
    );
    let (ok, out, err) = java("LoJdbc.java", &[&url, "web", "web-pw"]).await;
    assert!(ok && out.starts_with("ok"), "{out}\n{err}");
    // Other functions stay refused over FunctionCall, whatever the class.
    let oids = admin(&db.name)
        .await
        .query_one(
            "SELECT 'pg_terminate_backend'::regproc::oid, \
                    'set_config'::regproc::oid, 'lowrite'::regproc::oid",
            &[],
        )
        .await
        .unwrap();
    let (terminate, set_config, lowrite): (u32, u32, u32) = (oids.get(0), oids.get(1), oids.get(2));
    for (user, password) in [
        ("web", "web-pw"),
        ("migrate", "migrate-pw"),
        ("analyst", "analyst-pw"),
    ] {
        let mut raw = RawClient::login(rg.port, user, password, &db.name).await;
        for oid in [terminate, set_config] {
            let errors = function_call(&mut raw, oid, &[1]).await;
            assert_eq!(
                rolegate::wire::field(&errors[0], b'C'),
                Some("42501"),
                "{user}"
            );
        }
        if user == "analyst" {
            let errors = function_call(&mut raw, lowrite, &[0]).await;
            assert_eq!(rolegate::wire::field(&errors[0], b'C'), Some("42501"));
            assert!(rolegate::wire::field(&errors[0], b'M')
                .unwrap_or_default()
                .contains("readonly"));
        }
        let mut out = bytes::BytesMut::new();
        rolegate::wire::put_query(&mut out, "SELECT current_user::text");
        raw.send(&out).await;
        assert_eq!(raw.data_values().await, vec![db.owner.clone()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_pool_named_statements_and_resets() {
    let db = TestDb::create("nodepg").await;
    let rg = Rolegate::start(&db).await;
    for (user, class) in [
        ("web", "app"),
        ("analyst", "readonly"),
        ("migrate", "migrator"),
    ] {
        let url = format!(
            "postgresql://{user}:{}@127.0.0.1:{}/{}?sslmode=disable",
            password_of(user),
            rg.port,
            db.name
        );
        let (ok, out, err) = node("node_pg.js", &[&url, &db.owner, class]).await;
        assert!(
            ok && out.trim() == "ok",
            "{user}: {out}\n{err}\n{}",
            rg.log_text()
        );
    }
}

/// A Parse that reuses a name may fail on the server (a duplicate name, or an error earlier
/// in the batch), leaving the old statement in place: its Bind check must stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_check_outlives_a_parse_the_server_may_refuse() {
    let db = TestDb::create("bindcheck").await;
    let rg = Rolegate::start(&db).await;
    for (name, set) in [
        ("s1", "SELECT set_config('client_encoding', $1, false)"),
        ("s2", "SELECT set_config($1, 'x', false)"),
    ] {
        let mut raw = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
        let mut out = bytes::BytesMut::new();
        parse(&mut out, name, set);
        rolegate::wire::put_message(&mut out, b'S', &[]);
        // The server refuses this one: the name is taken.
        parse(&mut out, name, "SELECT 1");
        rolegate::wire::put_message(&mut out, b'S', &[]);
        raw.send(&out).await;
        let (_, errors) = raw.until_ready().await;
        assert!(errors.is_empty(), "{errors:?}");
        let (_, errors) = raw.until_ready().await;
        assert_eq!(rolegate::wire::field(&errors[0], b'C'), Some("42P05"));
        let mut out = bytes::BytesMut::new();
        let value: &[u8] = if name == "s1" { b"SJIS" } else { b"role" };
        bind_execute(&mut out, name, &[(0, value)]);
        rolegate::wire::put_message(&mut out, b'S', &[]);
        raw.send(&out).await;
        let (_, errors) = raw.until_ready().await;
        assert_eq!(errors.len(), 1, "{name}: {errors:?}");
        let code = rolegate::wire::field(&errors[0], b'C');
        assert!(
            matches!(code, Some("0A000") | Some("42501")),
            "{name}: {errors:?}"
        );
        let mut out = bytes::BytesMut::new();
        rolegate::wire::put_query(&mut out, "SELECT current_user::text");
        raw.send(&out).await;
        assert_eq!(raw.data_values().await, vec![db.owner.clone()]);
    }
}
