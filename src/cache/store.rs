//! The stored answers: a map bounded by bytes, least recently used out first.
//!
//! An entry's weight is its body, its headers and its key; inserting past `max_bytes` evicts
//! from the cold end until it fits, and an entry that could never fit is not stored. Entries
//! keep the repository they belong to, so a write can drop them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::coalesce::Head;
use super::key::Key;
use crate::store::cache::SharedKey;

/// A complete 200 answer.
#[derive(Debug)]
pub struct Entry {
    pub head: Arc<Head>,
    pub body: Bytes,
    /// When the request that fetched it went out.
    pub sent_at: Instant,
    /// The upstream's own `Age` when it arrived.
    pub upstream_age: Duration,
    pub scope: Option<Box<str>>,
    /// With `[store]`: where the entry lives there and the generations it was fetched under,
    /// so a write through another replica makes this copy stale too.
    pub shared: Option<(SharedKey, Bytes)>,
    weight: usize,
}

impl Entry {
    pub fn new(
        key: &Key,
        head: Arc<Head>,
        body: Bytes,
        sent_at: Instant,
        upstream_age: Duration,
        scope: Option<Box<str>>,
    ) -> Entry {
        let headers: usize = head
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        let weight = body.len()
            + headers
            + key.weight()
            + scope.as_ref().map_or(0, |s| s.len())
            + std::mem::size_of::<Entry>()
            + std::mem::size_of::<Head>();
        Entry {
            head,
            body,
            sent_at,
            upstream_age,
            scope,
            shared: None,
            weight,
        }
    }

    /// Records where the entry lives in the shared store and its generations there.
    pub fn with_shared(mut self, shared: Option<(SharedKey, Bytes)>) -> Entry {
        self.weight += shared.as_ref().map_or(0, |(_, gens)| 256 + gens.len());
        self.shared = shared;
        self
    }

    /// How old the answer is now (RFC 9111 4.2.3, counting from when the request went out).
    pub fn age(&self, now: Instant) -> Duration {
        self.upstream_age + now.saturating_duration_since(self.sent_at)
    }
}

struct Slot {
    entry: Arc<Entry>,
    tick: u64,
}

/// The LRU map.
pub struct Store {
    max_bytes: usize,
    bytes: usize,
    slots: HashMap<Key, Slot>,
    /// Last use → key; the first is the coldest.
    order: BTreeMap<u64, Key>,
    clock: u64,
}

impl Store {
    pub fn new(max_bytes: usize) -> Store {
        Store {
            max_bytes,
            bytes: 0,
            slots: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The entry for `key`, marked as just used.
    pub fn get(&mut self, key: &Key) -> Option<Arc<Entry>> {
        self.clock += 1;
        let slot = self.slots.get_mut(key)?;
        let key = self
            .order
            .remove(&slot.tick)
            .expect("every slot is ordered");
        slot.tick = self.clock;
        self.order.insert(self.clock, key);
        Some(slot.entry.clone())
    }

    /// The entry for `key`, without marking it used.
    pub fn peek(&self, key: &Key) -> Option<Arc<Entry>> {
        self.slots.get(key).map(|slot| slot.entry.clone())
    }

    /// Stores `entry`, evicting the least recently used until it fits. Returns whether it was
    /// stored (an entry larger than the whole store is not).
    pub fn insert(&mut self, key: Key, entry: Entry) -> bool {
        if entry.weight > self.max_bytes {
            self.remove(&key);
            return false;
        }
        self.remove(&key);
        while self.bytes + entry.weight > self.max_bytes {
            let Some((_, coldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(slot) = self.slots.remove(&coldest) {
                self.bytes -= slot.entry.weight;
            }
        }
        self.clock += 1;
        self.bytes += entry.weight;
        self.order.insert(self.clock, key.clone());
        self.slots.insert(
            key,
            Slot {
                entry: Arc::new(entry),
                tick: self.clock,
            },
        );
        true
    }

    pub fn remove(&mut self, key: &Key) {
        if let Some(slot) = self.slots.remove(key) {
            self.order.remove(&slot.tick);
            self.bytes -= slot.entry.weight;
        }
    }

    /// Drops every entry `drop` picks; returns how many.
    pub fn retain(&mut self, mut keep: impl FnMut(&Key, &Entry) -> bool) -> usize {
        let before = self.slots.len();
        let order = &mut self.order;
        let bytes = &mut self.bytes;
        self.slots.retain(|key, slot| {
            let kept = keep(key, &slot.entry);
            if !kept {
                order.remove(&slot.tick);
                *bytes -= slot.entry.weight;
            }
            kept
        });
        before - self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitbucket::credentials::UpstreamKind;
    use http::{HeaderMap, Method, StatusCode};

    fn key(n: usize) -> Key {
        let credential: Arc<str> = Arc::from("c");
        Key::new(
            &credential,
            UpstreamKind::Api,
            &Method::GET,
            &format!("/p/{n}"),
            &HeaderMap::new(),
        )
    }

    fn entry(key: &Key, size: usize) -> Entry {
        let head = Arc::new(Head {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            shareable: true,
            length: Some(size as u64),
            upstream: None,
        });
        Entry::new(
            key,
            head,
            Bytes::from(vec![b'x'; size]),
            Instant::now(),
            Duration::ZERO,
            Some("acme/widgets".into()),
        )
    }

    #[test]
    fn a_store_full_of_large_bodies_stays_within_its_bound() {
        let mut store = Store::new(100_000);
        for n in 0..50 {
            let k = key(n);
            assert!(store.insert(k.clone(), entry(&k, 30_000)));
            assert!(store.bytes() <= 100_000, "{} after {n}", store.bytes());
        }
        assert_eq!(store.len(), 3);
        // The newest three survive: least recently used went first.
        assert!(store.get(&key(49)).is_some());
        assert!(store.get(&key(46)).is_none());
        // Larger than the whole store: refused, nothing else evicted.
        let big = key(1000);
        assert!(!store.insert(big.clone(), entry(&big, 200_000)));
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn use_refreshes_and_retain_drops() {
        let mut store = Store::new(10_000);
        let sizes = 2_000;
        for n in 0..3 {
            let k = key(n);
            store.insert(k.clone(), entry(&k, sizes));
        }
        store.get(&key(0));
        for n in 3..5 {
            let k = key(n);
            store.insert(k.clone(), entry(&k, sizes));
        }
        assert!(store.get(&key(0)).is_some(), "recently used stays");
        assert!(store.get(&key(1)).is_none(), "coldest went");
        let dropped = store.retain(|_, e| e.scope.as_deref() != Some("acme/widgets"));
        assert!(dropped > 0);
        assert!(store.is_empty());
        assert_eq!(store.bytes(), 0);
    }
}
