//! Read-your-writes: a reconcile decides only from caches that show every write the
//! operator made ([`rollout::expectations`]). A grant whose Lease the Lease cache does
//! not show yet must not let the next reconcile grant around it.

use jiff::SignedDuration;
use rollout::expectations::{Expected, ObjectKey};
use tracing::{info, warn};

use crate::cluster::{Cluster, Refusal};

/// How long a write may go unseen before the cache is checked against a fresh read.
pub(crate) const BOUND: SignedDuration = SignedDuration::from_secs(10);

/// How long a write may go unseen before a reconcile that waits on it says so.
const SLOW: SignedDuration = SignedDuration::from_secs(2);

/// Notes a write about to be sent.
pub(crate) fn note<C: Cluster + ?Sized>(c: &C, key: ObjectKey, expected: Expected) {
    let now = c.now();
    c.expectations().expect(key, expected, now);
}

/// After a write of the object as it was at `from`: an answer from the API server
/// refusing it means nothing was written, and an answer with the same resourceVersion
/// means the write changed nothing (it set values already there), so no cache will
/// ever show a change: either way it is no longer awaited. (A request that got no
/// answer stays noted: it may have been applied.)
pub(crate) fn settle_write<C: Cluster + ?Sized>(
    c: &C,
    key: &ObjectKey,
    from: Option<&str>,
    result: &Result<Option<String>, Refusal>,
) {
    if nothing_written(from, result) {
        c.expectations().refused(key);
    }
}

/// Whether a write of the object at `from` that got `result` certainly changed nothing.
fn nothing_written(from: Option<&str>, result: &Result<Option<String>, Refusal>) -> bool {
    match result {
        Err(r) => r.code.is_some(),
        Ok(written) => from.is_some() && written.as_deref() == from,
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
    let oldest = c.expectations().oldest().map(|(k, t)| (k.clone(), t));
    if let Some((key, since)) = oldest {
        let waited = c.now().duration_since(since);
        if waited >= SLOW {
            info!(pending = pending.len(), kind = key.kind, name = %key.name, waited_ms = waited.as_millis(), "the caches do not show the operator's writes yet");
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: Option<u16>) -> Result<Option<String>, Refusal> {
        Err(Refusal {
            code,
            message: "x".into(),
        })
    }

    #[test]
    fn a_refused_or_no_op_write_is_not_awaited_and_an_unanswered_one_is() {
        assert!(nothing_written(Some("7"), &refusal(Some(409))), "refused");
        assert!(!nothing_written(Some("7"), &refusal(None)), "no answer");
        assert!(
            nothing_written(Some("7"), &Ok(Some("7".into()))),
            "a patch that set values already there"
        );
        assert!(
            !nothing_written(Some("7"), &Ok(Some("8".into()))),
            "written"
        );
        assert!(
            !nothing_written(Some("7"), &Ok(None)),
            "no version in the answer"
        );
        assert!(!nothing_written(None, &Ok(Some("8".into()))), "a create");
    }
}
