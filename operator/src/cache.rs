//! What the operator keeps of Nodes, and which changes of Nodes and UpdatePolicies
//! wake it.
//!
//! On a big cluster the Node watch is the operator's whole cost: Nodes are large and
//! kubelets rewrite their status every few seconds to minutes (heartbeats, images,
//! resource figures). baton reads little of a Node, so the cache keeps only that
//! (`slim`), and only changes to it trigger a reconcile (`Changes`). The cache itself is
//! updated by every event, so patches always carry the latest resourceVersion.
//!
//! Every policy's view of the others (which nodes they select, so where selectors
//! overlap) changes with any policy's spec: a new generation or a deletion of one wakes
//! all of them, while status writes wake none.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
};

use crds::UpdatePolicy;
use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus};
use kube::{ResourceExt, runtime::watcher::Event};

/// What of an object its watch events are judged by: changes to anything else wake
/// nothing.
pub trait Fingerprint {
    /// A digest of what matters.
    fn fingerprint(&self) -> u64;
}

impl Fingerprint for Node {
    fn fingerprint(&self) -> u64 {
        fingerprint(self)
    }
}

/// A policy's spec (its generation) and whether it is being deleted; not its status.
impl Fingerprint for UpdatePolicy {
    fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.metadata.generation.hash(&mut hasher);
        self.metadata.deletion_timestamp.is_some().hash(&mut hasher);
        // What pools promoted after this one read of its status: its completion and
        // whether it is halted or invalid (rare changes; any other status write wakes
        // nothing).
        if let Some(status) = &self.status {
            status
                .completed
                .as_ref()
                .map(|c| (&c.version, c.since.0))
                .hash(&mut hasher);
            for c in status.conditions.iter().filter(|c| {
                c.type_ == crds::policy::condition::HALTED
                    || c.type_ == crds::policy::condition::INVALID_SPEC
            }) {
                (&c.type_, &c.status).hash(&mut hasher);
            }
        }
        hasher.finish()
    }
}

/// Strips a Node to what baton reads: metadata without managed fields, the spec's
/// `unschedulable`, the `Ready` condition, and a control-plane node's internal
/// addresses (to find its etcd member by peer address). Images, the other addresses,
/// capacity, node info and the other conditions dominate a Node's size and baton reads
/// none of them.
pub fn slim(node: &mut Node) {
    let control_plane = rollout::etcd::is_control_plane(node.labels());
    node.managed_fields_mut().clear();
    if let Some(spec) = node.spec.as_mut() {
        *spec = NodeSpec {
            unschedulable: spec.unschedulable,
            ..Default::default()
        };
    }
    if let Some(status) = node.status.as_mut() {
        let ready = status
            .conditions
            .take()
            .map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect());
        let addresses = status
            .addresses
            .take()
            .filter(|_| control_plane)
            .map(|a| a.into_iter().filter(|a| a.type_ == "InternalIP").collect());
        *status = NodeStatus {
            conditions: ready,
            addresses,
            ..Default::default()
        };
    }
}

/// A digest of everything baton's decisions read from a Node: labels, annotations,
/// creation, deletion, `unschedulable` and whether it is Ready. Heartbeat timestamps
/// and the resourceVersion are left out on purpose.
pub fn fingerprint(node: &Node) -> u64 {
    let mut hasher = DefaultHasher::new();
    node.metadata.labels.hash(&mut hasher);
    node.metadata.annotations.hash(&mut hasher);
    node.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .hash(&mut hasher);
    node.metadata.deletion_timestamp.is_some().hash(&mut hasher);
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .hash(&mut hasher);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.as_str());
    ready.hash(&mut hasher);
    hasher.finish()
}

/// Remembers each object's fingerprint and admits only the watch events that matter:
/// a new object, a change of its fingerprint, a deletion, and every event of a relist
/// (which also forgets objects deleted while the watch was down).
#[derive(Debug)]
pub struct Changes<K = Node> {
    seen: HashMap<String, u64>,
    relisted: Option<HashMap<String, u64>>,
    kind: std::marker::PhantomData<fn(&K)>,
}

impl<K> Default for Changes<K> {
    fn default() -> Self {
        Changes {
            seen: HashMap::new(),
            relisted: None,
            kind: std::marker::PhantomData,
        }
    }
}

impl<K: Fingerprint + kube::Resource> Changes<K> {
    /// Whether `event` should trigger a reconcile; records what it shows.
    pub fn admit(&mut self, event: &Event<K>) -> bool {
        match event {
            Event::Apply(object) => {
                let print = object.fingerprint();
                self.seen.insert(object.name_any(), print) != Some(print)
            }
            Event::Delete(object) => {
                self.seen.remove(&object.name_any());
                true
            }
            Event::Init => {
                self.relisted = Some(HashMap::new());
                true
            }
            Event::InitApply(object) => {
                if let Some(relisted) = self.relisted.as_mut() {
                    relisted.insert(object.name_any(), object.fingerprint());
                }
                true
            }
            Event::InitDone => {
                if let Some(relisted) = self.relisted.take() {
                    self.seen = relisted;
                }
                true
            }
        }
    }

