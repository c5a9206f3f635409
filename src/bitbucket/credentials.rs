//! Credential kinds and the exact `Authorization` header each one needs (see FACTS.md).

use std::fmt;
use std::sync::Arc;

use http::{HeaderValue, Uri};

use crate::base::secrets::{Secret, basic_auth_header, bearer_header};
use crate::bitbucket::alias::strip_git_suffix;
use crate::bitbucket::rate_limit::RateLimit;

pub use super::UpstreamKind;

/// The `kind` key of a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    RepositoryAccessToken,
    ProjectAccessToken,
    WorkspaceAccessToken,
    ApiToken,
    AppPassword,
    OauthClientCredentials,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::RepositoryAccessToken => "repository_access_token",
            CredentialKind::ProjectAccessToken => "project_access_token",
            CredentialKind::WorkspaceAccessToken => "workspace_access_token",
            CredentialKind::ApiToken => "api_token",
            CredentialKind::AppPassword => "app_password",
            CredentialKind::OauthClientCredentials => "oauth_client_credentials",
        }
    }
}

impl fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a credential can reach, judged from the shape of upstream paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Repository {
        workspace: String,
        repository: String,
    },
    Project {
        workspace: String,
        project: String,
    },
    Workspace {
        workspace: String,
    },
    /// API tokens and app passwords act as a user: any path.
    Account,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Repository {
                workspace,
                repository,
            } => write!(f, "repository {workspace}/{repository}"),
            Scope::Project { workspace, project } => {
                write!(f, "project {project} in workspace {workspace}")
            }
            Scope::Workspace { workspace } => write!(f, "workspace {workspace}"),
            Scope::Account => f.write_str("the account"),
        }
    }
}

impl Scope {
    /// Whether every path under `upstream_prefix` on `upstream` stays inside this scope.
    ///
    /// Paths are judged by shape: `[/2.0]/repositories/{workspace}/{repo}`,
    /// `[/2.0]/workspaces/{workspace}[/projects/{key}]` for REST and
    /// `/{workspace}/{repo}[.git]` for git. The `/2.0` segment is optional so
    /// Bitbucket-compatible mocks without it validate too. Names compare as routing compares
    /// them ([`crate::bitbucket::alias`]): in any ASCII case, git repositories with or without `.git`.
    pub fn covers(&self, upstream: UpstreamKind, upstream_prefix: &str) -> bool {
        let segments: Vec<&str> = upstream_prefix
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        match (self, upstream) {
            (Scope::Account, _) => true,
            (
                Scope::Repository {
                    workspace,
                    repository,
                },
                UpstreamKind::Api,
            ) => match rest_resource(&segments) {
                Some(("repositories", [ws, repo, ..])) => eq(ws, workspace) && eq(repo, repository),
                _ => false,
            },
            (
                Scope::Repository {
                    workspace,
                    repository,
                },
                UpstreamKind::Git,
            ) => match segments.as_slice() {
                [ws, repo, ..] => {
                    eq(ws, workspace)
                        && strip_git_suffix(repo.as_bytes())
                            .eq_ignore_ascii_case(strip_git_suffix(repository.as_bytes()))
                }
                _ => false,
            },
            (Scope::Project { workspace, project }, UpstreamKind::Api) => {
                match rest_resource(&segments) {
                    // Another project's key is outside; the workspace's repositories can't be
                    // told apart by path, so they are judged by the workspace.
                    Some(("workspaces", [ws, "projects", key, ..])) => {
                        eq(ws, workspace) && eq(key, project)
                    }
                    Some(("repositories" | "workspaces", [ws, ..])) => eq(ws, workspace),
                    _ => false,
                }
            }
            (Scope::Workspace { workspace }, UpstreamKind::Api) => match rest_resource(&segments) {
                Some(("repositories" | "workspaces", [ws, ..])) => eq(ws, workspace),
                _ => false,
            },
            (
                Scope::Workspace { workspace } | Scope::Project { workspace, .. },
                UpstreamKind::Git,
            ) => {
                matches!(segments.as_slice(), [ws, ..] if eq(ws, workspace))
            }
        }
    }
}

/// Splits `[2.0, ]collection, rest..` for the REST path shapes scopes are judged by.
fn rest_resource<'a>(segments: &'a [&'a str]) -> Option<(&'a str, &'a [&'a str])> {
    let segments = match segments {
        ["2.0", rest @ ..] => rest,
        other => other,
    };
    match segments {
        [collection, rest @ ..] => Some((*collection, rest)),
        [] => None,
    }
}

