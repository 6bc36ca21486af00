//! `rolegate serve` end to end: real PostgreSQL (scram-sha-256), real clients (psql,
//! tokio-postgres, psycopg), a real rolegate process.

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_run_as_the_owner_role_for_every_client() {
    let db = TestDb::create("roles").await;
    let rg = Rolegate::start(&db).await;
    // Session mode serves on one thread per core unless `threads` says otherwise (the
    // main thread waits; counted before a blocking-pool thread could have started).
    let threads = rg.thread_count();
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(threads > cores, "{threads} threads\n{}", rg.log_text());
    // tokio-postgres
    let client = rg.client("web", &db).await;
    let row = client
        .query_one("SELECT current_user::text, session_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), db.owner);
    assert_eq!(row.get::<_, String>(1), db.login);
    // psql
    let (ok, out, err) = psql(
        &rg.url("migrate", "migrate-pw", &db.name),
        "migrate-pw",
        &["-c", "SELECT current_user, session_user"],
    )
    .await;
    assert!(ok, "psql failed: {err}");
    assert_eq!(out.trim(), format!("{}|{}", db.owner, db.login));
    // psycopg 3
    let (ok, out, err) = python(
        "psycopg_session.py",
        &[&rg.url("web", "web-pw", &db.name), &db.owner, &db.login],
    )
    .await;
    assert!(
        ok,
        "psycopg checks failed:\n{out}\n{err}\n{}",
        rg.log_text()
    );
    assert!(out.contains("psycopg ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_created_through_rolegate_belong_to_the_owner() {
    let db = TestDb::create("owned").await;
    let rg = Rolegate::start(&db).await;
    let migrate = rg.client("migrate", &db).await;
    migrate
        .batch_execute(
            "CREATE TABLE books (id serial PRIMARY KEY, title text);
             CREATE INDEX books_title ON books (title);
             CREATE VIEW titles AS SELECT title FROM books;",
        )
        .await
        .unwrap();
    let admin = admin(&db.name).await;
    let owners = admin
        .query(
            "SELECT c.relname::text, pg_get_userbyid(c.relowner)::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    assert!(owners.len() >= 4, "expected table, sequence, index, view");
    for row in owners {
        assert_eq!(
            row.get::<_, String>(1),
            db.owner,
            "{} is not owned by the owner role",
            row.get::<_, String>(0)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_extended_and_prepared_queries_work() {
    let db = TestDb::create("queries").await;
    let rg = Rolegate::start(&db).await;
    rg.client("migrate", &db)
        .await
        .batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let web = rg.client("web", &db).await;
    // Simple protocol, several statements in one string.
    let results = web
        .simple_query("INSERT INTO kv VALUES (1, 'one'); SELECT v FROM kv WHERE k = 1")
        .await
        .unwrap();
    let rows: Vec<_> = results
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(rows, vec!["one"]);
    // Extended protocol with parameters, and one prepared statement reused.
    let insert = web.prepare("INSERT INTO kv VALUES ($1, $2)").await.unwrap();
    for k in 2..50 {
        web.execute(&insert, &[&k, &format!("v{k}")]).await.unwrap();
    }
    let select = web.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
    for k in 2..50 {
        let row = web.query_one(&select, &[&k]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("v{k}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_of_100k_rows() {
    let db = TestDb::create("copy").await;
    let rg = Rolegate::start(&db).await;
    rg.client("migrate", &db)
        .await
        .batch_execute("CREATE TABLE nums (n int, label text)")
        .await
        .unwrap();
    let web = rg.client("web", &db).await;
    let mut data = String::new();
    for n in 0..100_000 {
        data.push_str(&format!("{n}\tlabel-{n}\n"));
    }
    let sink = web.copy_in("COPY nums FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 100_000);

    let row = web
        .query_one("SELECT count(*), sum(n) FROM nums", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 100_000);
    assert_eq!(row.get::<_, i64>(1), (0..100_000i64).sum::<i64>());

    let stream = web
        .copy_out("COPY (SELECT n, label FROM nums ORDER BY n) TO STDOUT")
        .await
        .unwrap();
    use futures_util::TryStreamExt;
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(out).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_the_client_and_rollback_works() {
    let db = TestDb::create("errors").await;
    let rg = Rolegate::start(&db).await;
    rg.client("migrate", &db)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let web = rg.client("web", &db).await;
    web.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let err = web
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("23505"), "{err}");
    let err = web.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"));
    web.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = web
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the rolled back insert is gone");
    // A server error is passed on as the server sent it.
    let err = web.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22012"));
    assert!(message(&err).contains("division by zero"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_query_is_cancelled() {
    let db = TestDb::create("cancel").await;
    let rg = Rolegate::start(&db).await;
    let web = rg.client("web", &db).await;
    let token = web.cancel_token();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let err = web.batch_execute("SELECT pg_sleep(30)").await.unwrap_err();
    canceller.await.unwrap().unwrap();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(1300),
        "cancel took {:?}",
        started.elapsed()
    );
    // The session is still usable.
    web.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_unknown_users_and_databases_are_refused() {
    let db = TestDb::create("auth").await;
    let rg = Rolegate::start(&db).await;
    let err = connect_url(&rg.url("web", "wrong", &db.name))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");
    let err = connect_url(&rg.url("nobody", "whatever", &db.name))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");
    // The unknown user gets the very same message shape as a wrong password.
    assert!(
        message(&err).contains("password authentication failed for user \"nobody\""),
        "{err:?}"
    );
    let err = connect_url(&rg.url("web", "web-pw", "otherdb"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("3D000"), "{err}");
    // psql shows the server's words.
    let (ok, _, stderr) = psql(
        &rg.url("web", "wrong", &db.name),
        "wrong",
        &["-c", "select 1"],
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    // The log names the user but never a password.
    let log = rg.log_text();
    assert!(log.contains("client authentication failed"), "{log}");
    assert!(!log.contains("wrong") && !log.contains("web-pw") && !log.contains(LOGIN_PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_offered_and_can_be_required() {
    let db = TestDb::create("tls").await;
    let rg = Rolegate::start_tls(&db, "require").await;
    let url = format!(
        "host=127.0.0.1 port={} user=web dbname={} sslmode=require",
        rg.port, db.name
    );
    let (ok, out, err) = psql(
        &url,
        "web-pw",
        &[
            "-c",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            "-c",
            "\\conninfo",
        ],
    )
    .await;
    assert!(ok, "psql over TLS failed: {err}\n{}", rg.log_text());
    assert!(
        out.contains("SSL connection"),
        "psql did not use TLS: {out}"
    );
    // A plaintext client is refused with a clear error.
    let err = connect_url(&rg.url("web", "web-pw", &db.name))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err}");
    assert!(message(&err).contains("requires TLS"), "{err:?}");
    // psycopg over TLS, with the extended protocol.
    let (ok, out, err) = python(
        "psycopg_session.py",
        &[
            &url.replace("user=web", "user=web password=web-pw"),
            &db.owner,
            &db.login,
        ],
    )
    .await;
    assert!(ok, "psycopg over TLS failed:\n{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients() {
    let db = TestDb::create("many").await;
    let rg = Rolegate::start(&db).await;
    let mut tasks = Vec::new();
    for i in 0..200i32 {
        let url = rg.url("web", "web-pw", &db.name);
        tasks.push(tokio::spawn(async move {
            let client = connect_url(&url).await?;
            for j in 0..10i32 {
                let row = client
                    .query_one("SELECT $1::int + $2::int", &[&i, &j])
                    .await?;
                assert_eq!(row.get::<_, i32>(0), i + j);
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for task in tasks {
        if let Err(e) = task.await.unwrap() {
            panic!("a client failed: {e:?}\n{}", rg.log_text());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_is_used_and_verified() {
    let db = TestDb::create("backendtls").await;
    let ca = cluster().ca_file();
    for mode in ["require", "verify-full"] {
        let rg = Rolegate::start_with(
            &db,
            Options {
                backend_extra: format!("tls = \"{mode}\"\nca_file = \"{}\"\n", ca.display()),
                ..Options::default()
            },
        )
        .await;
        let web = rg.client("web", &db).await;
        web.query_one("SELECT 1", &[]).await.unwrap();
        // Only a superuser sees another role's connection details.
        let row = admin("postgres")
            .await
            .query_one(
                "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s
                 JOIN pg_stat_activity a USING (pid) WHERE a.usename = $1",
                &[&db.login],
            )
            .await
            .unwrap();
        assert!(row.get::<_, i64>(0) >= 1);
        assert_eq!(
            row.get::<_, Option<bool>>(1),
            Some(true),
            "backend is not TLS with tls = {mode}"
        );
    }
    // verify-full against a CA that did not sign the server's certificate fails cleanly.
    let wrong_ca = tempfile::NamedTempFile::new().unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["elsewhere".to_owned()]).unwrap();
    std::fs::write(wrong_ca.path(), other.cert.pem()).unwrap();
    let rg = Rolegate::start_with(
        &db,
        Options {
            backend_extra: format!(
                "tls = \"verify-full\"\nca_file = \"{}\"\n",
                wrong_ca.path().display()
            ),
            ..Options::default()
        },
    )
    .await;
    let err = connect_url(&rg.url("web", "web-pw", &db.name))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err:?}");
    assert!(message(&err).contains("TLS"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_password_prints_a_verifier_for_the_config() {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rolegate"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"correct horse\n").await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let verifier = String::from_utf8(out.stdout).unwrap();
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
    assert!(!verifier.contains("correct horse"));
    rolegate::scram::ScramVerifier::parse(verifier.trim()).expect("a verifier the config accepts");
}

/// Hands the socket a TLS client's bytes in ragged pieces, so that its records reach
/// rolegate split anywhere, their headers included.
struct Ragged {
    tcp: tokio::net::TcpStream,
    turn: usize,
}

impl tokio::io::AsyncRead for Ragged {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Ragged {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        const PIECES: [usize; 8] = [1, 2, 3, 5, 4_099, 7, 20_000, 1];
        let this = self.get_mut();
        let piece = PIECES[this.turn % PIECES.len()].min(buf.len());
        let written = std::pin::Pin::new(&mut this.tcp).poll_write(cx, &buf[..piece]);
        if written.is_ready() {
            this.turn += 1;
        }
        written
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The first column of each DataRow a simple Query on `stream` answers; panics on an
/// error.
async fn query_values<S>(stream: &mut S, sql: &str) -> Vec<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_query(&mut out, sql);
    stream.write_all(&out).await.unwrap();
    stream.flush().await.unwrap();
    let mut values = Vec::new();
    loop {
        let (tag, body) = next_message(
            stream,
            Duration::from_secs(20),
            sql.get(..40).unwrap_or(sql),
        )
        .await;
        match tag {
            b'D' => {
                let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                values.push(String::from_utf8_lossy(&body[6..6 + len]).into_owned());
            }
            b'E' => panic!("{:?}", rolegate::wire::error_fields(&body)),
            b'Z' => return values,
            _ => {}
        }
    }
}

/// The clients' TLS is rolegate's own stream over rustls' unbuffered connection: records
/// that arrive split anywhere, messages of many records both ways, a client that changes
/// its keys (and asks rolegate to change its own) and one that ends with close_notify all
/// work, in both pool modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_records_split_anywhere_large_messages_and_key_updates_pass() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::create("tlsrecords").await;
    for mode in ["session", "transaction"] {
        let rg = Rolegate::start_with(
            &db,
            Options {
                tls_mode: Some("require"),
                extra: format!("[pool]\nmode = \"{mode}\"\nsize = 2\n"),
                ..Options::default()
            },
        )
        .await;
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", rg.port))
            .await
            .unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .unwrap();
        assert_eq!(tcp.read_u8().await.unwrap(), b'S');
        let connector = rolegate::tls::connector(None).unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector
            .connect(name, Ragged { tcp, turn: 0 })
            .await
            .unwrap_or_else(|e| panic!("{mode}: handshake failed: {e}\n{}", rg.log_text()));
        // A key update (asking rolegate for one too) before the first message.
        tls.get_mut().1.refresh_traffic_keys().unwrap();
        login_over(&mut tls, "web", "web-pw", &db.name).await;
        // A statement of 1 MB: about 60 records, checked by the server.
        let up = "0123456789".repeat(100_000);
        let sql = format!("SELECT md5('{up}') = md5(repeat('0123456789', 100000))");
        assert_eq!(query_values(&mut tls, &sql).await, ["t"], "{mode}");
        tls.get_mut().1.refresh_traffic_keys().unwrap();
        // An answer of 1.6 MB, compared byte for byte.
        let down = query_values(
            &mut tls,
            "SELECT string_agg(lpad(i::text, 8, '0'), '' ORDER BY i) FROM generate_series(1, 200000) i",
        )
        .await;
        let expected: String = (1..=200_000).map(|i| format!("{i:08}")).collect();
        assert_eq!(down.len(), 1, "{mode}");
        assert!(
            down[0] == expected,
            "{mode}: the 1.6 MB answer differs ({} bytes)",
            down[0].len()
        );
        assert_eq!(query_values(&mut tls, "SELECT 1").await, ["1"], "{mode}");
        // close_notify without Terminate: the client has gone; rolegate ends the
        // connection and sends nothing.
        tls.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("{mode}: rolegate did not end the connection"));
        assert!(rest.is_empty(), "{mode}: {ended:?} {rest:?}");
        assert!(!rg.log_text().contains("panick"), "{}", rg.log_text());
    }
}

/// The clients' TLS stream with the TLS stacks of three more drivers: asyncpg (Python's
/// OpenSSL), node-postgres (Node's OpenSSL) and pgjdbc (Java's own TLS), each through its
/// usual work (a pool's resets; statements; large objects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_works_with_asyncpg_node_postgres_and_pgjdbc() {
    let db = TestDb::create("tlsdrivers").await;
    let rg = Rolegate::start_tls(&db, "require").await;
    let dsn = |sslmode: &str| {
        format!(
            "postgresql://web:web-pw@127.0.0.1:{}/{}?sslmode={sslmode}",
            rg.port, db.name
        )
    };
    let (ok, out, err) = python("asyncpg_pool.py", &[&dsn("require"), &db.owner, "app"]).await;
    assert!(
        ok && out.contains("ok"),
        "asyncpg: {out}\n{err}\n{}",
        rg.log_text()
    );
    // (node-postgres reads sslmode=require as verify-full; no-verify is libpq's require.)
    let (ok, out, err) = node("node_pg.js", &[&dsn("no-verify"), &db.owner, "app"]).await;
    assert!(
        ok && out.trim() == "ok",
        "node-postgres: {out}\n{err}\n{}",
        rg.log_text()
    );
    // (LoJdbc.java's table, made by the owner, as a migration would.)
    admin(&db.name)
        .await
        .batch_execute(&format!(
            "CREATE TABLE docs (id int PRIMARY KEY, data oid); ALTER TABLE docs OWNER TO {}",
            db.owner
        ))
        .await
        .unwrap();
    let url = format!(
        "jdbc:postgresql://127.0.0.1:{}/{}?sslmode=require",
        rg.port, db.name
    );
    let (ok, out, err) = java("LoJdbc.java", &[&url, "web", "web-pw"]).await;
    assert!(
        ok && out.starts_with("ok"),
        "pgjdbc: {out}\n{err}\n{}",
        rg.log_text()
    );
    // Each of them really used TLS: rolegate logs every session's TLS (the log is
    // colored: its escapes are left out).
    let mut log = String::new();
    let mut in_escape = false;
    for c in rg.log_text().chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (false, c) => log.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    let sessions = log.matches("session started").count();
    assert!(sessions >= 3, "{log}");
    assert_eq!(log.matches("tls=true").count(), sessions, "{log}");
}
