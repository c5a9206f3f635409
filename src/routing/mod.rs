//! The route table: which credential and upstream path a request path maps to, built from the
//! route settings and the live credentials by [`crate::runtime`]. [`invariant`] states the
//! security invariant routing must keep, for the property tests and the fuzz targets.
//!
//! Uses [`crate::base`], [`crate::bitbucket`], [`crate::config`] and the live credentials of
//! [`crate::upstream`].

#[doc(hidden)]
pub mod invariant;

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;

use crate::bitbucket::alias::{self};
pub use crate::bitbucket::path::segment_prefix_matches;
use crate::bitbucket::path::{self, PathError};
use crate::config::{Config, RouteSettings};
use crate::telemetry::metrics::{RouteRef, RouteSeries};
use crate::upstream::credential::Credential;

/// Why [`RouteTable::route`] refused a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Path(#[from] PathError),
    /// A `{UUID}` names a workspace, repository or project where a more specific route exists:
    /// the proxy cannot tell whether that route's resource is meant.
    #[error("the path names a workspace, repository or project by {{UUID}}")]
    UuidAlias,
}

/// One route, live: its settings (read through `Deref`) and the live credential it forwards
/// with, which routes naming the same credential share.
#[derive(Debug)]
pub struct Route {
    settings: RouteSettings,
    pub credential: Arc<Credential>,
    /// Its metric series, kept so that recording a request looks nothing up.
    series: RouteSeries,
}

impl std::ops::Deref for Route {
    type Target = RouteSettings;

    fn deref(&self) -> &RouteSettings {
        &self.settings
    }
}

impl Route {
    /// The live route for `settings`, forwarding with `credential`.
    pub fn from_settings(settings: &RouteSettings, credential: Arc<Credential>) -> Route {
        Route {
            settings: settings.clone(),
            credential,
            series: RouteSeries::default(),
        }
    }

    /// The route as its metrics label it.
    pub fn metrics(&self) -> RouteRef<'_> {
        RouteRef {
            prefix: &self.prefix,
            credential: &self.credential.name,
            series: &self.series,
        }
    }

    /// `prefix` without its trailing `/`, so `/` matches everything by the segment rule.
    fn match_prefix(&self) -> &str {
        self.prefix.trim_end_matches('/')
    }

    fn upstream_base(&self) -> &str {
        self.upstream_prefix.trim_end_matches('/')
    }

    pub fn allows(&self, method: &Method) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|methods| methods.contains(method))
    }

    /// The upstream path for a request path this route matched. The matched segments are
    /// replaced whatever their spelling (`Widgets`, `widgets` without `.git`), so Bitbucket sees
    /// the route's own name for the resource. Borrowed when that changes nothing, as for every
    /// route whose `upstream_prefix` is its `prefix` and a request that spells it the same way.
    pub fn upstream_path<'a>(&self, request_path: &'a str) -> Cow<'a, str> {
        let matched = alias::leading_segments_len(request_path, self.pattern.segment_count());
        let (spelled, rest) = request_path.split_at(matched);
        let base = self.upstream_base();
        if spelled == base && !request_path.is_empty() {
            return Cow::Borrowed(request_path);
        }
        let mut out = String::with_capacity(base.len() + rest.len() + 1);
        out.push_str(base);
        out.push_str(rest);
        if out.is_empty() {
            out.push('/');
        }
        Cow::Owned(out)
    }
}

