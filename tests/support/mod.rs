//! The test harness: one private PostgreSQL cluster per test binary (initdb in a temp dir,
//! a free port, scram-sha-256 for every connection), a database with its own owner and
//! login roles per test, and a real `rolegate serve` process in front of it.
#![allow(dead_code)]

use bytes::BufMut;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ADMIN_PASSWORD: &str = "admin-secret-for-tests";
pub const LOGIN_PASSWORD: &str = "login-secret-for-tests";

/// The client identities every test rolegate knows: (user, password, class).
pub const CLIENTS: &[(&str, &str, &str)] = &[
    ("web", "web-pw", "app"),
    ("migrate", "migrate-pw", "migrator"),
    ("analyst", "analyst-pw", "readonly"),
];

pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    pub bin: PathBuf,
    /// The server options it was started with (port, TLS, settings).
    options: String,
}

fn pg_bin() -> PathBuf {
    match std::env::var("PG_BIN") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => rolegate::demo::find_pg_bin().expect("PostgreSQL server programs"),
    }
}

/// A port nothing listens on now, and one this test process has not handed out before:
/// the kernel may offer a port it just released again, and a test that asks for two
/// (rolegate's listen and admin addresses) must not get the same one twice.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

fn pg_command(bin: &Path, program: &str) -> Command {
    rolegate::demo::pg_command(bin, program, rolegate::demo::running_as_root())
}

/// The cluster for this test binary, started on first use and stopped by a watchdog
/// when the test process exits.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(start_cluster)
}

fn start_cluster() -> Cluster {
    let bin = pg_bin();
    let dir = std::env::temp_dir().join(format!("rolegate-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pwfile = dir.join("pwfile");
    std::fs::write(&pwfile, ADMIN_PASSWORD).unwrap();
    // A CA and a server certificate for 127.0.0.1, so backend TLS is really checked.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "rolegate test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&server_key, &ca, &ca_key)
            .unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.crt"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    if rolegate::demo::running_as_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown of the cluster dir failed");
    }
    let data = dir.join("data");
    let out =
        rolegate::demo::initdb_command(&bin, &data, &pwfile, rolegate::demo::running_as_root())
            .output()
            .expect("initdb could not run");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every connection, local or TCP, must prove its password.
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n",
    )
    .unwrap();
    let port = free_port();
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections=400 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key",
        dir.display(),
        dir = dir.display()
    );
    let cluster = Cluster {
        port,
        dir: dir.clone(),
        bin,
        options,
    };
    cluster.start();
    // Stop the server when this test process is gone, however it ends. The watchdog
    // outlives us on purpose, so it is never waited for.
    let watchdog = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; kill -INT $(head -1 {data}/postmaster.pid) 2>/dev/null; sleep 2; rm -rf {dir}",
        pid = std::process::id(),
        data = data.display(),
        dir = dir.display()
    );
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &watchdog])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("watchdog could not start");
    cluster
}

