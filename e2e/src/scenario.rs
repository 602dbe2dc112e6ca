//! The system tests' one scenario driver: a local control plane with kwok nodes, the
//! invariant watcher over the whole run, agents (real `baton-agent` processes on the
//! sim or ab backend, or agents faked by the test), and operator replicas run
//! in-process so that a test can kill, restart, slow or mislead them.
//!
//! Every scenario has one UpdatePolicy, [`POLICY`], rolling its nodes from 1.0.0 to
//! 2.0.0. Tests read the node protocol through the protocol's key names, never
//! through the code that parses it, so that they check that code.
//!
//! This module is test code that the system tests share: a step that fails fails the
//! test, with the cluster's state in the message, so it panics instead of returning
//! errors.
#![allow(clippy::expect_used, clippy::panic)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use clap::Parser;
use crds::{UpdatePolicy, UpdatePolicyStatus, grant::MANAGED_BY, protocol};
use futures::StreamExt;
use harness::{
    TestCluster,
    fleet::{Fleet, FleetOptions},
};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};

use crate::invariants::{Report, Watcher, WindowFn};

/// The namespace of the operator's Leases.
pub const NAMESPACE: &str = "baton-system";
/// The name of every scenario's UpdatePolicy.
pub const POLICY: &str = "pool";
/// The version every node starts on.
pub const OLD: &str = "1.0.0";
/// The version every scenario rolls out.
pub const NEW: &str = "2.0.0";

/// What the invariant watcher holds the run to.
#[derive(Clone)]
pub struct Limits {
    /// The most nodes disrupted at once.
    pub budget: usize,
    /// The failures that halt the pool (no grant while this many have failed).
    pub max_failed: usize,
    /// When a disruption may start (default: always).
    pub window: Option<WindowFn>,
}

impl Limits {
    /// `budget` nodes at once, halting on the first failure, no window.
    pub fn budget(budget: usize) -> Limits {
        Limits {
            budget,
            max_failed: 1,
            window: None,
        }
    }
}

/// One scenario: a cluster, its nodes, the watcher, the agents and whatever the test
/// started. Dropping it stops everything.
pub struct Scenario {
    /// The control plane.
    pub cluster: TestCluster,
    /// An admin's client.
    pub client: Client,
    /// The kwok nodes, in the order they were created.
    pub names: Vec<String>,
    /// The operator replicas' metrics (one registry shared by the replicas).
    pub metrics: Arc<operator::metrics::Metrics>,
    fleet: Option<Fleet>,
    watcher: Option<Watcher>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    // Last, so the slot is freed only once the cluster has stopped.
    _slot: tokio::sync::SemaphorePermit<'static>,
}

impl Scenario {
    /// A cluster with `nodes` kwok nodes and the watcher; no agent and no operator yet.
    pub async fn bare(nodes: usize, limits: Limits) -> Scenario {
        // At most three clusters at once: on 2 cores more only makes every test slower.
        static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(3);
        let _slot = SLOTS
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let (cluster, names) = TestCluster::start_with_nodes(nodes)
            .await
            .expect("the local control plane starts");
        let client = cluster.client();
        let watcher = Watcher::start(
            client.clone(),
            NAMESPACE,
            limits.budget,
            limits.max_failed,
            limits.window,
        );
        Scenario {
            cluster,
            client,
            names,
            metrics: Arc::new(operator::metrics::Metrics::default()),
            fleet: None,
            watcher: Some(watcher),
            tasks: Vec::new(),
            _slot,
        }
    }

    /// A cluster whose nodes each run a real `baton-agent` (sim backend, staging 1 s
    /// unless `agent_args` say otherwise, machines down 1 s per reboot).
    pub async fn start(nodes: usize, budget: usize, agent_args: &[&str]) -> Scenario {
        let mut s = Scenario::bare(nodes, Limits::budget(budget)).await;
        let options = s.fleet_options(Duration::from_secs(1), agent_args);
        s.start_fleet(&options);
        s
    }