/// Routes ordered most segments first, so the first match is the most specific.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Arc<Route>>) -> Self {
        routes.sort_by(|a, b| {
            RouteSettings::most_specific_first((&a.pattern, &a.prefix), (&b.pattern, &b.prefix))
        });
        RouteTable { routes }
    }

    /// The route table of `config` with credentials of its own (for tools, tests and fuzz
    /// targets; a running proxy builds one per generation with [`RouteTable::build`]).
    pub fn from_config(config: &Config) -> RouteTable {
        RouteTable::build(config, &Credential::all_of(config))
    }

    /// The route table of `config`, each route holding the live credential of the same name
    /// from `credentials` (built once per generation, so routes sharing a credential share its
    /// OAuth tokens and budget).
    pub fn build(config: &Config, credentials: &[Arc<Credential>]) -> RouteTable {
        let routes = config
            .routes
            .iter()
            .map(|settings| {
                let credential = credentials
                    .iter()
                    .find(|credential| credential.name == settings.credential.name)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Credential::from_settings(&settings.credential)));
                Arc::new(Route::from_settings(settings, credential))
            })
            .collect();
        RouteTable::new(routes)
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The most specific route matching one form of the path. A `{UUID}` in a name position
    /// that a route at least as specific as the match would take is refused, never routed to
    /// the broader match: it may name that route's resource.
    fn most_specific(&self, path: &[u8]) -> Result<Option<&Arc<Route>>, RouteError> {
        let Some(found) = self
            .routes
            .iter()
            .position(|route| route.pattern.match_len(path).is_some())
        else {
            return Ok(None);
        };
        let route = &self.routes[found];
        if path.contains(&b'{') || path.contains(&b'}') {
            let depth = route.pattern.segment_count();
            let may_mean_another = self
                .routes
                .iter()
                .enumerate()
                .take_while(|(_, other)| other.pattern.segment_count() >= depth)
                .any(|(i, other)| i != found && other.pattern.may_match_by_uuid(path));
            if may_mean_another {
                return Err(RouteError::UuidAlias);
            }
        }
        Ok(Some(route))
    }

    /// Finds the route for a raw request path after checking the path is safe to forward.
    ///
    /// A path whose percent-decoded form (once or twice, as [`path::check_path`] assumes an
    /// upstream may decode) would pick a different route is refused: otherwise
    /// `/2.0/repositories/acme/%77idgets` or `.../acme/%2577idgets` could slip past a narrower
    /// route's method list. Workspace, repository and project segments match in any ASCII case
    /// (and git repositories with or without `.git`), so every spelling of a resource picks the
    /// route written for it; see [`crate::bitbucket::alias`].
    pub fn route(&self, raw_path: &str) -> Result<Option<&Arc<Route>>, RouteError> {
        path::check_path(raw_path)?;
        let found = self.most_specific(raw_path.as_bytes())?;
        for decoded in path::decoded_for_routing(raw_path) {
            let decoded_match = self.most_specific(&decoded)?;
            let same = match (found, decoded_match) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                return Err(PathError::AmbiguousEncoding.into());
            }
        }
        Ok(found)
    }

    /// The local prefix to write in place of `route`'s upstream prefix (empty for `/`).
    pub fn local_base(route: &Route) -> &str {
        route.match_prefix()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::base::secrets::Secret;
    use crate::bitbucket::UpstreamKind;
    use crate::bitbucket::alias::PrefixPattern;
    use crate::bitbucket::credentials::{CredentialKind, CredentialSettings, Scope};

    pub(crate) fn route(
        prefix: &str,
        upstream_prefix: &str,
        methods: Option<&[Method]>,
    ) -> Arc<Route> {
        upstream_route(UpstreamKind::Api, prefix, upstream_prefix, methods)
    }

    pub(crate) fn upstream_route(
        upstream: UpstreamKind,
        prefix: &str,
        upstream_prefix: &str,
        methods: Option<&[Method]>,
    ) -> Arc<Route> {
        let credential = Arc::new(CredentialSettings::access_token(
            format!("cred{prefix}"),
            CredentialKind::WorkspaceAccessToken,
            Scope::Account,
            &Secret::from_runtime("t".into()),
        ));
        let settings = RouteSettings {
            prefix: prefix.into(),
            upstream,
            upstream_prefix: upstream_prefix.into(),
            credential: credential.clone(),
            methods: methods.map(<[Method]>::to_vec),
            allow_header: None,
            rewrite_links: true,
            coalesce: true,
            cache: Default::default(),
            pattern: PrefixPattern::new(upstream, prefix, upstream_prefix),
        };
        let live = Arc::new(Credential::from_settings(&credential));
        Arc::new(Route::from_settings(&settings, live))
    }

    pub(crate) fn table() -> RouteTable {
        RouteTable::new(vec![
            route("/2.0/repositories/acme", "/2.0/repositories/acme", None),
            route(
                "/2.0/repositories/acme/widgets",
                "/2.0/repositories/acme/widgets",
                Some(&[Method::GET]),
            ),
            route("/release", "/2.0/repositories/acme", None),
        ])
    }

    fn prefix_of(table: &RouteTable, path: &str) -> Option<String> {
        table.route(path).unwrap().map(|r| r.prefix.to_string())
    }

    #[test]
    fn longest_whole_segment_prefix_wins() {
        let table = table();
        assert_eq!(
            prefix_of(&table, "/2.0/repositories/acme/widgets/pullrequests").as_deref(),
            Some("/2.0/repositories/acme/widgets")
        );
        assert_eq!(
            prefix_of(&table, "/2.0/repositories/acme/widgets").as_deref(),
            Some("/2.0/repositories/acme/widgets")
        );
        assert_eq!(
            prefix_of(&table, "/2.0/repositories/acme/widgets-evil").as_deref(),
            Some("/2.0/repositories/acme")
        );
        assert_eq!(prefix_of(&table, "/2.0/repositories/acmex"), None);
        assert_eq!(prefix_of(&table, "/2.0/Repositories/acme"), None);
        assert_eq!(prefix_of(&table, "/releases"), None);
    }

    #[test]
    fn alias_maps_to_upstream_prefix() {
        let table = table();
        let route = table
            .route("/release/widgets/pullrequests")
            .unwrap()
            .unwrap();
        assert_eq!(
            route.upstream_path("/release/widgets/pullrequests"),
            "/2.0/repositories/acme/widgets/pullrequests"
        );
        assert_eq!(route.upstream_path("/release"), "/2.0/repositories/acme");
        assert_eq!(route.upstream_path("/release/"), "/2.0/repositories/acme/");
    }

    #[test]
    fn root_routes_map_cleanly() {
        let root = route("/", "/", None);
        assert_eq!(root.upstream_path("/"), "/");
        assert_eq!(root.upstream_path("/2.0/user"), "/2.0/user");
        let under = route("/", "/2.0", None);
        assert_eq!(under.upstream_path("/user"), "/2.0/user");
        assert_eq!(under.upstream_path("/"), "/2.0/");
    }

    #[test]
    fn encoding_that_changes_the_route_is_refused() {
        let table = table();
        assert_eq!(
            table.route("/2.0/repositories/acme/%77idgets").unwrap_err(),
            PathError::AmbiguousEncoding.into()
        );
        assert_eq!(
            table.route("/2.0/repositories/acme%2Fwidgets").unwrap_err(),
            PathError::AmbiguousEncoding.into()
        );
        // Decoded twice, as an upstream that decodes twice would read it.
        assert_eq!(
            table
                .route("/2.0/repositories/acme/%2577idgets")
                .unwrap_err(),
            PathError::AmbiguousEncoding.into()
        );
        assert!(
            table
                .route("/2.0/repositories/acme/widgets/refs/branches/feature%2Ffoo")
                .is_ok()
        );
    }

    /// The routes of docs/configuration.md's routing example plus a workspace-wide and a narrow
    /// git route.
    pub(crate) fn alias_table() -> RouteTable {
        let git = UpstreamKind::Git;
        let get = Some(&[Method::GET][..]);
        RouteTable::new(vec![
            route("/", "/", None),
            route("/2.0/repositories/acme", "/2.0/repositories/acme", None),
            route(
                "/2.0/repositories/acme/widgets",
                "/2.0/repositories/acme/widgets",
                get,
            ),
            route("/release", "/2.0/repositories/acme", None),
            route("/all/widgets", "/2.0/repositories/acme/widgets", get),
            route("/all", "/2.0/repositories/acme", None),
            route("/2.0/workspaces/acme", "/2.0/workspaces/acme", None),
            route(
                "/2.0/workspaces/acme/projects/WEB",
                "/2.0/workspaces/acme/projects/WEB",
                get,
            ),
            upstream_route(git, "/git/acme", "/acme", None),
            upstream_route(git, "/git/acme/widgets.git", "/acme/widgets.git", get),
        ])
    }

    #[test]
    fn every_spelling_of_a_resource_picks_its_route() {
        let table = alias_table();
        for (path, prefix) in [
            (
                "/2.0/repositories/acme/Widgets",
                "/2.0/repositories/acme/widgets",
            ),
            (
                "/2.0/repositories/ACME/WIDGETS/src",
                "/2.0/repositories/acme/widgets",
            ),
            ("/2.0/repositories/Acme/gadgets", "/2.0/repositories/acme"),
            (
                "/2.0/repositories/acme/widgets-evil",
                "/2.0/repositories/acme",
            ),
            ("/2.0/Repositories/acme/widgets", "/"),
            (
                "/2.0/workspaces/ACME/projects/web/x",
                "/2.0/workspaces/acme/projects/WEB",
            ),
            ("/2.0/workspaces/acme/Projects/web", "/2.0/workspaces/acme"),
            ("/all/Widgets", "/all/widgets"),
            ("/release/Widgets", "/release"),
            (
                "/git/acme/widgets/git-receive-pack",
                "/git/acme/widgets.git",
            ),
            ("/git/Acme/Widgets.GIT/info/refs", "/git/acme/widgets.git"),
            ("/git/acme/widgets.git.git", "/git/acme"),
            ("/git/acme/gadgets.git", "/git/acme"),
        ] {
            assert_eq!(prefix_of(&table, path).as_deref(), Some(prefix), "{path}");
        }
        // The route's own spelling goes upstream.
        let git = table.route("/git/ACME/widgets/info/refs").unwrap().unwrap();
        assert_eq!(
            git.upstream_path("/git/ACME/widgets/info/refs"),
            "/acme/widgets.git/info/refs"
        );
        assert_eq!(
            table.route("/2.0/repositories/acme/%57IDGETS").unwrap_err(),
            PathError::AmbiguousEncoding.into()
        );
    }

    #[test]
    fn a_uuid_that_may_name_a_narrower_route_is_refused() {
        let table = alias_table();
        for path in [
            "/2.0/repositories/acme/{0b1c2d3e-aaaa-bbbb-cccc-0123456789ab}",
            "/2.0/repositories/acme/%7B0b1c2d3e-aaaa-bbbb-cccc-0123456789ab%7D/src",
            "/2.0/repositories/acme/%7b0b1c%7d",
            "/2.0/repositories/acme/%257B0b1c%257D",
            "/2.0/repositories/{acme-uuid}/widgets",
            "/2.0/repositories/{acme-uuid}",
            "/2.0/workspaces/acme/projects/{p}",
            "/all/{w}",
            "/git/acme/{w}.git/git-receive-pack",
            "/git/{ws}/widgets.git",
        ] {
            assert_eq!(
                table.route(path).unwrap_err(),
                RouteError::UuidAlias,
                "{path}"
            );
        }
        // No narrower route for it to name: Bitbucket resolves it within the route.
        for (path, prefix) in [
            (
                "/2.0/repositories/acme/widgets/src/main/{x}",
                "/2.0/repositories/acme/widgets",
            ),
            (
                "/2.0/workspaces/acme/members/{user}",
                "/2.0/workspaces/acme",
            ),
            ("/release/{w}", "/release"),
            ("/git/acme/widgets.git/{x}", "/git/acme/widgets.git"),
        ] {
            assert_eq!(prefix_of(&table, path).as_deref(), Some(prefix), "{path}");
        }
    }
}

