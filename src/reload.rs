//! Reload without restart: on SIGHUP, or when the config file, a secret file or the CA file
//! changes (their directories are watched, so Kubernetes' `..data` symlink swap is seen), the
//! config is re-read and validated, then swapped in atomically. An invalid config leaves the
//! running one in place.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::AbortHandle;

use crate::config::{Config, ConfigError, ServerSettings};
use crate::metrics::ResultLabels;
use crate::state::SharedState;
use crate::verify::{self, VerifyStatus};

/// Lets file events settle (an editor's write-then-rename, a symlink swap) before reloading.
const DEBOUNCE: Duration = Duration::from_millis(150);

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
}

/// The `[server]` keys that differ from the running listeners' and need a restart.
fn startup_only_changes(
    running: &ServerSettings,
    configured: &ServerSettings,
) -> Vec<&'static str> {
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
    if running.header_read_timeout != configured.header_read_timeout {
        changed.push("server.header_read_timeout");
    }
    if running.send_timeout != configured.send_timeout {
        changed.push("server.send_timeout");
    }
    changed
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

#[derive(Default)]
struct Tasks {
    verifiers: Vec<AbortHandle>,
    watcher: Option<AbortHandle>,
}

impl ReloadHandle {
    pub fn new(state: Arc<SharedState>) -> Self {
        let started_with = Arc::new(state.current().config.server.clone());
        ReloadHandle {
            state,
            tasks: Arc::default(),
            reloading: Arc::default(),
            started_with,
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the config file and every secret, and installs the result if it is valid.
    pub async fn reload(&self) -> Result<u64, ReloadError> {
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
                tracing::error!(error = %error, "config reload failed; still serving the previous config");
                return Err(error);
            }
        };
        let unapplied = startup_only_changes(&self.started_with, &config.server);
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
        tracing::info!(generation, "config reloaded");
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
        for credential in generation.config.credentials.iter().filter(|c| c.verify) {
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
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event
                && !matches!(event.kind, notify::EventKind::Access(_))
            {
                // A full channel already means "reload pending".
                let _ = tx.try_send(());
            }
        });
        let mut watcher = match watcher {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(%error, "cannot watch config files; reload with SIGHUP");
                None
            }
        };
        // Directories and SIGHUP are registered before returning, not in the task: a file
        // changed before the task first runs would go unnoticed, and a SIGHUP would hit the
        // default action and terminate the process.
        let mut watched = BTreeSet::new();
        if let Some(watcher) = watcher.as_mut() {
            self.watch_directories(watcher, &mut watched);
        }
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let handle = self.clone();
        let task =
            tokio::spawn(async move { handle.watch_loop(watcher, watched, rx, hangup).await });
        self.tasks().watcher = Some(task.abort_handle());
    }

    async fn watch_loop(
        &self,
        mut watcher: Option<notify::RecommendedWatcher>,
        mut watched: BTreeSet<PathBuf>,
        mut changes: tokio::sync::mpsc::Receiver<()>,
        mut hangup: Option<tokio::signal::unix::Signal>,
    ) {
        let mut last_seen = fingerprint(&self.state.current().config.watched_files());
        loop {
            if let Some(watcher) = watcher.as_mut() {
                self.watch_directories(watcher, &mut watched);
            }
            let hangup_received = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(()) = changes.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while changes.try_recv().is_ok() {}
                    // Other files share these directories (logs, editors' swap files): reload
                    // only when a file the config depends on really changed.
                    let files = self.state.current().config.watched_files();
                    let now = tokio::task::spawn_blocking(move || fingerprint(&files)).await.unwrap_or_default();
                    if now == last_seen {
                        continue;
                    }
                    tracing::info!("a watched file changed; reloading");
                }
                _ = hangup_received => tracing::info!("SIGHUP received; reloading"),
            }
            let _ = self.reload().await;
            let files = self.state.current().config.watched_files();
            last_seen = tokio::task::spawn_blocking(move || fingerprint(&files))
                .await
                .unwrap_or_default();
        }
    }

    /// Watches the directory of every file the current config depends on. Directories, not
    /// files: a symlink swap or an editor's rename replaces the file being watched.
    fn watch_directories(
        &self,
        watcher: &mut notify::RecommendedWatcher,
        watched: &mut BTreeSet<PathBuf>,
    ) {
        use notify::Watcher;
        let generation = self.state.current();
        for file in generation.config.watched_files() {
            let Some(dir) = file.parent().map(|d| {
                if d.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    d.to_owned()
                }
            }) else {
                continue;
            };
            if watched.contains(&dir) {
                continue;
            }
            match watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir);
                }
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "cannot watch directory")
                }
            }
        }
    }
}
