//! Read-your-writes over watch caches, as kube-controller-manager's
//! ControllerExpectations do: the operator notes each write it makes, and decides again
//! only once its caches show every one of them. A decision taken on a cache older than
//! the operator's own last write could grant around a grant it just made.
//!
//! A write is noted before it is sent and forgotten only when the API server refused
//! it; a request whose outcome is unknown (a timeout) stays noted. Every wait has a
//! bound: past it, the operator compares its cache with a fresh read and forgets the
//! expectation when both agree (the write never happened), so a lost write can never
//! stall a policy for good.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

/// An object the operator wrote.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// `Node` or `Lease`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
}

impl ObjectKey {
    /// A Node.
    pub fn node(name: &str) -> ObjectKey {
        ObjectKey {
            kind: "Node",
            name: name.to_string(),
        }
    }

    /// A reboot Lease (in the operator's namespace).
    pub fn lease(name: &str) -> ObjectKey {
        ObjectKey {
            kind: "Lease",
            name: name.to_string(),
        }
    }
}

/// An object as a cache or a read shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.resourceVersion`.
    pub resource_version: Option<String>,
}

/// What a write will make the cache show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// A create (`from: None`) or an update of the object as it was at `from` (every
    /// update is guarded by that resourceVersion): any other version, or the object's
    /// deletion, shows the write or something after it.
    Changed {
        /// The resourceVersion written over.
        from: Option<String>,
    },
    /// A delete of the object with this uid.
    Gone {
        /// The uid deleted.
        uid: Option<String>,
    },
}

impl Expected {
    /// Whether `seen` (the cache's view; `None`: absent) shows the write.
    pub fn shown_by(&self, seen: Option<&Seen>) -> bool {
        match (self, seen) {
            (Expected::Changed { from: None }, seen) => seen.is_some(),
            (Expected::Changed { from: Some(_) }, None) => true,
            (Expected::Changed { from: Some(rv) }, Some(s)) => {
                s.resource_version.as_ref() != Some(rv)
            }
            (Expected::Gone { .. }, None) => true,
            (Expected::Gone { uid }, Some(s)) => s.uid != *uid,
        }
    }
}

/// The writes not yet seen in the caches.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    pending: BTreeMap<ObjectKey, (Expected, Timestamp)>,
}

impl Expectations {
    /// Notes a write about to be sent. A later write of the same object replaces an
    /// earlier one (it can only succeed on top of it).
    pub fn expect(&mut self, key: ObjectKey, expected: Expected, now: Timestamp) {
        self.pending.insert(key, (expected, now));
    }

    /// Forgets a write the API server refused: nothing will show it.
    pub fn refused(&mut self, key: &ObjectKey) {
        self.pending.remove(key);
    }

    /// Drops every write the caches now show; returns the objects still awaited.
    pub fn settle(&mut self, cache: impl Fn(&ObjectKey) -> Option<Seen>) -> Vec<ObjectKey> {
        self.pending
            .retain(|key, (expected, _)| !expected.shown_by(cache(key).as_ref()));
        self.pending.keys().cloned().collect()
    }

    /// The objects awaited for `bound` or longer at `now`.
    pub fn overdue(&self, now: Timestamp, bound: SignedDuration) -> Vec<ObjectKey> {
        self.pending
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) >= bound)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Past the bound: a fresh read (`live`) that agrees with the cache (`cached`) means
    /// the cache is current and the write never happened, so it is no longer awaited.
    pub fn resolve(&mut self, key: &ObjectKey, cached: Option<&Seen>, live: Option<&Seen>) {
        if cached == live {
            self.pending.remove(key);
        }
    }

    /// The write awaited longest, and since when.
    pub fn oldest(&self) -> Option<(&ObjectKey, Timestamp)> {
        self.pending
            .iter()
            .min_by_key(|(_, (_, since))| *since)
            .map(|(key, (_, since))| (key, *since))
    }

    /// Whether nothing is awaited.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(uid: &str, rv: &str) -> Seen {
        Seen {
            uid: Some(uid.into()),
            resource_version: Some(rv.into()),
        }
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// (the write, what the cache shows, whether the cache shows the write)
    #[test]
    fn a_write_is_shown_only_by_a_cache_past_the_version_it_wrote_over() {
        let created = Expected::Changed { from: None };
        let updated = Expected::Changed {
            from: Some("10".into()),
        };
        let deleted = Expected::Gone {
            uid: Some("u1".into()),
        };
        let rows = [
            (&created, None, false),
            (&created, Some(seen("u1", "11")), true),
            (&updated, Some(seen("u1", "10")), false),
            (&updated, Some(seen("u1", "11")), true),
            (&updated, Some(seen("u1", "12")), true),
            (&updated, None, true),
            (&deleted, Some(seen("u1", "10")), false),
            (&deleted, None, true),
            (&deleted, Some(seen("u2", "20")), true),
        ];
        for (expected, cache, shown) in rows {
            assert_eq!(
                expected.shown_by(cache.as_ref()),
                shown,
                "{expected:?} {cache:?}"
            );
        }
    }

    #[test]
    fn a_grant_not_yet_in_the_cache_holds_the_next_decision_back() {
        let mut e = Expectations::default();
        let lease = ObjectKey::lease("baton-reboot-n1");
        e.expect(
            lease.clone(),
            Expected::Changed { from: None },
            t("2026-11-30T10:00:00Z"),
        );
        assert_eq!(e.settle(|_| None), std::slice::from_ref(&lease));
        assert!(e.settle(|_| Some(seen("u1", "5"))).is_empty());
        assert!(e.is_empty());
    }

    #[test]
    fn a_refused_write_is_not_awaited() {
        let mut e = Expectations::default();
        let node = ObjectKey::node("n1");
        e.expect(
            node.clone(),
            Expected::Changed {
                from: Some("7".into()),
            },
            t("2026-11-30T10:00:00Z"),
        );
        e.refused(&node);
        assert!(e.settle(|_| Some(seen("u", "7"))).is_empty());
    }

    #[test]
    fn past_the_bound_a_fresh_read_that_agrees_with_the_cache_ends_the_wait() {
        let mut e = Expectations::default();
        let lease = ObjectKey::lease("baton-reboot-n1");
        let at = t("2026-11-30T10:00:00Z");
        e.expect(lease.clone(), Expected::Changed { from: None }, at);
        let bound = SignedDuration::from_secs(10);
        assert!(e.overdue(at, bound).is_empty());
        let later = t("2026-11-30T10:00:10Z");
        assert_eq!(e.overdue(later, bound), std::slice::from_ref(&lease));
        // The live object exists but the cache lags: keep waiting.
        e.resolve(&lease, None, Some(&seen("u1", "5")));
        assert!(!e.is_empty());
        // The request timed out and never reached the server: both say absent.
        e.resolve(&lease, None, None);
        assert!(e.is_empty());
    }
}
