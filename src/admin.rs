//! The proxy's own endpoints under the reserved prefix `/-/` (no Bitbucket workspace can be
//! named `-`): `/-/health`, `/-/ready`, `/-/metrics`.

use http::{HeaderValue, Method, Response, StatusCode, header};
use serde_json::json;

use crate::body::ProxyBody;
use crate::config::ADMIN_PREFIX;
use crate::error::ProxyError;
use crate::routing::segment_prefix_matches;
use crate::secrets::SecretSource;
use crate::state::{Generation, SharedState};

pub const HEALTH_PATH: &str = "/-/health";
pub const READY_PATH: &str = "/-/ready";
pub const METRICS_PATH: &str = "/-/metrics";

pub fn is_admin_path(path: &str) -> bool {
    segment_prefix_matches(ADMIN_PREFIX.as_bytes(), path.as_bytes())
}

/// Serves an admin path. Only GET and HEAD; anything else under `/-/` is a 404.
pub async fn serve(
    state: &SharedState,
    generation: &Generation,
    method: &Method,
    path: &str,
) -> Result<Response<ProxyBody>, ProxyError> {
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

/// Ready when a config is loaded, every file secret is still readable, no verified credential
/// is refused by Bitbucket, and the proxy is not draining.
pub async fn readiness(
    state: &SharedState,
    generation: &Generation,
) -> (StatusCode, serde_json::Value) {
    let mut problems = Vec::new();
    if state.is_draining() {
        problems.push("draining: shutting down".to_owned());
    }
    for (key, source) in &generation.config.secret_sources {
        if let SecretSource::File(path) = source {
            let readable = tokio::fs::metadata(path)
                .await
                .is_ok_and(|m| m.is_file() && m.len() > 0);
            if !readable {
                problems.push(format!("{key}: {} is no longer readable", path.display()));
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
    let ready = problems.is_empty();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "config_generation": generation.number,
        "draining": state.is_draining(),
        "problems": problems,
        "credentials": verify,
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
