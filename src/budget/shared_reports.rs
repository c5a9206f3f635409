//! The budget's side of Bitbucket's figures in the shared store ([`crate::store::reports`]):
//! a replica that sees `X-RateLimit-*` stores them (when they changed, or every minute), and
//! adopts those the others stored from every admission's reply, so the fleet paces with one
//! set of figures.

use std::time::Duration;

use tokio::time::Instant;

use super::reported::Report;
use super::{CredentialBudget, Shared};
use crate::store::budget::SharedReports;

/// How often an unchanged report is stored again for the other replicas.
const REPORT_RESHARE: Duration = Duration::from_secs(60);

impl CredentialBudget {
    /// Records what Bitbucket reported to other replicas, so this one paces with the same
    /// figures (takes effect from the next admission).
    pub(super) fn adopt_reports(&self, now: Instant, reports: &SharedReports) {
        for (resource, figures) in reports {
            if let Some(report) = Report::from_shared(resource, figures) {
                self.governor.record_report(now, &report);
            }
        }
    }

    /// Stores a report for the other replicas, unless the same one was stored lately.
    pub(super) async fn share_report(&self, shared: &Shared, report: &Report, now: Instant) {
        {
            let mut last = self.shared_report.lock().unwrap_or_else(|p| p.into_inner());
            if last
                .as_ref()
                .is_some_and(|(same, at)| same == report && now < *at + REPORT_RESHARE)
            {
                return;
            }
            *last = Some((report.clone(), now));
        }
        let identity = shared.credential.budget_identity();
        let figures = report.shared_figures();
        // Unavailable: the others keep their own figures until the next report.
        let _ = shared
            .store
            .share_report(identity, &report.resource, &figures)
            .await;
    }
}
