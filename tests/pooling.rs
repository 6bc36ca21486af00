//! Transaction pooling (`[pool] mode = "transaction"`): many clients on few backend
//! sessions, each with its own settings and prepared statements, through real clients.

mod support;

use std::time::Duration;

use support::*;

/// Transaction mode with `size` backend sessions per pool, the admin endpoint on
/// `admin_port`.
fn pooled(size: usize, more: &str, admin_port: u16) -> Options {
    Options {
        top: format!("admin_listen = \"127.0.0.1:{admin_port}\"\n"),
        extra: format!("[pool]\nmode = \"transaction\"\nsize = {size}\n{more}\n"),
        ..Options::default()
    }
}

async fn metrics(admin_port: u16) -> String {
    http_get(admin_port, "/metrics").await.1
}

/// Ends a backend session as an administrator would (`pg_terminate_backend`).
async fn terminate(pid: i32) -> bool {
    admin("postgres")
        .await
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0)
}

/// Backend sessions the login has open now.
async fn backend_sessions(db: &TestDb) -> i64 {
    admin("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
            &[&db.login],
        )
        .await
        .unwrap()
        .get(0)
}

async fn make_table(rg: &Rolegate, db: &TestDb) {
    let migrate = rg.client("migrate", db).await;
    migrate
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, owner text NOT NULL);
             INSERT INTO items SELECT g, 'seed' FROM generate_series(1, 100) g",
        )
        .await
        .unwrap();
}

/// 24 clients on 3 backend sessions: each keeps its own settings and its prepared
/// statements wherever its transactions land, SET LOCAL does not leak, and the server
/// never sees more than 3 sessions of the login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_few_backends_and_keep_their_own_state() {
    many_clients_share_few_backends("pool_many", "").await;
}

/// The same on several threads (`threads = 2`): clients and backend connections then
/// meet across threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_few_backends_on_several_threads() {
    many_clients_share_few_backends("pool_many_threads", "threads = 2\n").await;
}

/// The same with a runtime per thread (`runtime = "per_thread"`, 2 threads): each thread
/// accepts on its own listener and lends from its own pools (3 split as 2 + 1), both
/// threads serve, and the server still never sees more than 3 sessions per pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_few_backends_with_a_runtime_per_thread() {
    many_clients_share_few_backends(
        "pool_many_per_thread",
        "threads = 2\nruntime = \"per_thread\"\n",
    )
    .await;
}

