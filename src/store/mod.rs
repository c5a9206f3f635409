//! The shared store: a Redis server through which replicas holding the same credential share
//! its budget and its 429 cool-down (docs/store.md). This module owns the connection, the
//! store's health (down, slow, restarted empty) and the rule that no call waits longer than
//! `store.timeout`; [`budget`] holds the server-side scripts and the credential fingerprints,
//! [`probe`] the one probe after a shared cool-down, [`reports`] Bitbucket's figures shared
//! between replicas, [`cache`] the shared response-cache entries and their fill lock.
//!
//! Every call goes through [`Store::call`], which answers [`Unavailable`] at once while the
//! store is known to be down, and lets one call through per backoff interval to find out
//! whether it is back: the connection manager reconnects by itself, so recovery needs no
//! restart.
//!
//! Uses redis-rs, the config's [`StoreSettings`] and the metrics registry; knows nothing of
//! HTTP or routes.

pub mod budget;
pub mod cache;
pub mod probe;
pub mod reports;

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, TlsCertificates};
use tokio::time::Instant;

use crate::config::{OnStoreError, StoreSettings};
use crate::telemetry::metrics::store::StoreMetrics;

/// The first pause after a failed call before the store is tried again; doubles per failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long one connection attempt may take. Longer than a call's timeout: a TLS handshake
/// to a remote Redis needs a few round trips, and it runs beside the calls, not inside them.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Deletes a key only if it still holds the caller's token. KEYS: key. ARGV: token.
pub(crate) const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// `bytes` random bytes from the system source, as hex: lock tokens and salts.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut buffer)
        .expect("the system random source works");
    hex(&buffer)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The store could not answer in time; the caller falls back or refuses per `on_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

#[derive(Debug)]
struct Health {
    /// Since when calls fail; `None` while they succeed.
    down_since: Option<SystemTime>,
    /// No call is tried before this instant (one caller at a time finds out whether the store
    /// is back; the others fall back at once).
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<String>,
}

/// The store's state for `/-/ready`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreStatus {
    /// `up` or `down`.
    pub state: &'static str,
    /// `local` or `refuse`: what requests get while it is down.
    pub on_error: &'static str,
    /// Unix seconds since the store has been failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_since: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

pub struct Store {
    connection: ConnectionManager,
    timeout: Duration,
    on_error: OnStoreError,
    health: Mutex<Health>,
    metrics: StoreMetrics,
    /// Fingerprint keys and admission ids (see [`budget`]).
    pub(crate) budget: budget::BudgetKeys,
    cache_scripts: cache::CacheScripts,
}

impl Store {
    /// Builds the client; connects lazily, so a store that is down at start-up delays nothing.
    pub fn new(
        settings: &StoreSettings,
        metrics: &crate::telemetry::metrics::Metrics,
    ) -> Result<Self, String> {
        let addr = if settings.tls {
            ConnectionAddr::TcpTls {
                host: settings.host.clone(),
                port: settings.port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(settings.host.clone(), settings.port)
        };
        let mut redis_settings = RedisConnectionInfo::default().set_db(settings.db);
        if let Some(username) = &settings.username {
            redis_settings = redis_settings.set_username(username);
        }
        if let Some(password) = &settings.password {
            redis_settings = redis_settings.set_password(password.expose());
        }
        let info = addr
            .into_connection_info()
            .map_err(|e| e.to_string())?
            .set_redis_settings(redis_settings);
        let client = if settings.tls {
            Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: settings.ca_pem.clone(),
                },
            )
        } else {
            Client::open(info)
        }
        .map_err(|e| format!("store.url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("store.url: {e}"))?;
        let metrics = StoreMetrics::new(metrics);
        metrics.up.set(1);
        Ok(Store {
            connection,
            budget: budget::BudgetKeys::new(&settings.prefix),
            cache_scripts: cache::CacheScripts::new(),
            timeout: settings.timeout,
            on_error: settings.on_error,
            health: Mutex::new(Health {
                down_since: None,
                retry_at: None,
                backoff: FIRST_BACKOFF,
                last_error: None,
            }),
            metrics,
        })
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }

    pub fn on_error(&self) -> OnStoreError {
        self.on_error
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one call on the store, bounded by `store.timeout`. While the store is down, answers
    /// [`Unavailable`] without trying, except for one caller per backoff interval.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        {
            let mut health = self.health();
            if let Some(retry_at) = health.retry_at {
                let now = Instant::now();
                if now < retry_at {
                    return Err(Unavailable);
                }
                // This caller tries; the others keep falling back meanwhile.
                health.retry_at = Some(now + self.timeout + health.backoff);
            }
        }
        let outcome = tokio::time::timeout(self.timeout, call(self.connection.clone()))
            .await
            .map_err(|_| format!("no answer within store.timeout ({:?})", self.timeout))
            .and_then(|result| result.map_err(|e| e.to_string()));
        match outcome {
            Ok(value) => {
                self.succeeded();
                Ok(value)
            }
            Err(why) => {
                self.failed(why);
                Err(Unavailable)
            }
        }
    }

    fn succeeded(&self) {
        let mut health = self.health();
        if health.down_since.take().is_some() {
            health.retry_at = None;
            health.backoff = FIRST_BACKOFF;
            health.last_error = None;
            drop(health);
            self.metrics.up.set(1);
            tracing::info!("the store answers again: budgets and cool-downs are shared again");
        }
    }

    fn failed(&self, why: String) {
        self.metrics.errors.inc();
        let mut health = self.health();
        let first = health.down_since.is_none();
        if first {
            health.down_since = Some(SystemTime::now());
        } else {
            health.backoff = (health.backoff * 2).min(MAX_BACKOFF);
        }
        health.retry_at = Some(Instant::now() + health.backoff);
        // Logged once per outage, not per request: a dead store must not flood the log.
        if first {
            self.metrics.up.set(0);
            match self.on_error {
                OnStoreError::Local => tracing::warn!(
                    error = %why,
                    "the store is unreachable: budgets and cool-downs are per process until it answers again (store.on_error = \"local\")"
                ),
                OnStoreError::Refuse => tracing::warn!(
                    error = %why,
                    "the store is unreachable: requests are refused with 503 until it answers again (store.on_error = \"refuse\")"
                ),
            }
        }
        health.last_error = Some(why);
    }

    /// A request went ahead (or was refused) without the store.
    pub fn count_fallback(&self) {
        match self.on_error {
            OnStoreError::Local => self.metrics.fallbacks.inc(),
            OnStoreError::Refuse => self.metrics.refused.inc(),
        };
    }

    pub fn is_up(&self) -> bool {
        self.health().down_since.is_none()
    }

    pub fn status(&self) -> StoreStatus {
        let health = self.health();
        StoreStatus {
            state: if health.down_since.is_none() {
                "up"
            } else {
                "down"
            },
            on_error: match self.on_error {
                OnStoreError::Local => "local",
                OnStoreError::Refuse => "refuse",
            },
            down_since: health.down_since.map(|since| {
                since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            }),
            last_error: health.last_error.clone(),
        }
    }
}
