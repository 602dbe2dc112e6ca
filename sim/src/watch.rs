//! Watches: each client's caches of the watched kinds, fed from the model's change log
//! with a random delay, in order per kind (as a real watch delivers), and sometimes
//! dropped: a dropped watch relists after a while and replaces its cache with the state
//! at that moment, as kube's watcher does. Caches of different kinds lag independently.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};

use crds::UpdatePolicy;

use crate::{
    apiserver::{Kind, Object},
    runtime::TaskId,
    world::{Signal, Sim},
};

/// One client's caches.
#[derive(Debug, Default, Clone)]
pub struct Cache {
    /// Nodes (only the one named by `only_node`, for an agent).
    pub nodes: BTreeMap<String, Arc<Node>>,
    /// baton's reboot Leases.
    pub leases: BTreeMap<String, Arc<Lease>>,
    /// UpdatePolicies.
    pub policies: BTreeMap<String, Arc<UpdatePolicy>>,
    /// Whether each kind has been listed once (a reflector's readiness).
    pub listed: [bool; 3],
}

/// A cache shared between its watch tasks and its reader.
pub type Shared = Arc<Mutex<Cache>>;

/// Locks a cache.
pub fn lock(cache: &Shared) -> MutexGuard<'_, Cache> {
    cache.lock().unwrap_or_else(PoisonError::into_inner)
}

fn index(kind: Kind) -> usize {
    match kind {
        Kind::Node => 0,
        Kind::Lease => 1,
        Kind::Policy => 2,
    }
}

fn reboot_lease(lease: &Lease) -> bool {
    lease
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crds::grant::MANAGED_BY.0))
        .map(String::as_str)
        == Some(crds::grant::MANAGED_BY.1)
}

/// What one watch looks at.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The kind.
    pub kind: Kind,
    /// Only this Node (an agent's field selector).
    pub only_node: Option<String>,
}

fn relist(sim: &Sim, cache: &Shared, scope: &Scope) -> usize {
    let w = sim.lock();
    let mut c = lock(cache);
    match scope.kind {
        Kind::Node => {
            c.nodes = w
                .api
                .nodes
                .iter()
                .filter(|(name, _)| scope.only_node.as_ref().is_none_or(|o| o == *name))
                .map(|(k, v)| (k.clone(), Arc::clone(v)))
                .collect();
        }
        Kind::Lease => {
            c.leases = w
                .api
                .leases
                .iter()
                .filter(|(_, l)| reboot_lease(l))
                .map(|(k, v)| (k.clone(), Arc::clone(v)))
                .collect();
        }
        Kind::Policy => c.policies = w.api.policies.clone(),
    }
    c.listed[index(scope.kind)] = true;
    w.api.log.len()
}

fn apply(cache: &Shared, scope: &Scope, changes: &[crate::apiserver::Change]) -> bool {
    let mut c = lock(cache);
    let mut any = false;
    for change in changes.iter().filter(|c| c.kind == scope.kind) {
        if scope.only_node.as_ref().is_some_and(|o| *o != change.name) {
            continue;
        }
        any = true;
        match &change.object {
            Some(Object::Node(n)) => {
                c.nodes.insert(change.name.clone(), Arc::clone(n));
            }
            Some(Object::Lease(l)) if reboot_lease(l) => {
                c.leases.insert(change.name.clone(), Arc::clone(l));
            }
            Some(Object::Lease(_)) => {}
            Some(Object::Policy(p)) => {
                c.policies.insert(change.name.clone(), Arc::clone(p));
            }
            None => match scope.kind {
                Kind::Node => {
                    c.nodes.remove(&change.name);
                }
                Kind::Lease => {
                    c.leases.remove(&change.name);
                }
                Kind::Policy => {
                    c.policies.remove(&change.name);
                }
            },
        }
    }
    any
}

/// Starts a watch task feeding `cache` for `scope`; `woken` is notified after every
/// delivery that changed it. `client` names the watcher (its watches drop under
/// faults).
pub fn start(sim: &Sim, cache: Shared, scope: Scope, woken: Arc<Signal>) -> TaskId {
    let grew = Arc::new(Signal::default());
    sim.lock().watchers.push(Arc::clone(&grew));
    let s = sim.clone();
    sim.rt.spawn(async move {
        let mut cursor = relist(&s, &cache, &scope);
        woken.notify();
        loop {
            grew.wait().await;
            let (delay, drop) = {
                let mut w = s.lock();
                let max = w.timing.max_watch_delay;
                let per_mille = w.faults.drop_per_mille;
                (w.jitter(max), w.chance(per_mille))
            };
            if drop {
                let after = s.lock().timing.relist_after;
                s.rt.sleep(after).await;
                cursor = relist(&s, &cache, &scope);
                woken.notify();
                continue;
            }
            s.rt.sleep(delay).await;
            let changes = {
                let w = s.lock();
                let new = w.api.log[cursor..].to_vec();
                cursor = w.api.log.len();
                new
            };
            if apply(&cache, &scope, &changes) {
                woken.notify();
            }
        }
    })
}
