//! The `rolegate` command line.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use rolegate::config::Config;
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(async {
                let proxy = Arc::new(Proxy::new(config)?);
                tokio::select! {
                    result = rolegate::listener::serve(proxy) => result,
                    _ = tokio::signal::ctrl_c() => {
                        tracing::info!("interrupted; stopping");
                        Ok(())
                    }
                }
            })
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
