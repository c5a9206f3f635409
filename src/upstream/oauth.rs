//! OAuth consumers (`kind = "oauth_client_credentials"`): the proxy obtains access tokens with
//! the client-credentials grant, caches them, and renews them before `expires_in` runs out.
//! One renewal is in flight per credential however many requests arrive.
//!
//! Bitbucket may refuse a token before it expires (the consumer was changed or revoked). A 401
//! renews the token it was answered for at most once, shared by every request that saw it
//! refused, and never sooner than [`MIN_REFUSAL_RENEWAL_INTERVAL`] after the previous renewal
//! a 401 caused: a consumer Bitbucket refuses outright costs one token request per interval,
//! not one per client request.
//!
//! Nothing the token endpoint sends is copied into an error, a log line or `/-/ready`: its
//! answers may hold a token (a `201` with an `access_token`) or text the endpoint's owner
//! chose. Errors name its status and, for an OAuth error object, the standard `error` code.
//! The token URL is shown without its query or user information ([`display_url`]).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use tokio::time::Instant;

use crate::base::body::UpstreamRequestBody;
use crate::base::error_chain;
use crate::base::secrets::{Secret, basic_auth_header, bearer_header};
use crate::bitbucket::credentials::UpstreamKind;
use crate::upstream::client::UpstreamClient;

pub use crate::base::secrets::display_url;
pub use crate::bitbucket::credentials::DEFAULT_TOKEN_URL;

/// The most a token response may weigh; it is a few hundred bytes.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// Renew this long before expiry at most (a tenth of the lifetime for short-lived tokens).
const RENEW_MARGIN: Duration = Duration::from_secs(60);
/// The longest `expires_in` believed: Bitbucket's tokens live two hours, and a larger value
/// (up to `u64::MAX` seconds) must neither overflow the clock nor keep a token for ever.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The least time between two renewals caused by a 401, per credential.
pub const MIN_REFUSAL_RENEWAL_INTERVAL: Duration = Duration::from_secs(30);
/// The `error` codes of RFC 6749 §5.2, the only part of an error answer the proxy repeats.
const OAUTH_ERROR_CODES: [&str; 6] = [
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
];

#[derive(Debug, thiserror::Error)]
#[error(
    "credential `{credential}`: getting an OAuth access token from {token_url} failed: {detail}"
)]
pub struct TokenError {
    pub credential: Arc<str>,
    /// The token URL as [`display_url`] shows it.
    pub token_url: String,
    pub detail: String,
}

/// A token ready to use, with both header forms precomputed.
struct CachedToken {
    rest: HeaderValue,
    git: HeaderValue,
    renew_at: Instant,
    expires_at: Instant,
}

/// The fields read from a token answer; `expires_in` stays a JSON value so that any number,
/// however large or fractional, is judged here rather than failing the parse.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: secrecy::SecretString,
    expires_in: serde_json::Value,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
}

/// What the renewal lock guards besides the renewal itself.
#[derive(Default)]
struct Renewals {
    /// When a 401 last caused a renewal.
    last_after_refusal: Option<Instant>,
}

/// One OAuth consumer's token source.
pub struct OAuthClient {
    credential: Arc<str>,
    token_url: Uri,
    /// `Basic base64(client_id:client_secret)` for the token endpoint.
    client_authorization: HeaderValue,
    cached: ArcSwapOption<CachedToken>,
    renewing: tokio::sync::Mutex<Renewals>,
}

impl OAuthClient {
    /// `client_authorization`: the consumer's `Basic base64(client_id:client_secret)`.
    pub fn new(credential: Arc<str>, token_url: Uri, client_authorization: HeaderValue) -> Self {
        OAuthClient {
            credential,
            token_url,
            client_authorization,
            cached: ArcSwapOption::empty(),
            renewing: tokio::sync::Mutex::new(Renewals::default()),
        }
    }

    /// `Basic base64(client_id:client_secret)`: what identifies the consumer, for the shared
    /// store's keyed fingerprint (never sent anywhere but the token endpoint).
    pub fn client_authorization(&self) -> &HeaderValue {
        &self.client_authorization
    }

    pub fn token_url(&self) -> &Uri {
        &self.token_url
    }

    /// The `Authorization` for `upstream`, renewing the token first when it is due.
    ///
    /// While one request renews, others wait for it (at most `timeout`), except that a token
    /// which is due for renewal but not yet expired is still used rather than waited on.
    pub async fn authorization(
        &self,
        upstream: UpstreamKind,
        client: &UpstreamClient,
        timeout: Duration,
    ) -> Result<HeaderValue, TokenError> {
        let now = Instant::now();
        if let Some(token) = self.cached.load().as_ref() {
            if now < token.renew_at {
                return Ok(token.header(upstream).clone());
            }
            if now < token.expires_at && self.renewing.try_lock().is_err() {
                return Ok(token.header(upstream).clone());
            }
        }
        let deadline = now + timeout;
        let _renewing = self.lock_renewals(deadline, timeout).await?;
        // Someone else may have renewed while this request waited.
        if let Some(token) = self.cached.load().as_ref()
            && Instant::now() < token.renew_at
        {
            return Ok(token.header(upstream).clone());
        }
        self.renew(upstream, client, deadline, timeout).await
    }

