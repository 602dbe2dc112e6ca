//! The invariant watcher: records every Node and reboot-Lease event from watches and
//! checks baton's safety rules over a whole run. The rules are judged in the order
//! etcd applied the changes (by resourceVersion; one etcd, so the order is total), not
//! in the order two watches happen to deliver them:
//!
//! - the budget: never more nodes disrupted (cordoned, rebooting or verifying) at once
//!   than allowed;
//! - windows: no disruption starts (a Lease created or a node cordoned by baton) while
//!   the window is closed (judged at arrival, on the wall clock);
//! - grants: every reboot (a boot id change) happened under a live grant: from the
//!   agent's last `Rebooting` report in the old boot to the new boot id, the node's
//!   Lease named the old boot, was not deleted, and carried no failure, and the node
//!   carried `baton.dev/reboot-ok` for that boot and baton's cordon;
//! - leases: a Lease is released only once its node is done, failed, deleted, or no
//!   longer disrupted by baton, and none is left behind at the end but a failed one;
//! - halting: while failures reach the limit, no new Lease is granted.
//!
//! It reads the wire format itself, key by key (with the protocol's key names), and
//! judges with rules of its own: it checks the code that reads and writes the
//! protocol, so it must not share that code.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};

use crds::{grant::MANAGED_BY, node::EXCLUDE_FROM_LB, protocol};

/// When the maintenance window is open (default: always).
pub type WindowFn = Arc<dyn Fn(Timestamp) -> bool + Send + Sync>;

/// What the watcher saw, and what broke.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Node events seen.
    pub node_events: usize,
    /// State transitions seen (a node's `baton.dev/state` changing).
    pub transitions: usize,
    /// Leases created (grants).
    pub grants: usize,
    /// Leases deleted (releases).
    pub releases: usize,
    /// Reboots seen (boot id changes).
    pub reboots: usize,
    /// Reboots that happened without a live grant.
    pub reboots_without_grant: usize,
    /// The most nodes disrupted at once.
    pub max_disrupted: usize,
    /// The most nodes cordoned at once (by anyone).
    pub max_cordoned: usize,
    /// The most reboot Leases held at once.
    pub max_leases: usize,
    /// Nodes in the order baton first cordoned them.
    pub cordon_order: Vec<String>,
    /// Nodes seen cordoned by baton with the load-balancer exclusion label.
    pub excluded_from_lb: Vec<String>,
    /// Each node's states, in order, without repeats.
    pub states: BTreeMap<String, Vec<String>>,
    /// Nodes marked failed.
    pub failures: BTreeSet<String>,
    /// Broken rules, in the order seen.
    pub violations: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} node events, {} state transitions, {} grants, {} releases, {} reboots ({} without a live grant), at most {} disrupted at once, {} failed, {} violations",
            self.node_events,
            self.transitions,
            self.grants,
            self.releases,
            self.reboots,
            self.reboots_without_grant,
            self.max_disrupted,
            self.failures.len(),
            self.violations.len()
        )
    }
}

/// One recorded change, in etcd's order by `rv`.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    what: What,
}

#[derive(Debug, Clone)]
enum What {
    Node(Box<Node>),
    NodeGone(String),
    Lease(Box<Lease>),
    LeaseGone(Box<Lease>),
}

#[derive(Default)]
struct Recorded {
    changes: Vec<Change>,
    /// Violations judged at arrival (windows).
    early: Vec<String>,
    node_events: usize,
}

/// A running watcher.
pub struct Watcher {
    recorded: Arc<Mutex<Recorded>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    budget: usize,
    max_failed: usize,
}

fn lock(state: &Mutex<Recorded>) -> std::sync::MutexGuard<'_, Recorded> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn rv_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn ann<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.annotations().get(key).map(String::as_str)
}

fn unschedulable(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

fn disrupted(node: &Node) -> bool {
    unschedulable(node)
        || matches!(
            ann(node, protocol::STATE.name),
            Some("Rebooting" | "Verifying")
        )
}

fn holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone())
}

