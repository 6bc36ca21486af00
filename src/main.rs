//! The `rolegate` command line.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use rolegate::config::{Config, PoolMode, Runtime};
use rolegate::proxy::Proxy;

#[derive(Parser)]
#[command(
    name = "rolegate",
    version,
    about = "A PostgreSQL proxy that keeps apps out of the schema and sessions in the owner role"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// The config file (TOML).
        #[arg(long, short, env = "ROLEGATE_CONFIG")]
        config: PathBuf,
    },
    /// Read a password on stdin and print its SCRAM-SHA-256 verifier for the config.
    HashPassword,
    /// Create (or bring in line) the owner, login and rotator roles and the database.
    Setup {
        #[arg(long, short, env = "ROLEGATE_CONFIG")]
        config: PathBuf,
        /// A superuser, or a role with CREATEROLE and CREATEDB.
        #[arg(long, env = "ROLEGATE_ADMIN_URL", hide_env_values = true)]
        admin_url: String,
        /// Print the SQL that would run (secrets redacted) and run nothing.
        #[arg(long)]
        print_sql: bool,
        /// The rotator role's password, when it is created; generated and printed if unset.
        #[arg(long, env = "ROLEGATE_ROTATOR_PASSWORD", hide_env_values = true)]
        rotator_password: Option<String>,
    },
    /// Audit a live database against the layout; exit status 1 when there are problems.
    Check {
        #[arg(long, short, env = "ROLEGATE_CONFIG")]
        config: PathBuf,
        #[arg(long, env = "ROLEGATE_ADMIN_URL", hide_env_values = true)]
        admin_url: String,
    },
    /// Ask the running instance (its admin endpoint) to rotate the login now.
    Rotate {
        #[arg(long, short, env = "ROLEGATE_CONFIG")]
        config: PathBuf,
    },
    /// Start a throwaway PostgreSQL cluster, set it up and serve it with demo clients.
    Demo {
        /// Where the demo rolegate listens.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: String,
        /// `transaction`: app and readonly clients share backend connections per
        /// transaction (`[pool] mode`).
        #[arg(long, value_enum, default_value = "session")]
        pool_mode: PoolModeArg,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PoolModeArg {
    Session,
    Transaction,
}

/// The runtime for the subcommands that are not `serve`: one thread per core.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    serve_runtime(0)
}

/// `serve`'s runtime, by `Config::serve_threads`: 1 is a current-thread runtime (no work
/// stealing, no waking of other threads), anything else tokio's multi-thread one.
fn serve_runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder.enable_all().build().context("starting the runtime")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve { config: path } => {
            let config = Config::load(&path)?;
            let threads = match config.runtime {
                // This thread serves the first listener; the others get threads of their own.
                Runtime::PerThread => 1,
                Runtime::Shared => config.serve_threads(),
            };
            serve_runtime(threads)?.block_on(serve(config, path))
        }
        Command::Setup {
            config,
            admin_url,
            print_sql,
            rotator_password,
        } => {
            let config = Config::load(&config)?;
            runtime()?.block_on(rolegate::provision::setup(
                &config,
                rolegate::provision::SetupOptions {
                    admin_url: &admin_url,
                    print_sql,
                    rotator_password,
                },
            ))
        }
        Command::Check { config, admin_url } => {
            let config = Config::load(&config)?;
            let problems = runtime()?.block_on(rolegate::provision::check(&config, &admin_url))?;
            if problems.is_empty() {
                println!("ok: the database matches the rolegate layout");
                return Ok(());
            }
            for p in &problems {
                println!(
                    "problem: {}
    fix: {}",
                    p.problem, p.fix
                );
            }
            println!("{} problem(s)", problems.len());
            std::process::exit(1);
        }
        Command::Rotate { config } => {
            let config = Config::load(&config)?;
            let listen = config
                .admin_listen
                .context("rotate needs admin_listen in the config")?;
            let token = config.admin.token()?;
            let (ok, body) = runtime()?
                .block_on(rolegate::admin::request_rotation(&listen, token.as_deref()))?;
            println!("{body}");
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Demo { listen, pool_mode } => {
            let mode = match pool_mode {
                PoolModeArg::Session => rolegate::config::PoolMode::Session,
                PoolModeArg::Transaction => rolegate::config::PoolMode::Transaction,
            };
            runtime()?.block_on(rolegate::demo::run_demo(&listen, mode))
        }
        Command::HashPassword => {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .context("reading the password from stdin")?;
            let password = input.strip_suffix('\n').unwrap_or(&input);
            let password = password.strip_suffix('\r').unwrap_or(password);
            anyhow::ensure!(!password.is_empty(), "the password on stdin is empty");
            println!("{}", rolegate::scram::make_verifier(password));
            Ok(())
        }
    }
}