async fn many_clients_share_few_backends(db_name: &str, top: &str) {
    let per_thread = top.contains("per_thread");
    let db = TestDb::create(db_name).await;
    let admin_port = free_port();
    let mut options = pooled(3, "", admin_port);
    options.top.push_str(top);
    let rg = Rolegate::start_with(&db, options).await;
    // Transaction mode serves on one thread unless `threads` says otherwise; on the
    // runtime's worker threads when it does (counted before anything could have started
    // a blocking-pool thread; the port accepts as soon as it is bound, a moment before
    // the last serving thread starts).
    let expected = if per_thread { 2 } else { 3 };
    let mut threads = rg.thread_count();
    for _ in 0..100 {
        if top.is_empty() || threads >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        threads = rg.thread_count();
    }
    if top.is_empty() {
        assert_eq!(threads, 1, "{}", rg.log_text());
    } else if per_thread {
        assert_eq!(threads, 2, "{}", rg.log_text());
    } else {
        assert!(threads >= 3, "{threads} threads\n{}", rg.log_text());
    }
    make_table(&rg, &db).await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let client = rg
            .client(if i % 3 == 2 { "analyst" } else { "web" }, &db)
            .await;
        let rg_log = rg.log.clone();
        tasks.push(tokio::spawn(async move {
            let log = || std::fs::read_to_string(&rg_log).unwrap_or_default();
            let zone = format!("Etc/GMT+{}", i % 12);
            let app = format!("client{i}");
            client
                .batch_execute(&format!(
                    "SET TimeZone = '{zone}'; SET application_name = '{app}'; SET search_path = pg_catalog, public"
                ))
                .await
                .unwrap_or_else(|e| panic!("client {i}: {e}\n{}", log()));
            let count = client
                .prepare("SELECT count(*) FROM items WHERE id <= $1")
                .await
                .unwrap();
            let settings = client
                .prepare("SELECT current_setting('TimeZone'), current_setting('application_name'), current_setting('search_path'), current_user::text")
                .await
                .unwrap();
            for round in 0..15 {
                let row = client.query_one(&settings, &[]).await.unwrap_or_else(|e| panic!("client {i} round {round}: {e}\n{}", log()));
                assert_eq!(row.get::<_, String>(0), zone, "client {i} round {round}");
                assert_eq!(row.get::<_, String>(1), app, "client {i} round {round}");
                assert_eq!(row.get::<_, String>(2), "pg_catalog, public", "client {i}");
                assert!(row.get::<_, String>(3).ends_with("_owner"), "client {i}");
                let n: i64 = client
                    .query_one(&count, &[&(round + 1)])
                    .await
                    .unwrap_or_else(|e| panic!("client {i} round {round}: {e}\n{}", log()))
                    .get(0);
                assert_eq!(n, i64::from(round + 1));
                // SET LOCAL ends with its transaction, wherever the next one runs.
                client
                    .batch_execute("BEGIN; SET LOCAL statement_timeout = '1234ms'; SELECT 1; COMMIT")
                    .await
                    .unwrap();
                let timeout: String = client
                    .query_one("SHOW statement_timeout", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(timeout, "0", "client {i}: SET LOCAL leaked");
                tokio::task::yield_now().await;
            }
        }));
    }
    let watcher = {
        let db_login = db.login.clone();
        tokio::spawn(async move {
            let admin = admin("postgres").await;
            let mut most = 0i64;
            for _ in 0..200 {
                let n: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                        &[&db_login],
                    )
                    .await
                    .unwrap()
                    .get(0);
                most = most.max(n);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        })
    };
    for task in tasks {
        task.await.unwrap();
    }
    // The migrator's own session plus at most one pool of 3 per class's role pool.
    let most = watcher.await.unwrap();
    assert!(most <= 3 + 3 + 1, "{most} backend sessions for 24 clients");
    assert!(backend_sessions(&db).await <= 7);
    let text = metrics(admin_port).await;
    let owner = &db.owner;
    let checkouts = metric(
        &text,
        &format!("rolegate_pool_checkouts_total{{pool=\"{owner}\"}}"),
    );
    assert!(checkouts > 16.0 * 15.0, "{checkouts} checkouts\n{text}");
    // Every checkout was timed, and so was every transaction: each checkout but the one
    // that greeted each of the 16 clients of this pool lent a backend for one transaction
    // (no client pins here).
    let series = |name: &str| format!("rolegate_pool_{name}{{pool=\"{owner}\"}}");
    let waits = metric(&text, &series("checkout_wait_seconds_count"));
    assert_eq!(waits, checkouts, "{text}");
    let transactions = metric(&text, &series("transaction_seconds_count"));
    assert_eq!(transactions, checkouts - 16.0, "{text}");
    let slowest_bucket =
        format!("rolegate_pool_transaction_seconds_bucket{{le=\"+Inf\",pool=\"{owner}\"}}");
    assert_eq!(metric(&text, &slowest_bucket), transactions, "{text}");
    let spent = metric(&text, &series("transaction_seconds_sum"));
    assert!(spent > 0.0 && spent < transactions * 5.0, "{spent}\n{text}");
    // The pool's logins, each timed (a backend closed by its client's leaving is
    // replaced, so a few more than the pool's 3).
    let connects = metric(&text, &series("backend_connect_seconds_count"));
    assert!((1.0..=8.0).contains(&connects), "{connects}\n{text}");
    // Each client prepared its two statements; backends lacking them got them on demand.
    let prepares = metric(
        &text,
        &format!("rolegate_pool_prepares_total{{pool=\"{owner}\"}}"),
    );
    assert!(
        (6.0..=16.0 * 2.0 * 4.0).contains(&prepares),
        "{prepares}\n{text}"
    );
    assert!(
        metric(
            &text,
            &format!("rolegate_pool_backends_idle{{pool=\"{owner}/readonly\"}}")
        ) >= 1.0
    );
    if per_thread {
        // Each thread's pool of the owner role has its share of the 3 and opened backend
        // connections of its own (kept idle now): 16 clients all landing on one listener
        // would happen once in 2^15 runs.
        let (_, status) = http_get(admin_port, "/status").await;
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        let pools = status["pools"].as_array().unwrap();
        let pool = pools.iter().find(|p| p["pool"] == owner.as_str()).unwrap();
        assert_eq!(pool["size"], 3, "{status:#}");
        let mut shares: Vec<(u64, u64, u64)> = pool["threads"]
            .as_array()
            .unwrap_or_else(|| panic!("{status:#}"))
            .iter()
            .map(|p| {
                let number = |key: &str| p[key].as_u64().unwrap_or(u64::MAX);
                (number("thread"), number("size"), number("backends_open"))
            })
            .collect();
        shares.sort();
        assert_eq!(shares.len(), 2, "{status:#}");
        assert_eq!((shares[0].0, shares[0].1), (0, 2), "{status:#}");
        assert_eq!((shares[1].0, shares[1].1), (1, 1), "{status:#}");
        assert!(shares.iter().all(|s| s.2 >= 1), "{status:#}");
    }
}

