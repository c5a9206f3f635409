//! The live configuration, swapped atomically on reload; requests keep the one they started with.
//!
//! `Generation::new` is the one place live objects are built from settings: the credentials
//! (with their OAuth token caches), the route table, the upstream client with its keep-warm
//! connector, the link rewriter's patterns, the response cache, the budgets and the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::Uri;
use tokio::time::Instant;

use crate::bitbucket::credentials::UpstreamKind;
use crate::budget::CredentialBudget;
use crate::cache::Cache;
use crate::config::Config;
use crate::rewrite::RewritePatterns;
use crate::routing::RouteTable;
use crate::runtime::credential_status::VerifyStatus;
use crate::store::Store;
use crate::telemetry::metrics::Metrics;
use crate::upstream::client::{UpstreamClient, build_client};
use crate::upstream::credential::Credential;
use crate::upstream::warm::WarmConnector;

/// Everything derived from one successfully loaded config.
pub struct Generation {
    /// Counts loads: 1 at start-up, +1 per successful reload.
    pub number: u64,
    pub config: Arc<Config>,
    /// The config's credentials, live: one per `[[credentials]]`, shared by its routes.
    pub credentials: Vec<Arc<Credential>>,
    /// The config's routes, each with its live credential, most specific first.
    pub routes: RouteTable,
    pub client: UpstreamClient,
    /// The client's connector, for what `upstream.keep_warm` is doing.
    pub warm: WarmConnector,
    /// When `warm`'s keepers started: readiness waits for their first attempt at most
    /// `upstream.connect_timeout` from here.
    pub warm_since: Instant,
    /// The origins the routes use, in a fixed order; what `warm` keeps a spare for.
    warm_origins: Vec<Uri>,
    pub patterns: Arc<RewritePatterns>,
    /// Each credential's request budget, by name. Budgets outlive generations: a reload keeps
    /// counting what was sent in the last hour, and keeps a cool-down in progress.
    pub budgets: HashMap<Arc<str>, Arc<CredentialBudget>>,
    /// The response cache and the upstream requests in flight; a reload starts an empty one,
    /// so no answer outlives the routes and credentials it was fetched with.
    pub cache: Arc<Cache>,
    /// `[store]`, if configured: where budgets and cool-downs are shared with other replicas.
    /// Kept across reloads while its settings stay the same.
    pub store: Option<Arc<Store>>,
}

impl Generation {
    fn new(
        number: u64,
        config: Config,
        previous: Option<&Generation>,
        budgets: &Mutex<HashMap<Arc<str>, Arc<CredentialBudget>>>,
        metrics: &Metrics,
    ) -> Self {
        // Keep the connection pool across reloads unless the way upstream is reached, or the
        // set of origins the routes use, changed.
        let warm_origins = origins_in_use(&config);
        let (client, warm, warm_since) = match previous {
            Some(prev)
                if prev.config.upstream == config.upstream && prev.warm_origins == warm_origins =>
            {
                (prev.client.clone(), prev.warm.clone(), prev.warm_since)
            }
            _ => {
                let (client, warm) = build_client(&config.upstream, &warm_origins);
                (client, warm, Instant::now())
            }
        };
        let credentials = Credential::all_of(&config);
        let routes = RouteTable::build(&config, &credentials);
        let patterns = Arc::new(RewritePatterns::new(&config));
        let store = match (previous, &config.store) {
            (_, None) => None,
            (Some(prev), Some(settings)) if prev.config.store.as_ref() == Some(settings) => {
                prev.store.clone()
            }
            (_, Some(settings)) => match Store::new(settings, metrics) {
                Ok(store) => Some(Arc::new(store)),
                Err(why) => {
                    // Validation accepted the settings; the client refusing them leaves the
                    // budgets in-process rather than the proxy down.
                    tracing::error!(error = %why, "cannot build the store client; budgets stay per process");
                    None
                }
            },
        };
        let mut all = budgets.lock().unwrap_or_else(|p| p.into_inner());
        let budgets = config
            .credentials
            .iter()
            .map(|credential| {
                let budget = all
                    .entry(credential.name.clone())
                    .or_insert_with(|| {
                        Arc::new(CredentialBudget::new(
                            credential.name.clone(),
                            credential.rate_limit,
                            metrics,
                        ))
                    })
                    .clone();
                budget.set_limit(credential.rate_limit);
                (credential.name.clone(), budget)
            })
            .collect();
        let cache = Arc::new(Cache::new(config.cache, store.clone()));
        Generation {
            number,
            cache,
            config: Arc::new(config),
            credentials,
            routes,
            client,
            warm,
            warm_since,
            warm_origins,
            patterns,
            budgets,
            store,
        }
    }
}

/// `scheme://authority/` of each upstream some route forwards to, api before git.
fn origins_in_use(config: &Config) -> Vec<Uri> {
    [UpstreamKind::Api, UpstreamKind::Git]
        .into_iter()
        .filter(|kind| config.routes.iter().any(|r| r.upstream == *kind))
        .filter_map(|kind| {
            let origin = config.upstream.origin(kind);
            Uri::builder()
                .scheme(origin.scheme.clone())
                .authority(origin.authority.clone())
                .path_and_query("/")
                .build()
                .ok()
        })
        .fold(Vec::new(), |mut origins, origin| {
            if !origins.contains(&origin) {
                origins.push(origin);
            }
            origins
        })
}

/// Shared by every connection for the life of the process.
pub struct SharedState {
    current: ArcSwap<Generation>,
    draining: AtomicBool,
    pub metrics: Arc<Metrics>,
    verify: Mutex<BTreeMap<Arc<str>, VerifyStatus>>,
    budgets: Mutex<HashMap<Arc<str>, Arc<CredentialBudget>>>,
}

impl SharedState {
    pub fn new(config: Config) -> Self {
        let metrics = Arc::new(Metrics::new());
        metrics.config_generation.set(1);
        let budgets = Mutex::new(HashMap::new());
        SharedState {
            current: ArcSwap::from_pointee(Generation::new(1, config, None, &budgets, &metrics)),
            draining: AtomicBool::new(false),
            metrics,
            verify: Mutex::new(BTreeMap::new()),
            budgets,
        }
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Installs a validated config as the next generation and returns its number.
    pub fn install(&self, config: Config) -> u64 {
        let previous = self.current();
        let next = Generation::new(
            previous.number + 1,
            config,
            Some(&previous),
            &self.budgets,
            &self.metrics,
        );
        let number = next.number;
        self.current.store(Arc::new(next));
        self.metrics.config_generation.set(number as i64);
        number
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn set_verify_status(&self, name: Arc<str>, status: VerifyStatus) {
        self.verify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, status);
    }

    /// Keeps only the named credentials' statuses (after a reload removed some).
    pub fn retain_verify_statuses(&self, names: &[Arc<str>]) {
        self.verify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| names.contains(name));
    }

    pub fn verify_statuses(&self) -> BTreeMap<Arc<str>, VerifyStatus> {
        self.verify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