    /// A cluster whose agents are faked by the test: each asks for a reboot into
    /// [`NEW`] at once, and when granted for its boot reports `Rebooting`, "reboots"
    /// (a new boot id after `reboot`) and reports `Done` on [`NEW`]. The nodes at the
    /// indices in `lost` never come back.
    pub async fn with_fake_agents(
        nodes: usize,
        limits: Limits,
        reboot: Duration,
        lost: &[usize],
    ) -> Scenario {
        let mut s = Scenario::bare(nodes, limits).await;
        let lost = lost.iter().map(|i| s.names[*i].clone()).collect();
        let nodes = s.nodes();
        for (i, name) in s.names.iter().enumerate() {
            let boot = format!("{:08x}-0000-0000-0000-000000000001", i + 1);
            annotate(
                &nodes,
                name,
                &[
                    (protocol::STATE.name, Some("RebootRequired")),
                    (protocol::REBOOT_REQUIRED.name, Some("true")),
                    (protocol::BOOT_ID.name, Some(&boot)),
                    (protocol::CURRENT_VERSION.name, Some(OLD)),
                    (protocol::TARGET_VERSION.name, Some(NEW)),
                ],
            )
            .await;
        }
        s.tasks.push(tokio::spawn(fake_agents(nodes, reboot, lost)));
        s
    }

    /// Fleet options for this cluster's nodes: the built `baton-agent`, the admin's
    /// kubeconfig, machines down `machine_down` per reboot, sim staging 1 s unless
    /// `args` set it or choose another backend.
    pub fn fleet_options(&self, machine_down: Duration, args: &[&str]) -> FleetOptions {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if !args
            .iter()
            .any(|a| a == "--sim-stage-time" || a == "--backend")
        {
            args.extend(["--sim-stage-time".to_string(), "1s".into()]);
        }
        let binary = harness::binaries::workspace_binary("baton-agent")
            .expect("baton-agent is built (cargo run -p e2e -- test builds it)");
        FleetOptions::new(binary, self.cluster.kubeconfig(), machine_down, args)
    }

    /// Starts one agent process per node.
    pub fn start_fleet(&mut self, options: &FleetOptions) {
        self.fleet = Some(Fleet::start(&self.names, options).expect("the agents start"));
    }

    /// The agent processes.
    pub fn fleet(&self) -> &Fleet {
        self.fleet.as_ref().expect("this scenario runs real agents")
    }

    /// An operator replica named `identity` with the admin's client, restarted a second
    /// after it ends (as its Deployment would). Aborting the handle kills it for good.
    pub fn operator(&self, identity: &str) -> tokio::task::JoinHandle<()> {
        self.operator_on(self.client.clone(), identity, None)
    }

    /// [`Scenario::operator`] with its own client (a faulty one, say) and clock.
    pub fn operator_on(
        &self,
        client: Client,
        identity: &str,
        clock: Option<Arc<operator::clock::Clock>>,
    ) -> tokio::task::JoinHandle<()> {
        self.operator_with(client, replica_config(identity, &[]), clock)
    }