    /// Bitbucket answered 401 to a request sent with `used`. Returns the header to send the
    /// request again with, or `None` when it should not be: `used` is still the current token
    /// and a 401 renewed this credential's token less than [`MIN_REFUSAL_RENEWAL_INTERVAL`] ago.
    ///
    /// Requests refused with the same token share one renewal: whoever takes the lock first
    /// renews, the others find a newer token and use it.
    pub async fn renew_refused(
        &self,
        used: &HeaderValue,
        upstream: UpstreamKind,
        client: &UpstreamClient,
        timeout: Duration,
    ) -> Result<Option<HeaderValue>, TokenError> {
        let deadline = Instant::now() + timeout;
        let mut renewals = self.lock_renewals(deadline, timeout).await?;
        let now = Instant::now();
        if let Some(token) = self.cached.load().as_ref()
            && !token.is(used)
            && now < token.expires_at
        {
            return Ok(Some(token.header(upstream).clone()));
        }
        if !may_renew_after_refusal(renewals.last_after_refusal, now) {
            tracing::debug!(
                credential = &*self.credential,
                "Bitbucket refused the access token, which was renewed after a refusal less than {}s ago; not renewing again yet",
                MIN_REFUSAL_RENEWAL_INTERVAL.as_secs()
            );
            return Ok(None);
        }
        // Counted before asking: a failing token endpoint is not asked again per request either.
        renewals.last_after_refusal = Some(now);
        tracing::info!(
            credential = &*self.credential,
            "Bitbucket refused the access token; renewing once"
        );
        self.renew(upstream, client, deadline, timeout)
            .await
            .map(Some)
    }

    async fn lock_renewals(
        &self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<tokio::sync::MutexGuard<'_, Renewals>, TokenError> {
        tokio::time::timeout_at(deadline, self.renewing.lock())
            .await
            .map_err(|_| self.error(format!("waited {timeout:?} for another request's renewal")))
    }

    /// Fetches and caches a new token; the caller holds the renewal lock.
    async fn renew(
        &self,
        upstream: UpstreamKind,
        client: &UpstreamClient,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<HeaderValue, TokenError> {
        let token = tokio::time::timeout_at(deadline, self.fetch(client))
            .await
            .map_err(|_| self.error(format!("no answer within {timeout:?}")))??;
        let header = token.header(upstream).clone();
        self.cached.store(Some(Arc::new(token)));
        Ok(header)
    }

    async fn fetch(&self, client: &UpstreamClient) -> Result<CachedToken, TokenError> {
        let request = Request::post(self.token_url.clone())
            .header(header::AUTHORIZATION, self.client_authorization.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(UpstreamRequestBody::local(Bytes::from_static(
                b"grant_type=client_credentials",
            )))
            .map_err(|e| self.error(e.to_string()))?;
        let response = client
            .request(request)
            .await
            .map_err(|e| self.error(error_chain(&e)))?;
        let status = response.status();
        // The response may hold an access token: every copy is wiped when dropped.
        let body = zeroize::Zeroizing::new(
            Limited::new(response.into_body(), MAX_TOKEN_RESPONSE)
                .collect()
                .await
                .map_err(|_| {
                    self.error(format!(
                        "the token endpoint answered {status}, and its body could not be read in full (at most {MAX_TOKEN_RESPONSE} bytes)"
                    ))
                })?
                .to_bytes()
                .to_vec(),
        );
        if status != StatusCode::OK {
            return Err(self.error(refusal_detail(status, &body)));
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            // serde's message may quote the values it met, the token among them.
            self.error(
                "the token response is not a JSON object with a string `access_token` and a number `expires_in`"
                    .into(),
            )
        })?;
        let exposed = secrecy::ExposeSecret::expose_secret(&parsed.access_token);
        if exposed.is_empty() || !exposed.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(self.error(
                "the token response's `access_token` is empty or has characters a header cannot carry"
                    .into(),
            ));
        }
        let lifetime = token_lifetime(&parsed.expires_in).ok_or_else(|| {
            self.error("the token response's `expires_in` is not a number of seconds".into())
        })?;
        let token = Secret::from_runtime(exposed.to_owned());
        let obtained = Instant::now();
        tracing::info!(
            credential = &*self.credential,
            expires_in_s = lifetime.as_secs(),
            "obtained an OAuth access token"
        );
        Ok(CachedToken {
            rest: bearer_header(&token),
            git: basic_auth_header("x-token-auth", &token),
            renew_at: obtained + lifetime.saturating_sub(RENEW_MARGIN.min(lifetime / 10)),
            expires_at: obtained + lifetime,
        })
    }

