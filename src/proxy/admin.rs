//! The proxy's own endpoints under the reserved prefix `/-/` (no Bitbucket workspace can be
//! named `-`): `/-/health`, `/-/ready`, `/-/metrics`, and which listener serves which.
//!
//! Without `[admin] listen` the main listener serves all three. With it, the admin listener
//! serves all three and nothing else (no path there reaches a route), and the main listener
//! keeps only `/-/health`, for simple liveness probes: readiness details and metrics are for
//! the operator's network.

use http::{HeaderValue, Method, Response, StatusCode, header};
use serde_json::json;

use crate::base::body::ProxyBody;
use crate::base::secrets::{SecretSource, judge_secret_file};
use crate::config::ADMIN_PREFIX;
use crate::error::ProxyError;
use crate::routing::segment_prefix_matches;
use crate::runtime::state::{Generation, SharedState};

pub const HEALTH_PATH: &str = "/-/health";
pub const READY_PATH: &str = "/-/ready";
pub const METRICS_PATH: &str = "/-/metrics";

pub fn is_admin_path(path: &str) -> bool {
    segment_prefix_matches(ADMIN_PREFIX.as_bytes(), path.as_bytes())
}

/// The listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerRole {
    /// `server.listen`. `admin_elsewhere` when an `admin.listen` listener runs (fixed at
    /// start-up, like the listeners themselves).
    Main { admin_elsewhere: bool },
    /// `admin.listen`: admin endpoints only, admitted by `admin.allowed_clients`.
    Admin,
}

/// Whether a request is for the proxy's own endpoints rather than a route: everything on the
/// admin listener, and paths under `/-/` on the main one.
pub fn is_admin_request(listener: ListenerRole, path: &str) -> bool {
    listener == ListenerRole::Admin || is_admin_path(path)
}

/// The bounded `endpoint` label of an admin request.
pub fn endpoint_label(path: &str) -> &'static str {
    match path {
        HEALTH_PATH => HEALTH_PATH,
        READY_PATH => READY_PATH,
        METRICS_PATH => METRICS_PATH,
        _ => "other",
    }
}

/// Whether `path` is an endpoint this listener serves.
fn served_on(listener: ListenerRole, path: &str) -> bool {
    match listener {
        ListenerRole::Admin
        | ListenerRole::Main {
            admin_elsewhere: false,
        } => matches!(path, HEALTH_PATH | READY_PATH | METRICS_PATH),
        ListenerRole::Main {
            admin_elsewhere: true,
        } => path == HEALTH_PATH,
    }
}

/// Serves an admin request. Only GET and HEAD; a path this listener does not serve is a 404.
pub async fn serve(
    state: &SharedState,
    generation: &Generation,
    listener: ListenerRole,
    method: &Method,
    path: &str,
) -> Result<Response<ProxyBody>, ProxyError> {
    if !served_on(listener, path) {
        return Err(ProxyError::NoRoute);
    }
    if !matches!(*method, Method::GET | Method::HEAD) {
        return Err(ProxyError::MethodNotAllowed {
            method: method.clone(),
            prefix: path.to_owned(),
            allow: Some(HeaderValue::from_static("GET, HEAD")),
        });
    }
    match path {
        HEALTH_PATH => Ok(json_response(StatusCode::OK, &json!({ "status": "ok" }))),
        READY_PATH => {
            let (status, body) = readiness(state, generation).await;
            Ok(json_response(status, &body))
        }
        METRICS_PATH => {
            let mut response = Response::new(ProxyBody::local(state.metrics.encode()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Ok(response)
        }
        _ => Err(ProxyError::NoRoute),
    }
}

/// Ready when a config is loaded, every file secret is still readable (and neither over 64 KiB
/// nor writable by group or others), no verified credential is refused by Bitbucket, and the
/// proxy is not draining. Also lists 429 cool-downs in progress, credentials Bitbucket reports
/// near their limit, and the shared store's state.
pub async fn readiness(
    state: &SharedState,
    generation: &Generation,
) -> (StatusCode, serde_json::Value) {
    let mut problems = Vec::new();
    if state.is_draining() {
        problems.push("draining: shutting down".to_owned());
    }
    // Named by config key (the credential), never by path: `/-/ready` answers anyone allowed
    // to reach the proxy, and a secret's location is none of their business.
    for (key, source) in &generation.config.secret_sources {
        if let SecretSource::File(path) = source {
            let problem = match tokio::fs::metadata(path).await {
                Ok(metadata) => judge_secret_file(&metadata).err().map(|p| p.to_string()),
                Err(_) => Some("is no longer readable".to_owned()),
            };
            if let Some(problem) = problem {
                problems.push(format!("{key}: the secret file {problem}"));
            }
        }
    }
    let verify: std::collections::BTreeMap<String, _> = state
        .verify_statuses()
        .into_iter()
        .map(|(name, status)| (name.to_string(), status))
        .collect();
    for (name, status) in &verify {
        if status.state.blocks_readiness() {
            problems.push(format!("credentials.{name}: {}", status.detail));
        }
    }
    if generation.warm_since.elapsed() < generation.config.upstream.connect_timeout {
        for origin in generation.warm.unsettled() {
            problems.push(format!("upstream.keep_warm: still connecting to {origin}"));
        }
    }
    // A cool-down or NearLimit pacing is the proxy doing its job, not a fault: reported here
    // for operators, without making the proxy unready (which would only move the load).
    let mut cooldowns = std::collections::BTreeMap::new();
    let mut near_limit = std::collections::BTreeMap::new();
    for (name, budget) in &generation.budgets {
        if let Some(cooldown) = budget.cooldown() {
            cooldowns.insert(name.to_string(), cooldown);
        }
        let resources = budget.near_limit_resources();
        if !resources.is_empty() {
            near_limit.insert(name.to_string(), resources);
        }
    }
    // A store that is down is reported; it makes the proxy unready only under
    // `on_error = "refuse"`, where this replica now refuses governed requests and another one
    // that still reaches the store should take them.
    let store = generation.store.as_ref().map(|store| store.status());
    if let Some(store) = &store
        && store.state == "down"
        && store.on_error == "refuse"
    {
        problems.push(format!(
            "store: unreachable and store.on_error = \"refuse\" ({})",
            store.last_error.as_deref().unwrap_or("no answer")
        ));
    }
    let ready = problems.is_empty();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "config_generation": generation.number,
        "draining": state.is_draining(),
        "problems": problems,
        "credentials": verify,
        "cooldowns": cooldowns,
        "near_limit": near_limit,
        "store": store,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let bytes = serde_json::to_vec(body).expect("JSON values always serialise");
    let mut response = Response::new(ProxyBody::local(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
