//! `rolegate demo`: a private throwaway PostgreSQL cluster, `setup`, and `serve` with demo
//! clients, so a first look takes one command. Everything is removed on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::config::Config;
use crate::provision::{self, SetupOptions};
use crate::proxy::Proxy;
use crate::scram::make_verifier;

/// The demo clients: (user = password, class).
const DEMO_CLIENTS: &[(&str, &str)] = &[
    ("app", "app"),
    ("migrator", "migrator"),
    ("readonly", "readonly"),
];

/// PostgreSQL's server programs: `initdb` on PATH, or the newest /usr/lib/postgresql/*/bin.
pub fn find_pg_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                // Follow a symlink (/usr/local/bin/initdb → …/15/bin/initdb) to the
                // directory that holds the rest of that version's programs.
                let real = std::fs::canonicalize(dir.join("initdb"))?;
                return Ok(real.parent().map(Path::to_path_buf).unwrap_or(dir));
            }
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    candidates.sort();
    match candidates.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "rolegate demo needs PostgreSQL's server programs (initdb, pg_ctl): none on PATH \
             or under /usr/lib/postgresql/*/bin. Install them (Debian/Ubuntu: apt-get install postgresql)."
        ),
    }
}

pub fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A server program, run as the `postgres` OS user when we are root (PostgreSQL refuses
/// to run as root).
pub fn pg_command(bin: &Path, program: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(bin.join(program));
        command
    } else {
        Command::new(bin.join(program))
    }
}

/// `initdb` for a private cluster: superuser `postgres` with the password in `pwfile`,
/// scram-sha-256 for every connection (never trust), UTF8, C locale.
pub fn initdb_command(bin: &Path, data: &Path, pwfile: &Path, as_postgres: bool) -> Command {
    let mut initdb = pg_command(bin, "initdb", as_postgres);
    initdb
        .arg("-D")
        .arg(data)
        .args([
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .arg(format!("--pwfile={}", pwfile.display()));
    initdb
}

fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("could not run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A throwaway cluster in a temp dir, stopped and removed on drop.
struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    as_postgres: bool,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut stop = pg_command(&self.bin, "pg_ctl", self.as_postgres);
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"]);
        let _ = stop.output();
    }
}

pub async fn run_demo(listen: &str, pool_mode: crate::config::PoolMode) -> anyhow::Result<()> {
    let bin = find_pg_bin()?;
    let as_postgres = running_as_root();
    let dir = tempfile::Builder::new()
        .prefix("rolegate-demo-")
        .tempdir()
        .context("creating a temp dir")?;
    let admin_password = crate::provision::random_password();
    std::fs::write(dir.path().join("pwfile"), &admin_password)?;
    if as_postgres {
        let mut chown = Command::new("chown");
        chown.args(["-R", "postgres:postgres"]).arg(dir.path());
        run(chown, "chown (the cluster runs as the postgres OS user)")?;
    }
    let data = dir.path().join("data");
    let initdb = initdb_command(&bin, &data, &dir.path().join("pwfile"), as_postgres);
    run(initdb, "initdb")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut start = pg_command(&bin, "pg_ctl", as_postgres);
    start
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.path().join("server.log"))
        .args(["-w", "-o"])
        .arg(format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            dir.path().display()
        ))
        .arg("start");
    run(start, "pg_ctl start")?;
    let cluster = Cluster {
        bin,
        data,
        as_postgres,
        _dir: dir,
    };
    let dir = cluster._dir.path();

    let mut clients = String::new();
    for (user, class) in DEMO_CLIENTS {
        clients.push_str(&format!(
            "[[clients]]\nuser = \"{user}\"\npassword = \"{}\"\nclass = \"{class}\"\n\n",
            make_verifier(user)
        ));
    }
    let config_text = format!(
        "listen = \"{listen}\"\n\n[tls]\nmode = \"disable\"\n\n[backend]\nhost = \"127.0.0.1\"\nport = {port}\n\
         database = \"demo\"\nowner_role = \"demo_owner\"\n\n\
         [backend.logins]\n\
         app = {{ user = \"demo_app_login\", password_file = \"app-login.secret\" }}\n\
         readonly = {{ user = \"demo_readonly_login\", password_file = \"readonly-login.secret\" }}\n\
         migrator = {{ user = \"demo_migrator_login\", password_file = \"migrator-login.secret\" }}\n\n\
         {clients}{pool}",
        pool = match pool_mode {
            crate::config::PoolMode::Session => "",
            crate::config::PoolMode::Transaction => "[pool]\nmode = \"transaction\"\n",
        }
    );
    let config_path = dir.join("rolegate.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = Config::load(&config_path)?;
    let admin_url = format!(
        "host=127.0.0.1 port={port} user=postgres password={admin_password} dbname=postgres"
    );
    provision::setup(
        &config,
        SetupOptions {
            admin_url: &admin_url,
            print_sql: false,
            rotator_password: None,
        },
    )
    .await?;

    let proxy = Proxy::start(config).await?;
    let (host, listen_port) = listen.rsplit_once(':').unwrap_or((listen, "6432"));
    println!(
        "\nrolegate demo is running: PostgreSQL on 127.0.0.1:{port} (private, removed on exit), rolegate on {listen}.\n\
         Try (press Ctrl-C to stop):\n\n\
         \x20 psql \"postgresql://migrator:migrator@{host}:{listen_port}/demo\" -c \"CREATE TABLE books (id serial PRIMARY KEY, title text)\"   # works\n\
         \x20 psql \"postgresql://app:app@{host}:{listen_port}/demo\" -c \"INSERT INTO books (title) VALUES ('Dune')\"                    # works\n\
         \x20 psql \"postgresql://app:app@{host}:{listen_port}/demo\" -c \"CREATE TABLE t (id int)\"                                    # refused: DDL\n\
         \x20 psql \"postgresql://app:app@{host}:{listen_port}/demo\" -c \"SET ROLE postgres\"                                          # refused: role\n\
         \x20 psql \"postgresql://readonly:readonly@{host}:{listen_port}/demo\" -c \"DELETE FROM books\"                               # refused: write\n\
         \x20 psql \"postgresql://app:app@{host}:{listen_port}/demo\" -c \"SELECT current_user, session_user\"   # demo_app, demo_app_login\n"
    );
    tokio::select! {
        result = crate::listener::serve(proxy) => result?,
        _ = shutdown_signal() => println!("stopping the demo and removing its cluster"),
    }
    drop(cluster);
    Ok(())
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