/// psycopg 3 (server-side prepared statements, pipeline mode), asyncpg (statement cache,
/// binary types), psycopg2, node-postgres (named statements) and pgjdbc (after
/// prepareThreshold): far more connections than backend sessions, each seeing only its
/// own settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_drivers_work_in_transaction_mode() {
    let db = TestDb::create("pool_drivers").await;
    let rg = Rolegate::start_with(&db, pooled(4, "", free_port())).await;
    for user in ["web", "analyst"] {
        let dsn = format!(
            "postgresql://{user}:{}@127.0.0.1:{}/{}?sslmode=disable",
            password_of(user),
            rg.port,
            db.name
        );
        let (ok, out, err) = python("pooled_drivers.py", &[&dsn, "16"]).await;
        assert!(
            ok && out.starts_with("ok"),
            "{user}: {out}{err}\n{}",
            rg.log_text()
        );
        let (ok, out, err) = node("pooled_node.js", &[&dsn, "16"]).await;
        assert!(
            ok && out.starts_with("ok"),
            "{user}: {out}{err}\n{}",
            rg.log_text()
        );
        let url = format!(
            "jdbc:postgresql://127.0.0.1:{}/{}?sslmode=disable",
            rg.port, db.name
        );
        let (ok, out, err) = java("PooledJdbc.java", &[&url, user, password_of(user), "12"]).await;
        assert!(
            ok && out.starts_with("ok"),
            "{user}: {out}{err}\n{}",
            rg.log_text()
        );
    }
    assert!(backend_sessions(&db).await <= 8);
}

/// A client that waits longer than checkout_timeout gets an error, not a disconnect, and
/// its session works once a backend session is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_timeout_leaves_the_session_usable() {
    let db = TestDb::create("pool_wait").await;
    let admin_port = free_port();
    let rg = Rolegate::start_with(&db, pooled(1, "checkout_timeout = \"300ms\"", admin_port)).await;
    let holder = rg.client("web", &db).await;
    let waiter = rg.client("web", &db).await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let err = waiter.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    assert!(message(&err).contains("checkout_timeout"), "{err}");
    let err = waiter.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    let n: i32 = waiter.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    let text = metrics(admin_port).await;
    let owner = &db.owner;
    assert_eq!(
        metric(
            &text,
            &format!("rolegate_pool_checkout_timeouts_total{{pool=\"{owner}\"}}")
        ),
        2.0
    );
}

/// A client that got no backend connection and never finishes its batch (a Parse, no
/// Sync) is still closed by idle_client_timeout, not waited for without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_without_a_backend_is_bound_by_the_idle_timeout() {
    let db = TestDb::create("pool_wait_idle").await;
    let more = "checkout_timeout = \"200ms\"\n[limits]\nidle_client_timeout = \"1s\"";
    let rg = Rolegate::start_with(&db, pooled(1, more, free_port())).await;
    let mut waiter = RawClient::login(rg.port, "web", password_of("web"), &db.name).await;
    let holder = rg.client("web", &db).await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "", "SELECT 1");
    waiter.send(&out).await;
    let (tag, body) = waiter.read().await.expect("a FATAL, not a silent close");
    assert_fatal(tag, &body, "57P05", "a batch without a backend");
    assert!(waiter.read().await.is_none(), "the session ended");
    holder.batch_execute("COMMIT").await.unwrap();
}

