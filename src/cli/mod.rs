//! The command line: `run` (default), `check`, `health`, and the generators `schema`,
//! `completions` and `man` (which read no config). [`health`] probes a running proxy, and
//! [`git_config`] prints the `git config` lines `check` suggests.
//!
//! The top layer: may use every other; nothing uses it but `main`.

pub mod git_config;
pub mod health;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::config::{CONFIG_ENV, Config, ConfigError, Mode};
use crate::telemetry::logging::{LogFormat, init_logging};

#[derive(Debug, Parser)]
#[command(
    name = "bitbucket-auth-proxy",
    version = crate::base::build_info::long_version(),
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
    /// Validate the config and every secret, print the route table and the git config lines, and exit.
    Check {
        /// Validate everything but read no secret and no CA file (and touch no network), to lint
        /// a config away from the host it is meant for, e.g. in CI.
        #[arg(long)]
        offline: bool,
    },
    /// Probe a running proxy's `/-/health` (for container health checks; needs no shell).
    Health {
        /// The health URL; default: the first `server.listen` entry of --config, or
        /// http://127.0.0.1:8080/-/health. `unix:/path` probes a unix socket.
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// Print the config file's JSON Schema (the same as config/schema.json).
    Schema,
    /// Print a shell completion script.
    Completions {
        /// The shell to complete for.
        shell: CompletionShell,
    },
    /// Print the man page (roff), e.g. `bitbucket-auth-proxy man > bitbucket-auth-proxy.1`.
    Man {
        /// A subcommand's own page instead (`man check` is bitbucket-auth-proxy-check(1)).
        subcommand: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    match &command {
        Command::Health { url } => {
            return crate::cli::health::probe_command(url.as_deref(), cli.config.as_deref());
        }
        Command::Schema => return print(crate::config::schema::json_schema().as_bytes()),
        Command::Completions { shell } => return print(&completions(*shell)),
        Command::Man { subcommand } => {
            return match man_page(subcommand.as_deref()) {
                Ok(page) => print(&page),
                Err(message) => {
                    eprintln!("error: {message}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Run | Command::Check { .. } => {}
    }
    let Some(config_path) = cli.config else {
        eprintln!("error: no config file given: pass --config FILE or set {CONFIG_ENV}");
        return ExitCode::from(2);
    };
    if let Command::Check { offline } = command {
        check(
            &config_path,
            if offline { Mode::Offline } else { Mode::Full },
        )
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

/// The runtime for `workers` worker threads (`None`: one per CPU the process may use). One
/// worker gets tokio's current-thread scheduler: the same single thread running every task,
/// without the work-stealing machinery (shared queues, wake-ups across threads) that a lone
/// worker cannot use. It measured 3–5 % less CPU per proxied request (docs/performance.md),
/// which is what a sidecar or a CI runner's proxy on one CPU runs with.
fn runtime_builder(workers: Option<usize>) -> tokio::runtime::Builder {
    let workers = workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        runtime.worker_threads(workers);
        runtime
    }
}

/// Writes generated output to stdout; a closed pipe (`| head`) is not worth a panic.
fn print(bytes: &[u8]) -> ExitCode {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: cannot write to stdout: {error}");
            ExitCode::FAILURE
        }
    }
}

fn completions(shell: CompletionShell) -> Vec<u8> {
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    let mut command = Cli::command();
    let name = command.get_name().to_owned();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut out);
    out
}

/// The top-level page, or a subcommand's as `bitbucket-auth-proxy-NAME`, the way git names its
/// subcommand pages.
fn man_page(subcommand: Option<&str>) -> Result<Vec<u8>, String> {
    let mut command = Cli::command();
    // Propagates the global options (--config, --log-format) into each subcommand's page.
    command.build();
    let page = match subcommand {
        None => command,
        Some(name) => {
            let full_name = format!("{}-{name}", command.get_name());
            command
                .get_subcommands()
                .find(|sub| sub.get_name() == name && name != "help")
                .cloned()
                .ok_or_else(|| {
                    let names: Vec<&str> = command
                        .get_subcommands()
                        .map(clap::Command::get_name)
                        .filter(|n| *n != "help")
                        .collect();
                    format!("`{name}` is not a subcommand (valid: {})", names.join(", "))
                })?
                .name(full_name)
                .version(env!("CARGO_PKG_VERSION"))
        }
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(|error| format!("cannot render the man page: {error}"))?;
    Ok(out)
}

fn load(path: &std::path::Path, mode: Mode) -> Result<Config, ExitCode> {
    Config::load_with(path, mode).map_err(|error| {
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

fn check(path: &std::path::Path, mode: Mode) -> ExitCode {
    let config = match load(path, mode) {
        Ok(config) => config,
        Err(code) => return code,
    };
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    print!("{}", crate::config::describe_routes(&config));
    print!("{}", crate::cli::git_config::describe(&config));
    println!(
        "{}: OK ({} credential{}, {} route{}{})",
        path.display(),
        config.credentials.len(),
        if config.credentials.len() == 1 {
            ""
        } else {
            "s"
        },
        config.routes.len(),
        if config.routes.len() == 1 { "" } else { "s" },
        if mode == Mode::Offline {
            "; offline: no secret or CA file read"
        } else {
            ""
        },
    );
    ExitCode::SUCCESS
}

fn run(path: &std::path::Path, log_format: Option<LogFormat>) -> ExitCode {
    let _flush_logs_on_exit = init_logging(log_format);
    let config = match load(path, Mode::Full) {
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
    let runtime = match runtime_builder(workers).enable_all().build() {
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
        let proxy = match crate::server::listener::start(config).await {
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
            crate::server::listener::ShutdownOutcome::Drained => tracing::info!("drained, exiting"),
            crate::server::listener::ShutdownOutcome::GraceExpired => {
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
    fn one_worker_runs_the_current_thread_scheduler() {
        use tokio::runtime::RuntimeFlavor;
        let flavor = |workers| {
            runtime_builder(Some(workers))
                .enable_all()
                .build()
                .unwrap()
                .handle()
                .runtime_flavor()
        };
        assert_eq!(flavor(1), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(2), RuntimeFlavor::MultiThread);
    }

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