    /// [`Scenario::operator_on`] with a configuration of its own (see
    /// [`replica_config`]).
    pub fn operator_with(
        &self,
        client: Client,
        config: operator::config::Config,
        clock: Option<Arc<operator::clock::Clock>>,
    ) -> tokio::task::JoinHandle<()> {
        let metrics = Arc::clone(&self.metrics);
        let clock = clock.unwrap_or_else(|| Arc::new(operator::clock::Clock::system()));
        tokio::spawn(async move {
            loop {
                operator::replica::run_replica_with_clock(
                    client.clone(),
                    config.clone(),
                    Arc::clone(&metrics),
                    Arc::clone(&clock),
                )
                .await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    /// Creates the policy [`POLICY`] with `spec`, releasing [`NEW`] unless the spec
    /// names a release.
    pub async fn policy(&self, spec: serde_json::Value) {
        let mut spec = spec;
        if spec.get("release").is_none() {
            spec["release"] = serde_json::json!({
                "version": NEW, "url": "https://images.invalid/os-2.0.0.img",
                "sha256": "c".repeat(64), "signature": format!("{}==", "A".repeat(86)),
            });
        }
        let policy = UpdatePolicy::new(
            POLICY,
            serde_json::from_value(spec).expect("a valid UpdatePolicy spec"),
        );
        self.policies()
            .create(&PostParams::default(), &policy)
            .await
            .expect("the policy is admitted");
    }

    /// Creates the policy paused, waits until every agent has staged and asks for a
    /// reboot, then resumes it: the rollout then takes the nodes in
    /// [`Scenario::rollout_order`], whatever order their staging finished in.
    pub async fn policy_staged(&self, spec: serde_json::Value) {
        let mut paused = spec.clone();
        paused["paused"] = true.into();
        self.policy(paused).await;
        self.wait_requested().await;
        kubectl_baton::steer::set_policy_paused(self.client.clone(), POLICY, false)
            .await
            .expect("kubectl baton resume");
    }

    /// `kubectl baton why <node>` as the plugin computes it, from the API's objects now.
    pub async fn why(&self, node: &str) -> String {
        let policies = self
            .policies()
            .list(&ListParams::default())
            .await
            .expect("list the policies")
            .items;
        let nodes = list(&self.nodes()).await;
        let leases = self
            .leases()
            .list(&ListParams::default())
            .await
            .expect("list the Leases")
            .items;
        let blocking = std::collections::BTreeMap::new();
        let seen = kubectl_baton::why::Observed {
            policies: &policies,
            nodes: &nodes,
            leases: &leases,
            blocking: &blocking,
            now: jiff::Timestamp::now(),
        };
        kubectl_baton::why::render(node, &seen, None).expect("the node exists")
    }

    /// Waits until every agent has staged and asks for a reboot.
    pub async fn wait_requested(&self) {
        let nodes = self.nodes();
        self.cluster
            .wait_for("every agent to ask for a reboot", || async {
                list(&nodes)
                    .await
                    .iter()
                    .all(|n| state(n) == Some("RebootRequired"))
            })
            .await
            .expect("every agent stages");
    }

    /// Every Node.
    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Every UpdatePolicy.
    pub fn policies(&self) -> Api<UpdatePolicy> {
        Api::all(self.client.clone())
    }

    /// The Leases in [`NAMESPACE`] (baton's and the leader election's).
    pub fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    /// baton's reboot Leases held now.
    pub async fn reboot_leases(&self) -> Vec<Lease> {
        self.leases()
            .list(&reboot_leases())
            .await
            .expect("list the Leases")
            .items
    }

    /// The policy's status now.
    pub async fn status(&self) -> UpdatePolicyStatus {
        self.policies()
            .get_opt(POLICY)
            .await
            .expect("get the policy")
            .and_then(|p| p.status)
            .unwrap_or_default()
    }

    /// Whether the policy has the condition `type_` True.
    pub async fn condition(&self, type_: &str) -> bool {
        self.status()
            .await
            .conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    }

    /// Waits until the policy has the condition `type_` True.
    pub async fn wait_condition(&self, type_: &str) {
        let waited = self
            .cluster
            .wait_for(&format!("the pool's {type_} condition"), || {
                self.condition(type_)
            })
            .await;
        self.or_dump(waited).await;
    }

    /// The Events with `reason`, as "object: note".
    pub async fn events(&self, reason: &str) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(self.client.clone());
        events
            .list(&ListParams::default())
            .await
            .expect("list the Events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| {
                format!(
                    "{}: {}",
                    e.regarding.and_then(|r| r.name).unwrap_or_default(),
                    e.note.unwrap_or_default()
                )
            })
            .collect()
    }

    /// Waits (up to four minutes: fault scenarios slow a rollout down on purpose)
    /// until every node but those in `except` is Done on [`NEW`], uncordoned and
    /// without baton's marks, and no reboot Lease is left.
    pub async fn wait_done(&self, except: &[String]) {
        let nodes = self.nodes();
        let waited = self
            .cluster
            .wait_for_within(
                "every node Done on 2.0.0 with no lease left",
                Duration::from_secs(240),
                Duration::from_millis(200),
                || async {
                    self.reboot_leases().await.is_empty()
                        && list(&nodes).await.iter().all(|n| {
                            except.contains(&n.name_any())
                                || (state(n) == Some("Done")
                                    && version(n) == Some(NEW)
                                    && !unschedulable(n)
                                    && annotation(n, protocol::CORDONED.name).is_none())
                        })
                },
            )
            .await;
        self.or_dump(waited).await;
    }

    /// Panics with [`Scenario::dump`] when a wait failed.
    async fn or_dump(&self, waited: harness::Result<()>) {
        if let Err(e) = waited {
            panic!("{e}\n{}", self.dump().await);
        }
    }

    /// Every node's marks, the Leases and the policy status, for a failure message.
    pub async fn dump(&self) -> String {
        {
            let mut out = String::new();
            for n in list(&self.nodes()).await {
                out.push_str(&format!(
                    "{} {:?} {:?} cordoned={} failure={:?}\n",
                    n.name_any(),
                    state(&n),
                    version(&n),
                    unschedulable(&n),
                    annotation(&n, protocol::FAILURE.name)
                ));
            }
            for l in self
                .leases()
                .list(&ListParams::default())
                .await
                .into_iter()
                .flat_map(|l| l.items)
            {
                out.push_str(&format!("lease {} {:?}\n", l.name_any(), l.annotations()));
            }
            out.push_str(&format!("{:?}\n", self.status().await));
            out
        }
    }

    /// Puts a pod on `node` that a PodDisruptionBudget never lets go, so that baton's
    /// drain of that node stays in progress until its timeout. Returns the pod's name
    /// (in namespace `app`).
    pub async fn unevictable_pod(&self, node: &str) -> String {
        let app = format!("ledger-{node}");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": app, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "ledger", "image": "registry.invalid/ledger:1"}]},
        }))
        .expect("a valid Pod");
        self.app_namespace().await;
        Api::namespaced(self.client.clone(), "app")
            .create(&PostParams::default(), &pod)
            .await
            .expect("create the pod");
        self.never_evict(&app).await;
        app
    }

    /// A PodDisruptionBudget in namespace `app` that never lets a pod labelled
    /// `app=<app>` be evicted.
    pub async fn never_evict(&self, app: &str) {
        self.app_namespace().await;
        let pdb: PodDisruptionBudget = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{app}-never")},
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": app}}},
        }))
        .expect("a valid PodDisruptionBudget");
        Api::namespaced(self.client.clone(), "app")
            .create(&PostParams::default(), &pdb)
            .await
            .expect("create the PodDisruptionBudget");
    }

    /// The namespace `app`, created once.
    async fn app_namespace(&self) {
        if self.cluster.create_namespace("app").await.is_err() {
            // It exists already.
        }
    }

    /// Waits until `node` is cordoned by baton and holds its Lease (being drained).
    pub async fn wait_draining(&self, node: &str) {
        let (nodes, leases) = (self.nodes(), self.leases());
        let waited = self
            .cluster
            .wait_for(&format!("{node} to be drained"), || async {
                let n = nodes.get(node).await.expect("get the node");
                cordoned_by_baton(&n)
                    && leases
                        .get_opt(&crds::grant::lease_name(node))
                        .await
                        .expect("get the Lease")
                        .is_some()
            })
            .await;
        self.or_dump(waited).await;
    }

    /// The order the rollout takes the nodes: by zone, then oldest first, then name.
    pub async fn rollout_order(&self) -> Vec<String> {
        let mut nodes = list(&self.nodes()).await;
        nodes.sort_by_key(|n| {
            (
                n.labels().get("topology.kubernetes.io/zone").cloned(),
                n.metadata.creation_timestamp.clone().map(|t| t.0),
                n.name_any(),
            )
        });
        nodes.iter().map(|n| n.name_any()).collect()
    }

    /// `kubectl baton retry pool`, as an admin runs it.
    pub async fn retry_pool(&self) -> Vec<String> {
        kubectl_baton::steer::retry(self.client.clone(), NAMESPACE, Some(POLICY), &[])
            .await
            .expect("kubectl baton retry")
    }

    /// Sets or removes an admin's pause mark on `node`.
    pub async fn pause_node(&self, node: &str, paused: bool) {
        let patch = crds::node::NodePatch::paused(paused).to_json(None);
        self.nodes()
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch the node");
    }

    /// The watcher's report so far.
    pub fn report(&self) -> Report {
        self.watcher
            .as_ref()
            .expect("the watcher runs until finish")
            .report()
    }

    /// Stops the watcher and checks its report: no rule broken, no reboot without a
    /// live grant. The counts are printed, and appended to `$BATON_FAULTS_REPORT` when
    /// set (CI prints that file).
    pub fn finish(&mut self, name: &str) -> Report {
        let watcher = self.watcher.take().expect("finish is called once");
        finish(watcher, name)
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // The watcher's tasks stop while the control plane still answers them.
        self.watcher.take();
    }
}

