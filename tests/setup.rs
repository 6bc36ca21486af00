//! `rolegate setup`, `check` and `demo` against a private cluster.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

/// A config for `setup`: role and database names derived from `base`, the login password
/// in a file next to the config (setup writes it).
struct Layout {
    dir: tempfile::TempDir,
    port: u16,
    database: String,
    owner: String,
    login: String,
    config_path: std::path::PathBuf,
    config: String,
}

static N: AtomicUsize = AtomicUsize::new(0);

fn layout(database: &str, owner: &str, extra_backend: &str) -> Layout {
    let n = N.fetch_add(1, Ordering::SeqCst);
    let database = format!("{database}{n}");
    let owner = format!("{owner}{n}");
    let login = format!("{database}_login_0001");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\n[tls]\nmode = \"disable\"\n[backend]\nhost = \"127.0.0.1\"\nport = {pg}\n\
         database = {database:?}\nowner_role = {owner:?}\nlogin_user = {login:?}\n\
         login_password_file = \"login.secret\"\n{extra_backend}\n\n{clients}",
        pg = cluster().port,
        clients = clients_toml(),
    );
    let config_path = dir.path().join("rolegate.toml");
    std::fs::write(&config_path, &config).unwrap();
    Layout {
        dir,
        port,
        database,
        owner,
        login,
        config_path,
        config,
    }
}

fn admin_url() -> String {
    cluster().admin_url("postgres")
}

async fn setup(layout: &Layout, extra: &[&str]) -> (bool, String, String) {
    let config = layout.config_path.to_str().unwrap();
    let mut args = vec!["setup", "--config", config];
    args.extend_from_slice(extra);
    rolegate_command(&args, &[("ROLEGATE_ADMIN_URL", &admin_url())]).await
}

async fn check(layout: &Layout) -> (bool, String, String) {
    let config = layout.config_path.to_str().unwrap();
    rolegate_command(
        &["check", "--config", config],
        &[("ROLEGATE_ADMIN_URL", &admin_url())],
    )
    .await
}

/// Runs every `fix:` line `check` printed in `out` (as the admin, in the database), then
/// `check` must be clean.
async fn apply_fixes_then_check_is_clean(layout: &Layout, out: &str) {
    let admin_db = admin(&layout.database).await;
    for line in out.lines().filter_map(|l| l.trim().strip_prefix("fix: ")) {
        admin_db
            .batch_execute(line)
            .await
            .unwrap_or_else(|e| panic!("{line}: {e}"));
    }
    let (ok, out, _) = check(layout).await;
    assert!(ok, "check after the fixes:\n{out}");
}