impl Watcher {
    /// Starts watching Nodes and the reboot Leases in `namespace`. `budget` is the most
    /// nodes allowed disrupted at once, `max_failed` the failures that halt the pool,
    /// `window` when a disruption may start.
    pub fn start(
        client: Client,
        namespace: &str,
        budget: usize,
        max_failed: usize,
        window: Option<WindowFn>,
    ) -> Watcher {
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let window = window.unwrap_or_else(|| Arc::new(|_| true));
        let nodes_task = {
            let (recorded, window) = (Arc::clone(&recorded), Arc::clone(&window));
            let api: Api<Node> = Api::all(client.clone());
            tokio::spawn(async move {
                let mut cordoned: BTreeSet<String> = BTreeSet::new();
                // Backoff: a watch error must wait (and so yield), or a dead API server would
                // spin this task and no abort could ever stop it.
                let mut events = watcher(api, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let mut r = lock(&recorded);
                    match event {
                        watcher::Event::Apply(node) | watcher::Event::InitApply(node) => {
                            r.node_events += 1;
                            let name = node.name_any();
                            let by_baton = unschedulable(&node)
                                && ann(&node, protocol::CORDONED.name) == Some("true");
                            if by_baton
                                && cordoned.insert(name.clone())
                                && !window(Timestamp::now())
                            {
                                r.early.push(format!("{name} cordoned outside the window"));
                            }
                            if !by_baton {
                                cordoned.remove(&name);
                            }
                            r.changes.push(Change {
                                rv: rv_of(&node.metadata),
                                what: What::Node(Box::new(node)),
                            });
                        }
                        watcher::Event::Delete(node) => r.changes.push(Change {
                            rv: rv_of(&node.metadata),
                            what: What::NodeGone(node.name_any()),
                        }),
                        _ => {}
                    }
                }
            })
        };
        let leases_task = {
            let (recorded, window) = (Arc::clone(&recorded), Arc::clone(&window));
            let api: Api<Lease> = Api::namespaced(client, namespace);
            tokio::spawn(async move {
                let mut known: BTreeSet<String> = BTreeSet::new();
                let config = watcher::Config::default()
                    .labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
                let mut events = watcher(api, config).default_backoff().boxed();
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let mut r = lock(&recorded);
                    match event {
                        watcher::Event::Apply(l) | watcher::Event::InitApply(l) => {
                            if let Some(h) = holder(&l)
                                && known.insert(l.uid().unwrap_or_default())
                                && !window(Timestamp::now())
                            {
                                r.early.push(format!("{h} granted outside the window"));
                            }
                            r.changes.push(Change {
                                rv: rv_of(&l.metadata),
                                what: What::Lease(Box::new(l)),
                            });
                        }
                        watcher::Event::Delete(l) => r.changes.push(Change {
                            rv: rv_of(&l.metadata),
                            what: What::LeaseGone(Box::new(l)),
                        }),
                        _ => {}
                    }
                }
            })
        };
        Watcher {
            recorded,
            tasks: vec![nodes_task, leases_task],
            budget,
            max_failed,
        }
    }

    /// The report so far (end-of-run checks excluded).
    pub fn report(&self) -> Report {
        let r = lock(&self.recorded);
        judge(&r, self.budget, self.max_failed, false)
    }

    /// Stops watching and returns the final report, with the end-of-run checks: every
    /// remaining Lease belongs to a failed or deleted node.
    pub fn finish(self) -> Report {
        for t in &self.tasks {
            t.abort();
        }
        let r = lock(&self.recorded);
        judge(&r, self.budget, self.max_failed, true)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A reboot Lease as it stood at one moment.
#[derive(Debug, Clone)]
struct Held {
    uid: String,
    boot: Option<String>,
    failed: bool,
}

/// A reboot on its way: the node as it reported `Rebooting` (or was last seen) in the
/// boot it is leaving, and whether the grant has stayed live since.
#[derive(Debug, Clone)]
struct Leaving {
    boot: String,
    grant_live: Result<(), String>,
}

/// Replays every change in etcd's order and judges the rules.
fn judge(r: &Recorded, budget: usize, max_failed: usize, end: bool) -> Report {
    let mut report = Report {
        node_events: r.node_events,
        violations: r.early.clone(),
        ..Report::default()
    };
    let mut changes = r.changes.clone();
    changes.sort_by_key(|c| c.rv);
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut leases: BTreeMap<String, Held> = BTreeMap::new();
    let mut seen_leases: BTreeSet<String> = BTreeSet::new();
    let mut leaving: BTreeMap<String, Leaving> = BTreeMap::new();
    let mut last_rv: BTreeMap<String, u64> = BTreeMap::new();
    // (node, boot) pairs seen Rebooting: never Verifying or Done under one of them.
    let mut rebooting_boots: BTreeSet<(String, String)> = BTreeSet::new();
    for change in &changes {
        match &change.what {
            What::Node(node) => {
                let name = node.name_any();
                // A relist replays objects already seen: skip what is not newer.
                if last_rv.get(&name).is_some_and(|rv| *rv >= change.rv) {
                    continue;
                }
                last_rv.insert(name.clone(), change.rv);
                let old = nodes.insert(name.clone(), (**node).clone());
                let (before, now) = (
                    old.as_ref().and_then(|o| ann(o, protocol::BOOT_ID.name)),
                    ann(node, protocol::BOOT_ID.name),
                );
                if let Some(o) = &old
                    && ann(o, protocol::STATE.name) != ann(node, protocol::STATE.name)
                {
                    report.transitions += 1;
                }
                if let Some(state) = ann(node, protocol::STATE.name) {
                    let states = report.states.entry(name.clone()).or_default();
                    if states.last().map(String::as_str) != Some(state) {
                        states.push(state.to_string());
                    }
                    // A finished reboot is never claimed under the boot it left.
                    if let Some(b) = now.filter(|_| state == "Rebooting") {
                        rebooting_boots.insert((name.clone(), b.to_string()));
                    }
                    if matches!(state, "Verifying" | "Done")
                        && let Some(b) = now
                        && rebooting_boots.contains(&(name.clone(), b.to_string()))
                    {
                        report.violations.push(format!(
                            "{name} reported {state} under boot {b}, the boot it rebooted out of"
                        ));
                    }
                }
                let by_baton =
                    unschedulable(node) && ann(node, protocol::CORDONED.name) == Some("true");
                if by_baton && !report.cordon_order.contains(&name) {
                    report.cordon_order.push(name.clone());
                }
                if by_baton
                    && node.labels().contains_key(EXCLUDE_FROM_LB)
                    && !report.excluded_from_lb.contains(&name)
                {
                    report.excluded_from_lb.push(name.clone());
                }
                if let (Some(b), Some(n)) = (before, now)
                    && b != n
                {
                    report.reboots += 1;
                    let verdict = match leaving.remove(&name) {
                        Some(l) if l.boot == b => l.grant_live,
                        _ => live(old.as_ref(), leases.get(&name), b),
                    };
                    if let Err(why) = verdict {
                        report.reboots_without_grant += 1;
                        report.violations.push(format!(
                            "{name} rebooted out of boot {b} without a live grant: {why}"
                        ));
                    }
                }
                // Rebooting in this boot: the grant must be live now and stay live until
                // the new boot shows. Any other state in this boot: no reboot is on its
                // way (a refused grant, say); a later one reports Rebooting again.
                if let Some(b) = now {
                    if ann(node, protocol::STATE.name) == Some("Rebooting") {
                        let grant_live = live(Some(node), leases.get(&name), b);
                        leaving.insert(
                            name.clone(),
                            Leaving {
                                boot: b.to_string(),
                                grant_live,
                            },
                        );
                    } else {
                        leaving.remove(&name);
                    }
                }
                if ann(node, protocol::FAILURE.name).is_some() {
                    report.failures.insert(name.clone());
                }
                let disrupted_now = nodes.values().filter(|n| disrupted(n)).count();
                report.max_disrupted = report.max_disrupted.max(disrupted_now);
                let cordoned_now = nodes.values().filter(|n| unschedulable(n)).count();
                report.max_cordoned = report.max_cordoned.max(cordoned_now);
                if disrupted_now > budget {
                    report.violations.push(format!(
                        "{disrupted_now} nodes disrupted at once, budget {budget}"
                    ));
                }
            }
            What::NodeGone(name) => {
                nodes.remove(name);
                leaving.remove(name);
            }
            What::Lease(lease) => {
                let Some(h) = holder(lease) else { continue };
                let uid = lease.uid().unwrap_or_default();
                let held = Held {
                    uid: uid.clone(),
                    boot: lease
                        .annotations()
                        .get(protocol::lease::GRANTED_BOOT_ID.name)
                        .cloned(),
                    failed: lease.annotations().contains_key(protocol::FAILURE.name),
                };
                if held.failed {
                    report.failures.insert(h.clone());
                    end_grant(&mut leaving, &h, "its Lease recorded a failure");
                }
                if seen_leases.insert(uid) {
                    report.grants += 1;
                    let failed_now = failed_nodes(&nodes, &leases);
                    if failed_now >= max_failed {
                        report.violations.push(format!(
                            "{h} granted while {failed_now} failure(s) halted the pool"
                        ));
                    }
                }
                leases.insert(h, held);
                report.max_leases = report.max_leases.max(leases.len());
            }
            What::LeaseGone(lease) => {
                let Some(h) = holder(lease) else { continue };
                if leases
                    .get(&h)
                    .is_some_and(|l| Some(&l.uid) == lease.uid().as_ref())
                {
                    leases.remove(&h);
                    report.releases += 1;
                    end_grant(&mut leaving, &h, "its Lease was deleted");
                    let ok = nodes.get(&h).is_none_or(|n| {
                        ann(n, protocol::STATE.name) == Some("Done")
                            || ann(n, protocol::FAILURE.name).is_some()
                            || !(ann(n, protocol::CORDONED.name) == Some("true")
                                && unschedulable(n)
                                || ann(n, protocol::REBOOT_OK.name).is_some()
                                || matches!(
                                    ann(n, protocol::STATE.name),
                                    Some("Rebooting" | "Verifying")
                                ))
                    });
                    if !ok {
                        report.violations.push(format!(
                            "lease of {h} released while its node was still disrupted by baton"
                        ));
                    }
                }
            }
        }
    }
    if end {
        for (h, held) in &leases {
            let failed = held.failed
                || nodes
                    .get(h)
                    .is_some_and(|n| ann(n, protocol::FAILURE.name).is_some());
            if nodes.contains_key(h) && !failed {
                report
                    .violations
                    .push(format!("lease of {h} left behind although it did not fail"));
            }
        }
    }
    report
}

/// A grant that ends while a reboot is on its way: the reboot, if it comes, had none.
fn end_grant(leaving: &mut BTreeMap<String, Leaving>, node: &str, why: &str) {
    if let Some(l) = leaving.get_mut(node)
        && l.grant_live.is_ok()
    {
        l.grant_live = Err(why.to_string());
    }
}

/// Whether `node` (as last seen) held a live grant for `boot`.
fn live(node: Option<&Node>, lease: Option<&Held>, boot: &str) -> Result<(), String> {
    let Some(lease) = lease else {
        return Err("no Lease".into());
    };
    if lease.boot.as_deref() != Some(boot) {
        return Err(format!("the Lease names boot {:?}", lease.boot));
    }
    if lease.failed {
        return Err("the Lease records a failure".into());
    }
    let Some(node) = node else {
        return Err("the node was not seen".into());
    };
    if ann(node, protocol::REBOOT_OK.name) != Some(boot) {
        return Err(format!(
            "{} is {:?}",
            protocol::REBOOT_OK.name,
            ann(node, protocol::REBOOT_OK.name)
        ));
    }
    if !(unschedulable(node) && ann(node, protocol::CORDONED.name) == Some("true")) {
        return Err("baton's cordon is not on the node".into());
    }
    Ok(())
}

/// Failures that count now: nodes marked failed and failed Leases (of deleted nodes
/// too), each node once.
fn failed_nodes(nodes: &BTreeMap<String, Node>, leases: &BTreeMap<String, Held>) -> usize {
    let mut failed: BTreeSet<&str> = nodes
        .iter()
        .filter(|(_, n)| ann(n, protocol::FAILURE.name).is_some())
        .map(|(name, _)| name.as_str())
        .collect();
    failed.extend(
        leases
            .iter()
            .filter(|(_, l)| l.failed)
            .map(|(h, _)| h.as_str()),
    );
    failed.len()
}
