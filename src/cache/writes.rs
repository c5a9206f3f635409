//! Writes: which stored answers a write makes stale, and the record that keeps an answer
//! fetched before a write out of the store after it.

use std::collections::HashMap;

/// Writes seen since start-up, by repository, so an answer fetched before a write is not
/// stored after it.
#[derive(Default)]
pub(super) struct Epochs {
    pub(super) seq: u64,
    /// The last write of any kind.
    any: u64,
    /// The last write outside every repository.
    global: u64,
    scopes: HashMap<Box<str>, u64>,
    /// The last write to each repository object itself.
    repositories: HashMap<Box<str>, u64>,
}

/// Bounds the per-repository record; past it every older answer counts as preceded by a write.
const MAX_SCOPES: usize = 4096;

impl Epochs {
    pub(super) fn record(&mut self, write: &Write) {
        self.seq += 1;
        self.any = self.seq;
        let Some(scope) = write.scope.as_deref() else {
            self.global = self.seq;
            return;
        };
        if self.scopes.len() >= MAX_SCOPES || self.repositories.len() >= MAX_SCOPES {
            // Forgetting which repository was written means treating every one as written.
            self.scopes.clear();
            self.repositories.clear();
            self.global = self.seq;
            self.repositories.insert("".into(), self.seq);
        }
        self.scopes.insert(scope.into(), self.seq);
        if write.repository_itself {
            self.repositories.insert(scope.into(), self.seq);
        }
    }

    /// Whether no write that would have dropped an entry fetched since `started` happened.
    pub(super) fn unchanged_since(
        &self,
        started: u64,
        scope: Option<&str>,
        immutable: bool,
    ) -> bool {
        let before = |map: &HashMap<Box<str>, u64>, scope: &str| {
            map.get(scope).is_none_or(|&at| at <= started)
                && map.get("").is_none_or(|&at| at <= started)
        };
        match (scope, immutable) {
            (None, _) => self.any <= started,
            (Some(scope), true) => before(&self.repositories, scope),
            (Some(scope), false) => self.global <= started && before(&self.scopes, scope),
        }
    }
}

/// A write as far as the cache is concerned.
pub struct Write {
    /// The repository written to; `None` outside every repository.
    pub(super) scope: Option<Box<str>>,
    /// The repository object itself (`PUT`/`DELETE .../repositories/{ws}/{repo}`).
    pub(super) repository_itself: bool,
}

impl Write {
    /// Whether this write drops an entry of `scope`: a mutable entry of its repository, or
    /// that belongs to none (lists across repositories); for a write outside every repository,
    /// every mutable entry; an immutable entry only with its repository itself.
    pub(super) fn drops(&self, scope: Option<&str>, immutable: bool) -> bool {
        match (self.scope.as_deref(), scope) {
            (_, None) => true,
            (Some(written), Some(scope)) => {
                written == scope && (!immutable || self.repository_itself)
            }
            (None, Some(_)) => !immutable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(scope: Option<&str>, repository_itself: bool) -> Write {
        Write {
            scope: scope.map(Into::into),
            repository_itself,
        }
    }

    #[test]
    fn writes_drop_their_repository_and_cross_repository_lists() {
        let status = write(Some("acme/widgets"), false);
        assert!(status.drops(Some("acme/widgets"), false));
        assert!(
            !status.drops(Some("acme/widgets"), true),
            "a commit did not change"
        );
        assert!(!status.drops(Some("acme/gadgets"), false));
        assert!(status.drops(None, false));
        let deletion = write(Some("acme/widgets"), true);
        assert!(deletion.drops(Some("acme/widgets"), true));
        let outside = write(None, false);
        assert!(outside.drops(Some("acme/gadgets"), false));
        assert!(!outside.drops(Some("acme/gadgets"), true));
    }

    #[test]
    fn an_answer_fetched_before_a_write_is_not_kept() {
        let mut epochs = Epochs::default();
        let started = epochs.seq;
        assert!(epochs.unchanged_since(started, Some("acme/widgets"), false));
        epochs.record(&write(Some("acme/gadgets"), false));
        assert!(epochs.unchanged_since(started, Some("acme/widgets"), false));
        assert!(!epochs.unchanged_since(started, None, false));
        epochs.record(&write(Some("acme/widgets"), false));
        assert!(!epochs.unchanged_since(started, Some("acme/widgets"), false));
        assert!(epochs.unchanged_since(started, Some("acme/widgets"), true));
        epochs.record(&write(Some("acme/widgets"), true));
        assert!(!epochs.unchanged_since(started, Some("acme/widgets"), true));
        let later = epochs.seq;
        assert!(epochs.unchanged_since(later, Some("acme/widgets"), false));
        epochs.record(&write(None, false));
        assert!(!epochs.unchanged_since(later, Some("acme/widgets"), false));
        assert!(epochs.unchanged_since(later, Some("acme/widgets"), true));
    }
}
