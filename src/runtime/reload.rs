//! Reload without restart: on SIGHUP, or when the config file, a secret file or the CA file
//! changes (their directories are watched, so Kubernetes' `..data` symlink swap is seen), the
//! config is re-read and validated, then swapped in atomically. An invalid config leaves the
//! running one in place.
//!
//! Those directories hold other files too, the proxy's own log among them. An event for a file
//! the config does not depend on is dropped in the watcher's callback: it wakes nothing and logs
//! nothing, so a log file written next to the config cannot feed the watcher its own lines.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::AbortHandle;

use crate::config::{Config, ConfigError, ListenAddr, ServerSettings};
use crate::runtime::state::SharedState;
use crate::runtime::verify::{self, VerifyStatus};
use crate::telemetry::metrics::ResultLabels;

/// Lets file events settle (an editor's write-then-rename, a symlink swap) before reloading.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// How often files are checked when inotify is unavailable.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("the reload task failed: {0}")]
    Task(String),
}

/// Cheap to clone; every clone drives the same proxy.
#[derive(Clone)]
pub struct ReloadHandle {
    state: Arc<SharedState>,
    tasks: Arc<Mutex<Tasks>>,
    /// One reload at a time: a SIGHUP racing a file event must not install twice.
    reloading: Arc<tokio::sync::Mutex<()>>,
    /// The listener settings in force since start-up, which a reload cannot change.
    started_with: Arc<ServerSettings>,
    /// The files whose events matter, read by the watcher's callback on notify's thread.
    relevant: Arc<ArcSwap<RelevantFiles>>,
    /// The admin listener's addresses in force since start-up.
    admin_started_with: Arc<[ListenAddr]>,
}

/// The files the config depends on, by the directory that is watched for them.
#[derive(Default, PartialEq, Eq)]
struct RelevantFiles(BTreeMap<PathBuf, BTreeSet<OsString>>);

impl RelevantFiles {
    fn of(files: &[PathBuf]) -> Self {
        let mut by_directory: BTreeMap<PathBuf, BTreeSet<OsString>> = BTreeMap::new();
        for file in files {
            if let (Some(dir), Some(name)) = (watched_directory(file), file.file_name()) {
                by_directory.entry(dir).or_default().insert(name.to_owned());
            }
        }
        RelevantFiles(by_directory)
    }

    /// Whether an event may concern a file the config depends on. Besides the files
    /// themselves: names starting with `..` (Kubernetes swaps a secret mount's `..data`
    /// symlink), a watched directory itself, and events without paths (a queue overflow).
    /// Costs a map lookup per path, without allocating.
    fn concern(&self, event: &notify::Event) -> bool {
        event.paths.is_empty()
            || event.paths.iter().any(|path| {
                if self.0.contains_key(path) {
                    return true;
                }
                let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                    return true;
                };
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                self.0.get(dir).is_some_and(|names| {
                    names.contains(name) || name.as_encoded_bytes().starts_with(b"..")
                })
            })
    }
}

/// The directory watched for `file`: its parent, `.` for a bare file name.
fn watched_directory(file: &Path) -> Option<PathBuf> {
    file.parent().map(|d| {
        if d.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            d.to_owned()
        }
    })
}

/// The `[server]` and `[admin]` keys that differ from the running listeners' and need a
/// restart.
fn startup_only_changes(
    running: &ServerSettings,
    running_admin: &[ListenAddr],
    configured: &Config,
) -> Vec<&'static str> {
    let mut changed = listener_changes(running, &configured.server);
    if running_admin != configured.admin.listen.as_slice() {
        changed.push("admin.listen");
    }
    changed
}

fn listener_changes(running: &ServerSettings, configured: &ServerSettings) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if running.listen != configured.listen {
        changed.push("server.listen");
    }
    if running.unix_socket_mode != configured.unix_socket_mode {
        changed.push("server.unix_socket_mode");
    }
    if running.max_connections != configured.max_connections {
        changed.push("server.max_connections");
    }
    if running.max_in_flight != configured.max_in_flight {
        changed.push("server.max_in_flight");
    }
    if running.max_concurrent_streams != configured.max_concurrent_streams {
        changed.push("server.max_concurrent_streams");
    }
    if running.header_read_timeout != configured.header_read_timeout {
        changed.push("server.header_read_timeout");
    }
    if running.send_timeout != configured.send_timeout {
        changed.push("server.send_timeout");
    }
    changed
}