/// What lives in one backend session pins its client there: a LISTEN gets its NOTIFY
/// between transactions, a session advisory lock stays held; both are undone before the
/// backend session serves anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_advisory_locks_pin_the_client() {
    let db = TestDb::create("pool_pin").await;
    let admin_port = free_port();
    let rg = Rolegate::start_with(&db, pooled(2, "", admin_port)).await;
    let owner = db.owner.clone();
    let (listener, mut connection) =
        tokio_postgres::connect(&rg.url("web", "web-pw", &db.name), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(message)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    listener.batch_execute("LISTEN jobs").await.unwrap();
    let text = metrics(admin_port).await;
    assert_eq!(
        metric(
            &text,
            &format!("rolegate_pool_clients_pinned{{pool=\"{owner}\"}}")
        ),
        1.0
    );
    // Other clients keep running on the one backend session left, and notify.
    let other = rg.client("web", &db).await;
    for i in 0..5 {
        other
            .batch_execute(&format!("NOTIFY jobs, 'job {i}'"))
            .await
            .unwrap();
        listener.batch_execute("SELECT 1").await.unwrap();
    }
    for i in 0..5 {
        let got = tokio::time::timeout(Duration::from_secs(5), notes.recv())
            .await
            .expect("a notification")
            .unwrap();
        assert_eq!(got, format!("job {i}"));
    }
    // A session advisory lock is held across transactions.
    let locker = rg.client("web", &db).await;
    let got: bool = locker
        .query_one("SELECT pg_try_advisory_lock(42)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(got);
    drop(listener);
    let probe = rg.client("web", &db).await;
    for _ in 0..3 {
        let free: bool = probe
            .query_one("SELECT pg_try_advisory_lock(42)", &[])
            .await
            .unwrap()
            .get(0);
        assert!(!free, "the lock moved with its backend session");
        locker.batch_execute("SELECT 1").await.unwrap();
    }
    drop(locker);
    // Once the holder left, its backend session was reset (the lock released), not closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let free: bool = probe
            .query_one("SELECT pg_try_advisory_lock(42)", &[])
            .await
            .unwrap()
            .get(0);
        if free {
            probe
                .batch_execute("SELECT pg_advisory_unlock_all()")
                .await
                .unwrap();
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lock was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A cancel reaches the backend session running the client's query, and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_right_query() {
    let db = TestDb::create("pool_cancel").await;
    let rg = Rolegate::start_with(&db, pooled(3, "", free_port())).await;
    let victim = rg.client("web", &db).await;
    let bystander = rg.client("web", &db).await;
    let token = victim.cancel_token();
    let slow = tokio::spawn(async move { victim.batch_execute("SELECT pg_sleep(5)").await });
    let steady = tokio::spawn(async move {
        bystander
            .query_one("SELECT pg_sleep(1.5)::text", &[])
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = slow.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    steady
        .await
        .unwrap()
        .expect("the other client's query ran to its end");
}

/// With a runtime per thread a cancel request is a new connection the kernel may hand to
/// either thread's listener: every one reaches its query, wherever that runs. (A pool of
/// 8 is 4 per thread: the 4 sleeping clients fit however the kernel spreads them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_cross_threads_with_a_runtime_per_thread() {
    let db = TestDb::create("pool_cancel_per_thread").await;
    let mut options = pooled(8, "", free_port());
    options
        .top
        .push_str("threads = 2\nruntime = \"per_thread\"\n");
    let rg = Rolegate::start_with(&db, options).await;
    let mut slow = Vec::new();
    for _ in 0..4 {
        let victim = rg.client("web", &db).await;
        let token = victim.cancel_token();
        let query = tokio::spawn(async move { victim.batch_execute("SELECT pg_sleep(30)").await });
        slow.push((token, query));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (token, query) in slow {
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), query)
            .await
            .expect("the cancel never arrived")
            .unwrap()
            .unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    }
}

/// A backend session killed in the middle of a transaction fails that transaction only:
/// the client goes on with another backend session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_fails_only_its_transaction() {
    let db = TestDb::create("pool_kill").await;
    let rg = Rolegate::start_with(&db, pooled(2, "", free_port())).await;
    let client = rg.client("web", &db).await;
    client.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(terminate(pid).await);
    assert!(client.query_one("SELECT 1", &[]).await.is_err());
    let n: i32 = client
        .query_one("SELECT 3", &[])
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", rg.log_text()))
        .get(0);
    assert_eq!(n, 3);
    let other: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(other, pid);
}

/// A backend session the server ends while it sits idle in the pool never reaches a
/// client: the checkout finds it closed, or the relay sees it end before it was sent
/// anything, and the client's statement runs on a live one with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_ended_while_idle_is_never_lent() {
    let db = TestDb::create("pool_idle_kill").await;
    let rg = Rolegate::start_with(&db, pooled(1, "", free_port())).await;
    let client = rg.client("web", &db).await;
    let pid = |messages: Vec<tokio_postgres::SimpleQueryMessage>| {
        messages
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0)?.parse::<i32>().ok(),
                _ => None,
            })
            .expect("a row with a pid")
    };
    let first = pid(client
        .simple_query("SELECT pg_backend_pid()")
        .await
        .unwrap());
    assert!(terminate(first).await);
    // (Gone from the server, and its goodbye on rolegate's socket; PostgreSQL 13's
    // pg_terminate_backend has no wait.)
    let admin = admin("postgres").await;
    for _ in 0..100 {
        let gone: bool = admin
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                &[&first],
            )
            .await
            .unwrap()
            .get(0);
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next = client
        .simple_query("SELECT pg_backend_pid()")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", rg.log_text()));
    assert_ne!(pid(next), first);
}

