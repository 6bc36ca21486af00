//! Transaction pooling (`[pool] mode = "transaction"`): many clients on few backend
//! sessions, each with its own settings and prepared statements, through real clients.

mod support;

use std::time::Duration;

use support::*;

fn pooled(size: usize, more: &str) -> Options {
    Options {
        extra: format!("[pool]\nmode = \"transaction\"\nsize = {size}\n{more}\n"),
        ..Options::default()
    }
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
    let db = TestDb::create("pool_many").await;
    let rg = Rolegate::start_with(&db, pooled(3, "")).await;
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
}
