//! `[[routes]]` validated: prefixes, the upstream and its prefix, methods, the credential and
//! whether its scope covers the route, cache policy; two routes naming one place are refused.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use http::{HeaderValue, Method};

use super::RouteSettings;
use super::fields::Issues;
use super::file::RouteSection;
use crate::bitbucket::alias::PrefixPattern;
use crate::bitbucket::credentials::{CredentialSettings, Scope, UpstreamKind};

/// A prefix as configured: absolute, clean, without query, and without a trailing slash.
pub(super) fn check_prefix(issues: &mut Issues, key: &str, prefix: &str) -> bool {
    match super::checks::prefix_error(key, prefix) {
        Some(message) => {
            issues.error(key, message);
            false
        }
        None => true,
    }
}

pub(super) fn routes(
    issues: &mut Issues,
    sections: &[RouteSection],
    credentials: &BTreeMap<String, Option<Arc<CredentialSettings>>>,
) -> Vec<RouteSettings> {
    let mut seen_prefixes = HashSet::new();
    let mut routes = Vec::with_capacity(sections.len());
    for (i, section) in sections.iter().enumerate() {
        let key = format!("routes[{i}]");
        let mut ok = check_prefix(issues, &format!("{key}.prefix"), &section.prefix);
        if ok && !seen_prefixes.insert(section.prefix.clone()) {
            issues.error(
                format!("{key}.prefix"),
                format!(
                    "`{}` is already used by another route; prefixes must be unique",
                    section.prefix
                ),
            );
            ok = false;
        }
        let upstream = match section.upstream.as_deref() {
            None | Some("api") => UpstreamKind::Api,
            Some("git") => UpstreamKind::Git,
            Some(other) => {
                issues.error(
                    format!("{key}.upstream"),
                    format!("`{other}` is not an upstream (valid: \"api\", \"git\")"),
                );
                ok = false;
                UpstreamKind::Api
            }
        };
        let upstream_prefix = section
            .upstream_prefix
            .clone()
            .unwrap_or_else(|| section.prefix.clone());
        if section.upstream_prefix.is_some() {
            ok &= check_prefix(issues, &format!("{key}.upstream_prefix"), &upstream_prefix);
        }
        let methods = section.methods.as_ref().map(|methods| {
            if methods.is_empty() {
                issues.error(format!("{key}.methods"), "must list at least one method, or be left out to allow every method");
                ok = false;
            }
            methods
                .iter()
                .filter_map(|m| match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                    Ok(method) if !super::REFUSED_METHODS.contains(&method.as_str()) => {
                        Some(method)
                    }
                    _ => {
                        issues.error(format!("{key}.methods"), format!("`{m}` is not an HTTP method the proxy forwards (valid: \"GET\", \"HEAD\", \"POST\", \"PUT\", \"PATCH\", \"DELETE\", \"OPTIONS\")"));
                        ok = false;
                        None
                    }
                })
                .collect::<Vec<_>>()
        });
        let credential = match credentials.get(&section.credential) {
            Some(Some(credential)) => Some(credential.clone()),
            Some(None) => None, // its own errors are already reported
            None => {
                let defined: Vec<&str> = credentials.keys().map(String::as_str).collect();
                issues.error(
                    format!("{key}.credential"),
                    format!(
                        "`{}` is not a defined credential (defined: {})",
                        section.credential,
                        if defined.is_empty() {
                            "none".to_owned()
                        } else {
                            defined.join(", ")
                        }
                    ),
                );
                None
            }
        };
        if let Some(credential) = &credential
            && ok
            && !credential.scope.covers(upstream, &upstream_prefix)
        {
            issues.error(
                format!("{key}.credential"),
                format!(
                    "`{}` is a {} for {}, but this route forwards to `{upstream_prefix}` on the {upstream} upstream, outside that {}; \
                     narrow the route's upstream_prefix to the {} or use a credential that covers it",
                    credential.name,
                    credential.kind,
                    credential.scope,
                    scope_noun(&credential.scope),
                    scope_noun(&credential.scope),
                ),
            );
            ok = false;
        }
        let route_cache =
            super::cache::route_cache_policy(issues, &format!("{key}.cache"), &section.cache);
        if let (true, Some(credential)) = (ok, credential) {
            let allow_header = methods.as_ref().map(|methods| {
                let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
                HeaderValue::from_str(&list.join(", ")).expect("method names are valid header text")
            });
            let route = RouteSettings {
                pattern: PrefixPattern::new(upstream, &section.prefix, &upstream_prefix),
                prefix: section.prefix.as_str().into(),
                upstream,
                upstream_prefix,
                credential,
                methods,
                allow_header,
                rewrite_links: section.rewrite_links.unwrap_or(true),
                coalesce: section.coalesce.unwrap_or(true),
                cache: route_cache,
            };
            match routes
                .iter()
                .find(|other: &&RouteSettings| other.pattern.same_place(&route.pattern))
            {
                Some(other) => issues.error(
                    format!("{key}.prefix"),
                    format!(
                        "`{}` names the same place as route `{}` (workspace, repository and project names match in any case, git repositories with or without .git); prefixes must be unique",
                        route.prefix, other.prefix
                    ),
                ),
                None => routes.push(route),
            }
        }
    }
    if sections.is_empty() {
        issues.error(
            "routes",
            "no routes are defined; add at least one [[routes]] with a prefix and a credential",
        );
    }
    routes.sort_by(|a, b| {
        RouteSettings::most_specific_first((&a.pattern, &a.prefix), (&b.pattern, &b.prefix))
    });
    routes
}

pub(super) fn scope_noun(scope: &Scope) -> &'static str {
    match scope {
        Scope::Repository { .. } => "repository",
        Scope::Project { .. } | Scope::Workspace { .. } => "workspace",
        Scope::Account => "account",
    }
}