    fn error(&self, detail: String) -> TokenError {
        TokenError {
            credential: self.credential.clone(),
            token_url: display_url(&self.token_url.to_string()),
            detail,
        }
    }
}

/// Whether a 401 may renew now, given when one last did.
fn may_renew_after_refusal(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|last| now.saturating_duration_since(last) >= MIN_REFUSAL_RENEWAL_INTERVAL)
}

/// `expires_in` as a lifetime: any non-negative JSON number, capped at [`MAX_TOKEN_LIFETIME`].
fn token_lifetime(expires_in: &serde_json::Value) -> Option<Duration> {
    let seconds = match expires_in.as_u64() {
        Some(whole) => whole.min(MAX_TOKEN_LIFETIME.as_secs()) as f64,
        None => expires_in.as_f64().filter(|f| f.is_finite() && *f >= 0.0)?,
    };
    Some(Duration::from_secs_f64(
        seconds.min(MAX_TOKEN_LIFETIME.as_secs_f64()),
    ))
}

/// What a non-200 token answer is reported as: its status, and the `error` code of an OAuth
/// error object when it is one of the standard codes. Nothing else of the body.
fn refusal_detail(status: StatusCode, body: &[u8]) -> String {
    let code = serde_json::from_slice::<ErrorResponse>(body)
        .ok()
        .and_then(|e| OAUTH_ERROR_CODES.into_iter().find(|code| *code == e.error));
    match code {
        Some(code) => format!("the token endpoint answered {status} with OAuth error `{code}`"),
        None => format!("the token endpoint answered {status}"),
    }
}

impl CachedToken {
    fn is(&self, header: &HeaderValue) -> bool {
        self.rest == header || self.git == header
    }

    fn header(&self, upstream: UpstreamKind) -> &HeaderValue {
        match upstream {
            UpstreamKind::Api => &self.rest,
            UpstreamKind::Git => &self.git,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_capped_and_never_overflow() {
        use serde_json::json;
        let huge = token_lifetime(&json!(u64::MAX)).unwrap();
        assert_eq!(huge, MAX_TOKEN_LIFETIME);
        let _ = Instant::now() + huge;
        assert_eq!(token_lifetime(&json!(1e300)).unwrap(), MAX_TOKEN_LIFETIME);
        assert_eq!(
            token_lifetime(&json!(7200)).unwrap(),
            Duration::from_secs(7200)
        );
        assert_eq!(
            token_lifetime(&json!(1.5)).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(token_lifetime(&json!(-1)), None);
        assert_eq!(token_lifetime(&json!("7200")), None);
        assert_eq!(token_lifetime(&json!(null)), None);
    }

    #[test]
    fn refusals_report_the_status_and_only_a_standard_error_code() {
        let detail = refusal_detail(
            StatusCode::UNAUTHORIZED,
            br#"{"error":"invalid_client","error_description":"client secret-Qw7 unknown"}"#,
        );
        assert_eq!(
            detail,
            "the token endpoint answered 401 Unauthorized with OAuth error `invalid_client`"
        );
        let detail = refusal_detail(StatusCode::BAD_REQUEST, br#"{"error":"tok-123"}"#);
        assert_eq!(detail, "the token endpoint answered 400 Bad Request");
        let detail = refusal_detail(
            StatusCode::CREATED,
            br#"{"access_token":"tok-123","expires_in":7200}"#,
        );
        assert_eq!(detail, "the token endpoint answered 201 Created");
    }

    #[test]
    fn urls_are_shown_without_query_or_user_information() {
        assert_eq!(
            display_url("https://user:pw@bitbucket.org:8443/site/oauth2/access_token?key=s#f"),
            "https://bitbucket.org:8443/site/oauth2/access_token"
        );
        assert_eq!(display_url("not a url?secret"), "not a url");
        assert_eq!(display_url("https://h"), "https://h");
    }

    #[test]
    fn a_refusal_renews_at_most_once_per_interval() {
        let start = Instant::now();
        assert!(may_renew_after_refusal(None, start));
        assert!(!may_renew_after_refusal(Some(start), start));
        assert!(!may_renew_after_refusal(
            Some(start),
            start + MIN_REFUSAL_RENEWAL_INTERVAL - Duration::from_millis(1)
        ));
        assert!(may_renew_after_refusal(
            Some(start),
            start + MIN_REFUSAL_RENEWAL_INTERVAL
        ));
        // A clock read before `last` (another task's `now`) is not an underflow.
        assert!(!may_renew_after_refusal(
            Some(start + Duration::from_secs(1)),
            start
        ));
    }
}
