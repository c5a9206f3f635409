//! What Bitbucket says about a credential's budget: `X-RateLimit-Limit`,
//! `X-RateLimit-Resource`, `X-RateLimit-NearLimit` (and `X-RateLimit-Remaining` where sent),
//! parsed from untrusted response headers and kept per resource for the governor.
//!
//! Bitbucket keeps one budget per credential and resource (REST repositories, raw files, git…).
//! The proxy cannot tell before sending which resource a request will draw on, so the governor
//! guards the tightest budget it has a fresh report of. Reports age out after an hour, the
//! length of Bitbucket's rolling window.

use http::HeaderMap;

use crate::base::headers::first_values;

/// The headers read, in the order [`Report::parse`] takes them from [`first_values`].
const NAMES: [&str; 4] = [
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-nearlimit",
    "x-ratelimit-resource",
];

/// Resources remembered per credential; Bitbucket has a handful, and a hostile upstream must
/// not grow this without bound.
const MAX_RESOURCES: usize = 8;
/// Longest resource name kept; longer or odd ones are recorded under the unnamed resource.
const MAX_RESOURCE_NAME: usize = 64;
/// A report older than Bitbucket's rolling hour says nothing about the budget now.
const REPORT_LIFETIME_S: u64 = 3600;

/// The `X-RateLimit-*` headers of one response; `None` fields were absent or unreadable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Empty when the response named no resource (or an unusable one).
    pub resource: Box<str>,
    pub limit: Option<u32>,
    pub remaining: Option<u64>,
    pub near_limit: Option<bool>,
}

impl Report {
    /// Reads the headers; `None` when the response carries none of them (the hot path).
    pub fn parse(headers: &HeaderMap) -> Option<Report> {
        let [limit, remaining, near_limit, resource] = first_values(headers, NAMES);
        if limit.is_none() && remaining.is_none() && near_limit.is_none() {
            return None;
        }
        fn text(value: Option<&http::HeaderValue>) -> Option<&str> {
            value
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        }
        Some(Report {
            resource: text(resource)
                .filter(|name| is_plain_name(name))
                .unwrap_or("")
                .into(),
            // A limit of zero would stop the credential forever: not a budget, an error.
            limit: text(limit)
                .and_then(parse_count)
                .filter(|&n| n > 0)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            remaining: text(remaining).and_then(parse_count),
            near_limit: text(near_limit).and_then(|v| {
                if v.eq_ignore_ascii_case("true") || v == "1" {
                    Some(true)
                } else if v.eq_ignore_ascii_case("false") || v == "0" {
                    Some(false)
                } else {
                    None
                }
            }),
        })
    }
}

impl Report {
    /// The figures as stored for the other replicas ([`crate::store::reports`]):
    /// `limit,remaining,near` with empty fields for what the response left out.
    pub fn shared_figures(&self) -> String {
        let field = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
        let near = match self.near_limit {
            Some(true) => "1",
            Some(false) => "0",
            None => "",
        };
        format!(
            "{},{},{near}",
            field(self.limit.map(u64::from)),
            field(self.remaining)
        )
    }

    /// A report another replica stored; `None` when nothing in it is usable. Read as strictly
    /// as the headers: the store is one more place a hostile value could come from.
    pub fn from_shared(resource: &str, figures: &str) -> Option<Report> {
        let mut parts = figures.split(',');
        let (limit, remaining, near) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let report = Report {
            resource: if is_plain_name(resource) {
                resource
            } else {
                ""
            }
            .into(),
            limit: parse_count(limit)
                .filter(|&n| n > 0)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            remaining: parse_count(remaining),
            near_limit: match near {
                "1" => Some(true),
                "0" => Some(false),
                _ => None,
            },
        };
        (report.limit.is_some() || report.remaining.is_some() || report.near_limit.is_some())
            .then_some(report)
    }
}

/// Decimal digits only; numbers too large for `u64` saturate rather than fail, since "more
/// than anyone could send" is what such a header means.
fn parse_count(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse::<u64>().unwrap_or(u64::MAX))
}

/// Resource names end up in `/-/ready` and logs: keep them short and printable.
fn is_plain_name(name: &str) -> bool {
    name.len() <= MAX_RESOURCE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_.:-".contains(&b))
}

#[derive(Debug)]
struct ResourceState {
    name: Box<str>,
    limit: Option<u32>,
    remaining: Option<u64>,
    near_limit: bool,
    /// The second (on the governor's clock) of the last report.
    reported_at: u64,
}

/// The latest report per resource.
#[derive(Debug, Default)]
pub struct Reported {
    resources: Vec<ResourceState>,
}

impl Reported {
    /// Keeps a report received at `second`. Fields a response left out keep their last value.
    pub fn record(&mut self, report: &Report, second: u64) {
        self.forget_before(second);
        let index = match self
            .resources
            .iter()
            .position(|r| r.name == report.resource)
        {
            Some(index) => index,
            None if self.resources.len() < MAX_RESOURCES => {
                self.resources.push(ResourceState {
                    name: report.resource.clone(),
                    limit: None,
                    remaining: None,
                    near_limit: false,
                    reported_at: second,
                });
                self.resources.len() - 1
            }
            // Full of live resources: the unnamed one stands for the rest.
            None => match self.resources.iter().position(|r| r.name.is_empty()) {
                Some(index) => index,
                None => return,
            },
        };
        let state = &mut self.resources[index];
        state.reported_at = second;
        if let Some(limit) = report.limit {
            state.limit = Some(limit);
        }
        if let Some(remaining) = report.remaining {
            state.remaining = Some(remaining);
        }
        if let Some(near) = report.near_limit {
            state.near_limit = near;
        }
    }