/// Runs the proxy until SIGTERM/SIGINT, then stops accepting, lets sessions finish their
/// transactions for up to `shutdown_timeout`, and returns. SIGHUP reloads the config.
async fn serve(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let proxy = Proxy::start(config).await?;
    if let Some(listen) = proxy.config().admin_listen.clone() {
        let _ = proxy.admin_bound.set(listen.clone());
        let admin = proxy.clone();
        tokio::spawn(async move {
            if let Err(e) = rolegate::admin::serve(admin, listen).await {
                tracing::error!(error = format!("{e:#}"), "admin endpoint stopped");
            }
        });
    }
    let reloader = proxy.clone();
    tokio::spawn(async move {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hangup.recv().await.is_some() {
            match reloader.reload(&path) {
                Ok(()) => tracing::info!(config = %path.display(), "config reloaded"),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "new config refused; the old one stays in force"
                ),
            }
        }
    });
    let listener = start_listeners(&proxy)?;
    tokio::select! {
        result = listener => return result.context("listener task")?,
        _ = rolegate::demo::shutdown_signal() => {}
    }
    let timeout = proxy.config().limits.shutdown_timeout;
    tracing::info!(timeout = ?timeout, "shutting down: no new connections, sessions end when idle");
    let _ = proxy.shutdown.send(true);
    let deadline = tokio::time::Instant::now() + timeout;
    while proxy
        .open_connections
        .load(std::sync::atomic::Ordering::SeqCst)
        > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let left = proxy
        .open_connections
        .load(std::sync::atomic::Ordering::SeqCst);
    tracing::info!(closed_unfinished = left, "stopped");
    Ok(())
}

/// Starts accepting clients: on this runtime, or with `runtime = "per_thread"` on each
/// thread's own listener, the first on this thread (which serves shard 0 of the pools)
/// and each other on a thread with a current-thread runtime of its own. The handle ends
/// when any accept loop does (an error on any thread stops rolegate, as on one thread).
fn start_listeners(
    proxy: &Arc<Proxy>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    use rolegate::listener;
    let config = proxy.config();
    if config.runtime == Runtime::Shared {
        return Ok(tokio::spawn(listener::serve(proxy.clone())));
    }
    let threads = proxy.pools.shards();
    if config.pool.mode == PoolMode::Transaction && config.pool.size < 2 * threads {
        tracing::warn!(
            threads,
            pool_size = config.pool.size,
            "runtime = \"per_thread\": each thread lends only from its own share of a pool's backend connections, here 1 for some threads, which one pinned client (LISTEN, a session lock) then holds for all that thread's clients"
        );
    }
    let mut sockets = listener::bind_per_thread(&config.listen, threads)?.into_iter();
    let first = sockets.next().context("no listening socket")?;
    let (failed, mut failure) = tokio::sync::mpsc::unbounded_channel::<anyhow::Error>();
    for (shard, socket) in (1..).zip(sockets) {
        let runtime = serve_runtime(1)?;
        let proxy = proxy.clone();
        let failed = failed.clone();
        std::thread::Builder::new()
            .name(format!("rolegate-{shard}"))
            .spawn(move || {
                rolegate::pool::set_thread_shard(shard);
                runtime.block_on(async move {
                    let accepted = match tokio::net::TcpListener::from_std(socket) {
                        Ok(socket) => {
                            if proxy.config().pool.mode == PoolMode::Transaction {
                                tokio::spawn(proxy.pools.clone().maintain(shard));
                            }
                            listener::accept_loop(proxy, socket).await
                        }
                        Err(e) => Err(e.into()),
                    };
                    if let Err(e) = accepted {
                        let _ = failed.send(e.context(format!("serving thread {shard}")));
                    }
                    // The sessions of this thread run on until they end or the process
                    // does (after shutdown's wait for them): its runtime must not stop.
                    std::future::pending::<()>().await
                })
            })
            .context("starting a serving thread")?;
    }
    let proxy = proxy.clone();
    Ok(tokio::spawn(async move {
        let first = tokio::net::TcpListener::from_std(first)?;
        tokio::select! {
            accepted = listener::accept_loop(proxy, first) => accepted,
            Some(e) = failure.recv() => Err(e),
        }
    }))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROLEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
