//! `portico start`: runs the services a `portico.yaml` enables, in one
//! process; with no config, auth (SQLite), proxy and one wildcard agent.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

mod config;
mod run;

/// Portico allocates and frees many small buffers per relayed message,
/// across threads; mimalloc does that with less work than glibc's malloc
/// (docs/perf/README.md, "The allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "portico",
    version,
    about = "Portico: one access plane for your MCP servers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the services the config enables (all three on SQLite when no config is given).
    Start {
        /// The portico.yaml to read.
        #[arg(long, short = 'c', env = "PORTICO_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Where state lives: the SQLite database, identities.
        #[arg(long, env = "PORTICO_DATA_DIR", value_name = "DIR")]
        data_dir: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// A tracing filter such as info or portico_proxy=debug (RUST_LOG works too).
        #[arg(long, default_value = "info")]
        log_level: String,
    },
    /// Check a portico.yaml and print what it would run.
    Check {
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check { config } => check(&config),
        Cmd::Start {
            config,
            data_dir,
            log_format,
            log_level,
        } => start(config, data_dir, log_format, log_level),
    }
}

/// `portico check`: the config parses, and which services it runs.
fn check(config: &std::path::Path) {
    let loaded = config::load(config).and_then(|c| match &c.auth {
        Some(a) => a.validate().map(|()| c).map_err(|e| e.to_string()),
        None => Ok(c),
    });
    match loaded {
        Ok(c) => {
            let state = |on: bool| if on { "enabled" } else { "disabled" };
            println!("{}: ok", config.display());
            println!("  auth_service:  {}", state(c.auth.is_some()));
            println!("  proxy_service: {}", state(c.proxy.is_some()));
            println!("  app_service:   {}", state(c.agent.is_some()));
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn init_logs(format: LogFormat, level: String) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour only for a person at a terminal, never into files or pipes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `portico start`: the config (or the quick start), then the services until a signal.
fn start(config: Option<PathBuf>, data_dir: Option<PathBuf>, format: LogFormat, level: String) {
    init_logs(format, level);
    let cfg = match &config {
        Some(path) => config::load(path),
        None => Ok(config::Config::quick_start()),
    };
    let mut cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Some(d) = data_dir {
        cfg.data_dir = d;
    }
    let workers = match portico_agent::worker_threads(cfg.agent.is_some()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run::run(cfg, config.is_none())) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
