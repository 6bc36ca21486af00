//! Backend credential rotation while clients keep working.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

const ROTATOR_PASSWORD: &str = "rotator-secret-for-tests";

/// The rotator role, as `rolegate setup` makes it: on PostgreSQL 16 and later it may grant
/// the owner role but neither inherits it nor can SET ROLE to it.
async fn make_rotator(db: &TestDb) -> String {
    let rotator = format!("{}_rotator", db.name);
    let admin = admin("postgres").await;
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let options = if version >= 160_000 {
        "WITH ADMIN OPTION, INHERIT FALSE, SET FALSE"
    } else {
        "WITH ADMIN OPTION"
    };
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{rotator}\" LOGIN CREATEROLE NOINHERIT PASSWORD '{ROTATOR_PASSWORD}';
             GRANT \"{owner}\" TO \"{rotator}\" {options};
             GRANT pg_signal_backend TO \"{rotator}\";",
            owner = db.owner
        ))
        .await
        .unwrap();
    rotator
}

/// A file holding the rotator's connection URL (kept for the life of the test process).
fn rotator_url_file(rotator: &str) -> std::path::PathBuf {
    let url_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        url_file.path(),
        format!(
            "host=127.0.0.1 port={} user={rotator} password={ROTATOR_PASSWORD} dbname=postgres",
            cluster().port
        ),
    )
    .unwrap();
    url_file.keep().unwrap().1
}

async fn managed(db: &TestDb, rotation: &str) -> Rolegate {
    let rotator = make_rotator(db).await;
    let url_path = rotator_url_file(&rotator);
    let admin_port = free_port();
    Rolegate::start_with(
        db,
        Options {
            top: format!("admin_listen = \"127.0.0.1:{admin_port}\"\n"),
            extra: format!(
                "[rotation]\nmode = \"managed\"\nrotator_url_file = \"{}\"\n{rotation}\n",
                url_path.display()
            ),
            ..Options::default()
        },
    )
    .await
}

/// The port of the admin endpoint in a test rolegate's config.
fn admin_port(rg: &Rolegate) -> u16 {
    let config = std::fs::read_to_string(rg.config_path()).unwrap();
    config
        .lines()
        .find_map(|l| l.strip_prefix("admin_listen = \"127.0.0.1:"))
        .and_then(|rest| rest.trim_end_matches('"').parse().ok())
        .expect("admin_listen in the config")
}

async fn rotate(rg: &Rolegate) -> (bool, String) {
    let config = rg.config_path();
    let (ok, out, err) =
        rolegate_command(&["rotate", "--config", config.to_str().unwrap()], &[]).await;
    (ok, format!("{out}{err}"))
}