#[cfg(test)]
mod alias_properties;

#[cfg(test)]
mod invariant_property {
    //! The security invariant, as a property: whatever path a client sends, if the proxy
    //! forwards it, the upstream cannot see a path outside the matched route's upstream prefix,
    //! however it decodes (up to twice), merges slashes or removes dot-segments.

    use super::tests::{route, table};
    use super::*;
    use crate::routing::invariant::check_route;
    use proptest::prelude::*;

    fn path_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%2e".to_owned()),
            Just("%2E".to_owned()),
            Just("%252e".to_owned()),
            Just("%2f".to_owned()),
            Just("%2F".to_owned()),
            Just("%252F".to_owned()),
            Just("%5c".to_owned()),
            Just("\\".to_owned()),
            Just("%25".to_owned()),
            Just("%00".to_owned()),
            Just(";".to_owned()),
            Just("acme".to_owned()),
            Just("widgets".to_owned()),
            Just("gadgets".to_owned()),
            Just("%77idgets".to_owned()),
            Just("%2577idgets".to_owned()),
            "[a-z0-9~_-]{1,4}",
        ];
        let start = prop_oneof![
            Just("/2.0/repositories/acme/widgets".to_owned()),
            Just("/2.0/repositories/acme".to_owned()),
            Just("/release".to_owned()),
            Just("/".to_owned()),
            Just("".to_owned()),
        ];
        (start, proptest::collection::vec(piece, 0..10))
            .prop_map(|(s, pieces)| s + &pieces.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn forwarded_paths_stay_inside_the_route(path in path_strategy()) {
            if let Err(violation) = check_route(&table(), &path) {
                prop_assert!(false, "{}", violation);
            }
        }

        #[test]
        fn routing_never_panics_on_arbitrary_input(path in "\\PC{0,64}") {
            if let Err(violation) = check_route(&table(), &path) {
                prop_assert!(false, "{}", violation);
            }
            let root = RouteTable::new(vec![route("/", "/2.0", None)]);
            if let Ok(Some(r)) = root.route(&path) {
                prop_assert!(r.upstream_path(&path).starts_with("/2.0"));
            }
        }
    }
}