/// When the settings a transaction changed cannot be read back from its backend session
/// (the server ends it while rolegate reads them), the client's session ends with a
/// FATAL: its next statement never runs without what it SET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_be_carried_over_end_the_session() {
    let db = TestDb::create("pool_settings_lost").await;
    let rg = Rolegate::start_with(&db, pooled(2, "", free_port())).await;
    let mut client = RawClient::login(rg.port, "web", password_of("web"), &db.name).await;
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_query(&mut out, "SELECT 1");
    client.send(&out).await;
    assert_eq!(client.data_values().await, ["1"]);
    // rolegate reads a session's settings back from pg_settings after a transaction
    // that SET something: a lock on that view holds the read until the backend session
    // is ended under it.
    let locker = admin(&db.name).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE pg_catalog.pg_settings IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    out.clear();
    rolegate::wire::put_query(&mut out, "SET work_mem = '8MB'");
    client.send(&out).await;
    let (_, errors) = client.until_ready().await;
    assert!(errors.is_empty(), "{errors:?}");
    let watcher = admin("postgres").await;
    let mut reading = None;
    for _ in 0..200 {
        reading = watcher
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND wait_event_type = 'Lock'",
                &[&db.login],
            )
            .await
            .unwrap()
            .map(|row| row.get::<_, i32>(0));
        if reading.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let reading = reading.expect("rolegate reads the settings back after a SET");
    assert!(terminate(reading).await);
    locker.batch_execute("ROLLBACK").await.unwrap();
    out.clear();
    rolegate::wire::put_query(&mut out, "SHOW work_mem");
    client.send(&out).await;
    let (tag, body) = client.read().await.expect("a message, not a silent close");
    let fields = assert_fatal(tag, &body, "08006", "the next statement after the SET");
    let text = rolegate::wire::field(&fields, b'M').unwrap_or_default();
    assert!(text.contains("settings"), "{text}");
    assert!(client.read().await.is_none(), "the session ended");
    // Other clients are served on.
    let other = rg.client("web", &db).await;
    let n: i32 = other.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

