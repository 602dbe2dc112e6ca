//! What the operator keeps of Nodes, and which changes of Nodes and UpdatePolicies
//! wake it.
//!
//! On a big cluster the Node watch is the operator's whole cost: Nodes are large and
//! kubelets rewrite their status every few seconds to minutes (heartbeats, images,
//! resource figures). baton reads little of a Node, so [`Nodes`] keeps only baton's
//! view of each ([`NodeView`], read once per change, shared with every reconcile) and
//! only changes to that view trigger a reconcile. The cache is updated by every event,
//! so patches always carry the latest resourceVersion.
//!
//! Every policy's view of the others (which nodes they select, so where selectors
//! overlap) changes with any policy's spec: a new generation or a deletion of one wakes
//! all of them, while status writes wake none.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, RwLock},
};

use crds::UpdatePolicy;
use k8s_openapi::api::core::v1::Node;
use kube::{ResourceExt, runtime::watcher::Event};
use rollout::NodeView;

/// What of an object its watch events are judged by: changes to anything else wake
/// nothing.
pub trait Fingerprint {
    /// A digest of what matters.
    fn fingerprint(&self) -> u64;
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

/// What the operator keeps of one Node.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedNode {
    /// Its uid (the read-back of the operator's writes compares it).
    pub uid: Option<String>,
    /// baton's view of it, shared with every snapshot until the node changes.
    pub view: Arc<NodeView>,
    /// A control-plane node's InternalIP addresses (to find its etcd member by peer
    /// address); empty on other nodes.
    pub internal_ips: Vec<String>,
}

impl CachedNode {
    /// Reads what baton keeps of `node`.
    pub fn from_node(node: &Node) -> CachedNode {
        let internal_ips = if rollout::etcd::is_control_plane(node.labels()) {
            node.status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten())
                .filter(|a| a.type_ == "InternalIP")
                .map(|a| a.address.clone())
                .collect()
        } else {
            Vec::new()
        };
        CachedNode {
            uid: node.metadata.uid.clone(),
            view: Arc::new(NodeView::from_node(node)),
            internal_ips,
        }
    }

    /// Whether `other` differs in anything baton reads (its resourceVersion aside).
    fn differs(&self, other: &CachedNode) -> bool {
        if self.uid != other.uid || self.internal_ips != other.internal_ips {
            return true;
        }
        let (a, b) = (&*self.view, &*other.view);
        if a.resource_version == b.resource_version {
            return a != b;
        }
        let mut a = a.clone();
        a.resource_version.clone_from(&b.resource_version);
        a != *b
    }
}

/// The operator's Node cache, filled by the Node watch ([`Nodes::apply`]) and read by
/// every reconcile. Cloning it shares it.
#[derive(Debug, Clone)]
pub struct Nodes {
    inner: Arc<RwLock<Known<Arc<CachedNode>>>>,
    ready: Arc<tokio::sync::watch::Sender<bool>>,
}

/// What a watch has shown, by name: each object's `V`, and a relist's objects until
/// the relist is complete (it then replaces them, forgetting the objects deleted while
/// the watch was down).
#[derive(Debug)]
struct Known<V> {
    current: HashMap<String, V>,
    /// A relist in progress: the objects listed so far.
    relisted: Option<HashMap<String, V>>,
}

impl<V> Default for Known<V> {
    fn default() -> Self {
        Known {
            current: HashMap::new(),
            relisted: None,
        }
    }
}

