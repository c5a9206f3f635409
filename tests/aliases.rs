//! Aliases of one resource pick one route (issue 13, section 1), end to end: with the routes of
//! docs/configuration.md's routing example (a workspace route with a workspace token and a
//! GET-only repository route inside it)
//! plus a workspace-wide git route around a GET-only git route written for `widgets.git`, no
//! other spelling of the narrow routes' repository reaches Bitbucket with the workspace token.

mod support;

use support::proxy::*;
use support::*;

const UUID: &str = "0b1c2d3e-aaaa-bbbb-cccc-0123456789ab";

/// [`DEFAULT_ROUTES`]' REST routes, and git routes shaped the same way.
const ROUTES: &str = r#"
[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"
methods = ["GET", "HEAD"]

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"

[[routes]]
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "widgets-ci"
methods = ["GET", "HEAD"]

[[routes]]
prefix = "/git/acme"
upstream = "git"
upstream_prefix = "/acme"
credential = "acme-all"
"#;

struct Fixture {
    upstream: MockUpstream,
    proxy: TestProxy,
}

impl Fixture {
    async fn start() -> Fixture {
        let pki = TestPki::new();
        let upstream = echo_mock(&pki);
        let proxy = Setup::new(&upstream.base_url(), pki.ca_path())
            .routes(ROUTES)
            .start()
            .await;
        Fixture { upstream, proxy }
    }

    /// Sends `method target` as raw HTTP/1.1, so the target reaches the proxy byte for byte.
    async fn send(&self, method: &str, target: &str) -> RawResponse {
        let request = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.proxy.addr
        );
        raw(self.proxy.addr, &request).await
    }

    /// `method target` is answered by the proxy with `status` and `reason`, and Bitbucket sees
    /// nothing of it.
    async fn assert_refused(&self, method: &str, target: &str, status: u16, reason: &str) {
        let before = self.upstream.request_count();
        let response = self.send(method, target).await;
        assert_eq!(response.status, status, "{method} {target}: {response:?}");
        assert_eq!(
            response.header(bitbucket_auth_proxy::error::REASON_HEADER),
            Some(reason),
            "{method} {target}: {response:?}"
        );
        assert_error_json(response.body.as_bytes());
        assert_eq!(
            self.upstream.request_count(),
            before,
            "{method} {target} reached the upstream: {:?}",
            self.upstream.last_request()
        );
    }

    /// `method target` reaches Bitbucket as `upstream_target` with `authorization`.
    async fn assert_forwarded(
        &self,
        method: &str,
        target: &str,
        upstream_target: &str,
        authorization: &str,
    ) {
        let before = self.upstream.request_count();
        let response = self.send(method, target).await;
        assert_eq!(response.status, 200, "{method} {target}: {response:?}");
        assert_eq!(self.upstream.request_count(), before + 1);
        let seen = self.upstream.last_request().expect("a request");
        assert_eq!(seen.method.as_str(), method);
        assert_eq!(seen.uri, upstream_target, "{method} {target}");
        assert_eq!(seen.header("authorization"), Some(authorization));
    }
}

#[tokio::test]
async fn other_spellings_of_a_narrow_routes_repository_never_get_the_workspace_token() {
    let f = Fixture::start().await;
    let widgets = "/2.0/repositories/acme/widgets";
    // The narrow route answers for every case of its names: 405 with its Allow list.
    for target in [
        "/2.0/repositories/acme/Widgets",
        "/2.0/repositories/ACME/WIDGETS/pullrequests/1",
        widgets,
    ] {
        f.assert_refused("DELETE", target, 405, "method-not-allowed")
            .await;
    }
    // An escaped letter that becomes the narrow route's name once decoded.
    f.assert_refused(
        "DELETE",
        "/2.0/repositories/acme/%57IDGETS",
        400,
        "bad-path",
    )
    .await;
    // A UUID the proxy cannot resolve: percent-encoded in either case, raw, or encoded twice.
    for target in [
        format!("/2.0/repositories/acme/%7B{UUID}%7D"),
        format!("/2.0/repositories/acme/%7b{UUID}%7d/pullrequests"),
        format!("/2.0/repositories/acme/{{{UUID}}}"),
        format!("/2.0/repositories/acme/%257B{UUID}%257D"),
    ] {
        f.assert_refused("DELETE", &target, 400, "uuid-alias").await;
    }
    // git: with or without `.git`, in any case, is the narrow git route.
    for target in [
        "/git/acme/widgets/git-receive-pack",
        "/git/acme/widgets.git/git-receive-pack",
        "/git/Acme/Widgets.GIT/git-receive-pack",
    ] {
        f.assert_refused("POST", target, 405, "method-not-allowed")
            .await;
    }
    f.assert_refused(
        "POST",
        &format!("/git/acme/%7B{UUID}%7D/git-receive-pack"),
        400,
        "uuid-alias",
    )
    .await;
}

#[tokio::test]
async fn every_spelling_is_forwarded_as_the_routes_own_name_with_its_credential() {
    let f = Fixture::start().await;
    let repository = bearer(REPO_TOKEN);
    let workspace = bearer(WORKSPACE_TOKEN);
    f.assert_forwarded(
        "GET",
        "/2.0/repositories/acme/Widgets/src?at=main",
        "/2.0/repositories/acme/widgets/src?at=main",
        &repository,
    )
    .await;
    f.assert_forwarded(
        "GET",
        "/git/ACME/widgets/info/refs?service=git-upload-pack",
        "/acme/widgets.git/info/refs?service=git-upload-pack",
        &basic("x-token-auth", REPO_TOKEN),
    )
    .await;
    // Other repositories stay the workspace route's, spelled as the client spelled them.
    f.assert_forwarded(
        "DELETE",
        "/2.0/repositories/Acme/Gadgets",
        "/2.0/repositories/acme/Gadgets",
        &workspace,
    )
    .await;
    f.assert_forwarded(
        "DELETE",
        "/2.0/repositories/acme/widgets-evil",
        "/2.0/repositories/acme/widgets-evil",
        &workspace,
    )
    .await;
    // A UUID below the narrowest route has nothing narrower to be mistaken for.
    f.assert_forwarded(
        "GET",
        &format!("/2.0/repositories/acme/widgets/pullrequests/%7B{UUID}%7D"),
        &format!("/2.0/repositories/acme/widgets/pullrequests/%7B{UUID}%7D"),
        &repository,
    )
    .await;
}
