//! The model API server: the objects baton reads and writes (Nodes, Leases,
//! UpdatePolicies, Pods, PodDisruptionBudgets) with the semantics baton relies on, as
//! the real kube-apiserver has them:
//!
//! - one resourceVersion counter for everything, bumped by every write;
//! - a merge patch or an update that names a resourceVersion is refused with 409
//!   Conflict when the object has moved on; a delete with preconditions likewise;
//! - create of an existing name is 409 AlreadyExists; a missing object is 404;
//! - an eviction that a PodDisruptionBudget does not allow is 429;
//! - an object with finalizers is only marked for deletion; it goes when the last
//!   finalizer does;
//! - a spec change bumps `metadata.generation`, a status write does not;
//! - every change is appended to a log in resourceVersion order, which the watches
//!   deliver (`watch`).
//!
//! `e2e/tests/model.rs` runs the same short scenario here and on the real control plane
//! and compares what each answers.

use std::{collections::BTreeMap, sync::Arc};

use jiff::Timestamp;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Node, Pod},
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::{apis::meta::v1::Time, util::intstr::IntOrString},
};
use kube::ResourceExt;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crds::UpdatePolicy;
use rollout::selector::Selector;

/// What the model refuses, with the HTTP status the real API server answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 404.
    #[error("404 NotFound")]
    NotFound,
    /// 409 on create.
    #[error("409 AlreadyExists")]
    AlreadyExists,
    /// 409 on a stale resourceVersion or precondition.
    #[error("409 Conflict")]
    Conflict,
    /// 429: an eviction a PodDisruptionBudget does not allow.
    #[error("429 TooManyRequests: {0}")]
    TooManyRequests(String),
    /// 422: the object would be invalid.
    #[error("422 Invalid: {0}")]
    Invalid(String),
    /// 503, injected: the request failed before reaching the server.
    #[error("503 ServiceUnavailable (injected)")]
    Unavailable,
    /// No answer within the client's bound (injected hang).
    #[error("no answer within the request timeout (injected)")]
    Timeout,
}

impl ApiError {
    /// The HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound => 404,
            ApiError::AlreadyExists | ApiError::Conflict => 409,
            ApiError::TooManyRequests(_) => 429,
            ApiError::Invalid(_) => 422,
            ApiError::Unavailable => 503,
            ApiError::Timeout => 504,
        }
    }
}

/// The kinds baton watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Nodes.
    Node,
    /// Leases (reboot and leader election).
    Lease,
    /// UpdatePolicies.
    Policy,
}

/// A watched object.
#[derive(Debug, Clone)]
pub enum Object {
    /// A Node.
    Node(Arc<Node>),
    /// A Lease.
    Lease(Arc<Lease>),
    /// An UpdatePolicy.
    Policy(Arc<UpdatePolicy>),
}

/// One change, in resourceVersion order: the object as written, or `None` when it went.
#[derive(Debug, Clone)]
pub struct Change {
    /// The resourceVersion of the change.
    pub rv: u64,
    /// Its kind.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// The object after the change; `None` for a deletion.
    pub object: Option<Object>,
}

/// Delete preconditions.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    /// The uid the object must have.
    pub uid: Option<String>,
    /// The resourceVersion it must have.
    pub resource_version: Option<String>,
}

/// The model API server's state.
#[derive(Debug, Default)]
pub struct ApiServer {
    rv: u64,
    uids: u64,
    /// Every Node.
    pub nodes: BTreeMap<String, Arc<Node>>,
    /// Every Lease (one namespace: the operator's).
    pub leases: BTreeMap<String, Arc<Lease>>,
    /// Every UpdatePolicy.
    pub policies: BTreeMap<String, Arc<UpdatePolicy>>,
    /// Every Pod, by `namespace/name`.
    pub pods: BTreeMap<String, Pod>,
    /// Every PodDisruptionBudget, by `namespace/name`.
    pub pdbs: BTreeMap<String, PodDisruptionBudget>,
    /// The change log of the watched kinds.
    pub log: Vec<Change>,
    /// The time the server stamps (creation and deletion timestamps).
    pub now: Option<Timestamp>,
}

fn to_value<T: Serialize>(o: &T) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

