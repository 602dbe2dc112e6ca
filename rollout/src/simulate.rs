//! A model cluster driven by [`decide`](crate::decide()): agents that reboot in a
//! given time, drains that finish at once and hooks that answer at once. It backs
//! `kubectl baton plan` and the property tests; it is a model, not the operator.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

use crds::{
    AgentState, OnTimeout,
    protocol::{BootId, Version},
};

use crate::{
    decide,
    plan::{Action, Plan},
    policy::Policy,
    snapshot::{LeaseView, NodeView, Snapshot},
    window::WindowState,
};

/// The model cluster.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// Its nodes.
    pub nodes: Vec<NodeView>,
    /// Its reboot leases.
    pub leases: Vec<LeaseView>,
    /// Where the operator runs.
    pub operator_node: Option<String>,
    /// Nodes whose next boot falls back to the old version.
    pub roll_back_on_boot: Vec<String>,
    /// Its etcd, as the quorum guard sees it: a member is down while its node reboots,
    /// and leadership moves when told to (or, when its node goes down, by election).
    pub etcd: crate::etcd::Etcd,
    /// Nodes that went down while their etcd member led (the guard should prevent it).
    pub leaders_rebooted: Vec<String>,
    reboots: BTreeMap<String, Timestamp>,
    boots: u64,
}

/// Something that happened to a node in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When.
    pub at: Timestamp,
    /// Which node.
    pub node: String,
    /// What.
    pub what: EventKind,
}

/// The kinds of [`Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// Granted a lease, in the window stretch that closes then (`None`: always open).
    Granted {
        /// When the window stretch the grant fell in closes.
        window_closes: Option<Timestamp>,
    },
    /// Its reboot started.
    Rebooting,
    /// It came back up.
    Booted,
    /// Its lease was released after the update.
    Released,
    /// It was marked failed.
    Failed(String),
}

impl World {
    /// A world of `n` nodes named `node-01`…, in `zones` zones round-robin, each on
    /// version `from` and asking to reboot into `to`.
    pub fn requesting(n: usize, zones: usize, from: &str, to: &str) -> World {
        let mut world = World::default();
        for i in 0..n {
            let name = format!("node-{:02}", i + 1);
            let zone = format!("zone-{}", (b'a' + (i % zones.max(1)) as u8) as char);
            let boot = world.new_boot();
            world.nodes.push(NodeView {
                labels: BTreeMap::from([("topology.kubernetes.io/zone".to_string(), zone)]),
                created: Timestamp::from_second(i as i64).ok(),
                ready: true,
                agent: crate::snapshot::AgentView {
                    state: Some(AgentState::RebootRequired),
                    current_version: Version::new(from).ok(),
                    target_version: Version::new(to).ok(),
                    boot_id: Some(boot),
                    reboot_required: true,
                    ..Default::default()
                },
                name,
                ..Default::default()
            });
        }
        world
    }

    /// A what-if world: the given nodes as they are (Ready, cordoned, paused, failed),
    /// each asking to reboot into `target` from a fresh boot.
    pub fn what_if(nodes: Vec<NodeView>, target: &str) -> World {
        let mut world = World::default();
        for mut node in nodes {
            node.agent.boot_id = Some(world.new_boot());
            node.agent.state = Some(AgentState::RebootRequired);
            node.agent.reboot_required = true;
            node.agent.target_version = Version::new(target).ok();
            node.agent.reboot_ok = None;
            node.malformed.clear();
            world.nodes.push(node);
        }
        world
    }

    /// The member on `node` goes down with it; if it led, another healthy one is
    /// elected.
    fn member_down(&mut self, node: &str) {
        let crate::etcd::Etcd::Members(members) = &mut self.etcd else {
            return;
        };
        let Some(i) = members.iter().position(|m| m.node.as_deref() == Some(node)) else {
            return;
        };
        if members[i].leader {
            self.leaders_rebooted.push(node.to_string());
            if let Some(next) = members.iter().position(|m| m.healthy && !m.leader) {
                members[next].leader = true;
            }
        }
        let m = &mut members[i];
        m.healthy = false;
        m.leader = false;
        m.problem = Some("rebooting".into());
    }

    /// The member on `node` rejoins, caught up (and leads if no one does, as a
    /// single-member etcd does after its reboot).
    fn member_up(&mut self, node: &str) {
        let crate::etcd::Etcd::Members(members) = &mut self.etcd else {
            return;
        };
        let index = members.iter().filter_map(|m| m.raft_index).max();
        let leaderless = !members.iter().any(|m| m.leader);
        if let Some(m) = members.iter_mut().find(|m| m.node.as_deref() == Some(node)) {
            m.healthy = true;
            m.problem = None;
            m.raft_index = index;
            m.leader = leaderless;
        }
    }