impl Cluster {
    pub fn admin_url(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres password={} dbname={database}",
            self.port, ADMIN_PASSWORD
        )
    }

    /// Runs `pg_ctl <action>` on the cluster and waits for it. With `-l` a new postmaster
    /// does not hold our output pipes open.
    fn pg_ctl(&self, action: &str, extra: &[&str]) {
        let out = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60"])
            .args(extra)
            .arg(action)
            .output()
            .expect("pg_ctl could not run");
        assert!(
            out.status.success(),
            "pg_ctl {action} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the (stopped) server.
    pub fn start(&self) {
        self.pg_ctl("start", &["-o", &self.options]);
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&self) {
        self.pg_ctl("stop", &["-m", "fast"]);
    }

    /// Restarts the server (fast shutdown: sessions are terminated with 57P01).
    pub fn restart(&self) {
        self.pg_ctl("restart", &["-m", "fast"]);
    }

    /// The CA that signed the server's TLS certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

pub async fn connect_url(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The roles whose names start with `prefix`, sorted.
pub async fn roles_with_prefix(prefix: &str) -> Vec<String> {
    admin("postgres")
        .await
        .query(
            "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1) ORDER BY 1",
            &[&prefix],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

pub async fn admin(database: &str) -> tokio_postgres::Client {
    connect_url(&cluster().admin_url(database))
        .await
        .expect("admin connection to the test cluster")
}

/// A database of its own for one test: `<name>` owned by the NOLOGIN `<name>_owner`, with
/// the login role `<name>_login` granted the owner role.
pub struct TestDb {
    pub name: String,
    pub owner: String,
    pub login: String,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TestDb {
    pub async fn create(prefix: &str) -> TestDb {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}_{n}");
        let db = TestDb {
            owner: format!("{name}_owner"),
            login: format!("{name}_login"),
            name,
        };
        // CREATE DATABASE copies template1 and fails if another copy is running.
        static PROVISIONING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one_at_a_time = PROVISIONING.lock().await;
        let admin = admin("postgres").await;
        let verifier = rolegate::scram::make_verifier(LOGIN_PASSWORD);
        for sql in [
            format!("CREATE ROLE \"{}\" NOLOGIN", db.owner),
            format!(
                "CREATE ROLE \"{}\" LOGIN PASSWORD '{verifier}' IN ROLE \"{}\"",
                db.login, db.owner
            ),
            format!("CREATE DATABASE \"{}\" OWNER \"{}\"", db.name, db.owner),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .expect("provisioning the test database");
        }
        db
    }
}

pub struct Rolegate {
    pub port: u16,
    child: Child,
    pub log: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Drop for Rolegate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options for a test rolegate beyond the defaults.
#[derive(Default, Clone)]
pub struct Options {
    /// `[tls] mode`; "disable" when None.
    pub tls_mode: Option<&'static str>,
    /// Extra TOML appended at the end (sections of its own).
    pub extra: String,
    /// Extra lines inside `[backend]`.
    pub backend_extra: String,
    /// Extra top-level keys (before any section).
    pub top: String,
}

impl Rolegate {
    pub async fn start(db: &TestDb) -> Rolegate {
        Rolegate::start_with(db, Options::default()).await
    }

    /// Serves clients over TLS (`[tls] mode`: "prefer" or "require"), with a certificate
    /// made for the run.
    pub async fn start_tls(db: &TestDb, mode: &'static str) -> Rolegate {
        let options = Options {
            tls_mode: Some(mode),
            ..Options::default()
        };
        Rolegate::start_with(db, options).await
    }

    pub async fn start_with(db: &TestDb, options: Options) -> Rolegate {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut tls = String::from("[tls]\nmode = \"disable\"\n");
        if let Some(mode) = options.tls_mode {
            let cert =
                rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                    .expect("test certificate");
            std::fs::write(dir.path().join("server.crt"), cert.cert.pem()).unwrap();
            std::fs::write(dir.path().join("server.key"), cert.key_pair.serialize_pem()).unwrap();
            tls =
                format!("[tls]\nmode = \"{mode}\"\ncert = \"server.crt\"\nkey = \"server.key\"\n");
        }
        // ROLEGATE_TEST_TOP: top-level keys for every test rolegate, to run whole suites
        // under another setting (`threads = 0` and `runtime = "per_thread"`).
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\n{top}\n{test_top}\n{tls}\n[backend]\nhost = \"127.0.0.1\"\nport = {pg}\ndatabase = \"{db}\"\nowner_role = \"{owner}\"\nlogin_user = \"{login}\"\nlogin_password_env = \"TEST_LOGIN_PASSWORD\"\n{backend_extra}\n\n{clients}{extra}",
            pg = cluster().port,
            db = db.name,
            owner = db.owner,
            login = db.login,
            backend_extra = options.backend_extra,
            extra = options.extra,
            top = options.top,
            test_top = std::env::var("ROLEGATE_TEST_TOP").unwrap_or_default(),
            clients = clients_toml(),
        );
        Rolegate::launch(dir, port, &config).await
    }

    /// Writes `config` into `dir` and runs `rolegate serve` on it; returns once it listens
    /// on `port`.
    pub async fn launch(dir: tempfile::TempDir, port: u16, config: &str) -> Rolegate {
        let config_path = dir.path().join("rolegate.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("rolegate.log");
        let child = Command::new(env!("CARGO_BIN_EXE_rolegate"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("TEST_LOGIN_PASSWORD", LOGIN_PASSWORD)
            .env("ROLEGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("rolegate could not start");
        let rolegate = Rolegate {
            port,
            child,
            log,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "rolegate did not start: {}",
                rolegate.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rolegate
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The threads of the rolegate process right now (its tasks in /proc).
    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .count()
    }

    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The config file this rolegate runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("rolegate.toml")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={database} sslmode=disable",
            self.port
        )
    }

    /// A tokio-postgres client through rolegate as one of the `CLIENTS`.
    pub async fn client(&self, user: &str, db: &TestDb) -> tokio_postgres::Client {
        let password = password_of(user);
        connect_url(&self.url(user, password, &db.name))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{user} could not connect through rolegate: {e}\n{}",
                    self.log_text()
                )
            })
    }
}

pub fn password_of(user: &str) -> &'static str {
    CLIENTS
        .iter()
        .find(|(u, _, _)| *u == user)
        .map(|(_, p, _)| *p)
        .unwrap_or("unknown")
}

/// Runs psql against rolegate and returns (success, stdout, stderr).
pub async fn psql(conninfo: &str, password: &str, args: &[&str]) -> (bool, String, String) {
    // The server's own psql when it has one; embedded server packages ship none.
    let own = cluster().bin.join("psql");
    let program = if own.is_file() {
        own
    } else {
        PathBuf::from("psql")
    };
    let out = tokio::process::Command::new(program)
        .arg(conninfo)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("psql could not run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a Python script from tests/clients with the arguments; returns
/// (success, stdout, stderr).
pub async fn python(script: &str, args: &[&str]) -> (bool, String, String) {
    client_script("python3", script, args, &[]).await
}

/// Where `.ci/run` installs node-postgres (`npm install --prefix target/node pg@8`).
pub fn node_modules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/node/node_modules")
}

/// Runs a Node.js script from tests/clients with node-postgres on its module path.
pub async fn node(script: &str, args: &[&str]) -> (bool, String, String) {
    assert!(
        node_modules().join("pg").is_dir(),
        "node-postgres is missing: npm install --prefix target/node pg@8 (as .ci/run does)"
    );
    let modules = node_modules().display().to_string();
    client_script("node", script, args, &[("NODE_PATH", &modules)]).await
}

/// Runs a single-source Java program from tests/clients with pgjdbc (Debian's
/// libpostgresql-jdbc-java) on its class path.
pub async fn java(source: &str, args: &[&str]) -> (bool, String, String) {
    client_script(
        "java",
        source,
        args,
        &[("CLASSPATH", "/usr/share/java/postgresql.jar")],
    )
    .await
}

async fn client_script(
    program: &str,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let out = tokio::process::Command::new(program)
        .arg(path)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} could not run: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `[[clients]]` sections for `CLIENTS`.
pub fn clients_toml() -> String {
    let mut clients = String::new();
    for (user, password, class) in CLIENTS {
        clients.push_str(&format!(
            "[[clients]]\nuser = \"{user}\"\npassword = \"{}\"\nclass = \"{class}\"\n\n",
            rolegate::scram::make_verifier(password)
        ));
    }
    clients
}

/// A plain HTTP/1.1 request to 127.0.0.1 with extra header lines; returns (status line, body).
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// A plain HTTP/1.1 GET; returns (status line, body).
pub async fn http_get(port: u16, path: &str) -> (String, String) {
    http_request(port, "GET", path, &[]).await
}

/// The value of a metric line (`name{labels}`) in Prometheus text.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no {name_and_labels} in:\n{text}"))
}

/// Runs the rolegate binary with these arguments; returns (success, stdout, stderr).
pub async fn rolegate_command(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    // A thread of its own waits for the process: tokio's wait hears of a child's exit
    // through SIGCHLD, and once two children that ended together were never heard of
    // (CI, two tests running `serve` at once, both waited out their timeouts).
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_rolegate"));
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    let (done, outcome) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done.send(command.output());
    });
    let out = outcome
        .await
        .expect("the thread waiting for rolegate ended")
        .expect("rolegate could not run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The SQLSTATE of a tokio-postgres error, if the server (or rolegate) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_owned())
}

/// Asserts that a message read from rolegate (`tag`, `body`) is a FATAL with SQLSTATE
/// `code` (`context` says where); returns its fields.
pub fn assert_fatal(tag: u8, body: &[u8], code: &str, context: &str) -> Vec<(u8, String)> {
    let fields = rolegate::wire::error_fields(body);
    assert_eq!(tag, b'E', "{context}: {fields:?}");
    assert_eq!(
        rolegate::wire::field(&fields, b'S'),
        Some("FATAL"),
        "{context}: {fields:?}"
    );
    assert_eq!(
        rolegate::wire::field(&fields, b'C'),
        Some(code),
        "{context}: {fields:?}"
    );
    fields
}

/// The message of a tokio-postgres error as the server (or rolegate) worded it.
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// A hand-driven protocol client, for what no driver sends: FunctionCall, malformed
/// frames, odd lengths.
pub struct RawClient {
    pub stream: tokio::net::TcpStream,
}

impl RawClient {
    pub async fn connect(port: u16) -> RawClient {
        RawClient {
            stream: tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        }
    }

    /// Connects and logs in with SCRAM-SHA-256; panics on failure.
    pub async fn login(port: u16, user: &str, password: &str, database: &str) -> RawClient {
        let mut client = RawClient::connect(port).await;
        login_over(&mut client.stream, user, password, database).await;
        client
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next message (tag, body), or None when the connection closed; gives up after
    /// 10 s so that a hang fails the test instead of stalling it.
    pub async fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        let read = rolegate::wire::read_message(&mut self.stream, 1 << 30);
        match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok((tag, body))) => Some((tag, body.to_vec())),
            Ok(Err(_)) => None,
            Err(_) => panic!("no message from rolegate within 10 s"),
        }
    }

    /// Reads up to and including ReadyForQuery; returns the tags and error fields seen.
    /// The text values of the first column of the DataRows up to ReadyForQuery; panics
    /// on an error.
    pub async fn data_values(&mut self) -> Vec<String> {
        let mut values = Vec::new();
        while let Some((tag, body)) = self.read().await {
            match tag {
                b'D' => {
                    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                    values.push(String::from_utf8_lossy(&body[6..6 + len]).into_owned());
                }
                b'E' => panic!("{:?}", rolegate::wire::error_fields(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        values
    }

    pub async fn until_ready(&mut self) -> (Vec<u8>, Vec<Vec<(u8, String)>>) {
        let mut tags = Vec::new();
        let mut errors = Vec::new();
        while let Some((tag, body)) = self.read().await {
            tags.push(tag);
            if tag == b'E' {
                errors.push(rolegate::wire::error_fields(&body));
            }
            if tag == b'Z' {
                break;
            }
        }
        (tags, errors)
    }
}

/// The next message from rolegate on `stream`; panics when none comes within `within`
/// or the connection ends (`what` says where).
pub async fn next_message<S>(stream: &mut S, within: Duration, what: &str) -> (u8, bytes::BytesMut)
where
    S: tokio::io::AsyncRead + Unpin,
{
    let read = rolegate::wire::read_message(stream, 1 << 30);
    match tokio::time::timeout(within, read).await {
        Ok(Ok(message)) => message,
        Ok(Err(e)) => panic!("{what}: the connection ended: {e}"),
        Err(_) => panic!("{what}: no message from rolegate within {within:?}"),
    }
}

/// Sends a StartupMessage on `stream` and logs in with SCRAM-SHA-256, up to the first
/// ReadyForQuery; panics on failure.
pub async fn login_over<S>(stream: &mut S, user: &str, password: &str, database: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut out = bytes::BytesMut::new();
    rolegate::wire::put_startup(&mut out, &[("user", user), ("database", database)]);
    stream.write_all(&out).await.unwrap();
    stream.flush().await.unwrap();
    let mut scram = None;
    loop {
        let (tag, body) = next_message(stream, Duration::from_secs(10), "login").await;
        match tag {
            b'R' => {
                let mut out = bytes::BytesMut::new();
                answer_authentication(&body, password, &mut scram, &mut out)
                    .unwrap_or_else(|e| panic!("login: {e}"));
                if !out.is_empty() {
                    stream.write_all(&out).await.unwrap();
                    stream.flush().await.unwrap();
                }
            }
            b'E' => panic!("login failed: {:?}", rolegate::wire::error_fields(&body)),
            b'Z' => return,
            _ => {}
        }
    }
}

/// The client's side of one Authentication request (`body`): SCRAM-SHA-256 with
/// `password`, its state kept in `scram`; what to send goes into `out`.
pub fn answer_authentication(
    body: &[u8],
    password: &str,
    scram: &mut Option<postgres_protocol::authentication::sasl::ScramSha256>,
    out: &mut bytes::BytesMut,
) -> Result<(), String> {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let code = body
        .get(..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or("short Authentication message")?;
    let data = &body[4..];
    match code {
        0 => {}
        10 => {
            let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
            let mut payload = b"SCRAM-SHA-256\0".to_vec();
            payload.extend_from_slice(&(s.message().len() as i32).to_be_bytes());
            payload.extend_from_slice(s.message());
            rolegate::wire::put_message(out, b'p', &payload);
            *scram = Some(s);
        }
        11 => {
            let s = scram.as_mut().ok_or("SCRAM out of order")?;
            s.update(data).map_err(|e| format!("SCRAM: {e}"))?;
            rolegate::wire::put_message(out, b'p', s.message());
        }
        12 => {
            let s = scram.as_mut().ok_or("SCRAM out of order")?;
            s.finish(data).map_err(|e| format!("SCRAM: {e}"))?;
        }
        other => return Err(format!("unexpected authentication request {other}")),
    }
    Ok(())
}

/// Parse of statement `name` (no parameter types).
pub fn parse(out: &mut bytes::BytesMut, name: &str, sql: &str) {
    let mut parse = bytes::BytesMut::new();
    parse.put_slice(name.as_bytes());
    parse.put_u8(0);
    parse.put_slice(sql.as_bytes());
    parse.put_u8(0);
    parse.put_i16(0);
    rolegate::wire::put_message(out, b'P', &parse);
}

/// Bind of statement `name` to the unnamed portal (text or binary parameters), Execute.
pub fn bind_execute(out: &mut bytes::BytesMut, name: &str, params: &[(i16, &[u8])]) {
    let mut bind = bytes::BytesMut::new();
    bind.put_u8(0);
    bind.put_slice(name.as_bytes());
    bind.put_u8(0);
    bind.put_i16(params.len() as i16);
    for (format, _) in params {
        bind.put_i16(*format);
    }
    bind.put_i16(params.len() as i16);
    for (_, value) in params {
        bind.put_i32(value.len() as i32);
        bind.put_slice(value);
    }
    bind.put_i16(0);
    rolegate::wire::put_message(out, b'B', &bind);
    rolegate::wire::put_message(out, b'E', b"\0\0\0\0\0");
}

/// Parse, Bind (text or binary parameters), Execute of an unnamed statement.
pub fn extended(out: &mut bytes::BytesMut, sql: &str, params: &[(i16, &[u8])]) {
    parse(out, "", sql);
    bind_execute(out, "", params);
}
