//! OAuth consumers (`kind = "oauth_client_credentials"`): the proxy obtains access tokens with
//! the client-credentials grant, caches them, and renews them before `expires_in` runs out.
//! One renewal is in flight per credential however many requests arrive.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use tokio::time::Instant;

use crate::body::UpstreamRequestBody;
use crate::credentials::UpstreamKind;
use crate::error::error_chain;
use crate::secrets::{Secret, basic_auth_header, bearer_header};
use crate::upstream::UpstreamClient;

/// Bitbucket's token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://bitbucket.org/site/oauth2/access_token";
/// The most a token response may weigh; it is a few hundred bytes.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// Renew this long before expiry at most (a tenth of the lifetime for short-lived tokens).
const RENEW_MARGIN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[error(
    "credential `{credential}`: getting an OAuth access token from {token_url} failed: {detail}"
)]
pub struct TokenError {
    pub credential: Arc<str>,
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

#[derive(Deserialize)]
struct TokenResponse {
    access_token: secrecy::SecretString,
    expires_in: u64,
}

/// One OAuth consumer's token source.
pub struct OAuthClient {
    credential: Arc<str>,
    token_url: Uri,
    /// `Basic base64(client_id:client_secret)` for the token endpoint.
    client_authorization: HeaderValue,
    cached: ArcSwapOption<CachedToken>,
    renewing: tokio::sync::Mutex<()>,
}

impl OAuthClient {
    pub fn new(
        credential: Arc<str>,
        token_url: Uri,
        client_id: &str,
        client_secret: &Secret,
    ) -> Self {
        OAuthClient {
            credential,
            token_url,
            client_authorization: basic_auth_header(client_id, client_secret),
            cached: ArcSwapOption::empty(),
            renewing: tokio::sync::Mutex::new(()),
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
        let _renewing = tokio::time::timeout_at(deadline, self.renewing.lock())
            .await
            .map_err(|_| self.error(format!("waited {timeout:?} for another request's renewal")))?;
        // Someone else may have renewed while this request waited.
        if let Some(token) = self.cached.load().as_ref()
            && Instant::now() < token.renew_at
        {
            return Ok(token.header(upstream).clone());
        }
        let token = tokio::time::timeout_at(deadline, self.fetch(client))
            .await
            .map_err(|_| self.error(format!("no answer within {timeout:?}")))??;
        let header = token.header(upstream).clone();
        self.cached.store(Some(Arc::new(token)));
        Ok(header)
    }

    /// Forgets the cached token if it is the one in `used`: Bitbucket refused it.
    pub fn invalidate(&self, used: &HeaderValue) {
        let current = self.cached.load();
        if let Some(token) = current.as_ref()
            && (token.rest == used || token.git == used)
        {
            self.cached.compare_and_swap(&current, None);
        }
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
        let body = Limited::new(response.into_body(), MAX_TOKEN_RESPONSE)
            .collect()
            .await
            .map_err(|e| self.error(format!("reading the response: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            // Bitbucket's error bodies name the problem ("invalid_client") and hold no secret.
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(self.error(format!("the token endpoint answered {status}: {text}")));
        }
        // The response holds the access token: parse from a copy that is wiped afterwards.
        let body = zeroize::Zeroizing::new(body.to_vec());
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| self.error(format!("the token response is not the expected JSON: {e}")))?;
        let token = Secret::from_runtime(
            secrecy::ExposeSecret::expose_secret(&parsed.access_token).to_owned(),
        );
        let lifetime = Duration::from_secs(parsed.expires_in);
        let obtained = Instant::now();
        tracing::info!(
            credential = &*self.credential,
            expires_in_s = parsed.expires_in,
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
            token_url: self.token_url.to_string(),
            detail,
        }
    }
}

impl CachedToken {
    fn header(&self, upstream: UpstreamKind) -> &HeaderValue {
        match upstream {
            UpstreamKind::Api => &self.rest,
            UpstreamKind::Git => &self.git,
        }
    }
}