fn from_value<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::Invalid(e.to_string()))
}

/// The resourceVersion a merge patch names as its precondition, removed from it.
fn take_precondition(patch: &mut Value) -> Option<String> {
    let meta = patch.get_mut("metadata")?.as_object_mut()?;
    let rv = meta.remove("resourceVersion")?;
    rv.as_str().map(str::to_string)
}

/// The key of a namespaced object.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl ApiServer {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn uid(&mut self) -> String {
        self.uids += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.uids)
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn stamp(&self) -> Option<Time> {
        self.now.map(Time)
    }

    fn record(&mut self, rv: u64, kind: Kind, name: &str, object: Option<Object>) {
        self.log.push(Change {
            rv,
            kind,
            name: name.to_string(),
            object,
        });
    }

    /// Creates a Node.
    pub fn create_node(&mut self, mut node: Node) -> Result<Arc<Node>, ApiError> {
        let name = node.name_any();
        if self.nodes.contains_key(&name) {
            return Err(ApiError::AlreadyExists);
        }
        let rv = self.bump();
        node.metadata.resource_version = Some(rv.to_string());
        node.metadata.uid = Some(self.uid());
        node.metadata.creation_timestamp = self.stamp();
        let node = Arc::new(node);
        self.nodes.insert(name.clone(), Arc::clone(&node));
        self.record(rv, Kind::Node, &name, Some(Object::Node(Arc::clone(&node))));
        Ok(node)
    }

    /// Merge-patches a Node; a `metadata.resourceVersion` in the patch is a precondition.
    pub fn patch_node(&mut self, name: &str, patch: &Value) -> Result<Arc<Node>, ApiError> {
        let current = self.nodes.get(name).ok_or(ApiError::NotFound)?;
        let node: Node = merged(&**current, patch)?;
        let rv = self.bump();
        let mut node = node;
        node.metadata.resource_version = Some(rv.to_string());
        let node = Arc::new(node);
        self.nodes.insert(name.to_string(), Arc::clone(&node));
        self.record(rv, Kind::Node, name, Some(Object::Node(Arc::clone(&node))));
        Ok(node)
    }

    /// Deletes a Node.
    pub fn delete_node(&mut self, name: &str) -> Result<(), ApiError> {
        self.nodes.remove(name).ok_or(ApiError::NotFound)?;
        let rv = self.bump();
        self.record(rv, Kind::Node, name, None);
        Ok(())
    }

    /// Creates a Lease.
    pub fn create_lease(&mut self, mut lease: Lease) -> Result<Arc<Lease>, ApiError> {
        let name = lease.name_any();
        if self.leases.contains_key(&name) {
            return Err(ApiError::AlreadyExists);
        }
        let rv = self.bump();
        lease.metadata.resource_version = Some(rv.to_string());
        lease.metadata.uid = Some(self.uid());
        lease.metadata.creation_timestamp = self.stamp();
        let lease = Arc::new(lease);
        self.leases.insert(name.clone(), Arc::clone(&lease));
        self.record(
            rv,
            Kind::Lease,
            &name,
            Some(Object::Lease(Arc::clone(&lease))),
        );
        Ok(lease)
    }

    /// Replaces a Lease (an update): its resourceVersion must be the current one.
    pub fn replace_lease(&mut self, mut lease: Lease) -> Result<Arc<Lease>, ApiError> {
        let name = lease.name_any();
        let current = self.leases.get(&name).ok_or(ApiError::NotFound)?;
        if lease.metadata.resource_version != current.metadata.resource_version {
            return Err(ApiError::Conflict);
        }
        lease.metadata.uid.clone_from(&current.metadata.uid);
        lease.metadata.creation_timestamp = current.metadata.creation_timestamp.clone();
        let rv = self.bump();
        lease.metadata.resource_version = Some(rv.to_string());
        let lease = Arc::new(lease);
        self.leases.insert(name.clone(), Arc::clone(&lease));
        self.record(
            rv,
            Kind::Lease,
            &name,
            Some(Object::Lease(Arc::clone(&lease))),
        );
        Ok(lease)
    }

    /// Merge-patches a Lease; a `metadata.resourceVersion` in the patch is a precondition.
    pub fn patch_lease(&mut self, name: &str, patch: &Value) -> Result<Arc<Lease>, ApiError> {
        let current = self.leases.get(name).ok_or(ApiError::NotFound)?;
        let mut lease: Lease = merged(&**current, patch)?;
        let rv = self.bump();
        lease.metadata.resource_version = Some(rv.to_string());
        let lease = Arc::new(lease);
        self.leases.insert(name.to_string(), Arc::clone(&lease));
        self.record(
            rv,
            Kind::Lease,
            name,
            Some(Object::Lease(Arc::clone(&lease))),
        );
        Ok(lease)
    }

    /// Deletes a Lease, under `pre`.
    pub fn delete_lease(&mut self, name: &str, pre: &Preconditions) -> Result<(), ApiError> {
        let current = self.leases.get(name).ok_or(ApiError::NotFound)?;
        let uid_ok = pre.uid.is_none() || pre.uid == current.metadata.uid;
        let rv_ok = pre.resource_version.is_none()
            || pre.resource_version == current.metadata.resource_version;
        if !(uid_ok && rv_ok) {
            return Err(ApiError::Conflict);
        }
        self.leases.remove(name);
        let rv = self.bump();
        self.record(rv, Kind::Lease, name, None);
        Ok(())
    }

    /// Creates an UpdatePolicy (generation 1).
    pub fn create_policy(
        &mut self,
        mut policy: UpdatePolicy,
    ) -> Result<Arc<UpdatePolicy>, ApiError> {
        let name = policy.name_any();
        if self.policies.contains_key(&name) {
            return Err(ApiError::AlreadyExists);
        }
        let rv = self.bump();
        policy.metadata.resource_version = Some(rv.to_string());
        policy.metadata.uid = Some(self.uid());
        policy.metadata.generation = Some(1);
        policy.metadata.creation_timestamp = self.stamp();
        let policy = Arc::new(policy);
        self.policies.insert(name.clone(), Arc::clone(&policy));
        self.record(
            rv,
            Kind::Policy,
            &name,
            Some(Object::Policy(Arc::clone(&policy))),
        );
        Ok(policy)
    }

    /// Merge-patches an UpdatePolicy's spec or metadata (a spec change bumps the
    /// generation); the policy goes once it is marked for deletion and has no
    /// finalizer left.
    pub fn patch_policy(&mut self, name: &str, patch: &Value) -> Result<(), ApiError> {
        let current = self.policies.get(name).ok_or(ApiError::NotFound)?;
        let mut patch = patch.clone();
        if let Some(o) = patch.as_object_mut() {
            o.remove("status");
        }
        let mut policy: UpdatePolicy = merged(&**current, &patch)?;
        if to_value(&policy.spec) != to_value(&current.spec) {
            policy.metadata.generation = Some(current.metadata.generation.unwrap_or(1) + 1);
        }
        self.store_policy(name, policy)
    }

    /// Merge-patches an UpdatePolicy's status (the status subresource).
    pub fn patch_policy_status(&mut self, name: &str, patch: &Value) -> Result<(), ApiError> {
        let current = self.policies.get(name).ok_or(ApiError::NotFound)?;
        let only_status =
            serde_json::json!({"status": patch.get("status").cloned().unwrap_or(Value::Null)});
        let mut policy: UpdatePolicy = merged(&**current, &only_status)?;
        policy.metadata.generation = current.metadata.generation;
        self.store_policy(name, policy)
    }

    fn store_policy(&mut self, name: &str, mut policy: UpdatePolicy) -> Result<(), ApiError> {
        let rv = self.bump();
        if policy.metadata.deletion_timestamp.is_some() && policy.finalizers().is_empty() {
            self.policies.remove(name);
            self.record(rv, Kind::Policy, name, None);
            return Ok(());
        }
        policy.metadata.resource_version = Some(rv.to_string());
        let policy = Arc::new(policy);
        self.policies.insert(name.to_string(), Arc::clone(&policy));
        self.record(rv, Kind::Policy, name, Some(Object::Policy(policy)));
        Ok(())
    }

    /// Deletes an UpdatePolicy: with finalizers, it is only marked for deletion.
    pub fn delete_policy(&mut self, name: &str) -> Result<(), ApiError> {
        let current = self.policies.get(name).ok_or(ApiError::NotFound)?;
        if current.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let mut policy = (**current).clone();
        policy.metadata.deletion_timestamp = self.stamp().or(Some(Time(Timestamp::UNIX_EPOCH)));
        self.store_policy(name, policy)
    }

    /// Creates a Pod (`namespace/name` from its metadata).
    pub fn create_pod(&mut self, mut pod: Pod) -> Result<(), ApiError> {
        let k = key(&pod.namespace().unwrap_or_default(), &pod.name_any());
        if self.pods.contains_key(&k) {
            return Err(ApiError::AlreadyExists);
        }
        let rv = self.bump();
        pod.metadata.resource_version = Some(rv.to_string());
        pod.metadata.uid = Some(self.uid());
        self.pods.insert(k, pod);
        Ok(())
    }

    /// Deletes a Pod outright (bypassing every PodDisruptionBudget).
    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Result<Pod, ApiError> {
        let pod = self
            .pods
            .remove(&key(namespace, name))
            .ok_or(ApiError::NotFound)?;
        self.bump();
        Ok(pod)
    }

    /// Creates a PodDisruptionBudget.
    pub fn create_pdb(&mut self, pdb: PodDisruptionBudget) -> Result<(), ApiError> {
        let k = key(&pdb.namespace().unwrap_or_default(), &pdb.name_any());
        if self.pdbs.contains_key(&k) {
            return Err(ApiError::AlreadyExists);
        }
        self.bump();
        self.pdbs.insert(k, pdb);
        Ok(())
    }

    /// Deletes a PodDisruptionBudget.
    pub fn delete_pdb(&mut self, namespace: &str, name: &str) -> Result<(), ApiError> {
        self.pdbs
            .remove(&key(namespace, name))
            .ok_or(ApiError::NotFound)?;
        self.bump();
        Ok(())
    }

    /// The pods scheduled on `node`.
    pub fn pods_on(&self, node: &str) -> Vec<Pod> {
        self.pods
            .values()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .cloned()
            .collect()
    }

    /// The PodDisruptionBudgets in `namespace` that select `pod`.
    pub fn budgets_of(&self, pod: &Pod) -> Vec<&PodDisruptionBudget> {
        let ns = pod.namespace().unwrap_or_default();
        self.pdbs
            .values()
            .filter(|b| b.namespace().unwrap_or_default() == ns)
            .filter(|b| {
                b.spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .and_then(|s| Selector::compile(s).ok())
                    .is_some_and(|s| s.matches(pod.labels()))
            })
            .collect()
    }

    /// Evicts a pod through the Eviction API: refused with 429 when a
    /// PodDisruptionBudget selecting it allows no disruption now.
    pub fn evict(&mut self, namespace: &str, name: &str) -> Result<Pod, ApiError> {
        let pod = self
            .pods
            .get(&key(namespace, name))
            .ok_or(ApiError::NotFound)?
            .clone();
        // As the API server: a pod that is not running (Pending, Succeeded, Failed) or
        // is already being deleted goes whatever its budgets say.
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let running = !matches!(phase, Some("Pending" | "Succeeded" | "Failed") | None);
        if !running || pod.metadata.deletion_timestamp.is_some() {
            return self.delete_pod(namespace, name);
        }
        for budget in self.budgets_of(&pod) {
            if self.disruptions_allowed(budget) <= 0 {
                return Err(ApiError::TooManyRequests(format!(
                    "Cannot evict pod as it would violate the pod's disruption budget {}.",
                    budget.name_any()
                )));
            }
        }
        self.delete_pod(namespace, name)
    }

    /// `status.disruptionsAllowed` as the disruption controller computes it: healthy
    /// pods minus the desired healthy ones.
    fn disruptions_allowed(&self, budget: &PodDisruptionBudget) -> i64 {
        let Some(spec) = budget.spec.as_ref() else {
            return 1;
        };
        let Some(selector) = spec
            .selector
            .as_ref()
            .and_then(|s| Selector::compile(s).ok())
        else {
            return 0;
        };
        let ns = budget.namespace().unwrap_or_default();
        let selected: Vec<&Pod> = self
            .pods
            .values()
            .filter(|p| p.namespace().unwrap_or_default() == ns && selector.matches(p.labels()))
            .collect();
        let expected = selected.len() as i64;
        let healthy = selected
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count() as i64;
        let resolve = |v: &IntOrString| match v {
            IntOrString::Int(i) => i64::from(*i),
            IntOrString::String(s) => {
                let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
                (expected * pct + 99) / 100
            }
        };
        let desired = match (&spec.min_available, &spec.max_unavailable) {
            (Some(min), _) => resolve(min),
            (None, Some(max)) => expected - resolve(max),
            (None, None) => 0,
        };
        healthy - desired
    }
}

