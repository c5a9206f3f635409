//! The live credential a route forwards with: its settings' static headers, or an OAuth
//! consumer's token cache and renewal ([`crate::upstream::oauth`]). Built from
//! [`CredentialSettings`] by [`crate::runtime`] once per generation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Uri};

use crate::bitbucket::credentials::{CredentialAuth, CredentialSettings, UpstreamKind};
use crate::config::Config;
use crate::upstream::client::UpstreamClient;
use crate::upstream::oauth::{OAuthClient, TokenError};

/// A credential ready to use: its settings (read through `Deref`: name, kind, scope,
/// `verify`, `rate_limit`) and where its `Authorization` header comes from now.
pub struct Credential {
    settings: Arc<CredentialSettings>,
    auth: Authorization,
}

impl std::ops::Deref for Credential {
    type Target = CredentialSettings;

    fn deref(&self) -> &CredentialSettings {
        &self.settings
    }
}

/// Where the `Authorization` header comes from.
enum Authorization {
    /// Computed once at load time, for REST and for git.
    Static { rest: HeaderValue, git: HeaderValue },
    /// Access tokens obtained and renewed at run time.
    OAuth(OAuthClient),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// The live credential for `settings`. An OAuth consumer starts with no token: the first
    /// request that needs one fetches it.
    pub fn from_settings(settings: &Arc<CredentialSettings>) -> Self {
        let auth = match &settings.auth {
            CredentialAuth::Static { rest, git } => Authorization::Static {
                rest: rest.clone(),
                git: git.clone(),
            },
            CredentialAuth::OAuthConsumer {
                token_url,
                client_authorization,
            } => Authorization::OAuth(OAuthClient::new(
                settings.name.clone(),
                Uri::clone(token_url),
                client_authorization.clone(),
            )),
        };
        Credential {
            settings: settings.clone(),
            auth,
        }
    }

    /// One live credential per `[[credentials]]` of `config`, in its order.
    pub fn all_of(config: &Config) -> Vec<Arc<Credential>> {
        config
            .credentials
            .iter()
            .map(|settings| Arc::new(Credential::from_settings(settings)))
            .collect()
    }

    /// The precomputed, sensitive header for `upstream`, for credentials that have one;
    /// cloning it copies no secret bytes.
    pub fn static_authorization(&self, upstream: UpstreamKind) -> Option<&HeaderValue> {
        match &self.auth {
            Authorization::Static { rest, git } => Some(match upstream {
                UpstreamKind::Api => rest,
                UpstreamKind::Git => git,
            }),
            Authorization::OAuth(_) => None,
        }
    }

    /// The header to send to `upstream` now; OAuth credentials may fetch a token first.
    pub async fn authorization(
        &self,
        upstream: UpstreamKind,
        client: &UpstreamClient,
        timeout: Duration,
    ) -> Result<HeaderValue, TokenError> {
        match &self.auth {
            Authorization::Static { rest, git } => Ok(match upstream {
                UpstreamKind::Api => rest.clone(),
                UpstreamKind::Git => git.clone(),
            }),
            // Boxed: a token fetch is a request of its own, and inline it would add its size to
            // every request's future, static credentials' too (docs/performance.md).
            Authorization::OAuth(oauth) => {
                Box::pin(oauth.authorization(upstream, client, timeout)).await
            }
        }
    }

    /// The secret material that identifies this credential to Bitbucket's rate limiter: the REST
    /// `Authorization` (which holds the token), or an OAuth consumer's key and secret. Only
    /// ever fed to a keyed hash ([`crate::store::budget`]); never stored or logged.
    pub fn budget_identity(&self) -> &[u8] {
        match &self.auth {
            Authorization::Static { rest, .. } => rest.as_bytes(),
            Authorization::OAuth(oauth) => oauth.client_authorization().as_bytes(),
        }
    }

    /// Whether a 401 from Bitbucket may mean an access token to renew (OAuth only).
    pub fn renews_tokens(&self) -> bool {
        matches!(self.auth, Authorization::OAuth(_))
    }

    /// Bitbucket refused `used` with a 401: the header to resend with, if the request should
    /// be (see [`OAuthClient::renew_refused`]); always `None` for static credentials.
    pub async fn renew_refused(
        &self,
        used: &HeaderValue,
        upstream: UpstreamKind,
        client: &UpstreamClient,
        timeout: Duration,
    ) -> Result<Option<HeaderValue>, TokenError> {
        match &self.auth {
            Authorization::Static { .. } => Ok(None),
            Authorization::OAuth(oauth) => {
                Box::pin(oauth.renew_refused(used, upstream, client, timeout)).await
            }
        }
    }
}