    fn new_boot(&mut self) -> BootId {
        self.boots += 1;
        // Infallible: 32 hex digits.
        BootId::new(format!("{:032x}", self.boots)).unwrap_or_else(|_| unreachable!())
    }

    /// What `decide` sees.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            nodes: self
                .nodes
                .iter()
                .cloned()
                .map(std::sync::Arc::new)
                .collect(),
            leases: self.leases.clone(),
            operator_node: self.operator_node.clone(),
            etcd: self.etcd.clone(),
            ..Default::default()
        }
    }

    /// Deletes `name`'s lease (at index `lease`) and ends its grant.
    fn release(
        &mut self,
        name: &str,
        lease: Option<usize>,
        now: Timestamp,
        events: &mut Vec<Event>,
    ) {
        if let Some(i) = lease {
            self.leases.remove(i);
        }
        if let Some(n) = self.node_mut(name) {
            n.agent.reboot_ok = None;
        }
        events.push(Event {
            at: now,
            node: name.into(),
            what: EventKind::Released,
        });
    }

    /// A node by name.
    pub fn node_mut(&mut self, name: &str) -> Option<&mut NodeView> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    /// The next moment a reboot in flight completes.
    pub fn next_boot(&self) -> Option<Timestamp> {
        self.reboots.values().min().copied()
    }

    /// Completes every reboot due by `now`.
    pub fn advance(&mut self, now: Timestamp) -> Vec<Event> {
        let due: Vec<String> = self
            .reboots
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(n, _)| n.clone())
            .collect();
        let mut events = Vec::new();
        for name in due {
            self.reboots.remove(&name);
            let boot = self.new_boot();
            let roll_back = self.roll_back_on_boot.contains(&name);
            let target = self
                .leases
                .iter()
                .find(|l| l.node == name)
                .and_then(|l| l.target_version.clone());
            self.member_up(&name);
            if let Some(node) = self.node_mut(&name) {
                node.agent.boot_id = Some(boot);
                node.ready = true;
                node.agent.reboot_required = false;
                if roll_back {
                    node.agent.state = Some(AgentState::RolledBack);
                    node.agent.message = Some("booted the old slot".into());
                } else {
                    node.agent.state = Some(AgentState::Done);
                    node.agent.current_version = target.or(node.agent.target_version.clone());
                }
                events.push(Event {
                    at: now,
                    node: name,
                    what: EventKind::Booted,
                });
            }
        }
        events
    }

    /// Performs a plan as the operator and the agents would, instantly. Returns what
    /// happened and whether anything changed.
    pub fn apply(
        &mut self,
        plan: &Plan,
        policy: &Policy,
        now: Timestamp,
        reboot_time: &dyn Fn(&str) -> SignedDuration,
    ) -> (Vec<Event>, bool) {
        let mut events = Vec::new();
        let mut changed = false;
        for step in &plan.nodes {
            let name = step.node.as_str();
            let lease = self.leases.iter().position(|l| l.node == name);
            match &step.action {
                Action::Grant {
                    boot_id,
                    target_version,
                    drain,
                    ..
                } => {
                    let target = target_version.clone();
                    self.leases.push(LeaseView {
                        name: format!("baton-reboot-{name}"),
                        uid: None,
                        resource_version: None,
                        node: name.to_string(),
                        policy: policy.name.clone(),
                        acquired: now,
                        granted_boot_id: Some(boot_id.clone()),
                        target_version: target,
                        // The same step starts the drain (the model's drains are
                        // instant).
                        drain_started: drain.then_some(now),
                        drained: drain.then_some(now),
                        done: None,
                        failure: None,
                    });
                    // The operator cordons in the same step.
                    if let Some(n) = self.node_mut(name) {
                        n.unschedulable = true;
                        n.cordoned_by_baton = true;
                    }
                    let window_closes = match plan.window {
                        WindowState::Open { closes } => Some(closes),
                        _ => None,
                    };
                    events.push(Event {
                        at: now,
                        node: name.into(),
                        what: EventKind::Granted { window_closes },
                    });
                }
                Action::Cordon => {
                    if let Some(n) = self.node_mut(name) {
                        n.unschedulable = true;
                        n.cordoned_by_baton = true;
                    }
                }
                Action::RunBeforeHooks { missing, .. } | Action::RunAfterHooks { missing, .. } => {
                    if let Some(n) = self.node_mut(name) {
                        n.true_annotations.extend(missing.iter().cloned());
                    }
                }
                Action::Drain { .. }
                | Action::DrainTimedOut(OnTimeout::Force | OnTimeout::Proceed) => {
                    if let Some(l) = lease.map(|i| &mut self.leases[i]) {
                        l.drain_started.get_or_insert(now);
                        l.drained = Some(now);
                    }
                }
                Action::DrainTimedOut(OnTimeout::Abort) => {
                    if let Some(n) = self.node_mut(name).filter(|n| n.cordoned_by_baton) {
                        n.unschedulable = false;
                        n.cordoned_by_baton = false;
                    }
                    self.fail(name, lease, "drain timed out", now, &mut events);
                }
                Action::AllowReboot { boot_id } => {
                    let back = now.checked_add(reboot_time(name)).unwrap_or(now);
                    if let Some(n) = self.node_mut(name) {
                        n.agent.reboot_ok = Some(boot_id.clone());
                        n.agent.state = Some(AgentState::Rebooting);
                        n.ready = false;
                    }
                    self.reboots.insert(name.to_string(), back);
                    self.member_down(name);
                    events.push(Event {
                        at: now,
                        node: name.into(),
                        what: EventKind::Rebooting,
                    });
                }
                Action::Finish { uncordon, release } => {
                    if let Some(n) = self.node_mut(name).filter(|_| *uncordon) {
                        n.unschedulable = false;
                        n.cordoned_by_baton = false;
                    }
                    if *release {
                        self.release(name, lease, now, &mut events);
                    } else if let Some(l) = lease.map(|i| &mut self.leases[i]) {
                        l.done = Some(now);
                    }
                }
                Action::Release(_) => self.release(name, lease, now, &mut events),
                Action::Fail { reason } => self.fail(name, lease, reason, now, &mut events),
                Action::ClearStaleGrant => {
                    if let Some(n) = self.node_mut(name) {
                        if n.cordoned_by_baton {
                            n.unschedulable = false;
                            n.cordoned_by_baton = false;
                        }
                        n.agent.reboot_ok = None;
                    }
                }
                Action::Abort { .. } => {
                    if let Some(n) = self.node_mut(name) {
                        if n.cordoned_by_baton {
                            n.unschedulable = false;
                            n.cordoned_by_baton = false;
                        }
                        n.agent.reboot_ok = None;
                    }
                    if let Some(i) = lease {
                        self.leases.remove(i);
                    }
                    events.push(Event {
                        at: now,
                        node: name.into(),
                        what: EventKind::Released,
                    });
                }
                Action::Publish { version, .. } => {
                    if let Some(n) = self.node_mut(name) {
                        n.desired_version = Some(version.clone());
                    }
                    continue;
                }
                // The model's etcd (when it has one) hands leadership over at once.
                Action::MoveLeader { to, .. } => {
                    if let crate::etcd::Etcd::Members(members) = &mut self.etcd {
                        for m in members.iter_mut() {
                            m.leader = m.name == *to;
                        }
                    }
                }
                Action::WaitForReboot { .. }
                | Action::WaitForEtcd { .. }
                | Action::Settle { .. }
                | Action::Skip(_) => continue,
            }
            changed = true;
        }
        (events, changed)
    }

    fn fail(
        &mut self,
        name: &str,
        lease: Option<usize>,
        reason: &str,
        now: Timestamp,
        events: &mut Vec<Event>,
    ) {
        if let Some(l) = lease.map(|i| &mut self.leases[i]) {
            l.failure = Some(reason.to_string());
        }
        if let Some(n) = self.node_mut(name) {
            n.failure = Some(reason.to_string());
            n.agent.reboot_ok = None;
        }
        events.push(Event {
            at: now,
            node: name.into(),
            what: EventKind::Failed(reason.into()),
        });
    }
}

