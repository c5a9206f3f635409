//! Logging set-up: the tracing subscriber (text or JSON, non-blocking) and how paths are shown
//! in log lines. Uses nothing else in the crate.

use std::io::IsTerminal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The level used when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info";
/// The most notify, the file-watching crate, may log unless `RUST_LOG` names it.
const NOTIFY_CAP: &str = "notify=debug";

/// Installs the global subscriber: `RUST_LOG` filtering, text on a terminal, JSON otherwise.
///
/// Lines are written by a background thread (a bounded queue that blocks rather than drops
/// when full), so request threads never wait on the stderr pipe. Keep the returned guard alive
/// until exit: dropping it flushes what is queued.
pub fn init_logging(format: Option<LogFormat>) -> tracing_appender::non_blocking::WorkerGuard {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    // notify logs every file event at trace. With the log written into a watched directory,
    // each line would be an event, and each event a line: only a RUST_LOG that names notify
    // gets its trace lines.
    if !std::env::var("RUST_LOG").is_ok_and(|spec| spec.contains("notify")) {
        filter = filter.add_directive(NOTIFY_CAP.parse().expect("a valid directive"));
    }
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The default queue preallocates 128,000 lines (4 MiB resident at idle); 8,192 absorbs
        // bursts and blocks beyond them.
        .buffered_lines_limit(8192)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(format == LogFormat::Text && std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        // The request's span (with its id) on each line, not the list of every enclosing one.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_span_list(false)
            .try_init(),
    };
    guard
}

/// A path as logged: absolute and without symlinks when it can be resolved, so a line read
/// away from the process's working directory still names the file.
pub fn resolved(path: &std::path::Path) -> std::borrow::Cow<'_, std::path::Path> {
    std::fs::canonicalize(path).map_or(std::borrow::Cow::Borrowed(path), std::borrow::Cow::Owned)
}
