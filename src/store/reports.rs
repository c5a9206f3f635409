//! Bitbucket's `X-RateLimit-*` figures shared between replicas: one replica that sees them
//! stores them under the credential's fingerprint (`{stem}:reported`, a hash of resource →
//! figures, a few minutes' lifetime), and every admission ([`super::budget`]) hands them to the
//! replica asking, so all of them pace with the same figures. The figures' text is made and read
//! by [`crate::budget::reported`]; this module only stores it, bounded in fields and size.

use std::time::Duration;

use redis::Script;

use super::{Store, Unavailable};

/// How long a shared report lives unless its replica renews it.
pub const REPORT_TTL: Duration = Duration::from_secs(120);
/// Resources kept per credential: Bitbucket has a handful, and a hostile upstream must not grow
/// the hash without bound.
const MAX_RESOURCES: usize = 8;
/// Longest field or value accepted.
const MAX_TEXT: usize = 96;

/// KEYS: reported. ARGV: resource, figures, ttl in ms, most resources.
const SHARE: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

impl Store {
    /// Stores the figures one response reported for `resource` of the credential whose secret
    /// material is `identity`.
    pub async fn share_report(
        &self,
        identity: &[u8],
        resource: &str,
        figures: &str,
    ) -> Result<(), Unavailable> {
        if resource.len() > MAX_TEXT || figures.len() > MAX_TEXT {
            return Ok(());
        }
        let key = format!(
            "{}:reported",
            self.budget.stem(&self.budget.salt(), identity)
        );
        let key = &key;
        self.call(|mut connection| async move {
            Script::new(SHARE)
                .key(key)
                .arg(resource)
                .arg(figures)
                .arg(REPORT_TTL.as_millis() as u64)
                .arg(MAX_RESOURCES)
                .invoke_async::<i64>(&mut connection)
                .await
                .map(drop)
        })
        .await
    }
}