/// A `[[credentials]]` entry, validated: what the credential is and the material it
/// authenticates with. Plain data; the live credential ([`crate::upstream::credential`]) is
/// built from it.
pub struct CredentialSettings {
    /// The config name; also the metrics and log label.
    pub name: Arc<str>,
    pub kind: CredentialKind,
    pub scope: Scope,
    /// Whether the proxy checks this credential against Bitbucket (`verify = true`).
    pub verify: bool,
    /// Local pacing of requests (`rate_limit = { per_hour, burst }`), if configured.
    pub rate_limit: Option<RateLimit>,
    pub auth: CredentialAuth,
}

/// What a credential authenticates with.
pub enum CredentialAuth {
    /// The `Authorization` header for REST and for git, computed once at load time (sensitive
    /// header values: cloning one copies no secret bytes).
    Static { rest: HeaderValue, git: HeaderValue },
    /// An OAuth consumer: access tokens come from `token_url` with the client-credentials grant.
    /// `client_authorization` is `Basic base64(client_id:client_secret)`, what the token
    /// endpoint authenticates the consumer with.
    OAuthConsumer {
        token_url: Uri,
        client_authorization: HeaderValue,
    },
}

impl fmt::Debug for CredentialSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialSettings")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Bitbucket's OAuth token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://bitbucket.org/site/oauth2/access_token";

/// The user name Bitbucket expects in git Basic auth for access tokens and OAuth tokens.
pub const ACCESS_TOKEN_GIT_USER: &str = "x-token-auth";
/// The user name Bitbucket accepts in git Basic auth for API tokens.
const API_TOKEN_GIT_USER: &str = "x-bitbucket-api-token-auth";

impl CredentialSettings {
    fn with(name: String, kind: CredentialKind, scope: Scope, auth: CredentialAuth) -> Self {
        CredentialSettings {
            name: name.into(),
            kind,
            scope,
            verify: false,
            rate_limit: None,
            auth,
        }
    }

    /// Repository, project and workspace access tokens: Bearer for REST, `x-token-auth` for git.
    pub fn access_token(name: String, kind: CredentialKind, scope: Scope, token: &Secret) -> Self {
        let rest = bearer_header(token);
        let git = basic_auth_header(ACCESS_TOKEN_GIT_USER, token);
        CredentialSettings::with(name, kind, scope, CredentialAuth::Static { rest, git })
    }

    /// API tokens: Basic with the account email for REST (Bearer is refused), and the dedicated
    /// `x-bitbucket-api-token-auth` user for git.
    pub fn api_token(name: String, email: &str, token: &Secret) -> Self {
        let rest = basic_auth_header(email, token);
        let git = basic_auth_header(API_TOKEN_GIT_USER, token);
        CredentialSettings::with(
            name,
            CredentialKind::ApiToken,
            Scope::Account,
            CredentialAuth::Static { rest, git },
        )
    }

    /// Legacy app passwords: Basic with the Bitbucket username (not the email) everywhere.
    pub fn app_password(name: String, username: &str, password: &Secret) -> Self {
        let header = basic_auth_header(username, password);
        let auth = CredentialAuth::Static {
            rest: header.clone(),
            git: header,
        };
        CredentialSettings::with(name, CredentialKind::AppPassword, Scope::Account, auth)
    }

    /// OAuth consumers: Bearer access tokens for REST, `x-token-auth` for git, obtained with
    /// the client-credentials grant from `token_url`.
    pub fn oauth_client_credentials(
        name: String,
        token_url: Uri,
        client_id: &str,
        client_secret: &Secret,
    ) -> Self {
        let auth = CredentialAuth::OAuthConsumer {
            token_url,
            client_authorization: basic_auth_header(client_id, client_secret),
        };
        CredentialSettings::with(
            name,
            CredentialKind::OauthClientCredentials,
            Scope::Account,
            auth,
        )
    }