async fn session_user(rg: &Rolegate, db: &TestDb) -> String {
    rg.client("web", db)
        .await
        .query_one("SELECT session_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_rotations_under_load_lose_no_query() {
    let db = TestDb::create("rot").await;
    let rg = managed(&db, "drain = \"4s\"\non_drain_timeout = \"terminate\"").await;
    let prefix = format!("{}_login_", db.name);
    rg.client("migrate", &db)
        .await
        .batch_execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, worker int, n int)")
        .await
        .unwrap();
    let first_login = session_user(&rg, &db).await;
    assert!(first_login.starts_with(&prefix), "{first_login}");

    // A long-lived session from before the rotations.
    let long_lived = rg.client("web", &db).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..16i32 {
        let url = rg.url("web", "web-pw", &db.name);
        let (stop, done) = (stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Connect, a few short transactions, disconnect.
                let client = match connect_url(&url).await {
                    Ok(c) => c,
                    Err(e) => {
                        failures.push(format!("connect: {e:?}"));
                        continue;
                    }
                };
                for n in 0..3i32 {
                    let r = client
                        .batch_execute(&format!(
                            "BEGIN; INSERT INTO ledger (worker, n) VALUES ({worker}, {n}); COMMIT"
                        ))
                        .await;
                    match r {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("query: {e:?}")),
                    }
                }
            }
            failures
        }));
    }
    let mut seen_logins = vec![first_login.clone()];
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (ok, out) = rotate(&rg).await;
        assert!(ok, "rotation failed: {out}\n{}", rg.log_text());
        seen_logins.push(session_user(&rg, &db).await);
        if round == 0 {
            // Its login was just replaced, but the drain deadline is seconds away.
            long_lived
                .query_one("SELECT 1", &[])
                .await
                .expect("long-lived session within the drain");
        }
    }
    stop_workers_without_failures(&stop, workers, &done, 100).await;
    seen_logins.dedup();
    assert_eq!(
        seen_logins.len(),
        4,
        "each rotation must switch the login: {seen_logins:?}"
    );

    // After the drain deadlines: the long-lived session was ended, the old roles are gone.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let err = long_lived.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(
        err.is_closed() || sqlstate(&err).as_deref() == Some("57P01"),
        "{err:?}"
    );
    let current = seen_logins.last().unwrap().clone();
    assert_eq!(roles_with_prefix(&prefix).await, vec![current.clone()]);
    // An old login cannot log in any more (its role is gone).
    let old = format!(
        "host=127.0.0.1 port={} user={} password=x dbname={}",
        cluster().port,
        first_login,
        db.name
    );
    assert!(connect_url(&old).await.is_err());
    // The migrator's table survived and is usable.
    let web = rg.client("web", &db).await;
    web.batch_execute("INSERT INTO ledger (worker, n) VALUES (-1, -1)")
        .await
        .unwrap();
    let n: i64 = web
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n > 100);
    assert!(!rg.log_text().contains(ROTATOR_PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rotation_keeps_the_old_login() {
    let db = TestDb::create("rotfail").await;
    let rg = managed(&db, "drain = \"1s\"").await;
    let before = session_user(&rg, &db).await;
    let client = rg.client("web", &db).await;
    // The rotator loses its right to create roles.
    admin("postgres")
        .await
        .batch_execute(&format!("ALTER ROLE \"{}_rotator\" NOCREATEROLE", db.name))
        .await
        .unwrap();
    let (ok, out) = rotate(&rg).await;
    assert!(!ok, "rotation should fail: {out}");
    assert!(out.contains("error"), "{out}");
    client
        .query_one("SELECT 1", &[])
        .await
        .expect("open session untouched");
    assert_eq!(
        session_user(&rg, &db).await,
        before,
        "the old login must stay in use"
    );
    let prefix = format!("{}_login_", db.name);
    assert_eq!(
        roles_with_prefix(&prefix).await,
        vec![before],
        "no half-made role is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_switches_to_a_rewritten_file_and_refuses_a_wrong_one() {
    let db = TestDb::create("rotfile").await;
    let file = tempfile::NamedTempFile::new().unwrap();
    let write = |user: &str, password: &str| {
        std::fs::write(
            file.path(),
            format!("{{\"username\": \"{user}\", \"password\": \"{password}\"}}"),
        )
        .unwrap()
    };
    write(&db.login, LOGIN_PASSWORD);
    let rg = Rolegate::start_with(
        &db,
        Options {
            extra: format!(
                "[rotation]\nmode = \"file\"\nfile = \"{}\"\npoll_interval = \"200ms\"\n",
                file.path().display()
            ),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(session_user(&rg, &db).await, db.login);
    let second = format!("{}_2", db.login);
    admin("postgres")
        .await
        .batch_execute(&format!(
            "CREATE ROLE \"{second}\" LOGIN PASSWORD 'second-pw' IN ROLE \"{}\"",
            db.owner
        ))
        .await
        .unwrap();
    write(&second, "second-pw");
    let mut switched = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if session_user(&rg, &db).await == second {
            switched = true;
            break;
        }
    }
    assert!(
        switched,
        "rolegate did not switch to the rewritten credential"
    );
    // A wrong password is proved before use, refused, and the working login stays.
    write(&db.login, "not-the-password");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(session_user(&rg, &db).await, second);
    let log = rg.log_text();
    assert!(log.contains("does not log in"), "{log}");
    assert!(!log.contains("not-the-password") && !log.contains("second-pw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_rotate_against_one_database() {
    let db = TestDb::create("rottwo").await;
    let url_path = rotator_url_file(&make_rotator(&db).await);
    let mut instances = Vec::new();
    for id in ["a", "b"] {
        let admin_port = free_port();
        instances.push(
            Rolegate::start_with(
                &db,
                Options {
                    top: format!("admin_listen = \"127.0.0.1:{admin_port}\"\n"),
                    extra: format!(
                        "[rotation]\nmode = \"managed\"\ninstance_id = \"{id}\"\ndrain = \"1s\"\nrotator_url_file = \"{}\"\n",
                        url_path.display()
                    ),
                    ..Options::default()
                },
            )
            .await,
        );
    }
    for _ in 0..2 {
        for rg in &instances {
            let (ok, out) = rotate(rg).await;
            assert!(ok, "{out}");
        }
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (rg, id) in instances.iter().zip(["a", "b"]) {
        let user = session_user(rg, &db).await;
        assert!(
            user.starts_with(&format!("{}_login_{id}_", db.name)),
            "{user}"
        );
        let own = roles_with_prefix(&format!("{}_login_{id}_", db.name)).await;
        assert_eq!(
            own,
            vec![user],
            "instance {id} keeps exactly its current login"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_turns_on_a_rotation_schedule() {
    let db = TestDb::create("rotsighup").await;
    let rg = managed(&db, "drain = \"1s\"").await;
    let before = session_user(&rg, &db).await;
    let config_path = rg.config_path();
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace("drain = \"1s\"", "drain = \"1s\"\nevery = \"1s\""),
    )
    .unwrap();
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &rg.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut rotated = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if session_user(&rg, &db).await != before {
            rotated = true;
            break;
        }
    }
    assert!(
        rotated,
        "the schedule set by SIGHUP did not rotate: {}",
        rg.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_need_the_token() {
    const TOKEN: &str = "admin-token-for-tests-7f3a";
    let db = TestDb::create("token").await;
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), format!("{TOKEN}\n")).unwrap();
    let rg = managed(
        &db,
        &format!(
            "\n[admin]\ntoken_file = {:?}",
            token_file.path().display().to_string()
        ),
    )
    .await;
    let port = admin_port(&rg);
    let bearer = format!("Authorization: Bearer {TOKEN}");
    for (method, path) in [("GET", "/status"), ("POST", "/rotate")] {
        for headers in [
            &[][..],
            &["Authorization: Bearer wrong-token"][..],
            &["Authorization: admin-token-for-tests-7f3a"][..],
        ] {
            let (status, body) = http_request(port, method, path, headers).await;
            assert!(
                status.contains("401"),
                "{method} {path} {headers:?}: {status} {body}"
            );
        }
    }
    let (status, body) = http_request(port, "GET", "/status", &[&bearer]).await;
    assert!(
        status.contains("200") && body.contains("login_role"),
        "{status} {body}"
    );
    let before = session_user(&rg, &db).await;
    let (status, body) = http_request(port, "POST", "/rotate", &[&bearer]).await;
    assert!(
        status.contains("200") && body.contains("new_login"),
        "{status} {body}"
    );
    let after_http = session_user(&rg, &db).await;
    assert_ne!(before, after_http);
    // `rolegate rotate` reads the token from the same config.
    let (ok, out) = rotate(&rg).await;
    assert!(ok, "{out}");
    assert_ne!(session_user(&rg, &db).await, after_http);
    // Probes and metrics stay open.
    for path in ["/livez", "/readyz", "/healthz", "/metrics"] {
        let (status, _) = http_get(port, path).await;
        assert!(status.contains("200"), "{path}: {status}");
    }
    let log = rg.log_text();
    assert!(log.contains("admin request refused"), "{log}");
    assert!(
        !log.contains(TOKEN) && !log.contains("wrong-token"),
        "{log}"
    );
}

/// Transaction mode: 50 long-lived clients through three rotations lose no query and
/// are never ended; backend sessions of old logins are retired as they come back, so
/// only the newest login is left once the drains are over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_in_transaction_mode_keep_long_lived_clients() {
    let db = TestDb::create("rotpool").await;
    let rg = managed(
        &db,
        "drain = \"3s\"\non_drain_timeout = \"terminate\"\n\n[pool]\nmode = \"transaction\"\nsize = 4",
    )
    .await;
    let prefix = format!("{}_login_", db.name);
    rg.client("migrate", &db)
        .await
        .batch_execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, worker int, n int)")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..50i32 {
        let client = rg.client("web", &db).await;
        let (stop, done) = (stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let insert = client
                .prepare("INSERT INTO ledger (worker, n) VALUES ($1, $2)")
                .await
                .unwrap();
            let mut n = 0i32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match client.execute(&insert, &[&worker, &n]).await {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(format!("query: {e:?}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (client, failures)
        }));
    }
    let mut seen_logins = vec![session_user(&rg, &db).await];
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (ok, out) = rotate(&rg).await;
        assert!(ok, "rotation failed: {out}\n{}", rg.log_text());
        seen_logins.push(session_user(&rg, &db).await);
    }
    // Past every drain deadline, with the clients still working.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    let mut clients = Vec::new();
    for w in workers {
        let (client, failed) = w.await.unwrap();
        failures.extend(failed);
        clients.push(client);
    }
    assert!(
        failures.is_empty(),
        "{} failed queries: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        rg.log_text()
    );
    assert!(done.load(Ordering::Relaxed) > 500);
    seen_logins.dedup();
    assert_eq!(seen_logins.len(), 4, "{seen_logins:?}");
    let current = seen_logins.last().unwrap().clone();
    assert_eq!(roles_with_prefix(&prefix).await, vec![current.clone()]);
    // The long-lived clients were never ended, and now run on the newest login.
    for client in &clients {
        let user: String = client
            .query_one("SELECT session_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(user, current);
    }
}

/// A login per class, managed: `rolegate setup` makes the class roles and the rotator, and
/// each rotation replaces all three class logins while app and readonly clients keep
/// working; afterwards only the newest login of each class is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_every_class_login_under_load_loses_no_query() {
    rotate_every_class_login_under_load("").await;
}

/// The same with transaction pooling: a pool per class role, opened with its class's login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_every_class_login_in_transaction_mode_loses_no_query() {
    rotate_every_class_login_under_load("[pool]\nmode = \"transaction\"\nsize = 4\n").await;
}

async fn rotate_every_class_login_under_load(pool: &str) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let database = format!(
        "classrot{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let owner = format!("{database}_owner");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin_port = free_port();
    let url_file = dir.path().join("rotator.url");
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
         [tls]\nmode = \"disable\"\n[backend]\nhost = \"127.0.0.1\"\nport = {pg}\n\
         database = {database:?}\nowner_role = {owner:?}\n[backend.logins]\n\n\
         [rotation]\nmode = \"managed\"\nrotator_url_file = {url:?}\ndrain = \"2s\"\n\n{pool}\n{clients}",
        pg = cluster().port,
        url = url_file.display().to_string(),
        clients = clients_toml(),
    );
    let config_path = dir.path().join("rolegate.toml");
    std::fs::write(&config_path, &config).unwrap();
    let config_arg = config_path.to_str().unwrap().to_owned();
    let admin_url = cluster().admin_url("postgres");
    let (ok, out, err) = rolegate_command(
        &["setup", "--config", &config_arg],
        &[("ROLEGATE_ADMIN_URL", &admin_url)],
    )
    .await;
    assert!(ok, "setup failed:\n{out}\n{err}");
    let rotator_password = out
        .lines()
        .find_map(|l| l.split("(shown only this once): ").nth(1))
        .expect("setup prints the rotator password")
        .trim()
        .to_owned();
    std::fs::write(
        &url_file,
        format!(
            "host=127.0.0.1 port={} user={database}_rotator password={rotator_password} dbname=postgres",
            cluster().port
        ),
    )
    .unwrap();
    let rg = Rolegate::launch(dir, port, &config).await;
    let url = |user: &str| rg.url(user, password_of(user), &database);
    connect_url(&url("migrate"))
        .await
        .unwrap()
        .batch_execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, worker int)")
        .await
        .unwrap();
    let logins = || async {
        let mut out = Vec::new();
        for user in ["web", "analyst", "migrate"] {
            let row = connect_url(&url(user))
                .await
                .unwrap()
                .query_one("SELECT session_user::text, current_user::text", &[])
                .await
                .unwrap();
            out.push((row.get::<_, String>(0), row.get::<_, String>(1)));
        }
        out
    };
    let first = logins().await;
    for ((login, role), (class, class_role)) in first.iter().zip([
        ("app", format!("{database}_app")),
        ("readonly", format!("{database}_readonly")),
        ("migrator", owner.clone()),
    ]) {
        assert!(
            login.starts_with(&format!("{database}_{class}_login_")),
            "{login}"
        );
        assert_eq!(*role, class_role);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..8i32 {
        let (user, sql) = if worker % 2 == 0 {
            (
                "web",
                format!("INSERT INTO ledger (worker) VALUES ({worker})"),
            )
        } else {
            ("analyst", "SELECT count(*) FROM ledger".to_owned())
        };
        let url = url(user);
        let (stop, done) = (stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let client = match connect_url(&url).await {
                    Ok(c) => c,
                    Err(e) => {
                        failures.push(format!("connect: {e:?}"));
                        continue;
                    }
                };
                for _ in 0..3 {
                    match client.batch_execute(&sql).await {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("query: {e:?}")),
                    }
                }
            }
            failures
        }));
    }
    let mut seen = vec![first];
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (ok, out, err) = rolegate_command(&["rotate", "--config", &config_arg], &[]).await;
        assert!(ok, "rotation failed: {out}{err}\n{}", rg.log_text());
        assert!(out.contains("\"rotations\""), "{out}");
        seen.push(logins().await);
    }
    stop_workers_without_failures(&stop, workers, &done, 50).await;
    for i in 0..3 {
        let mut names: Vec<_> = seen.iter().map(|s| s[i].0.clone()).collect();
        names.dedup();
        assert_eq!(
            names.len(),
            3,
            "each rotation switches every class login: {seen:?}"
        );
    }
    // /status shows the login of each class.
    let (_, body) = http_get(admin_port, "/status").await;
    for (i, class) in ["app", "readonly", "migrator"].iter().enumerate() {
        assert!(
            body.contains(&seen[2][i].0),
            "{class} login not in /status: {body}"
        );
    }
    if !pool.is_empty() {
        // Each class's pool opens its connections with that class's login.
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        let pools = status["pools"].as_array().expect("pools in /status");
        for (i, label) in [
            format!("{database}_app"),
            format!("{database}_readonly/readonly"),
        ]
        .iter()
        .enumerate()
        {
            let pool = pools
                .iter()
                .find(|p| p["pool"] == label.as_str())
                .unwrap_or_else(|| panic!("no pool {label}: {body}"));
            assert_eq!(pool["login"], seen[2][i].0.as_str(), "{body}");
        }
    }
    // Once drained, only the newest login of each class is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for (i, class) in ["app", "readonly", "migrator"].iter().enumerate() {
        let prefix = format!("{database}_{class}_login_");
        loop {
            let left = roles_with_prefix(&prefix).await;
            if left == [seen[2][i].0.clone()] {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{class} logins left: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // check lists prefixed logins without sessions as stale: the current ones have some.
    let mut open_sessions = Vec::new();
    for user in ["web", "analyst", "migrate"] {
        open_sessions.push(connect_url(&url(user)).await.unwrap());
    }
    let (ok, out, err) = rolegate_command(
        &["check", "--config", &config_arg],
        &[("ROLEGATE_ADMIN_URL", &admin_url)],
    )
    .await;
    assert!(ok, "check after the rotations:\n{out}{err}");
    assert!(!rg.log_text().contains(&rotator_password));
}

/// Lets the workers run 700 ms more, stops them; none of their queries may have failed,
/// and together they must have run more than `at_least` to prove anything.
async fn stop_workers_without_failures<F: std::fmt::Debug>(
    stop: &AtomicBool,
    workers: Vec<tokio::task::JoinHandle<Vec<F>>>,
    done: &AtomicU64,
    at_least: u64,
) {
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed queries: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        done.load(Ordering::Relaxed) > at_least,
        "the workers did too little to prove anything"
    );
}