/// Protocol-level prepared statements keep PostgreSQL's own answers: an unknown name is
/// 26000, a duplicate 42P05, a closed one is gone for the client (the server copy stays
/// for others); rolegate's own names cannot be used from SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_errors_are_postgres_own() {
    let db = TestDb::create("pool_stmts").await;
    let rg = Rolegate::start_with(&db, pooled(1, "", free_port())).await;
    let mut raw = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let sync = |out: &mut bytes::BytesMut| rolegate::wire::put_message(out, b'S', &[]);
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "a", "SELECT 'a'::text");
    sync(&mut out);
    raw.send(&out).await;
    assert!(raw.until_ready().await.1.is_empty());
    for round in 0..2 {
        let mut out = bytes::BytesMut::new();
        bind_execute(&mut out, "a", &[]);
        sync(&mut out);
        raw.send(&out).await;
        assert_eq!(
            raw.data_values().await,
            vec!["a".to_owned()],
            "round {round}"
        );
    }
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "a", "SELECT 'other'::text");
    sync(&mut out);
    raw.send(&out).await;
    let (_, errors) = raw.until_ready().await;
    assert_eq!(rolegate::wire::field(&errors[0], b'C'), Some("42P05"));
    let mut out = bytes::BytesMut::new();
    bind_execute(&mut out, "nope", &[]);
    sync(&mut out);
    raw.send(&out).await;
    let (_, errors) = raw.until_ready().await;
    assert_eq!(rolegate::wire::field(&errors[0], b'C'), Some("26000"));
    assert!(rolegate::wire::field(&errors[0], b'M')
        .unwrap()
        .contains("\"nope\""));
    // Close: gone for this client; another client's identical statement still runs.
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_message(&mut out, b'C', b"Sa\0");
    sync(&mut out);
    raw.send(&out).await;
    let (tags, errors) = raw.until_ready().await;
    assert!(errors.is_empty() && tags.contains(&b'3'), "{tags:?}");
    let mut out = bytes::BytesMut::new();
    bind_execute(&mut out, "a", &[]);
    sync(&mut out);
    raw.send(&out).await;
    let (_, errors) = raw.until_ready().await;
    assert_eq!(rolegate::wire::field(&errors[0], b'C'), Some("26000"));
    let mut other = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "b", "SELECT 'a'::text");
    bind_execute(&mut out, "b", &[]);
    sync(&mut out);
    other.send(&out).await;
    assert_eq!(other.data_values().await, vec!["a".to_owned()]);
    // DEALLOCATE ALL (Prisma after BEGIN) empties the client's view; the next Parse of
    // the same name works.
    let web = rg.client("web", &db).await;
    let statement = web.prepare("SELECT 5").await.unwrap();
    web.batch_execute("BEGIN; DEALLOCATE ALL; COMMIT")
        .await
        .unwrap();
    let err = web.query(&statement, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("26000"), "{err}");
    let n: i32 = web.query_one("SELECT 5", &[]).await.unwrap().get(0);
    assert_eq!(n, 5);
    for sql in ["EXECUTE rolegate_s1", "DEALLOCATE rolegate_s1"] {
        let err = web.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{sql}: {err}");
    }
}

/// Idle backend sessions above `min_idle` are closed after `server_idle_timeout`; the
/// pool keeps `min_idle` open without clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_backends_shrink_to_min_idle() {
    let db = TestDb::create("pool_idle").await;
    let rg = Rolegate::start_with(
        &db,
        pooled(4, "min_idle = 1\nserver_idle_timeout = \"1s\"", free_port()),
    )
    .await;
    let clients = futures_util::future::join_all((0..4).map(|_| rg.client("web", &db))).await;
    // Four transactions open at once take four backend sessions.
    for c in &clients {
        c.batch_execute("BEGIN").await.unwrap();
    }
    assert_eq!(backend_sessions(&db).await, 4);
    for c in &clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while backend_sessions(&db).await > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle backends stayed open"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(backend_sessions(&db).await, 1, "min_idle kept one open");
    let n: i32 = clients[0].query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
}

fn sync(out: &mut bytes::BytesMut) {
    rolegate::wire::put_message(out, b'S', &[]);
}

fn sqlstate_of(errors: &[Vec<(u8, String)>]) -> Option<&str> {
    errors.first().and_then(|e| rolegate::wire::field(e, b'C'))
}

