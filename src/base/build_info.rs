//! What this binary was built from: the package version and, when the build could see git
//! (see `build.rs`), the commit and its date. Used by `--version` and the `build_info` metric.

/// The package version, `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The short commit hash, when known.
pub const COMMIT: Option<&str> = option_env!("BITBUCKET_AUTH_PROXY_COMMIT");

/// The commit's date, `YYYY-MM-DD`, when known.
pub const COMMIT_DATE: Option<&str> = option_env!("BITBUCKET_AUTH_PROXY_COMMIT_DATE");

/// `0.1.0 (abc1234 2026-12-01)`, `0.1.0 (abc1234)` without a date, or `0.1.0` without a commit.
pub fn long_version() -> &'static str {
    static LONG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LONG.get_or_init(|| match (COMMIT, COMMIT_DATE) {
        (Some(commit), Some(date)) => format!("{VERSION} ({commit} {date})"),
        (Some(commit), None) => format!("{VERSION} ({commit})"),
        (None, _) => VERSION.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_version_starts_with_the_package_version_and_names_the_commit_when_known() {
        let long = long_version();
        assert!(long.starts_with(VERSION), "{long}");
        match COMMIT {
            Some(commit) => assert!(long.contains(&format!("({commit}")), "{long}"),
            None => assert_eq!(long, VERSION),
        }
    }
}