/// Stops `watcher` and checks its report (see [`Scenario::finish`]).
pub fn finish(watcher: Watcher, name: &str) -> Report {
    let report = watcher.finish();
    let mut lines = vec![format!("[faults] {name}: {report}")];
    lines.extend(
        report
            .violations
            .iter()
            .map(|v| format!("[faults]   violation: {v}")),
    );
    for line in &lines {
        eprintln!("{line}");
    }
    if let Ok(path) = std::env::var("BATON_FAULTS_REPORT") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{}", lines.join("\n"));
        }
    }
    assert!(
        report.violations.is_empty(),
        "{name}: {:?}",
        report.violations
    );
    assert_eq!(report.reboots_without_grant, 0, "{name}");
    report
}

/// The configuration of an operator replica named `identity`: leader Lease 3 s,
/// renewed every second, Force drains allowed, and the `extra` flags.
pub fn replica_config(identity: &str, extra: &[String]) -> operator::config::Config {
    let flags = [
        "baton-operator",
        "--namespace",
        NAMESPACE,
        "--identity",
        identity,
        "--leader-lease-duration",
        "3s",
        "--leader-renew-interval",
        "1s",
        "--allow-force-drain=true",
    ];
    operator::config::Config::try_parse_from(
        flags
            .iter()
            .map(|f| f.to_string())
            .chain(extra.iter().cloned()),
    )
    .expect("valid operator flags")
}

