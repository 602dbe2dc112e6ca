//! Read-your-writes: a reconcile decides only from caches that show every write the
//! operator made ([`rollout::expectations`]). A grant whose Lease the Lease cache does
//! not show yet must not let the next reconcile grant around it.

use jiff::SignedDuration;
use rollout::expectations::{Expected, ObjectKey};
use tracing::warn;

use crate::cluster::{Cluster, Refusal};

/// How long a write may go unseen before the cache is checked against a fresh read.
pub(crate) const BOUND: SignedDuration = SignedDuration::from_secs(10);

/// Notes a write about to be sent.
pub(crate) fn note<C: Cluster + ?Sized>(c: &C, key: ObjectKey, expected: Expected) {
    let now = c.now();
    c.expectations().expect(key, expected, now);
}

/// After a write: an answer from the API server refusing it means nothing was written.
/// (A request that got no answer stays noted: it may have been applied.)
pub(crate) fn settle_write<C: Cluster + ?Sized>(c: &C, key: &ObjectKey, error: Option<&Refusal>) {
    if error.is_some_and(|r| r.code.is_some()) {
        c.expectations().refused(key);
    }
}

/// Whether the caches show every write the operator made. Writes unseen past
/// [`BOUND`] are checked against a fresh read: when it agrees with the cache, the
/// write never happened and is no longer awaited.
pub async fn caught_up<C: Cluster>(c: &C) -> bool {
    let pending = c.expectations().settle(|key| c.cached(key));
    if pending.is_empty() {
        return true;
    }
    let overdue = c.expectations().overdue(c.now(), BOUND);
    for key in overdue {
        match c.read(&key).await {
            Ok(found) => {
                let in_cache = c.cached(&key);
                if in_cache != found {
                    warn!(kind = key.kind, name = %key.name, "the cache still lags a write of the operator's");
                }
                c.expectations()
                    .resolve(&key, in_cache.as_ref(), found.as_ref());
            }
            Err(e) => {
                warn!(kind = key.kind, name = %key.name, error = %e, "cannot read back a write")
            }
        }
    }
    c.expectations().settle(|key| c.cached(key)).is_empty()
}