impl<V> Known<V> {
    /// Records what `event` shows (`read` makes an object's `V`) and returns whether
    /// it matters: a new object, one `changed` judges changed, a deletion, and every
    /// event of a relist.
    fn apply<K: kube::Resource>(
        &mut self,
        event: &Event<K>,
        read: impl Fn(&K) -> V,
        changed: impl Fn(&V, &V) -> bool,
    ) -> bool {
        match event {
            Event::Apply(object) => {
                let new = read(object);
                match self.current.get_mut(&object.name_any()) {
                    Some(old) => {
                        let matters = changed(old, &new);
                        *old = new;
                        matters
                    }
                    None => {
                        self.current.insert(object.name_any(), new);
                        true
                    }
                }
            }
            Event::Delete(object) => {
                self.current.remove(&object.name_any());
                true
            }
            Event::Init => {
                self.relisted = Some(HashMap::new());
                true
            }
            Event::InitApply(object) => {
                if let Some(relisted) = self.relisted.as_mut() {
                    relisted.insert(object.name_any(), read(object));
                }
                true
            }
            Event::InitDone => {
                if let Some(relisted) = self.relisted.take() {
                    self.current = relisted;
                }
                true
            }
        }
    }
}

impl Default for Nodes {
    fn default() -> Self {
        Nodes {
            inner: Arc::default(),
            ready: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

impl Nodes {
    /// Records what `event` shows and returns whether it should trigger a reconcile: a
    /// new node, a change to what baton reads of one, a deletion, and every event of a
    /// relist (which also forgets the nodes deleted while the watch was down).
    /// Heartbeats and other changes baton does not read update the cache (its
    /// resourceVersion) and wake nothing.
    pub fn apply(&self, event: &Event<Node>) -> bool {
        let admitted = self
            .inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .apply(
                event,
                |node| Arc::new(CachedNode::from_node(node)),
                |old, new| old.differs(new),
            );
        if matches!(event, Event::InitDone) {
            self.ready.send_replace(true);
        }
        admitted
    }

    /// Every node.
    pub fn state(&self) -> Vec<Arc<CachedNode>> {
        self.read().current.values().cloned().collect()
    }

    /// One node by name.
    pub fn get(&self, name: &str) -> Option<Arc<CachedNode>> {
        self.read().current.get(name).cloned()
    }

    /// How many nodes are known.
    pub fn len(&self) -> usize {
        self.read().current.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns once the first list is complete.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives as long as `self`: this cannot fail while waiting.
        let _ = ready.wait_for(|r| *r).await;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Known<Arc<CachedNode>>> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Remembers each object's fingerprint and admits only the watch events that matter:
/// a new object, a change of its fingerprint, a deletion, and every event of a relist
/// (which also forgets objects deleted while the watch was down).
#[derive(Debug)]
pub struct Changes<K> {
    seen: Known<u64>,
    kind: std::marker::PhantomData<fn(&K)>,
}

impl<K> Default for Changes<K> {
    fn default() -> Self {
        Changes {
            seen: Known::default(),
            kind: std::marker::PhantomData,
        }
    }
}

impl<K: Fingerprint + kube::Resource> Changes<K> {
    /// Whether `event` should trigger a reconcile; records what it shows.
    pub fn admit(&mut self, event: &Event<K>) -> bool {
        self.seen
            .apply(event, Fingerprint::fingerprint, |old, new| old != new)
    }

    /// How many objects are remembered.
    pub fn len(&self) -> usize {
        self.seen.current.len()
    }

    /// Whether no object is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.current.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeAddress, NodeCondition, NodeSpec, NodeStatus},
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

    fn relist(nodes: &Nodes, listed: &[Node]) {
        assert!(nodes.apply(&Event::Init));
        for n in listed {
            assert!(nodes.apply(&Event::InitApply(n.clone())));
        }
        assert!(nodes.apply(&Event::InitDone));
    }

    #[test]
    fn heartbeats_are_not_admitted_but_what_baton_reads_is() {
        let nodes = Nodes::default();
        let a = node("a", "True", "2026-01-01T00:00:00Z", "1");
        relist(&nodes, std::slice::from_ref(&a));
        let beat = node("a", "True", "2026-01-01T00:00:40Z", "2");
        assert!(!nodes.apply(&Event::Apply(beat.clone())), "a heartbeat");
        assert_eq!(
            nodes.get("a").unwrap().view.resource_version.as_deref(),
            Some("2"),
            "the cache still has the latest resourceVersion"
        );
        let mut foreign = beat.clone();
        foreign
            .annotations_mut()
            .insert("node.alpha.kubernetes.io/ttl".into(), "0".into());
        assert!(
            !nodes.apply(&Event::Apply(foreign)),
            "an annotation baton does not read"
        );
        let mut annotated = beat.clone();
        annotated
            .annotations_mut()
            .insert(crds::protocol::STATE.name.into(), "Idle".into());
        assert!(
            nodes.apply(&Event::Apply(annotated.clone())),
            "a baton annotation"
        );
        assert!(
            !nodes.apply(&Event::Apply(annotated.clone())),
            "the same again"
        );
        let mut hook = annotated.clone();
        hook.annotations_mut()
            .insert("example.com/ok".into(), "true".into());
        assert!(nodes.apply(&Event::Apply(hook)), "a hook's answer");
        let mut cordoned = annotated.clone();
        cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
        assert!(nodes.apply(&Event::Apply(cordoned)), "a cordon");
        assert!(
            nodes.apply(&Event::Apply(node(
                "a",
                "False",
                "2026-01-01T00:01:20Z",
                "3"
            ))),
            "NotReady"
        );
        let mut labelled = node("a", "False", "2026-01-01T00:01:20Z", "4");
        labelled.labels_mut().insert("pool".into(), "web".into());
        assert!(nodes.apply(&Event::Apply(labelled)), "a label");
    }

    #[test]
    fn new_and_deleted_nodes_are_admitted_and_a_relist_forgets_the_gone() {
        let nodes = Nodes::default();
        relist(&nodes, &[node("a", "True", "2026-01-01T00:00:00Z", "1")]);
        assert!(nodes.apply(&Event::Apply(node(
            "b",
            "True",
            "2026-01-01T00:00:00Z",
            "2"
        ))));
        assert_eq!(nodes.len(), 2);
        // Deletion: the last state of the object, unchanged, must still count.
        assert!(nodes.apply(&Event::Delete(node(
            "b",
            "True",
            "2026-01-01T00:00:00Z",
            "2"
        ))));
        assert_eq!(nodes.len(), 1);
        assert!(nodes.apply(&Event::Apply(node(
            "c",
            "True",
            "2026-01-01T00:00:00Z",
            "3"
        ))));
        // "a" was deleted while the watch was down: the relist shows only "c".
        relist(&nodes, &[node("c", "True", "2026-01-01T00:00:00Z", "3")]);
        assert_eq!(nodes.len(), 1);
        assert!(nodes.get("a").is_none());
        assert!(!nodes.apply(&Event::Apply(node(
            "c",
            "True",
            "2026-01-01T00:09:00Z",
            "9"
        ))));
    }

    #[test]
    fn the_cache_keeps_the_view_and_a_control_plane_nodes_internal_addresses() {
        let mut n = node("cp", "True", "2026-01-01T00:00:00Z", "1");
        n.metadata.uid = Some("u1".into());
        n.labels_mut().insert(
            "node-role.kubernetes.io/control-plane".into(),
            String::new(),
        );
        n.spec.as_mut().unwrap().unschedulable = Some(true);
        n.status.as_mut().unwrap().addresses = Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: "10.0.0.1".into(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: "cp".into(),
            },
        ]);
        let cached = CachedNode::from_node(&n);
        assert_eq!(cached.uid.as_deref(), Some("u1"));
        assert_eq!(cached.internal_ips, ["10.0.0.1"]);
        assert!(cached.view.ready && cached.view.unschedulable);
        assert_eq!(*cached.view, NodeView::from_node(&n));
        n.labels_mut().clear();
        assert!(CachedNode::from_node(&n).internal_ips.is_empty());
    }

    #[tokio::test]
    async fn the_cache_is_ready_once_the_first_list_is_complete() {
        let nodes = Nodes::default();
        let waiting = {
            let nodes = nodes.clone();
            tokio::spawn(async move { nodes.wait_until_ready().await })
        };
        assert!(nodes.apply(&Event::Init));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        relist(&nodes, &[]);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
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