/// The result of a simulated rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    /// Everything that happened, in order.
    pub events: Vec<Event>,
    /// When the simulation stopped.
    pub end: Timestamp,
    /// Whether every node finished (no lease left, none waiting).
    pub complete: bool,
}

/// Runs the model from `start` until nothing is left to do or `horizon` passes.
pub fn run(
    world: &mut World,
    policy: &Policy,
    start: Timestamp,
    horizon: Timestamp,
    reboot_time: &dyn Fn(&str) -> SignedDuration,
) -> Timeline {
    let mut now = start;
    let mut events = Vec::new();
    let mut last_plan = None;
    for _ in 0..100_000 {
        events.extend(world.advance(now));
        let plan = decide(&world.snapshot(), policy, now);
        let (happened, changed) = world.apply(&plan, policy, now, reboot_time);
        events.extend(happened);
        if changed {
            last_plan = Some(plan);
            continue;
        }
        let next = [plan.next_change, world.next_boot()]
            .into_iter()
            .flatten()
            .min();
        last_plan = Some(plan);
        match next {
            Some(t) if t <= horizon && t > now => now = t,
            _ => break,
        }
    }
    let complete = last_plan.is_some_and(|p| p.counts.waiting == 0 && p.counts.in_progress == 0)
        && world.leases.is_empty();
    Timeline {
        events,
        end: now,
        complete,
    }
}
