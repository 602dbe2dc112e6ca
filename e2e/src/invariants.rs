//! The invariant watcher: records every node transition and every reboot Lease from
//! watches, and checks baton's safety rules over a whole run:
//!
//! - the budget: never more nodes disrupted (cordoned, rebooting or verifying) at once
//!   than allowed;
//! - windows: no disruption starts (a Lease created or a node cordoned) while the
//!   window is closed;
//! - leases: a node never reboots (its boot id changes) without holding a Lease, and
//!   every Lease ends with its node done, failed or deleted;
//! - halting: once failures reach the limit, no new Lease is granted.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{Api, Client, ResourceExt, runtime::watcher};

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
    /// The most nodes disrupted at once.
    pub max_disrupted: usize,
    /// Nodes marked failed.
    pub failures: BTreeSet<String>,
    /// Broken rules, in the order seen.
    pub violations: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} node events, {} state transitions, {} grants, {} releases, {} reboots, at most {} disrupted at once, {} failed, {} violations",
            self.node_events,
            self.transitions,
            self.grants,
            self.releases,
            self.reboots,
            self.max_disrupted,
            self.failures.len(),
            self.violations.len()
        )
    }
}

#[derive(Default)]
struct State {
    report: Report,
    nodes: BTreeMap<String, Node>,
    leases: BTreeSet<String>,
    /// Nodes that held a lease at some point since their last boot.
    leased_this_boot: BTreeSet<String>,
}

/// A running watcher.
pub struct Watcher {
    state: Arc<Mutex<State>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    budget: usize,
    max_failed: usize,
}

fn disrupted(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
        || matches!(
            node.annotations()
                .get("baton.dev/state")
                .map(String::as_str),
            Some("Rebooting" | "Verifying")
        )
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let state = Arc::new(Mutex::new(State::default()));
        let window = window.unwrap_or_else(|| Arc::new(|_| true));
        let nodes_task = {
            let (state, window) = (Arc::clone(&state), Arc::clone(&window));
            let api: Api<Node> = Api::all(client.clone());
            tokio::spawn(async move {
                let mut events = watcher(api, watcher::Config::default()).boxed();
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let mut s = lock(&state);
                    match event {
                        watcher::Event::Apply(node) | watcher::Event::InitApply(node) => {
                            s.observe_node(node, budget, &window)
                        }
                        watcher::Event::Delete(node) => {
                            s.nodes.remove(&node.name_any());
                        }
                        _ => {}
                    }
                }
            })
        };
        let leases_task = {
            let state = Arc::clone(&state);
            let api: Api<Lease> = Api::namespaced(client, namespace);
            tokio::spawn(async move {
                let config =
                    watcher::Config::default().labels("app.kubernetes.io/managed-by=baton");
                let mut events = watcher(api, config).boxed();
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let mut s = lock(&state);
                    match event {
                        watcher::Event::Apply(l) | watcher::Event::InitApply(l) => {
                            s.lease_seen(&l, max_failed, &window)
                        }
                        watcher::Event::Delete(l) => s.lease_gone(&l),
                        _ => {}
                    }
                }
            })
        };
        Watcher {
            state,
            tasks: vec![nodes_task, leases_task],
            budget,
            max_failed,
        }
    }

    /// The report so far.
    pub fn report(&self) -> Report {
        lock(&self.state).report.clone()
    }

    /// Stops watching and returns the final report, with the end-of-run checks: every
    /// remaining Lease belongs to a failed or deleted node.
    pub fn finish(self) -> Report {
        for t in &self.tasks {
            t.abort();
        }
        let mut s = lock(&self.state);
        let leftover: Vec<String> = s
            .leases
            .iter()
            .filter(|holder| {
                s.nodes
                    .get(*holder)
                    .is_some_and(|n| !n.annotations().contains_key("baton.dev/failure"))
            })
            .cloned()
            .collect();
        for holder in leftover {
            s.report.violations.push(format!(
                "lease of {holder} left behind although it did not fail"
            ));
        }
        let _ = (self.budget, self.max_failed);
        s.report.clone()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl State {
    fn observe_node(&mut self, node: Node, budget: usize, window: &WindowFn) {
        let name = node.name_any();
        self.report.node_events += 1;
        let now = Timestamp::now();
        let old = self.nodes.get(&name).cloned();
        let get = |n: &Node, k: &str| n.annotations().get(k).cloned();
        if let Some(old) = &old {
            if get(old, "baton.dev/state") != get(&node, "baton.dev/state") {
                self.report.transitions += 1;
            }
            let (before, after) = (
                get(old, "baton.dev/boot-id"),
                get(&node, "baton.dev/boot-id"),
            );
            if before.is_some() && after.is_some() && before != after {
                self.report.reboots += 1;
                if !self.leased_this_boot.contains(&name) && !self.leases.contains(&name) {
                    self.report
                        .violations
                        .push(format!("{name} rebooted without holding a lease"));
                }
                self.leased_this_boot.remove(&name);
                if self.leases.contains(&name) {
                    self.leased_this_boot.insert(name.clone());
                }
            }
            let was_cordoned = old
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            let cordoned = node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            if cordoned
                && !was_cordoned
                && get(&node, "baton.dev/cordoned").as_deref() == Some("true")
                && !window(now)
            {
                self.report
                    .violations
                    .push(format!("{name} cordoned outside the window"));
            }
        }
        if node.annotations().contains_key("baton.dev/failure") {
            self.report.failures.insert(name.clone());
        }
        self.nodes.insert(name, node);
        let now_disrupted = self.nodes.values().filter(|n| disrupted(n)).count();
        self.report.max_disrupted = self.report.max_disrupted.max(now_disrupted);
        if now_disrupted > budget {
            self.report.violations.push(format!(
                "{now_disrupted} nodes disrupted at once, budget {budget}"
            ));
        }
    }

    fn lease_seen(&mut self, lease: &Lease, max_failed: usize, window: &WindowFn) {
        let Some(holder) = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()) else {
            return;
        };
        if self.leases.insert(holder.clone()) {
            self.report.grants += 1;
            self.leased_this_boot.insert(holder.clone());
            if !window(Timestamp::now()) {
                self.report
                    .violations
                    .push(format!("{holder} granted outside the window"));
            }
            if self.report.failures.len() >= max_failed {
                self.report.violations.push(format!(
                    "{holder} granted after {} failure(s) halted the pool",
                    self.report.failures.len()
                ));
            }
        }
    }

    fn lease_gone(&mut self, lease: &Lease) {
        let Some(holder) = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()) else {
            return;
        };
        if self.leases.remove(&holder) {
            self.report.releases += 1;
            let node = self.nodes.get(&holder);
            let ok = node.is_none_or(|n| {
                let a = n.annotations();
                a.get("baton.dev/state").map(String::as_str) == Some("Done")
                    || a.contains_key("baton.dev/failure")
            });
            if !ok {
                self.report.violations.push(format!(
                    "lease of {holder} released before the node was done"
                ));
            }
        }
    }
}