/// The nodes holding a reboot Lease in `leases`' namespace now (none if the list
/// fails: for samplers that poll).
pub async fn lease_holders(leases: &Api<Lease>) -> Vec<String> {
    leases
        .list(&reboot_leases())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter_map(|l| l.spec.as_ref()?.holder_identity.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Only baton's reboot Leases (not the leader-election Lease beside them).
pub fn reboot_leases() -> ListParams {
    ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1))
}

/// Every node now.
pub async fn list(nodes: &Api<Node>) -> Vec<Node> {
    nodes
        .list(&ListParams::default())
        .await
        .expect("list the nodes")
        .items
}

/// The node's annotation `key`.
pub fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.annotations().get(key).map(String::as_str)
}

/// The state the node's agent reports.
pub fn state(node: &Node) -> Option<&str> {
    annotation(node, protocol::STATE.name)
}

/// The version the node's agent reports running.
pub fn version(node: &Node) -> Option<&str> {
    annotation(node, protocol::CURRENT_VERSION.name)
}

/// Whether the node is cordoned (by anyone).
pub fn unschedulable(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

/// Whether the node carries baton's cordon.
pub fn cordoned_by_baton(node: &Node) -> bool {
    unschedulable(node) && annotation(node, protocol::CORDONED.name) == Some("true")
}

/// Sets (or, with `None`, removes) annotations on `node`.
pub async fn annotate(nodes: &Api<Node>, node: &str, values: &[(&str, Option<&str>)]) {
    let map: BTreeMap<&str, Option<&str>> = values.iter().copied().collect();
    let patch = serde_json::json!({"metadata": {"annotations": map}});
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate the node");
}

/// The first node seen in `wanted` state, other than `not`.
pub async fn first_in_state(nodes: Api<Node>, wanted: &str, not: Option<String>) -> String {
    let mut events = watcher(nodes, watcher::Config::default())
        .applied_objects()
        .boxed();
    while let Some(Ok(n)) = events.next().await {
        if state(&n) == Some(wanted) && not.as_deref() != Some(n.name_any().as_str()) {
            return n.name_any();
        }
    }
    panic!("the node watch ended");
}

/// The fake agents of [`Scenario::with_fake_agents`].
async fn fake_agents(nodes: Api<Node>, reboot: Duration, lost: Vec<String>) {
    let mut events = watcher(nodes.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    while let Some(Ok(node)) = events.next().await {
        let (Some(ok), Some(boot)) = (
            annotation(&node, protocol::REBOOT_OK.name),
            annotation(&node, protocol::BOOT_ID.name),
        ) else {
            continue;
        };
        if ok != boot || state(&node) != Some("RebootRequired") {
            continue;
        }
        let name = node.name_any();
        annotate(&nodes, &name, &[(protocol::STATE.name, Some("Rebooting"))]).await;
        if lost.contains(&name) {
            continue;
        }
        let nodes = nodes.clone();
        let new_boot = boot.replace("-000000000001", "-000000000002");
        tokio::spawn(async move {
            tokio::time::sleep(reboot).await; // the "reboot"
            annotate(
                &nodes,
                &name,
                &[
                    (protocol::STATE.name, Some("Done")),
                    (protocol::REBOOT_REQUIRED.name, Some("false")),
                    (protocol::BOOT_ID.name, Some(&new_boot)),
                    (protocol::CURRENT_VERSION.name, Some(NEW)),
                ],
            )
            .await;
        });
    }
}
