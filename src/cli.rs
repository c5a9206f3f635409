//! The command line: `run` (default) and `check`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{CONFIG_ENV, Config, ConfigError};
use crate::telemetry::{LogFormat, init_logging};

#[derive(Debug, Parser)]
#[command(
    name = "bitbucket-auth-proxy",
    version = crate::build_info::long_version(),
    about = "Keeps Bitbucket Cloud credentials in one process: clients call it without secrets, it injects them."
)]
pub struct Cli {
    /// The TOML config file.
    #[arg(long, short = 'c', global = true, env = CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log format; default: text on a terminal, json otherwise. Level comes from RUST_LOG.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default).
    Run,
    /// Validate the config and every secret, print the route table, and exit.
    Check,
    /// Probe a running proxy's `/-/health` (for container health checks; needs no shell).
    Health {
        /// The health URL; default: the first `server.listen` entry of --config, or
        /// http://127.0.0.1:8080/-/health. `unix:/path` probes a unix socket.
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Health { url } = &command {
        return crate::health::probe_command(url.as_deref(), cli.config.as_deref());
    }
    let Some(config_path) = cli.config else {
        eprintln!("error: no config file given: pass --config FILE or set {CONFIG_ENV}");
        return ExitCode::from(2);
    };
    if let Command::Check = command {
        check(&config_path)
    } else {
        run(&config_path, cli.log_format)
    }
}

/// tokio's own override for the runtime's worker count, read here so that a bad value is an
/// error message rather than tokio's panic.
const WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// The worker count `TOKIO_WORKER_THREADS` asks for; `None` (one per usable CPU) when unset.
fn worker_threads(value: Option<std::ffi::OsString>) -> Result<Option<usize>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.to_str().map(|v| v.trim().parse::<usize>()) {
        Some(Ok(workers)) if workers > 0 => Ok(Some(workers)),
        _ => Err(format!(
            "{WORKER_THREADS_ENV}={value:?}: expected a whole number of worker threads, 1 or more"
        )),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|error| {
        report_config_error(&error);
        ExitCode::FAILURE
    })
}

/// Prints config errors plainly. When the only problem is unset environment variables (a
/// newcomer running the example), one line says which to set.
fn report_config_error(error: &ConfigError) {
    match error.only_missing_env() {
        Some(vars) if !vars.is_empty() => {
            let mut vars: Vec<&str> = vars;
            vars.dedup();
            eprintln!(
                "error: {}: set the environment variable{} {} to the Bitbucket token{} this config reads",
                error.path.display(),
                if vars.len() > 1 { "s" } else { "" },
                vars.join(", "),
                if vars.len() > 1 { "s" } else { "" },
            );
        }
        _ => {
            for line in error.to_string().lines() {
                eprintln!("error: {line}");
            }
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    print!("{}", crate::config::describe_routes(&config));
    println!(
        "{}: OK ({} credential{}, {} route{})",
        path.display(),
        config.credentials.len(),
        if config.credentials.len() == 1 {
            ""
        } else {
            "s"
        },
        config.routes.routes().len(),
        if config.routes.routes().len() == 1 {
            ""
        } else {
            "s"
        },
    );
    ExitCode::SUCCESS
}

fn run(path: &std::path::Path, log_format: Option<LogFormat>) -> ExitCode {
    let _flush_logs_on_exit = init_logging(log_format);
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let workers = match worker_threads(std::env::var_os(WORKER_THREADS_ENV)) {
        Ok(workers) => workers,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        runtime.worker_threads(workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        let signals = match ShutdownSignals::install() {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("error: cannot install the SIGTERM/SIGINT handlers: {error}");
                return ExitCode::FAILURE;
            }
        };
        let proxy = match crate::listener::start(config).await {
            Ok(proxy) => proxy,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        };
        signals.received().await;
        // The grace period of the config in force now, reloads included.
        let grace = proxy.state().current().config.server.shutdown_grace;
        tracing::info!(
            grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            "shutting down: no new connections, draining"
        );
        match proxy.shutdown(grace).await {
            crate::listener::ShutdownOutcome::Drained => tracing::info!("drained, exiting"),
            crate::listener::ShutdownOutcome::GraceExpired => {
                tracing::warn!("grace period over, closing the remaining connections")
            }
        }
        ExitCode::SUCCESS
    })
}

/// SIGTERM and SIGINT, registered before the listeners open: a signal sent as soon as the
/// proxy answers must not be lost.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn received(mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_accepts_a_positive_count_and_refuses_anything_else() {
        assert_eq!(worker_threads(None), Ok(None));
        assert_eq!(worker_threads(Some("1".into())), Ok(Some(1)));
        assert_eq!(worker_threads(Some(" 4 ".into())), Ok(Some(4)));
        for bad in ["0", "", "two", "-1", "1.5"] {
            let error = worker_threads(Some(bad.into())).unwrap_err();
            assert!(error.contains("TOKIO_WORKER_THREADS"), "{bad}: {error}");
            assert!(error.contains("1 or more"), "{bad}: {error}");
        }
    }
}