    fn forget_before(&mut self, second: u64) {
        self.resources
            .retain(|r| second.saturating_sub(r.reported_at) < REPORT_LIFETIME_S);
    }

    fn fresh(&self, second: u64) -> impl Iterator<Item = &ResourceState> {
        self.resources
            .iter()
            .filter(move |r| second.saturating_sub(r.reported_at) < REPORT_LIFETIME_S)
    }

    /// The tightest limit Bitbucket reported within the hour.
    pub fn limit(&self, second: u64) -> Option<u32> {
        self.fresh(second).filter_map(|r| r.limit).min()
    }

    /// Whether any resource was reported near its limit, and that resource's limit if known.
    pub fn near_limit(&self, second: u64) -> Option<Option<u32>> {
        self.fresh(second)
            .filter(|r| r.near_limit)
            .map(|r| r.limit)
            .min_by_key(|limit| limit.unwrap_or(u32::MAX))
    }

    /// The lowest `X-RateLimit-Remaining` reported within the hour.
    pub fn remaining(&self, second: u64) -> Option<u64> {
        self.fresh(second).filter_map(|r| r.remaining).min()
    }

    /// Names of the resources reported near their limit, for `/-/ready`.
    pub fn near_limit_resources(&self, second: u64) -> Vec<String> {
        self.fresh(second)
            .filter(|r| r.near_limit)
            .map(|r| r.name.to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            );
        }
        map
    }

    #[test]
    fn reads_bitbuckets_headers_and_ignores_garbage() {
        assert_eq!(Report::parse(&headers(&[("etag", "x")])), None);
        let report = Report::parse(&headers(&[
            ("x-ratelimit-limit", " 10000 "),
            ("x-ratelimit-resource", "api/repositories"),
            ("x-ratelimit-nearlimit", "True"),
        ]))
        .unwrap();
        assert_eq!(report.limit, Some(10_000));
        assert_eq!(&*report.resource, "api/repositories");
        assert_eq!(report.near_limit, Some(true));
        let hostile = Report::parse(&headers(&[
            ("x-ratelimit-limit", "-5"),
            ("x-ratelimit-remaining", "99999999999999999999999999"),
            ("x-ratelimit-resource", "api/../\u{e9}tc"),
            ("x-ratelimit-nearlimit", "maybe"),
        ]))
        .unwrap();
        assert_eq!(hostile.limit, None);
        assert_eq!(hostile.remaining, Some(u64::MAX));
        assert_eq!(&*hostile.resource, "");
        assert_eq!(hostile.near_limit, None);
        for zero_or_huge in ["0", "4294967296000"] {
            let report = Report::parse(&headers(&[("x-ratelimit-limit", zero_or_huge)])).unwrap();
            assert!(report.limit.is_none_or(|l| l == u32::MAX), "{report:?}");
        }
    }

    #[test]
    fn the_tightest_fresh_report_wins_and_old_ones_age_out() {
        let mut reported = Reported::default();
        let report = |resource: &str, limit: u32, near: bool| Report {
            resource: resource.into(),
            limit: Some(limit),
            remaining: None,
            near_limit: Some(near),
        };
        reported.record(&report("git", 60_000, false), 0);
        reported.record(&report("api", 1_000, false), 10);
        assert_eq!(reported.limit(20), Some(1_000));
        assert_eq!(reported.near_limit(20), None);
        reported.record(&report("api", 1_000, true), 30);
        assert_eq!(reported.near_limit(40), Some(Some(1_000)));
        assert_eq!(reported.near_limit_resources(40), ["api"]);
        // The git report is an hour old at 3600; the API one at 3630.
        assert_eq!(reported.limit(3_600), Some(1_000));
        assert_eq!(reported.limit(3_630), None);
        assert_eq!(reported.near_limit(3_630), None);
    }

    #[test]
    fn shared_figures_round_trip_and_garbage_is_refused() {
        let report = Report {
            resource: "api/repositories".into(),
            limit: Some(1000),
            remaining: None,
            near_limit: Some(true),
        };
        assert_eq!(report.shared_figures(), "1000,,1");
        assert_eq!(
            Report::from_shared("api/repositories", &report.shared_figures()),
            Some(report)
        );
        assert_eq!(Report::from_shared("x", ",,"), None);
        assert_eq!(Report::from_shared("x", "1,2"), None);
        assert_eq!(Report::from_shared("x", "1,2,3,4"), None);
        assert_eq!(Report::from_shared("x", "-1,abc,maybe"), None);
        let odd = Report::from_shared("../\u{e9}", "5,,").unwrap();
        assert_eq!((&*odd.resource, odd.limit), ("", Some(5)));
    }

    #[test]
    fn resources_are_bounded() {
        let mut reported = Reported::default();
        for i in 0..100u32 {
            reported.record(
                &Report {
                    resource: format!("r{i}").into(),
                    limit: Some(1_000 + i),
                    ..Report::default()
                },
                0,
            );
        }
        assert_eq!(reported.resources.len(), MAX_RESOURCES);
    }
}