/// A backend session goes back to the pool only between batches: not in the middle of a
/// client's frame, not after a refused extended-protocol message before its Sync, and
/// what one client left under the unnamed statement is never another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_is_lent_again_only_when_it_is_clean() {
    let db = TestDb::create("pool_clean").await;
    let rg =
        Rolegate::start_with(&db, pooled(1, "checkout_timeout = \"500ms\"", free_port())).await;
    let other = rg.client("web", &db).await;
    // A Query, then only the header of a CopyData frame: the rest is still to come.
    let mut raw = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_query(&mut out, "SELECT 1");
    out.extend_from_slice(b"d\0\0\0\x0e");
    raw.send(&out).await;
    assert!(raw.until_ready().await.1.is_empty());
    let err = other.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    drop(raw);
    // A refused Parse and a Flush: the server skips to Sync, the session is the client's.
    let mut raw = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "", "CREATE TABLE x (i int)");
    rolegate::wire::put_message(&mut out, b'H', &[]);
    raw.send(&out).await;
    let (tag, body) = raw.read().await.unwrap();
    assert_eq!(tag, b'E');
    assert_eq!(
        rolegate::wire::field(&rolegate::wire::error_fields(&body), b'C'),
        Some("42501")
    );
    let err = other.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    let mut out = bytes::BytesMut::new();
    sync(&mut out);
    raw.send(&out).await;
    raw.until_ready().await;
    drop(raw);
    // Another client's unnamed statement cannot be bound.
    let mut first = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "", "SELECT set_config($1, $2, false)");
    sync(&mut out);
    first.send(&out).await;
    assert!(first.until_ready().await.1.is_empty());
    let mut second = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    bind_execute(&mut out, "", &[(0, b"role"), (0, b"none")]);
    sync(&mut out);
    second.send(&out).await;
    let (_, errors) = second.until_ready().await;
    assert_eq!(sqlstate_of(&errors), Some("26000"), "{errors:?}");
    let user: String = other
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, db.owner);
}

/// A client's unnamed statement is the text it parsed last (a new text or the same one
/// again), whatever other clients left under the empty name on the backend session in
/// between: rolegate parses it again from its own record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_is_the_last_one_parsed() {
    let db = TestDb::create("pool_unnamed").await;
    let rg = Rolegate::start_with(&db, pooled(1, "", free_port())).await;
    let mut mine = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut other = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let steps = [
        ("SELECT $1::int * 10", "SELECT $1::int + 1", "5", "50"),
        ("SELECT $1::int + 1", "SELECT $1::int * 10", "5", "6"),
        ("SELECT $1::int + 1", "SELECT $1::int * 10", "7", "8"),
        ("SELECT $1::int * 10", "SELECT $1::int * 10", "7", "70"),
    ];
    for (my_text, other_text, param, expected) in steps {
        for (client, text) in [(&mut mine, my_text), (&mut other, other_text)] {
            let mut out = bytes::BytesMut::new();
            parse(&mut out, "", text);
            sync(&mut out);
            client.send(&out).await;
            let (_, errors) = client.until_ready().await;
            assert!(errors.is_empty(), "{errors:?}");
        }
        let mut out = bytes::BytesMut::new();
        bind_execute(&mut out, "", &[(0, param.as_bytes())]);
        sync(&mut out);
        mine.send(&out).await;
        assert_eq!(
            mine.data_values().await,
            [expected],
            "{my_text} with {param}"
        );
    }
}

/// The client's view of its statements follows what the server did: a Parse that failed
/// can be sent again, and a DEALLOCATE ALL that was bound but never executed leaves no
/// statement name in a state that breaks the next Parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_bookkeeping_follows_what_the_server_did() {
    let db = TestDb::create("pool_books").await;
    let rg = Rolegate::start_with(&db, pooled(1, "", free_port())).await;
    let mut raw = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "p", "SELECT no_such_column");
    sync(&mut out);
    raw.send(&out).await;
    let (_, errors) = raw.until_ready().await;
    assert_eq!(sqlstate_of(&errors), Some("42703"), "{errors:?}");
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "p", "SELECT 'again'::text");
    bind_execute(&mut out, "p", &[]);
    sync(&mut out);
    raw.send(&out).await;
    assert_eq!(raw.data_values().await, vec!["again".to_owned()]);
    // DEALLOCATE ALL bound, not executed; then statements are used as usual.
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "d", "DEALLOCATE ALL");
    rolegate::wire::put_message(&mut out, b'B', b"\0d\0\0\0\0\0\0\0");
    sync(&mut out);
    raw.send(&out).await;
    assert!(raw.until_ready().await.1.is_empty());
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "q", "SELECT 'again'::text");
    bind_execute(&mut out, "q", &[]);
    sync(&mut out);
    raw.send(&out).await;
    assert_eq!(raw.data_values().await, vec!["again".to_owned()]);
    drop(raw);
    let mut next = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "r", "SELECT 'again'::text");
    bind_execute(&mut out, "r", &[]);
    sync(&mut out);
    next.send(&out).await;
    assert_eq!(next.data_values().await, vec!["again".to_owned()]);
}

