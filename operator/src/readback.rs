//! Read-your-writes: a reconcile decides only from caches that show every write the
//! operator made ([`rollout::expectations`]). A grant whose Lease the Lease cache does
//! not show yet must not let the next reconcile grant around it.

use std::sync::MutexGuard;

use jiff::SignedDuration;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{Api, Resource, ResourceExt, runtime::reflector::ObjectRef};
use rollout::expectations::{Expectations, Expected, ObjectKey, Seen};
use tracing::warn;

use crate::context::Context;

/// How long a write may go unseen before the cache is checked against a fresh read.
pub(crate) const BOUND: SignedDuration = SignedDuration::from_secs(10);

fn expectations(ctx: &Context) -> MutexGuard<'_, Expectations> {
    ctx.expectations
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Notes a write about to be sent.
pub(crate) fn note(ctx: &Context, key: ObjectKey, expected: Expected) {
    expectations(ctx).expect(key, expected, ctx.clock.now());
}

/// After a write: an error answer from the API server means nothing was written.
/// (A request that got no answer stays noted: it may have been applied.)
pub(crate) fn settle_write(ctx: &Context, key: &ObjectKey, error: Option<&kube::Error>) {
    if let Some(kube::Error::Api(_)) = error {
        expectations(ctx).refused(key);
    }
}

fn seen<K: Resource>(object: Option<std::sync::Arc<K>>) -> Option<Seen> {
    object.map(|o| Seen {
        uid: o.uid(),
        resource_version: o.resource_version(),
    })
}

fn cached(ctx: &Context, key: &ObjectKey) -> Option<Seen> {
    match key.kind {
        "Node" => seen(ctx.nodes.get(&ObjectRef::new(&key.name))),
        _ => seen(
            ctx.leases
                .get(&ObjectRef::new(&key.name).within(&ctx.config.namespace)),
        ),
    }
}

async fn live(ctx: &Context, key: &ObjectKey) -> Result<Option<Seen>, kube::Error> {
    let found = match key.kind {
        "Node" => Api::<Node>::all(ctx.client.clone())
            .get_opt(&key.name)
            .await?
            .map(|n| Seen {
                uid: n.uid(),
                resource_version: n.resource_version(),
            }),
        _ => Api::<Lease>::namespaced(ctx.client.clone(), &ctx.config.namespace)
            .get_opt(&key.name)
            .await?
            .map(|l| Seen {
                uid: l.uid(),
                resource_version: l.resource_version(),
            }),
    };
    Ok(found)
}

/// Whether the caches show every write the operator made. Writes unseen past
/// [`BOUND`] are checked against a fresh read: when it agrees with the cache, the
/// write never happened and is no longer awaited.
pub(crate) async fn caught_up(ctx: &Context) -> bool {
    let pending = expectations(ctx).settle(|key| cached(ctx, key));
    if pending.is_empty() {
        return true;
    }
    let overdue = expectations(ctx).overdue(ctx.clock.now(), BOUND);
    for key in overdue {
        match live(ctx, &key).await {
            Ok(found) => {
                let in_cache = cached(ctx, &key);
                if in_cache != found {
                    warn!(kind = key.kind, name = %key.name, "the cache still lags a write of the operator's");
                }
                expectations(ctx).resolve(&key, in_cache.as_ref(), found.as_ref());
            }
            Err(e) => {
                warn!(kind = key.kind, name = %key.name, error = %e, "cannot read back a write")
            }
        }
    }
    expectations(ctx).settle(|key| cached(ctx, key)).is_empty()
}