async fn serve(layout: Layout) -> Rolegate {
    let config = layout.config.clone();
    Rolegate::launch(layout.dir, layout.port, &config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_on_an_empty_cluster_then_the_whole_flow() {
    let layout = layout("shop", "shop_owner", "");
    let (ok, out, err) = setup(&layout, &[]).await;
    assert!(ok, "setup failed:\n{out}\n{err}");
    let setup_out = out.clone();
    // The login password went to a 0600 file, never to stdout.
    let secret = layout.dir.path().join("login.secret");
    let password = std::fs::read_to_string(&secret).unwrap();
    assert!(!out.contains(password.trim()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let (ok, out, _) = check(&layout).await;
    assert!(ok, "check after setup found problems:\n{out}");

    let (database, owner, login) = (
        layout.database.clone(),
        layout.owner.clone(),
        layout.login.clone(),
    );
    let rg = serve(layout).await;
    let url = |user: &str| rg.url(user, password_of(user), &database);
    let migrate = connect_url(&url("migrate")).await.unwrap();
    migrate
        .batch_execute("CREATE TABLE orders (id serial PRIMARY KEY, total int)")
        .await
        .unwrap();
    let web = connect_url(&url("web")).await.unwrap();
    web.batch_execute("INSERT INTO orders (total) VALUES (42)")
        .await
        .unwrap();
    let row = web
        .query_one(
            "SELECT total, current_user::text, session_user::text FROM orders",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), owner);
    assert_eq!(row.get::<_, String>(2), login);
    let err = web
        .batch_execute("CREATE TABLE nope (id int)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"));

    // PUBLIC cannot connect to the database or create in its schema.
    let admin_db = admin(&database).await;
    let row = admin_db
        .query_one(
            "SELECT has_database_privilege('public', current_database(), 'CONNECT'),
                    has_schema_privilege('public', 'public', 'CREATE'),
                    (SELECT rolcanlogin FROM pg_roles WHERE rolname = $1),
                    (SELECT rolsuper FROM pg_roles WHERE rolname = $2)",
            &[&owner, &format!("{database}_rotator")],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "PUBLIC may still connect");
    assert!(!row.get::<_, bool>(1), "PUBLIC may still create in public");
    assert!(!row.get::<_, bool>(2), "the owner role can log in");
    assert!(!row.get::<_, bool>(3), "the rotator is a superuser");

    // The rotator can manage roles, and nothing else: no data, no databases.
    let rotator_password = out_of_setup_rotator_password(&setup_out);
    let rotator_url = |db: &str| {
        format!(
            "host=127.0.0.1 port={} user={database}_rotator password={rotator_password} dbname={db}",
            cluster().port
        )
    };
    let rotator = connect_url(&rotator_url("postgres"))
        .await
        .expect("rotator logs in");
    rotator
        .batch_execute("CREATE ROLE rotator_probe LOGIN; DROP ROLE rotator_probe")
        .await
        .expect("the rotator manages roles");
    assert!(rotator
        .batch_execute("CREATE DATABASE rotator_db")
        .await
        .is_err());
    assert!(
        connect_url(&rotator_url(&database)).await.is_err(),
        "the rotator may connect to the application database"
    );

    // The login password is in no log: not rolegate's, not PostgreSQL's.
    assert!(!rg.log_text().contains(password.trim()));
    assert!(!cluster().server_log().contains(password.trim()));
}

fn out_of_setup_rotator_password(out: &str) -> String {
    out.lines()
        .find_map(|l| l.split("(shown only this once): ").nth(1))
        .expect("setup prints the generated rotator password once")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_twice_changes_nothing_and_fails_on_nothing() {
    let layout = layout("twice", "twice_owner", "");
    let (ok, _, err) = setup(&layout, &[]).await;
    assert!(ok, "{err}");
    let secret = layout.dir.path().join("login.secret");
    let first_password = std::fs::read_to_string(&secret).unwrap();
    let (ok, out, err) = setup(&layout, &[]).await;
    assert!(ok, "second setup failed:\n{out}\n{err}");
    assert!(
        !out.contains("rotator role"),
        "the rotator was made again: {out}"
    );
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), first_password);
    let (ok, out, _) = check(&layout).await;
    assert!(ok, "{out}");
    // And sessions still log in with the password from the first run.
    let database = layout.database.clone();
    let rg = serve(layout).await;
    connect_url(&rg.url("web", "web-pw", &database))
        .await
        .unwrap();
    // The one-login layout works as before, and says once what it lacks.
    let log = rg.log_text();
    assert_eq!(
        log.matches("one login role serves every class").count(),
        1,
        "{log}"
    );
    assert!(log.contains("[backend.logins]"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_need_quoting_cannot_inject() {
    let layout = layout("drop table x", "own\"er", "");
    let (ok, out, err) = setup(&layout, &[]).await;
    assert!(ok, "setup with odd names failed:\n{out}\n{err}");
    let (ok, out, _) = check(&layout).await;
    assert!(ok, "{out}");
    let admin = admin("postgres").await;
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = $1 AND NOT rolcanlogin",
            &[&layout.owner],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the owner role with a quote in its name exists");
    let database = layout.database.clone();
    let owner = layout.owner.clone();
    let rg = serve(layout).await;
    let web = connect_url(&rg.url("web", "web-pw", &database)).await;
    // libpq-style URLs cannot carry a space in dbname unquoted: use a Config instead.
    drop(web);
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(rg.port)
        .user("migrate")
        .password("migrate-pw")
        .dbname(&database);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), owner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_sql_runs_nothing_and_shows_no_secret() {
    let layout = layout("printed", "printed_owner", "");
    let (ok, out, err) = setup(&layout, &["--print-sql"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("CREATE ROLE \"{}\" NOLOGIN", layout.owner)),
        "{out}"
    );
    assert!(out.contains("CREATE DATABASE"), "{out}");
    assert!(out.contains("'<redacted>'"), "{out}");
    assert!(
        !out.contains("SCRAM-SHA-256$"),
        "a verifier was printed: {out}"
    );
    let admin = admin("postgres").await;
    let exists = admin
        .query_opt(
            "SELECT 1 FROM pg_roles WHERE rolname = $1",
            &[&layout.owner],
        )
        .await
        .unwrap();
    assert!(exists.is_none(), "--print-sql created the owner role");
    assert!(!layout.dir.path().join("login.secret").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_tables_owned_by_someone_else_and_its_fixes_work() {
    let layout = layout("legacy", "legacy_owner", "");
    // An existing database, made and filled the old way: by a login role.
    let admin_pg = admin("postgres").await;
    let old = format!("{}_oldapp", layout.database);
    for sql in [
        format!("CREATE ROLE \"{old}\" LOGIN PASSWORD 'old'"),
        format!("CREATE DATABASE \"{}\" OWNER \"{old}\"", layout.database),
    ] {
        admin_pg.batch_execute(&sql).await.unwrap();
    }
    let admin_db = admin(&layout.database).await;
    admin_db
        .batch_execute(&format!(
            "SET ROLE \"{old}\"; CREATE TABLE accounts (id serial PRIMARY KEY, name text);
             CREATE VIEW account_names AS SELECT name FROM accounts;
             CREATE FUNCTION account_count() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM accounts';
             RESET ROLE;"
        ))
        .await
        .unwrap();

    let (ok, _, err) = setup(&layout, &[]).await;
    assert!(ok, "setup on an existing database failed: {err}");
    let (ok, out, _) = check(&layout).await;
    assert!(!ok, "check must fail while tables belong to {old}");
    assert!(
        out.contains("public.accounts") && out.contains(&old),
        "{out}"
    );
    assert!(out.contains("account_count()"), "{out}");
    // Apply the printed fixes, then check is clean.
    apply_fixes_then_check_is_clean(&layout, &out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_role_makes_postgres_enforce_the_app_class_too() {
    let layout = layout("withapp", "withapp_owner", "app_role = \"withapp_dml\"");
    let (ok, out, err) = setup(&layout, &[]).await;
    assert!(ok, "{out}\n{err}");
    let database = layout.database.clone();
    let rg = serve(layout).await;
    let migrate = connect_url(&rg.url("migrate", "migrate-pw", &database))
        .await
        .unwrap();
    migrate
        .batch_execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        .await
        .unwrap();
    let web = connect_url(&rg.url("web", "web-pw", &database))
        .await
        .unwrap();
    let row = web
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "withapp_dml");
    // Default privileges reach the table the migrator made after setup.
    web.batch_execute("INSERT INTO notes (body) VALUES ('hi')")
        .await
        .unwrap();
    let n: i64 = web
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_and_cleans_up() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rolegate"))
        .args(["demo", "--listen", &listen])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "demo did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url =
        |user: &str| format!("host=127.0.0.1 port={port} user={user} dbname=demo sslmode=disable");
    let (ok, _, err) = psql(
        &url("migrator"),
        "migrator",
        &["-c", "CREATE TABLE t (id int)"],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, _, err) = psql(&url("app"), "app", &["-c", "CREATE TABLE u (id int)"]).await;
    assert!(!ok);
    assert!(
        err.contains("rolegate: DDL is not allowed for app clients"),
        "{err}"
    );
    let (ok, _, err) = psql(&url("app"), "app", &["-c", "INSERT INTO t VALUES (1)"]).await;
    assert!(ok, "{err}");
    // A login per class: each class in its own role.
    for (user, expected) in [
        ("app", "demo_app demo_app_login"),
        ("readonly", "demo_readonly demo_readonly_login"),
        ("migrator", "demo_owner demo_migrator_login"),
    ] {
        let (ok, out, err) = psql(
            &url(user),
            user,
            &["-tAc", "SELECT current_user || ' ' || session_user"],
        )
        .await;
        assert!(ok, "{err}");
        assert_eq!(out.trim(), expected);
    }

    // Ctrl-C stops it and removes the cluster.
    let pid = child.id().unwrap() as i32;
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("demo did not stop on SIGINT")
        .unwrap();
    assert!(status.success(), "{status:?}");
    use tokio::io::AsyncReadExt;
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    let dir = out
        .lines()
        .find_map(|l| l.split_whitespace().find(|w| w.contains("rolegate-demo-")))
        .map(|w| w.split("/login.secret").next().unwrap().to_owned());
    let dir = dir.expect("the demo names its directory");
    assert!(
        !std::path::Path::new(&dir).exists(),
        "{dir} was not removed"
    );
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_stale_logins_and_logins_outside_the_owner_role() {
    let layout = layout("stale", "stale_owner", "");
    let (ok, _, err) = setup(&layout, &[]).await;
    assert!(ok, "{err}");
    let admin_pg = admin("postgres").await;
    let stale = format!("{}_login_0000", layout.database);
    admin_pg
        .batch_execute(&format!(
            "CREATE ROLE \"{stale}\" LOGIN IN ROLE \"{owner}\";
             REVOKE \"{owner}\" FROM \"{login}\";
             ALTER ROLE \"{owner}\" LOGIN;",
            owner = layout.owner,
            login = layout.login
        ))
        .await
        .unwrap();
    let (ok, out, _) = check(&layout).await;
    assert!(!ok);
    assert!(out.contains(&format!("stale login role {stale}")), "{out}");
    assert!(
        out.contains(&format!("login role {} is not a member", layout.login)),
        "{out}"
    );
    assert!(out.contains("the owner role can log in"), "{out}");
    apply_fixes_then_check_is_clean(&layout, &out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_rotation_needs_no_static_login() {
    // A managed config names no login role and no login password at all.
    let n = N.fetch_add(1, Ordering::SeqCst);
    let database = format!("managed{n}");
    let owner = format!("managed_owner{n}");
    let prefix = format!("{database}_login_");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin_port = free_port();
    let url_file = dir.path().join("rotator.url");
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
         [tls]\nmode = \"disable\"\n[backend]\nhost = \"127.0.0.1\"\nport = {pg}\n\
         database = {database:?}\nowner_role = {owner:?}\n\n\
         [rotation]\nmode = \"managed\"\nrotator_url_file = {url:?}\ndrain = \"2s\"\n\n{clients}",
        pg = cluster().port,
        url = url_file.display().to_string(),
        clients = clients_toml(),
    );
    let config_path = dir.path().join("rolegate.toml");
    std::fs::write(&config_path, &config).unwrap();
    let config_arg = config_path.to_str().unwrap().to_owned();

    let (ok, out, err) = rolegate_command(
        &["setup", "--config", &config_arg],
        &[("ROLEGATE_ADMIN_URL", &admin_url())],
    )
    .await;
    assert!(ok, "setup of a managed config failed:\n{out}\n{err}");
    std::fs::write(
        &url_file,
        format!(
            "host=127.0.0.1 port={} user={database}_rotator password={} dbname=postgres",
            cluster().port,
            out_of_setup_rotator_password(&out)
        ),
    )
    .unwrap();

    let rg = Rolegate::launch(dir, port, &config).await;
    let session_user = || async {
        let web = connect_url(&rg.url("web", password_of("web"), &database))
            .await
            .unwrap();
        let row = web
            .query_one("SELECT session_user::text, current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(1), owner);
        row.get::<_, String>(0)
    };
    let mut seen = vec![session_user().await];
    assert!(seen[0].starts_with(&prefix), "{seen:?}");
    for _ in 0..3 {
        let (ok, out, err) = rolegate_command(&["rotate", "--config", &config_arg], &[]).await;
        assert!(ok, "rotation failed: {out}{err}\n{}", rg.log_text());
        seen.push(session_user().await);
    }
    seen.dedup();
    assert_eq!(seen.len(), 4, "each rotation switches the login: {seen:?}");
    // Once the old logins' sessions are gone, only the newest login is left.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = roles_with_prefix(&prefix).await;
        if left == [seen[3].clone()] {
            break;
        }
        assert!(Instant::now() < deadline, "logins left: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `[backend.logins]` for a layout: a static login per class, passwords in files setup
/// writes.
fn class_logins_toml(database: &str) -> String {
    let mut text = String::from("[backend.logins]\n");
    for class in ["app", "readonly", "migrator"] {
        text.push_str(&format!(
            "{class} = {{ user = \"{database}_{class}_login\", password_file = \"{class}-login.secret\" }}\n"
        ));
    }
    text
}

/// A class layout: the one-login config turned into a login per class.
fn class_layout(base: &str) -> Layout {
    let mut layout = layout(base, &format!("{base}_owner"), "");
    let database = layout.database.clone();
    layout.config = layout
        .config
        .replace(
            &format!(
                "login_user = {:?}\nlogin_password_file = \"login.secret\"\n",
                layout.login
            ),
            "",
        )
        .replacen(
            "\n\n[[clients]]",
            &format!("\n{}\n[[clients]]", class_logins_toml(&database)),
            1,
        );
    std::fs::write(&layout.config_path, &layout.config).unwrap();
    layout
}

/// Straight to PostgreSQL as a class's login, the way rolegate connects (its startup
/// setting `role`, no parser in the way).
async fn as_login(layout: &Layout, class: &str) -> tokio_postgres::Client {
    let password =
        std::fs::read_to_string(layout.dir.path().join(format!("{class}-login.secret"))).unwrap();
    let role = match class {
        "app" => format!("{}_app", layout.database),
        "readonly" => format!("{}_readonly", layout.database),
        _ => layout.owner.clone(),
    };
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(cluster().port)
        .user(format!("{}_{class}_login", layout.database))
        .password(password.trim())
        .dbname(&layout.database)
        .options(format!("-c role={role}"));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn refused(client: &tokio_postgres::Client, sql: &str) -> String {
    let err = client
        .batch_execute(sql)
        .await
        .expect_err(&format!("{sql} was not refused"));
    sqlstate(&err).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_per_class_makes_postgres_refuse_what_the_class_may_not() {
    let layout = class_layout("perclass");
    let (ok, out, err) = setup(&layout, &[]).await;
    assert!(ok, "setup failed:\n{out}\n{err}");
    let (ok, out, err) = setup(&layout, &[]).await;
    assert!(ok, "second setup failed:\n{out}\n{err}");
    let (ok, out, _) = check(&layout).await;
    assert!(ok, "check after setup found problems:\n{out}");

    let migrator = as_login(&layout, "migrator").await;
    migrator
        .batch_execute(
            "CREATE TABLE orders (id serial PRIMARY KEY, total int); INSERT INTO orders (total) VALUES (1)",
        )
        .await
        .unwrap();
    let app = as_login(&layout, "app").await;
    let readonly = as_login(&layout, "readonly").await;
    // The database alone refuses DDL for app, every write for readonly; rows work.
    app.batch_execute("INSERT INTO orders (total) VALUES (2); UPDATE orders SET total = 3 WHERE id = 2; SELECT nextval('orders_id_seq')")
        .await
        .unwrap();
    for sql in [
        "CREATE TABLE nope (id int)",
        "ALTER TABLE orders ADD COLUMN x int",
        "DROP TABLE orders",
        "TRUNCATE orders",
        "CREATE TEMP TABLE t (id int)",
        "CREATE SCHEMA s",
    ] {
        assert_eq!(refused(&app, sql).await, "42501", "app: {sql}");
    }
    readonly
        .batch_execute("SELECT * FROM orders")
        .await
        .unwrap();
    for sql in [
        "SET default_transaction_read_only = off; INSERT INTO orders (total) VALUES (9)",
        "SET default_transaction_read_only = off; UPDATE orders SET total = 0",
        "SET default_transaction_read_only = off; DELETE FROM orders",
        "SET default_transaction_read_only = off; SELECT setval('orders_id_seq', 100)",
        "SET default_transaction_read_only = off; SELECT nextval('orders_id_seq')",
        "SET default_transaction_read_only = off; CREATE TABLE nope (id int)",
    ] {
        assert_eq!(refused(&readonly, sql).await, "42501", "readonly: {sql}");
    }
    // A role reset, where no parser sees it, leaves a session with nothing.
    for (class, client) in [
        ("app", &app),
        ("readonly", &readonly),
        ("migrator", &migrator),
    ] {
        client
            .batch_execute("SET default_transaction_read_only = off")
            .await
            .unwrap();
        client
            .query_one(
                "SELECT query_to_xml('SELECT set_config(''role'', ''none'', false)', true, false, '')",
                &[],
            )
            .await
            .unwrap();
        let user: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(user, format!("{}_{class}_login", layout.database));
        assert_eq!(
            refused(client, "SELECT * FROM orders").await,
            "42501",
            "{class}"
        );
        assert_eq!(
            refused(client, "CREATE TABLE escaped (id int)").await,
            "42501",
            "{class}"
        );
        assert_eq!(
            refused(client, "CREATE TEMP TABLE escaped (id int)").await,
            "42501",
            "{class}"
        );
    }
    // And an app or readonly login cannot take the owner role.
    for client in [&app, &readonly] {
        let sql = format!("SELECT set_config('role', '{}', false)", layout.owner);
        assert_eq!(refused(client, &sql).await, "42501", "{sql}");
    }
    let other = format!("{}_readonly", layout.database);
    let sql = format!("SELECT set_config('role', '{other}', false)");
    assert_eq!(refused(&app, &sql).await, "42501", "{sql}");

    // Through rolegate, session mode: each class in its class role and login, and the
    // escape (refused by rolegate, or run and gaining nothing).
    let database = layout.database.clone();
    let owner = layout.owner.clone();
    // The same in transaction mode, from a copy of the config and its password files.
    let pooled_dir = tempfile::tempdir().unwrap();
    for class in ["app", "readonly", "migrator"] {
        let file = format!("{class}-login.secret");
        std::fs::copy(layout.dir.path().join(&file), pooled_dir.path().join(&file)).unwrap();
    }
    let pooled_port = free_port();
    let pooled_config = layout
        .config
        .replace(&format!(":{}\"", layout.port), &format!(":{pooled_port}\""))
        + "[pool]\nmode = \"transaction\"\nsize = 2\n";
    let config_path = layout.config_path.clone();
    let rg = serve(layout).await;
    assert!(
        !rg.log_text().contains("one login role serves every class"),
        "a login per class must not warn"
    );
    assert_escape_gains_nothing(&rg, &database, &owner, true).await;
    let pooled = Rolegate::launch(pooled_dir, pooled_port, &pooled_config).await;
    assert_escape_gains_nothing(&pooled, &database, &owner, true).await;
    // The next clients on the same backend connections gain nothing either.
    assert_escape_gains_nothing(&pooled, &database, &owner, false).await;
    // Nothing any of it did left an object owned by anything but the owner.
    let (ok, out, _) = rolegate_command(
        &["check", "--config", config_path.to_str().unwrap()],
        &[("ROLEGATE_ADMIN_URL", &admin_url())],
    )
    .await;
    assert!(ok, "check after the escapes:\n{out}");
}

/// Through rolegate: `current_user`/`session_user` per class, then the role reset hidden in
/// query_to_xml: rolegate refuses it (42501) or, if it runs, the session gains nothing.
/// With `strict`, every session starts in its class role; without, a session may also start
/// as its bare class login (transaction mode after an escape on the same backend connection).
async fn assert_escape_gains_nothing(rg: &Rolegate, database: &str, owner: &str, strict: bool) {
    for (user, role, class) in [
        ("web", format!("{database}_app"), "app"),
        ("analyst", format!("{database}_readonly"), "readonly"),
        ("migrate", owner.to_owned(), "migrator"),
    ] {
        let client = connect_url(&rg.url(user, password_of(user), database))
            .await
            .unwrap();
        let row = client
            .query_one("SELECT current_user::text, session_user::text", &[])
            .await
            .unwrap();
        let login = format!("{database}_{class}_login");
        assert_eq!(row.get::<_, String>(1), login);
        let user = row.get::<_, String>(0);
        if strict || user != login {
            assert_eq!(user, role);
        } else {
            // Transaction mode, a backend connection an earlier client reset the role of
            // where rolegate could not see it: the session is the bare login, which holds
            // nothing.
            let err = client
                .query_one("SELECT count(*) FROM orders", &[])
                .await
                .unwrap_err();
            assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
        }
        if class == "migrator" {
            // A DO block resets the role: what the migrator creates next cannot belong to
            // a login that rotation will drop, because the bare login creates nothing.
            let reset = client
                .batch_execute("DO $$ BEGIN PERFORM set_config('role', 'none', false); END $$")
                .await;
            if reset.is_ok() {
                let err = client
                    .batch_execute("CREATE TABLE made_by_a_login (id int)")
                    .await
                    .unwrap_err();
                assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
            }
            continue;
        }
        if class == "readonly" {
            // Read-only mode turned off where rolegate cannot see it: the readonly class
            // role still cannot write a sequence (or a table).
            let off = client
                .query_one(
                    "SELECT query_to_xml('SELECT set_config(''default_transaction_read_only'', ''off'', false)', true, false, '')",
                    &[],
                )
                .await;
            if off.is_ok() {
                for sql in [
                    "SELECT setval('orders_id_seq', 100)",
                    "SELECT nextval('orders_id_seq')",
                    "INSERT INTO orders (total) VALUES (7)",
                ] {
                    let err = client.batch_execute(sql).await.unwrap_err();
                    let code = sqlstate(&err).unwrap_or_default();
                    assert!(code == "42501" || code == "25006", "{sql}: {err}");
                }
            }
        }
        let escape = client
            .query_one(
                "SELECT query_to_xml('SELECT set_config(''role'', ''none'', false)', true, false, '')",
                &[],
            )
            .await;
        match escape {
            Err(e) => assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}"),
            Ok(_) => {
                let user: String = client
                    .query_one("SELECT current_user::text", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_ne!(user, owner, "{class} became the owner");
                if user != role {
                    let err = client
                        .query_one("SELECT count(*) FROM orders", &[])
                        .await
                        .unwrap_err();
                    assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
                }
            }
        }
        let err = client
            .batch_execute("CREATE TABLE escaped (id int)")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{class}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_converts_a_one_login_deployment_and_check_flags_each_misconfiguration() {
    // Today's layout, with an app_role, and a table.
    let mut layout = layout("convert", "convert_owner", "app_role = \"convert_app_x\"");
    let app_role = "convert_app_x";
    let (ok, out, err) = setup(&layout, &[]).await;
    assert!(ok, "{out}\n{err}");
    let old_login = layout.login.clone();
    let admin_db = admin(&layout.database).await;
    admin_db
        .batch_execute(&format!(
            "SET ROLE \"{owner}\"; CREATE TABLE books (id serial PRIMARY KEY, title text); RESET ROLE",
            owner = layout.owner
        ))
        .await
        .unwrap();

    // The config turned into a login per class (the app role keeps its name).
    let database = layout.database.clone();
    layout.config = layout
        .config
        .replace(
            &format!("login_user = {old_login:?}\nlogin_password_file = \"login.secret\"\n"),
            "",
        )
        .replacen(
            "\n\n[[clients]]",
            &format!("\n{}\n[[clients]]", class_logins_toml(&database)),
            1,
        );
    std::fs::write(&layout.config_path, &layout.config).unwrap();
    let (ok, out, err) = setup(&layout, &[]).await;
    assert!(ok, "converting setup failed:\n{out}\n{err}");
    let (ok, out, err) = setup(&layout, &[]).await;
    assert!(ok, "second converting setup failed:\n{out}\n{err}");
    // What is left is the old login, with the SQL that removes it.
    let (ok, out, _) = check(&layout).await;
    assert!(!ok);
    for line in out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("problem: "))
    {
        assert!(
            line.contains(&old_login),
            "only the old login is left: {line}\n{out}"
        );
    }
    apply_fixes_then_check_is_clean(&layout, &out).await;

    // The app class role reaches the table made before the conversion.
    let app = format!("{database}_app_login");
    let readonly_role = format!("{database}_readonly");
    let readonly_login = format!("{database}_readonly_login");
    // Each misconfiguration, then check names it and its fix repairs it.
    let version: i32 = admin_db
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    // PostgreSQL 16+ records INHERIT per membership, older versions per role.
    let inherit = if version >= 160_000 {
        format!("GRANT \"{app_role}\" TO \"{app}\" WITH INHERIT TRUE;")
    } else {
        format!("ALTER ROLE \"{app}\" INHERIT;")
    };
    admin_db
        .batch_execute(&format!(
            "{inherit}
             GRANT \"{app_role}\" TO \"{readonly_login}\";
             GRANT CREATE ON SCHEMA public TO \"{app_role}\";
             GRANT INSERT, DELETE ON books TO \"{readonly_role}\";
             REVOKE UPDATE ON books FROM \"{app_role}\";
             REVOKE SELECT ON SEQUENCE books_id_seq FROM \"{app_role}\";
             GRANT SELECT ON books TO \"{readonly_role}\" WITH GRANT OPTION;"
        ))
        .await
        .unwrap();
    let (ok, out, _) = check(&layout).await;
    assert!(!ok);
    for expected in [
        format!("login role {app} inherits"),
        format!("login role {readonly_login} is a member of 2 class roles"),
        format!("app class role {app_role} may CREATE in schema public"),
        format!("readonly class role {readonly_role} may INSERT, DELETE on public.books"),
        format!("app class role {app_role} lacks UPDATE on public.books"),
        format!("app class role {app_role} lacks SELECT on public.books_id_seq"),
        format!("readonly class role {readonly_role} holds GRANT OPTION on public.books"),
    ] {
        assert!(
            out.contains(&expected),
            "check does not say {expected:?}:\n{out}"
        );
    }
    apply_fixes_then_check_is_clean(&layout, &out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_reads_one_credential_per_class() {
    // setup makes the class logins (static config), then the same logins come from files.
    let layout = class_layout("perfile");
    let (ok, out, err) = setup(&layout, &[]).await;
    assert!(ok, "setup failed:\n{out}\n{err}");
    let database = layout.database.clone();
    let write = |class: &str, user: &str, password: &str| {
        std::fs::write(
            layout.dir.path().join(format!("{class}.json")),
            serde_json::json!({"username": user, "password": password}).to_string(),
        )
        .unwrap();
    };
    let mut files = String::from("[backend.logins]\n");
    for class in ["app", "readonly", "migrator"] {
        let password =
            std::fs::read_to_string(layout.dir.path().join(format!("{class}-login.secret")))
                .unwrap();
        write(class, &format!("{database}_{class}_login"), password.trim());
        files.push_str(&format!("{class} = {{ file = \"{class}.json\" }}\n"));
    }
    let config = layout.config.replace(&class_logins_toml(&database), &files)
        + "[rotation]\nmode = \"file\"\npoll_interval = \"200ms\"\n";
    assert!(config.contains("file = \"app.json\""), "{config}");
    let dir = layout.dir.path().to_owned();
    let port = layout.port;
    let keep = layout.dir;
    let rg = Rolegate::launch(keep, port, &config).await;
    let session_user = |user: &'static str| {
        let url = rg.url(user, password_of(user), &database);
        async move {
            connect_url(&url)
                .await
                .unwrap()
                .query_one("SELECT session_user::text, current_user::text", &[])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(session_user("web").await, format!("{database}_app_login"));
    assert_eq!(
        session_user("analyst").await,
        format!("{database}_readonly_login")
    );
    // A new app login, made as setup makes them, written to the app file only.
    let new_login = format!("{database}_app_login_2");
    admin("postgres")
        .await
        .batch_execute(&format!(
            "CREATE ROLE \"{new_login}\" LOGIN NOINHERIT PASSWORD 'second-pw' IN ROLE \"{database}_app\";
             ALTER ROLE \"{new_login}\" SET role = '{database}_app';
             GRANT CONNECT ON DATABASE \"{database}\" TO \"{new_login}\";"
        ))
        .await
        .unwrap();
    std::fs::write(
        dir.join("app.json"),
        serde_json::json!({"username": new_login, "password": "second-pw"}).to_string(),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while session_user("web").await != new_login {
        assert!(Instant::now() < deadline, "{}", rg.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The other classes keep their own logins.
    assert_eq!(
        session_user("analyst").await,
        format!("{database}_readonly_login")
    );
    assert_eq!(
        session_user("migrate").await,
        format!("{database}_migrator_login")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_sql_of_a_login_per_class_runs_nothing_and_shows_no_secret() {
    let layout = class_layout("printedclass");
    let (ok, out, err) = setup(&layout, &["--print-sql"]).await;
    assert!(ok, "{err}");
    let db = &layout.database;
    for expected in [
        format!("CREATE ROLE \"{db}_app\" NOLOGIN"),
        format!("CREATE ROLE \"{db}_readonly\" NOLOGIN"),
        format!("CREATE ROLE \"{db}_app_login\" LOGIN NOINHERIT PASSWORD '<redacted>'"),
        format!("ALTER ROLE \"{db}_readonly_login\" SET role = E'{db}_readonly'"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO \"{db}_readonly\""),
        "ALTER DEFAULT PRIVILEGES FOR ROLE".to_owned(),
    ] {
        assert!(out.contains(&expected), "{expected}:\n{out}");
    }
    assert!(
        !out.contains("SCRAM-SHA-256$"),
        "a verifier was printed: {out}"
    );
    assert!(!layout.dir.path().join("app-login.secret").exists());
    let exists = admin("postgres")
        .await
        .query_opt(
            "SELECT 1 FROM pg_roles WHERE rolname = $1",
            &[&format!("{db}_app")],
        )
        .await
        .unwrap();
    assert!(exists.is_none(), "--print-sql created the app role");
}