/// inotify where it can. Where it cannot (inotify instances are limited per user, and a shared
/// host's other tenants may have used them up; some network filesystems send no events), the
/// watch loop polls the files' fingerprints instead.
fn file_watcher<H: notify::EventHandler>(on_event: H) -> Option<notify::RecommendedWatcher> {
    match notify::recommended_watcher(on_event) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(%error, interval = ?POLL_INTERVAL, "cannot use inotify; polling config files instead");
            None
        }
    }
}

/// Size, modification time and inode of each file (following symlinks): enough to tell a real
/// change from unrelated activity in a watched directory.
type Fingerprint = Vec<Option<(u64, Option<std::time::SystemTime>, u64)>>;

fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|file| {
            std::fs::metadata(file)
                .ok()
                .map(|m| (m.len(), m.modified().ok(), m.ino()))
        })
        .collect()
}

async fn fingerprint_off_thread(files: Vec<PathBuf>) -> Fingerprint {
    tokio::task::spawn_blocking(move || fingerprint(&files))
        .await
        .unwrap_or_default()
}

/// The files whose fingerprint differs, comma-separated (every file when the lists differ,
/// as after a reload that named other secret files).
fn changed_files(files: &[PathBuf], now: &Fingerprint, before: &Fingerprint) -> String {
    files
        .iter()
        .enumerate()
        .filter(|(i, _)| now.len() != before.len() || now[*i] != before[*i])
        .map(|(_, file)| {
            crate::telemetry::logging::resolved(file)
                .display()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Failed directories are retried on every pass (a secret mount may appear later) but warned
/// about once.
enum DirectoryWatch {
    Watched,
    Failed,
}

#[derive(Default)]
struct Tasks {
    verifiers: Vec<AbortHandle>,
    watcher: Option<AbortHandle>,
}

impl ReloadHandle {
    pub fn new(state: Arc<SharedState>) -> Self {
        let current = state.current();
        let started_with = Arc::new(current.config.server.clone());
        let admin_started_with = current.config.admin.listen.clone().into();
        ReloadHandle {
            state,
            tasks: Arc::default(),
            reloading: Arc::default(),
            started_with,
            relevant: Arc::default(),
            admin_started_with,
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the config file and every secret, and installs the result if it is valid.
    pub async fn reload(&self) -> Result<u64, ReloadError> {
        self.reload_because("requested").await
    }

    /// [`reload`](Self::reload), logging what set it off: `SIGHUP`, or the files that changed.
    async fn reload_because(&self, cause: &str) -> Result<u64, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.state.current();
        let path = current.config.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| ReloadError::Task(e.to_string()))
            .and_then(|loaded| loaded.map_err(ReloadError::from));
        let config = match loaded {
            Ok(config) => config,
            Err(error) => {
                self.count("failed");
                tracing::error!(config = %crate::telemetry::logging::resolved(&current.config.path).display(), cause, error = %error, "config reload failed; still serving the previous config");
                return Err(error);
            }
        };
        let unapplied = startup_only_changes(&self.started_with, &self.admin_started_with, &config);
        if !unapplied.is_empty() {
            tracing::warn!(
                keys = %unapplied.join(", "),
                "these settings apply at start-up only: the running values stay until a restart; everything else is reloaded"
            );
        }
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        let generation = self.state.install(config);
        self.count("ok");
        tracing::info!(
            generation,
            config = %crate::telemetry::logging::resolved(&current.config.path).display(),
            cause,
            "config reloaded"
        );
        self.start_verifiers();
        Ok(generation)
    }

    fn count(&self, result: &'static str) {
        self.state
            .metrics
            .config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// (Re)starts one checker per credential with `verify = true`.
    pub fn start_verifiers(&self) {
        let generation = self.state.current();
        let mut tasks = self.tasks();
        for task in tasks.verifiers.drain(..) {
            task.abort();
        }
        let names: Vec<Arc<str>> = generation
            .config
            .credentials
            .iter()
            .filter(|c| c.verify)
            .map(|c| c.name.clone())
            .collect();
        self.state.retain_verify_statuses(&names);
        for credential in generation.credentials.iter().filter(|c| c.verify) {
            if !self.state.verify_statuses().contains_key(&credential.name) {
                verify::record(&self.state, &credential.name, VerifyStatus::pending());
            }
            let task = tokio::spawn(verify::run_verifier(self.state.clone(), credential.clone()));
            tasks.verifiers.push(task.abort_handle());
        }
    }

    /// Stops background work (checks, watching) ahead of shutdown.
    pub fn stop(&self) {
        let mut tasks = self.tasks();
        for task in tasks.verifiers.drain(..) {
            task.abort();
        }
        if let Some(watcher) = tasks.watcher.take() {
            watcher.abort();
        }
    }

    /// Reloads on SIGHUP and whenever a file the config depends on changes.
    pub fn watch(&self) {
        let (tx, rx) = tokio::sync::mpsc::channel::<()>(1);
        let relevant = self.relevant.clone();
        let on_event = move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event
                && !matches!(event.kind, notify::EventKind::Access(_))
                && relevant.load().concern(&event)
            {
                // A full channel already means "reload pending".
                let _ = tx.try_send(());
            }
        };
        let mut watcher = file_watcher(on_event);
        // Directories and SIGHUP are registered before returning, not in the task: a file
        // changed before the task first runs would go unnoticed, and a SIGHUP would hit the
        // default action and terminate the process.
        let mut watched = BTreeMap::new();
        if let Some(watcher) = watcher.as_mut() {
            self.watch_directories(watcher, &mut watched);
        }
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        // The baseline too: taken in the task, it could already include a change made after
        // this returns, and that change would then look like nothing happened.
        let baseline = fingerprint(&self.state.current().config.watched_files());
        let handle = self.clone();
        let task = tokio::spawn(async move {
            handle
                .watch_loop(watcher, watched, baseline, rx, hangup)
                .await
        });
        self.tasks().watcher = Some(task.abort_handle());
    }

    async fn watch_loop(
        &self,
        mut watcher: Option<notify::RecommendedWatcher>,
        mut watched: BTreeMap<PathBuf, DirectoryWatch>,
        mut last_seen: Fingerprint,
        mut changes: tokio::sync::mpsc::Receiver<()>,
        mut hangup: Option<tokio::signal::unix::Signal>,
    ) {
        loop {
            let every_directory_watched = match watcher.as_mut() {
                Some(watcher) => self.watch_directories(watcher, &mut watched),
                None => false,
            };
            let hangup_received = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            let hangup = tokio::select! {
                Some(()) = changes.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while changes.try_recv().is_ok() {}
                    false
                }
                () = tokio::time::sleep(POLL_INTERVAL), if !every_directory_watched => false,
                _ = hangup_received => true,
            };
            let files = self.state.current().config.watched_files();
            // Taken before the reload reads the files, so a write racing the reload still
            // differs from it and triggers another one.
            let before = fingerprint_off_thread(files.clone()).await;
            let cause = if hangup {
                tracing::info!("SIGHUP received; reloading");
                "SIGHUP".to_owned()
            } else if before == last_seen {
                // Other files share these directories (logs, editors' swap files): reload
                // only when a file the config depends on really changed.
                continue;
            } else {
                let changed = changed_files(&files, &before, &last_seen);
                tracing::info!(changed = %changed, "a watched file changed; reloading");
                format!("changed: {changed}")
            };
            let _ = self.reload_because(&cause).await;
            let reloaded_files = self.state.current().config.watched_files();
            last_seen = if reloaded_files == files {
                before
            } else {
                fingerprint_off_thread(reloaded_files).await
            };
        }
    }

    /// Watches the directory of every file the current config depends on. Directories, not
    /// files: a symlink swap or an editor's rename replaces the file being watched. Returns
    /// whether every directory is watched; the loop polls when one is not.
    fn watch_directories(
        &self,
        watcher: &mut notify::RecommendedWatcher,
        watched: &mut BTreeMap<PathBuf, DirectoryWatch>,
    ) -> bool {
        use notify::Watcher;
        let mut every_directory_watched = true;
        let generation = self.state.current();
        let files = generation.config.watched_files();
        let relevant = RelevantFiles::of(&files);
        if **self.relevant.load() != relevant {
            self.relevant.store(Arc::new(relevant));
        }
        for file in files {
            let Some(dir) = watched_directory(&file) else {
                continue;
            };
            let warned = match watched.get(&dir) {
                Some(DirectoryWatch::Watched) => continue,
                Some(DirectoryWatch::Failed) => true,
                None => false,
            };
            match watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir, DirectoryWatch::Watched);
                }
                Err(error) => {
                    every_directory_watched = false;
                    if !warned {
                        tracing::warn!(dir = %dir.display(), %error, "cannot watch directory; polling it instead");
                    }
                    watched.insert(dir, DirectoryWatch::Failed);
                }
            }
        }
        every_directory_watched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(paths: &[&str]) -> notify::Event {
        let mut event = notify::Event::new(notify::EventKind::Any);
        event.paths = paths.iter().map(PathBuf::from).collect();
        event
    }

    #[test]
    fn only_events_for_the_configs_files_concern_the_watcher() {
        let relevant = RelevantFiles::of(&[
            PathBuf::from("/etc/proxy/proxy.toml"),
            PathBuf::from("/run/secrets/token"),
            PathBuf::from("local.toml"),
        ]);
        for paths in [
            &["/etc/proxy/proxy.toml"][..],
            &["/etc/proxy/.proxy.toml.swp", "/etc/proxy/proxy.toml"],
            &["/run/secrets/..data"],
            &["/run/secrets/..2026_12_01_05_00_00.123"],
            &["/run/secrets"],
            &["./local.toml"],
            &[],
        ] {
            assert!(relevant.concern(&event(paths)), "{paths:?}");
        }
        for paths in [
            &["/etc/proxy/proxy.log"][..],
            &["/etc/proxy/.proxy.toml.swp"],
            &["/run/secrets/other-token"],
            &["/var/log/proxy.toml"],
            &["./proxy.log"],
        ] {
            assert!(!relevant.concern(&event(paths)), "{paths:?}");
        }
    }

    const CONFIG: &str = r#"
[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = { file = "token" }

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"
"#;

    #[test]
    fn admin_listen_is_start_up_only_and_admin_allowed_clients_is_not() {
        let config = |admin: &str| {
            let text = format!(
                "{admin}\n{}",
                CONFIG.replace("{ file = \"token\" }", "{ value = \"t\" }")
            );
            Config::from_toml(std::path::Path::new("/etc/bbap/proxy.toml"), &text).unwrap()
        };
        let running = config("[admin]\nlisten = [\"127.0.0.1:9090\"]");
        let changes =
            |next: &Config| startup_only_changes(&running.server, &running.admin.listen, next);
        assert!(
            changes(&config(
                "[admin]\nlisten = [\"127.0.0.1:9090\"]\nallowed_clients = [\"10.0.0.0/8\"]"
            ))
            .is_empty()
        );
        assert_eq!(
            changes(&config("[admin]\nlisten = [\"127.0.0.1:9091\"]")),
            ["admin.listen"]
        );
        assert_eq!(changes(&config("")), ["admin.listen"]);
    }

    /// Without inotify the loop polls fingerprints, which see a sub-second replace-by-rename
    /// that a whole-second mtime comparison would miss.
    #[tokio::test]
    async fn without_inotify_a_replaced_secret_file_is_polled_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, CONFIG).unwrap();
        std::fs::write(dir.path().join("token"), "old-token\n").unwrap();
        let state = Arc::new(SharedState::new(Config::load(&config_path).unwrap()));
        let handle = ReloadHandle::new(state.clone());
        let baseline = fingerprint(&state.current().config.watched_files());
        let (_no_events, changes) = tokio::sync::mpsc::channel(1);
        let watching = handle.clone();
        let task = tokio::spawn(async move {
            watching
                .watch_loop(None, BTreeMap::new(), baseline, changes, None)
                .await
        });

        let aside = dir.path().join(".token.tmp");
        std::fs::write(&aside, "new-token\n").unwrap();
        std::fs::rename(&aside, dir.path().join("token")).unwrap();

        let deadline = tokio::time::Instant::now() + POLL_INTERVAL * 5;
        while state.current().number < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not reloaded within five poll intervals"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
    }
}