/// `current` with the merge patch `patch` applied, under its resourceVersion
/// precondition.
fn merged<T: Serialize + DeserializeOwned + kube::Resource>(
    current: &T,
    patch: &Value,
) -> Result<T, ApiError> {
    let mut patch = patch.clone();
    if let Some(rv) = take_precondition(&mut patch)
        && Some(rv) != current.meta().resource_version
    {
        return Err(ApiError::Conflict);
    }
    let mut value = to_value(current);
    json_patch::merge(&mut value, &patch);
    from_value(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Node {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap()
    }

    #[test]
    fn a_stale_resource_version_is_a_conflict_and_a_fresh_one_applies() {
        let mut api = ApiServer::default();
        let n = api.create_node(node("a")).unwrap();
        let rv = n.metadata.resource_version.clone().unwrap();
        let patch =
            serde_json::json!({"metadata": {"resourceVersion": rv, "annotations": {"x": "1"}}});
        let patched = api.patch_node("a", &patch).unwrap();
        assert_eq!(patched.annotations()["x"], "1");
        assert_eq!(api.patch_node("a", &patch).unwrap_err(), ApiError::Conflict);
        // null removes a key.
        let remove = serde_json::json!({"metadata": {"annotations": {"x": null}}});
        assert!(
            !api.patch_node("a", &remove)
                .unwrap()
                .annotations()
                .contains_key("x")
        );
    }

    #[test]
    fn deletes_honour_preconditions_and_creates_refuse_duplicates() {
        let mut api = ApiServer::default();
        let lease: Lease =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "l"}})).unwrap();
        let l = api.create_lease(lease.clone()).unwrap();
        assert_eq!(
            api.create_lease(lease).unwrap_err(),
            ApiError::AlreadyExists
        );
        let stale = Preconditions {
            uid: l.metadata.uid.clone(),
            resource_version: Some("0".into()),
        };
        assert_eq!(api.delete_lease("l", &stale), Err(ApiError::Conflict));
        let fresh = Preconditions {
            uid: l.metadata.uid.clone(),
            resource_version: l.metadata.resource_version.clone(),
        };
        assert_eq!(api.delete_lease("l", &fresh), Ok(()));
        assert_eq!(api.delete_lease("l", &fresh), Err(ApiError::NotFound));
    }

    #[test]
    fn an_eviction_a_budget_forbids_is_429_and_a_delete_bypasses_it() {
        let mut api = ApiServer::default();
        for i in 0..2 {
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("web-{i}"), "namespace": "app", "labels": {"app": "web"}},
                "spec": {"nodeName": format!("n{i}"), "containers": []},
                "status": {"phase": "Running"},
            }))
            .unwrap();
            api.create_pod(pod).unwrap();
        }
        let pdb: PodDisruptionBudget = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "app"},
            "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}},
        }))
        .unwrap();
        api.create_pdb(pdb).unwrap();
        assert_eq!(api.evict("app", "web-0").unwrap_err().code(), 429);
        assert!(api.delete_pod("app", "web-0").is_ok());
        assert_eq!(api.evict("app", "web-0").unwrap_err(), ApiError::NotFound);
        // A pod that does not run yet goes whatever its budgets say.
        let pending: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-9", "namespace": "app", "labels": {"app": "web"}},
            "spec": {"nodeName": "n9", "containers": []},
            "status": {"phase": "Pending"},
        }))
        .unwrap();
        api.create_pod(pending).unwrap();
        assert!(api.evict("app", "web-9").is_ok());
    }
}