    /// The precomputed, sensitive header for `upstream`, for credentials that have one.
    pub fn static_authorization(&self, upstream: UpstreamKind) -> Option<&HeaderValue> {
        match &self.auth {
            CredentialAuth::Static { rest, git } => Some(match upstream {
                UpstreamKind::Api => rest,
                UpstreamKind::Git => git,
            }),
            CredentialAuth::OAuthConsumer { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn basic(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    #[test]
    fn each_kind_builds_the_documented_headers() {
        let token = Secret::from_runtime("T0K".into());
        let repo = CredentialSettings::access_token(
            "r".into(),
            CredentialKind::RepositoryAccessToken,
            Scope::Workspace {
                workspace: "acme".into(),
            },
            &token,
        );
        assert_eq!(
            repo.static_authorization(UpstreamKind::Api).unwrap(),
            "Bearer T0K"
        );
        assert_eq!(
            repo.static_authorization(UpstreamKind::Git)
                .unwrap()
                .to_str()
                .unwrap(),
            basic("x-token-auth", "T0K")
        );

        let api = CredentialSettings::api_token("a".into(), "bot@acme.example", &token);
        assert_eq!(
            api.static_authorization(UpstreamKind::Api)
                .unwrap()
                .to_str()
                .unwrap(),
            basic("bot@acme.example", "T0K")
        );
        assert_eq!(
            api.static_authorization(UpstreamKind::Git)
                .unwrap()
                .to_str()
                .unwrap(),
            basic("x-bitbucket-api-token-auth", "T0K")
        );

        let app = CredentialSettings::app_password("p".into(), "legacy-bot", &token);
        assert_eq!(
            app.static_authorization(UpstreamKind::Api)
                .unwrap()
                .to_str()
                .unwrap(),
            basic("legacy-bot", "T0K")
        );
        assert_eq!(
            app.static_authorization(UpstreamKind::Git)
                .unwrap()
                .to_str()
                .unwrap(),
            basic("legacy-bot", "T0K")
        );
        assert!(
            app.static_authorization(UpstreamKind::Git)
                .unwrap()
                .is_sensitive()
        );
        assert!(!format!("{app:?}").contains("T0K"));
    }

    #[test]
    fn repository_scope_covers_only_its_repository() {
        let scope = Scope::Repository {
            workspace: "acme".into(),
            repository: "widgets".into(),
        };
        assert!(scope.covers(UpstreamKind::Api, "/2.0/repositories/acme/widgets"));
        assert!(scope.covers(
            UpstreamKind::Api,
            "/2.0/repositories/acme/widgets/pullrequests"
        ));
        assert!(scope.covers(UpstreamKind::Api, "/repositories/acme/widgets"));
        assert!(!scope.covers(UpstreamKind::Api, "/2.0/repositories/acme/gadgets"));
        assert!(!scope.covers(UpstreamKind::Api, "/2.0/repositories/acme"));
        assert!(!scope.covers(UpstreamKind::Api, "/2.0/workspaces/acme"));
        assert!(scope.covers(UpstreamKind::Git, "/acme/widgets.git"));
        assert!(scope.covers(UpstreamKind::Git, "/acme/widgets"));
        assert!(!scope.covers(UpstreamKind::Git, "/acme/gadgets.git"));
        assert!(!scope.covers(UpstreamKind::Git, "/acme"));
        // Names in any case, git repositories with or without `.git` (in any case).
        assert!(scope.covers(UpstreamKind::Api, "/2.0/repositories/ACME/Widgets/src"));
        assert!(scope.covers(UpstreamKind::Git, "/Acme/WIDGETS.GIT"));
        assert!(!scope.covers(UpstreamKind::Api, "/2.0/Repositories/acme/widgets"));
        assert!(!scope.covers(UpstreamKind::Api, "/2.0/repositories/acme/{0b1c}"));
        let declared_with_git = Scope::Repository {
            workspace: "acme".into(),
            repository: "widgets.git".into(),
        };
        assert!(declared_with_git.covers(UpstreamKind::Git, "/acme/widgets"));
    }

    #[test]
    fn project_scope_covers_its_workspace_but_only_its_own_project() {
        let scope = Scope::Project {
            workspace: "acme".into(),
            project: "WEB".into(),
        };
        assert!(scope.covers(UpstreamKind::Api, "/2.0/workspaces/acme/projects/WEB"));
        assert!(scope.covers(
            UpstreamKind::Api,
            "/2.0/workspaces/Acme/projects/web/deploy-keys"
        ));
        assert!(scope.covers(UpstreamKind::Api, "/2.0/workspaces/acme/projects"));
        assert!(scope.covers(UpstreamKind::Api, "/2.0/repositories/ACME/web-app"));
        assert!(!scope.covers(UpstreamKind::Api, "/2.0/workspaces/acme/projects/OPS"));
        assert!(!scope.covers(UpstreamKind::Api, "/2.0/workspaces/other/projects/WEB"));
        assert!(scope.covers(UpstreamKind::Git, "/ACME/web-app.git"));
    }

    #[test]
    fn workspace_scope_covers_its_repositories_and_workspace() {
        let scope = Scope::Workspace {
            workspace: "acme".into(),
        };
        assert!(scope.covers(UpstreamKind::Api, "/2.0/repositories/acme"));
        assert!(scope.covers(UpstreamKind::Api, "/2.0/repositories/ACME/widgets"));
        assert!(scope.covers(UpstreamKind::Api, "/2.0/workspaces/acme/projects"));
        assert!(scope.covers(UpstreamKind::Api, "/2.0/workspaces/acme/projects/OPS"));
        assert!(!scope.covers(UpstreamKind::Api, "/2.0/repositories"));
        assert!(!scope.covers(UpstreamKind::Api, "/2.0/repositories/other"));
        assert!(!scope.covers(UpstreamKind::Api, "/2.0/user"));
        assert!(scope.covers(UpstreamKind::Git, "/acme/widgets.git"));
        assert!(!scope.covers(UpstreamKind::Git, "/"));
        assert!(Scope::Account.covers(UpstreamKind::Api, "/"));
    }
}