/// COPY FROM STDIN over both protocols (tokio-postgres sends a Sync before the data,
/// which the server ignores): afterwards the backend session goes back to the pool, and
/// another client's unnamed-statement tricks across an error still find nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_gives_the_backend_back() {
    use futures_util::SinkExt;
    let db = TestDb::create("pool_copy").await;
    let rg = Rolegate::start_with(&db, pooled(1, "checkout_timeout = \"2s\"", free_port())).await;
    make_table(&rg, &db).await;
    let copier = rg.client("web", &db).await;
    let other = rg.client("web", &db).await;
    for round in 0..3 {
        let sink = copier
            .copy_in("COPY items (id, owner) FROM STDIN")
            .await
            .unwrap();
        let mut sink = std::pin::pin!(sink);
        let rows = format!(
            "{}\tcopied\n{}\tcopied\n",
            1000 + 2 * round,
            1001 + 2 * round
        );
        sink.send(bytes::Bytes::from(rows)).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), 2);
        let n: i64 = other
            .query_one("SELECT count(*) FROM items WHERE owner = 'copied'", &[])
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", rg.log_text()))
            .get(0);
        assert_eq!(n, 2 * (round + 1));
    }
    // An error makes the server skip the client's Parse of its unnamed statement; the
    // Bind after the next Sync gets the client's statement, never another client's.
    let mut first = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    parse(&mut out, "", "SELECT set_config($1, $2, false)");
    sync(&mut out);
    first.send(&out).await;
    assert!(first.until_ready().await.1.is_empty());
    drop(first);
    let mut second = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let mut out = bytes::BytesMut::new();
    bind_execute(&mut out, "nope", &[]);
    parse(&mut out, "", "SELECT $1::text || $2::text");
    sync(&mut out);
    bind_execute(&mut out, "", &[(0, b"role"), (0, b"none")]);
    sync(&mut out);
    second.send(&out).await;
    let (_, errors) = second.until_ready().await;
    assert_eq!(sqlstate_of(&errors), Some("26000"), "{errors:?}");
    // (Its own text, parsed again on the backend session; never the other client's
    // set_config.)
    assert_eq!(second.data_values().await, vec!["rolenone".to_owned()]);
    let user: String = other
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, db.owner);
}

/// A pin ends when the server has nothing left that only that backend session holds:
/// after UNLISTEN * or an advisory unlock, the backend session serves others again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undoing_what_pins_unpins() {
    let db = TestDb::create("pool_unpin").await;
    let admin_port = free_port();
    let rg = Rolegate::start_with(&db, pooled(1, "checkout_timeout = \"500ms\"", admin_port)).await;
    let pinned = rg.client("web", &db).await;
    let other = rg.client("web", &db).await;
    let gauge = format!("rolegate_pool_clients_pinned{{pool=\"{}\"}}", db.owner);
    for (pin, half_undo, undo) in [
        ("LISTEN a; LISTEN b", "UNLISTEN a", "UNLISTEN *"),
        (
            "SELECT pg_advisory_lock(7), pg_advisory_lock(8)",
            "SELECT pg_advisory_unlock(7)",
            "SELECT pg_advisory_unlock(8)",
        ),
    ] {
        pinned.batch_execute(pin).await.unwrap();
        let err = other.query_one("SELECT 1", &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{pin}: {err}");
        // Something is still held: still pinned.
        pinned.batch_execute(half_undo).await.unwrap();
        let err = other.query_one("SELECT 1", &[]).await.unwrap_err();
        assert_eq!(
            sqlstate(&err).as_deref(),
            Some("53300"),
            "{half_undo}: {err}"
        );
        assert_eq!(metric(&metrics(admin_port).await, &gauge), 1.0);
        pinned.batch_execute(undo).await.unwrap();
        let n: i32 = other
            .query_one("SELECT 2", &[])
            .await
            .unwrap_or_else(|e| panic!("{undo}: {e}"))
            .get(0);
        assert_eq!(n, 2);
        assert_eq!(metric(&metrics(admin_port).await, &gauge), 0.0);
    }
}