    /// How many objects are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no object is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::NodeCondition,
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;

    fn node(name: &str, ready: &str, heartbeat: &str, version: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    last_heartbeat_time: Some(Time(heartbeat.parse().unwrap())),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn relist(changes: &mut Changes, nodes: &[Node]) {
        assert!(changes.admit(&Event::Init));
        for n in nodes {
            assert!(changes.admit(&Event::InitApply(n.clone())));
        }
        assert!(changes.admit(&Event::InitDone));
    }

    #[test]
    fn heartbeats_are_not_admitted_but_what_baton_reads_is() {
        let mut changes = Changes::default();
        let a = node("a", "True", "2026-01-01T00:00:00Z", "1");
        relist(&mut changes, std::slice::from_ref(&a));
        let beat = node("a", "True", "2026-01-01T00:00:40Z", "2");
        assert!(!changes.admit(&Event::Apply(beat.clone())), "a heartbeat");
        let mut annotated = beat.clone();
        annotated
            .annotations_mut()
            .insert(crds::protocol::STATE.name.into(), "Idle".into());
        assert!(
            changes.admit(&Event::Apply(annotated.clone())),
            "an annotation"
        );
        assert!(
            !changes.admit(&Event::Apply(annotated.clone())),
            "the same again"
        );
        let mut cordoned = annotated.clone();
        cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
        assert!(changes.admit(&Event::Apply(cordoned)), "a cordon");
        assert!(
            changes.admit(&Event::Apply(node(
                "a",
                "False",
                "2026-01-01T00:01:20Z",
                "3"
            ))),
            "NotReady"
        );
        let mut labelled = node("a", "False", "2026-01-01T00:01:20Z", "4");
        labelled.labels_mut().insert("pool".into(), "web".into());
        assert!(changes.admit(&Event::Apply(labelled)), "a label");
    }

    #[test]
    fn new_and_deleted_nodes_are_admitted_and_a_relist_forgets_the_gone() {
        let mut changes = Changes::default();
        relist(
            &mut changes,
            &[node("a", "True", "2026-01-01T00:00:00Z", "1")],
        );
        assert!(changes.admit(&Event::Apply(node(
            "b",
            "True",
            "2026-01-01T00:00:00Z",
            "2"
        ))));
        assert_eq!(changes.len(), 2);
        // Deletion: the last state of the object, unchanged, must still count.
        assert!(changes.admit(&Event::Delete(node(
            "b",
            "True",
            "2026-01-01T00:00:00Z",
            "2"
        ))));
        assert_eq!(changes.len(), 1);
        assert!(changes.admit(&Event::Apply(node(
            "c",
            "True",
            "2026-01-01T00:00:00Z",
            "3"
        ))));
        // "a" was deleted while the watch was down: the relist shows only "c".
        relist(
            &mut changes,
            &[node("c", "True", "2026-01-01T00:00:00Z", "3")],
        );
        assert_eq!(changes.len(), 1);
        assert!(!changes.admit(&Event::Apply(node(
            "c",
            "True",
            "2026-01-01T00:09:00Z",
            "9"
        ))));
    }

    #[test]
    fn slimming_keeps_what_the_fingerprint_reads() {
        let mut n = node("a", "True", "2026-01-01T00:00:00Z", "1");
        n.labels_mut().insert("pool".into(), "web".into());
        n.spec.as_mut().unwrap().unschedulable = Some(true);
        n.spec.as_mut().unwrap().provider_id = Some("kwok://a".into());
        let before = fingerprint(&n);
        slim(&mut n);
        assert_eq!(fingerprint(&n), before);
        assert_eq!(n.spec.as_ref().unwrap().provider_id, None);
    }

    #[test]
    fn a_policys_spec_change_or_deletion_is_admitted_and_its_status_writes_are_not() {
        let policy = |generation: i64, failed: u32| {
            let mut p = UpdatePolicy::new(
                "night",
                serde_json::from_value(serde_json::json!({})).unwrap(),
            );
            p.metadata.generation = Some(generation);
            p.status = Some(crds::UpdatePolicyStatus {
                failed,
                ..Default::default()
            });
            p
        };
        let mut changes = Changes::<UpdatePolicy>::default();
        assert!(changes.admit(&Event::Apply(policy(1, 0))), "a new policy");
        assert!(
            !changes.admit(&Event::Apply(policy(1, 1))),
            "a status write"
        );
        assert!(changes.admit(&Event::Apply(policy(2, 1))), "a spec change");
        let mut deleting = policy(3, 1);
        deleting.metadata.deletion_timestamp = Some(Time("2026-01-01T00:00:00Z".parse().unwrap()));
        assert!(
            changes.admit(&Event::Apply(deleting.clone())),
            "being deleted"
        );
        assert!(changes.admit(&Event::Delete(deleting)), "gone");
    }
}
