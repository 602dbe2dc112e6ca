//! The operator against a real control plane: kwok nodes, agents faked by the test
//! (they flip the node's boot id when granted, as a reboot would), and a watcher that
//! checks the invariants over the whole run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use clap::Parser;
use crds::UpdatePolicy;
use e2e::TestCluster;
use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::Mutex;

/// What the watcher saw over a run.
#[derive(Debug, Default)]
struct Observed {
    max_cordoned: usize,
    max_leases: usize,
    cordon_order: Vec<String>,
    /// Nodes seen cordoned with the exclude-from-external-load-balancers label.
    excluded_from_lb: Vec<String>,
}

async fn set_annotations(nodes: &Api<Node>, name: &str, values: &[(&str, &str)]) {
    let map: BTreeMap<&str, &str> = values.iter().copied().collect();
    let patch = serde_json::json!({"metadata": {"annotations": map}});
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// A fake agent per node: asks for a reboot into 2.0.0; when granted for its boot,
/// "reboots" (new boot id, after `reboot`) and reports Done on the new version. Nodes
/// in `lost` never come back.
async fn fake_agents(client: Client, names: Vec<String>, reboot: Duration, lost: Vec<String>) {
    let nodes: Api<Node> = Api::all(client);
    for (i, name) in names.iter().enumerate() {
        let boot = format!("{:08x}-0000-0000-0000-000000000001", i + 1);
        set_annotations(
            &nodes,
            name,
            &[
                ("baton.dev/state", "RebootRequired"),
                ("baton.dev/reboot-required", "true"),
                ("baton.dev/boot-id", &boot),
                ("baton.dev/current-version", "1.0.0"),
                ("baton.dev/target-version", "2.0.0"),
            ],
        )
        .await;
    }
    let mut events = watcher(nodes.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    while let Some(Ok(node)) = events.next().await {
        let a = node.annotations();
        let (Some(ok), Some(boot)) = (a.get("baton.dev/reboot-ok"), a.get("baton.dev/boot-id"))
        else {
            continue;
        };
        if ok == boot && a.get("baton.dev/state").map(String::as_str) == Some("RebootRequired") {
            set_annotations(
                &nodes,
                &node.name_any(),
                &[("baton.dev/state", "Rebooting")],
            )
            .await;
            if lost.contains(&node.name_any()) {
                continue;
            }
            let (nodes, name) = (nodes.clone(), node.name_any());
            let new_boot = boot.replace("-000000000001", "-000000000002");
            tokio::spawn(async move {
                tokio::time::sleep(reboot).await; // the "reboot"
                set_annotations(
                    &nodes,
                    &name,
                    &[
                        ("baton.dev/state", "Done"),
                        ("baton.dev/reboot-required", "false"),
                        ("baton.dev/boot-id", &new_boot),
                        ("baton.dev/current-version", "2.0.0"),
                    ],
                )
                .await;
            });
        }
    }
}

/// Records the most nodes cordoned and leases held at once.
async fn watch_invariants(client: Client, observed: Arc<Mutex<Observed>>) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "baton-system");
    let mut events = watcher(nodes.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    while let Some(Ok(node)) = events.next().await {
        let all = nodes.list(&ListParams::default()).await.unwrap().items;
        let cordoned: Vec<String> = all
            .iter()
            .filter(|n| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false)
            })
            .map(|n| n.name_any())
            .collect();
        let held = leases.list(&reboot_leases()).await.unwrap().items.len();
        let mut o = observed.lock().await;
        o.max_cordoned = o.max_cordoned.max(cordoned.len());
        o.max_leases = o.max_leases.max(held);
        if node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false)
            && !o.cordon_order.contains(&node.name_any())
        {
            o.cordon_order.push(node.name_any());
        }
        let excluded = node
            .labels()
            .contains_key("node.kubernetes.io/exclude-from-external-load-balancers");
        if excluded
            && node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false)
            && !o.excluded_from_lb.contains(&node.name_any())
        {
            o.excluded_from_lb.push(node.name_any());
        }
    }
}

/// The version a node's (fake) agent reports.
fn version(node: &Node) -> Option<&str> {
    node.annotations()
        .get("baton.dev/current-version")
        .map(String::as_str)
}

/// Reboot leases only (not the leader-election Lease beside them).
fn reboot_leases() -> ListParams {
    ListParams::default().labels("app.kubernetes.io/managed-by=baton")
}

fn replica_config(identity: &str) -> operator::config::Config {
    operator::config::Config::try_parse_from([
        "baton-operator",
        "--namespace",
        "baton-system",
        "--identity",
        identity,
        "--leader-lease-duration",
        "3s",
        "--leader-renew-interval",
        "1s",
        "--allow-force-drain=true",
    ])
    .unwrap()
}

/// A cluster with kwok nodes, fake agents, the invariant watcher and the operator.
struct Run {
    cluster: TestCluster,
    client: Client,
    names: Vec<String>,
    observed: Arc<Mutex<Observed>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    metrics: Arc<operator::metrics::Metrics>,
    // Last, so the slot is freed only once the cluster has stopped.
    _slot: tokio::sync::SemaphorePermit<'static>,
}

impl Run {
    async fn start(nodes: usize, reboot: Duration, lost: &[usize]) -> Run {
        // At most three clusters at once: on 2 cores more only makes every test slower.
        static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(3);
        let _slot = SLOTS.acquire().await.unwrap();
        let (cluster, names) = TestCluster::start_with_nodes(nodes).await.unwrap();
        let client = cluster.client();
        let observed = Arc::new(Mutex::new(Observed::default()));
        let metrics = Arc::new(operator::metrics::Metrics::default());
        let lost = lost.iter().map(|i| names[*i].clone()).collect();
        let config = replica_config("op-a");
        let tasks = vec![
            tokio::spawn(watch_invariants(client.clone(), observed.clone())),
            tokio::spawn(operator::replica::run_replica_with(
                client.clone(),
                config,
                Arc::clone(&metrics),
            )),
            tokio::spawn(fake_agents(client.clone(), names.clone(), reboot, lost)),
        ];
        Run {
            _slot,
            cluster,
            client,
            names,
            observed,
            tasks,
            metrics,
        }
    }

    async fn policy(&self, spec: serde_json::Value) {
        let policy: UpdatePolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy", "metadata": {"name": "workers"}, "spec": spec,
        }))
        .unwrap();
        Api::<UpdatePolicy>::all(self.client.clone())
            .create(&PostParams::default(), &policy)
            .await
            .unwrap();
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    async fn leases(&self) -> Vec<Lease> {
        Api::<Lease>::namespaced(self.client.clone(), "baton-system")
            .list(&reboot_leases())
            .await
            .unwrap()
            .items
    }

    async fn status(&self) -> crds::UpdatePolicyStatus {
        Api::<UpdatePolicy>::all(self.client.clone())
            .get("workers")
            .await
            .unwrap()
            .status
            .unwrap_or_default()
    }

    async fn wait_all_updated(&self, except: &[String]) {
        let nodes = self.nodes();
        self.cluster
            .wait_for(
                "every node on 2.0.0, uncordoned, with no lease left",
                || async {
                    let all = nodes.list(&ListParams::default()).await.unwrap().items;
                    self.leases().await.is_empty()
                        && all
                            .iter()
                            .filter(|n| !except.contains(&n.name_any()))
                            .all(|n| {
                                version(n) == Some("2.0.0")
                                    && !n
                                        .spec
                                        .as_ref()
                                        .and_then(|s| s.unschedulable)
                                        .unwrap_or(false)
                                    && !n.annotations().contains_key("baton.dev/cordoned")
                            })
                },
            )
            .await
            .unwrap();
    }

    async fn events(&self, reason: &str) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(self.client.clone());
        events
            .list(&ListParams::default())
            .await
            .unwrap()
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
}

impl Drop for Run {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_update_one_at_a_time() {
    let run = Run::start(5, Duration::from_millis(300), &[]).await;
    run.policy(serde_json::json!({"nodeSelector": {"matchLabels": {"type": "kwok"}}, "maxUnavailable": 1, "health": {"rebootTimeout": "2m"}})).await;
    run.wait_all_updated(&[]).await;
    run.cluster
        .wait_for("the status to count 5 updated nodes", || async {
            run.status().await.up_to_date == 5
        })
        .await
        .unwrap();
    let status = run.status().await;
    let o = run.observed.lock().await;
    eprintln!(
        "[rollout] cordon order {:?}; at most {} cordoned and {} leases at once",
        o.cordon_order, o.max_cordoned, o.max_leases
    );
    assert_eq!(o.max_cordoned, 1, "never two nodes cordoned at once");
    assert_eq!(o.max_leases, 1, "never two leases at once");
    assert_eq!(
        o.cordon_order.len(),
        5,
        "every node was cordoned once: {:?}",
        o.cordon_order
    );
    assert_eq!(
        (status.nodes, status.up_to_date, status.in_progress),
        (5, 5, 0),
        "{status:?}"
    );
    assert_eq!(run.events("Done").await.len(), 5);
    let metrics = run.metrics.encode();
    for needle in [
        "baton_nodes{policy=\"workers\",state=\"up_to_date\"} 5",
        "baton_leases_held{policy=\"workers\"} 0",
        "baton_drain_duration_seconds_count 5",
        "baton_is_leader 1",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forty_percent_budget_on_ten_nodes_never_disrupts_more_than_four() {
    let run = Run::start(10, Duration::from_secs(2), &[]).await;
    run.policy(serde_json::json!({"maxUnavailable": "40%", "ordering": {"oneZoneAtATime": false}}))
        .await;
    run.wait_all_updated(&[]).await;
    let o = run.observed.lock().await;
    eprintln!(
        "[percent] at most {} cordoned and {} leases at once",
        o.max_cordoned, o.max_leases
    );
    assert!(o.max_leases <= 4 && o.max_cordoned <= 4, "{o:?}");
    assert_eq!(o.max_leases, 4, "the budget is used in full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_comes_back_fails_at_reboot_timeout_and_halts_its_pool() {
    let run = Run::start(3, Duration::from_millis(300), &[0]).await;
    run.policy(serde_json::json!({"health": {"rebootTimeout": "5s"}}))
        .await;
    let lost = run.names[0].clone();
    let nodes = run.nodes();
    run.cluster
        .wait_for(
            "the lost node to be marked failed and the pool halted",
            || async {
                let node = nodes.get(&lost).await.unwrap();
                let halted = run
                    .status()
                    .await
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Halted" && c.status == "True");
                node.annotations()
                    .get("baton.dev/failure")
                    .is_some_and(|f| f.contains("rebootTimeout"))
                    && halted
            },
        )
        .await
        .unwrap();
    // A halted pool grants nothing more, and the failed node keeps its lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leases = run.leases().await;
    assert_eq!(leases.len(), 1);
    assert!(leases[0].annotations().get("baton.dev/failure").is_some());
    let o = run.observed.lock().await;
    assert_eq!(
        o.cordon_order,
        std::slice::from_ref(&lost),
        "no other node was touched"
    );
    let status = run.status().await;
    assert_eq!((status.failed, status.up_to_date), (1, 0), "{status:?}");
    assert!(!run.events("Failed").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admins_cordon_is_never_undone_and_its_node_is_left_alone() {
    let run = Run::start(3, Duration::from_millis(300), &[]).await;
    let admin_cordoned = run.names[0].clone();
    run.nodes()
        .patch(
            &admin_cordoned,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    run.policy(serde_json::json!({"maxUnavailable": 2})).await;
    run.wait_all_updated(std::slice::from_ref(&admin_cordoned))
        .await;
    let node = run.nodes().get(&admin_cordoned).await.unwrap();
    assert_eq!(
        node.spec.as_ref().unwrap().unschedulable,
        Some(true),
        "the admin's cordon stays"
    );
    assert_eq!(version(&node), Some("1.0.0"), "never granted");
    let o = run.observed.lock().await;
    // The admin's node counts against the budget of 2: the others went one at a time.
    assert_eq!(o.max_cordoned, 2, "{o:?}");
    assert_eq!(o.max_leases, 1, "{o:?}");
}

/// Two Ready pods, one per node, under a PodDisruptionBudget that never allows an
/// eviction.
async fn unevictable_app(run: &Run) {
    let client = run.client.clone();
    run.cluster.create_namespace("app").await.unwrap();
    Api::namespaced(client.clone(), "app")
        .create(&PostParams::default(), &e2e::workload::spread("web", 2))
        .await
        .unwrap();
    let pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-never"},
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "web"}}},
        }))
        .unwrap();
    Api::namespaced(client.clone(), "app")
        .create(&PostParams::default(), &pdb)
        .await
        .unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client, "app");
    run.cluster
        .wait_for("2 Running web pods", || async {
            let list = pods.list(&ListParams::default()).await.unwrap().items;
            list.iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count()
                == 2
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdb_that_never_allows_eviction_aborts_the_drain_and_halts_the_pool() {
    let run = Run::start(2, Duration::from_millis(300), &[]).await;
    unevictable_app(&run).await;
    run.policy(serde_json::json!({"drain": {"timeout": "5s", "onTimeout": "Abort"}}))
        .await;
    let first = run.names[0].clone();
    let nodes = run.nodes();
    run.cluster
        .wait_for("the drain to be aborted and the node failed", || async {
            let n = nodes.get(&first).await.unwrap();
            n.annotations()
                .get("baton.dev/failure")
                .is_some_and(|f| f.contains("drain timed out"))
                && !n
                    .spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false)
        })
        .await
        .unwrap();
    let blocked = run.events("DrainBlocked").await;
    eprintln!("[pdb] {blocked:?}");
    assert!(
        blocked
            .iter()
            .any(|e| e.contains("PodDisruptionBudget web-never")),
        "{blocked:?}"
    );
    run.cluster
        .wait_for("the pool to halt", || async {
            run.status()
                .await
                .conditions
                .iter()
                .any(|c| c.type_ == "Halted" && c.status == "True")
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let o = run.observed.lock().await;
    assert_eq!(
        o.cordon_order,
        std::slice::from_ref(&first),
        "no other node was touched"
    );
    let n = nodes.get(&first).await.unwrap();
    assert_eq!(version(&n), Some("1.0.0"), "Abort never reboots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_deletes_what_the_pdb_protects_and_proceed_reboots_with_it_in_place() {
    for (on_timeout, reason) in [("Force", "DrainForced"), ("Proceed", "DrainTimedOut")] {
        let run = Run::start(2, Duration::from_millis(300), &[]).await;
        unevictable_app(&run).await;
        run.policy(serde_json::json!({"drain": {"timeout": "3s", "onTimeout": on_timeout}}))
            .await;
        run.wait_all_updated(&[]).await;
        let events = run.events(reason).await;
        eprintln!("[{on_timeout}] {events:?}");
        assert!(
            events
                .iter()
                .any(|e| e.contains(&format!("onTimeout: {on_timeout}"))),
            "{events:?}"
        );
        let o = run.observed.lock().await;
        assert_eq!(o.max_cordoned, 1, "{o:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_replica_takes_over_when_the_leader_dies_mid_drain() {
    let mut run = Run::start(2, Duration::from_millis(300), &[]).await;
    unevictable_app(&run).await;
    run.policy(serde_json::json!({"drain": {"timeout": "8s", "onTimeout": "Proceed"}}))
        .await;
    let leases: Api<Lease> = Api::namespaced(run.client.clone(), "baton-system");
    let first = run.names[0].clone();
    run.cluster
        .wait_for("the first node's drain to start", || async {
            leases
                .get_opt(&format!("baton-reboot-{first}"))
                .await
                .unwrap()
                .is_some_and(|l| l.annotations().contains_key("baton.dev/drain-started-at"))
        })
        .await
        .unwrap();
    let started = leases
        .get(&format!("baton-reboot-{first}"))
        .await
        .unwrap()
        .annotations()["baton.dev/drain-started-at"]
        .clone();
    // Kill the leader (op-a, the operator task) mid-drain; start op-b.
    run.tasks[1].abort();
    run.tasks.push(tokio::spawn(operator::replica::run_replica(
        run.client.clone(),
        replica_config("op-b"),
    )));
    run.cluster
        .wait_for("op-b to lead", || async {
            leases
                .get("baton-operator-leader")
                .await
                .unwrap()
                .spec
                .and_then(|s| s.holder_identity)
                .as_deref()
                == Some("op-b")
        })
        .await
        .unwrap();
    // The drain's clock carried over: op-b did not restart it.
    if let Some(l) = leases
        .get_opt(&format!("baton-reboot-{first}"))
        .await
        .unwrap()
    {
        assert_eq!(
            l.annotations().get("baton.dev/drain-started-at"),
            Some(&started)
        );
    }
    run.wait_all_updated(&[]).await;
    let o = run.observed.lock().await;
    eprintln!("[leader] {o:?}");
    assert_eq!((o.max_cordoned, o.max_leases), (1, 1), "{o:?}");
    let leader = leases
        .get("baton-operator-leader")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert!(leader.lease_transitions.unwrap_or(0) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_is_reported_and_other_policies_carry_on() {
    let run = Run::start(3, Duration::from_millis(300), &[]).await;
    let policies: Api<UpdatePolicy> = Api::all(run.client.clone());
    // Passes the CRD's shape checks, but no such zone exists: only the operator can tell.
    let invalid: UpdatePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy", "metadata": {"name": "mars"},
        "spec": {
            "nodeSelector": {"matchLabels": {"topology.kubernetes.io/zone": "zone-a"}},
            "maintenanceWindows": [{"schedule": "0 2 * * *", "duration": "1h", "timeZone": "Mars/Olympus"}],
        },
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &invalid)
        .await
        .unwrap();
    run.policy(serde_json::json!({"nodeSelector": {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": ["zone-a"]}]}})).await;
    run.wait_all_updated(std::slice::from_ref(&run.names[0]))
        .await;
    run.cluster
        .wait_for("InvalidSpec on the invalid policy", || async {
            let status = policies
                .get("mars")
                .await
                .unwrap()
                .status
                .unwrap_or_default();
            status.conditions.iter().any(|c| {
                c.type_ == "InvalidSpec" && c.status == "True" && c.message.contains("Mars/Olympus")
            }) && status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False")
        })
        .await
        .unwrap();
    let events = run.events("InvalidSpec").await;
    assert!(
        events.iter().any(|e| e.contains("Mars/Olympus")),
        "{events:?}"
    );
    let zone_a = run.nodes().get(&run.names[0]).await.unwrap();
    assert_eq!(
        version(&zone_a),
        Some("1.0.0"),
        "the invalid policy touched nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_starts_outside_a_window_and_a_reboot_running_when_it_closes_completes() {
    // Reboots take 65 s; the window opens at the next whole minute at least 15 s away and
    // stays open 1 minute: one node starts in it and finishes after it closed.
    let run = Run::start(2, Duration::from_secs(65), &[]).await;
    let now = jiff::Timestamp::now();
    let opens = now
        .checked_add(jiff::SignedDuration::from_secs(75))
        .unwrap()
        .round(
            jiff::TimestampRound::new()
                .smallest(jiff::Unit::Minute)
                .mode(jiff::RoundMode::Trunc),
        )
        .unwrap();
    let local = opens.to_zoned(jiff::tz::TimeZone::UTC);
    let day = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
        [local.weekday().to_monday_zero_offset() as usize];
    run.policy(serde_json::json!({
        "maintenanceWindows": [{"weekdays": [day], "start": local.strftime("%H:%M").to_string(), "duration": "1m", "timeZone": "UTC"}],
        "health": {"rebootTimeout": "5m"},
    }))
    .await;
    // Closed: nothing starts, and the status says when it opens.
    run.cluster
        .wait_for("the status to show the closed window", || async {
            run.status().await.window.as_deref() == Some("Closed")
        })
        .await
        .unwrap();
    assert_eq!(run.status().await.next_window.map(|t| t.0), Some(opens));
    while jiff::Timestamp::now()
        < opens
            .checked_sub(jiff::SignedDuration::from_secs(2))
            .unwrap()
    {
        assert!(
            run.leases().await.is_empty(),
            "granted before the window opened"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Open: the first node starts; the window closes during its reboot; it completes.
    let first = run.names[0].clone();
    let nodes = run.nodes();
    run.cluster
        .wait_for("the first node to be updated", || async {
            let n = nodes.get(&first).await.unwrap();
            version(&n) == Some("2.0.0") && run.leases().await.is_empty()
        })
        .await
        .unwrap();
    let closes = opens
        .checked_add(jiff::SignedDuration::from_mins(1))
        .unwrap();
    assert!(
        jiff::Timestamp::now() > closes,
        "the reboot ran past the window's end"
    );
    // The second node waits for next week's window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = nodes.get(&run.names[1]).await.unwrap();
    assert_eq!(version(&second), Some("1.0.0"));
    assert!(run.leases().await.is_empty());
    assert_eq!(run.status().await.window.as_deref(), Some("Closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_pod_holds_its_node_back_until_it_is_gone() {
    let run = Run::start(2, Duration::from_millis(300), &[]).await;
    run.cluster.create_namespace("ops").await.unwrap();
    let blocked = run.names[0].clone();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(run.client.clone(), "ops");
    let backup: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "backup", "labels": {"app": "backup"}},
        "spec": {"nodeName": blocked, "containers": [{"name": "backup", "image": "registry.invalid/backup:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &backup).await.unwrap();
    run.cluster
        .wait_for("the backup pod to run", || async {
            pods.get("backup")
                .await
                .unwrap()
                .status
                .and_then(|s| s.phase)
                .as_deref()
                == Some("Running")
        })
        .await
        .unwrap();
    run.policy(serde_json::json!({"health": {"blockingPodSelectors": [{"matchLabels": {"app": "backup"}}]}})).await;
    // The other node goes first although the blocked one comes first in order.
    let nodes = run.nodes();
    let other = run.names[1].clone();
    run.cluster
        .wait_for("the unblocked node to be updated", || async {
            version(&nodes.get(&other).await.unwrap()) == Some("2.0.0")
                && run.leases().await.is_empty()
        })
        .await
        .unwrap();
    let held = nodes.get(&blocked).await.unwrap();
    assert_eq!(version(&held), Some("1.0.0"));
    assert!(
        run.observed.lock().await.cordon_order == [other.clone()],
        "the blocked node was never touched"
    );
    // Once the pod is gone, the node proceeds (within the 30 s recheck).
    pods.delete("backup", &Default::default()).await.unwrap();
    run.wait_all_updated(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_leave_load_balancers_while_cordoned_and_come_back_after() {
    let run = Run::start(2, Duration::from_millis(500), &[]).await;
    run.policy(serde_json::json!({"drain": {"excludeFromLoadBalancers": true}}))
        .await;
    run.wait_all_updated(&[]).await;
    let o = run.observed.lock().await;
    assert_eq!(o.excluded_from_lb.len(), 2, "{o:?}");
    for node in run
        .nodes()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
    {
        assert!(
            !node
                .labels()
                .contains_key("node.kubernetes.io/exclude-from-external-load-balancers"),
            "{} still excluded",
            node.name_any()
        );
        assert!(!node.annotations().contains_key("baton.dev/lb-excluded"));
    }
}

/// The GateClosed condition's status and message.
async fn gate_condition(run: &Run) -> Option<(String, String)> {
    run.status()
        .await
        .conditions
        .into_iter()
        .find(|c| c.type_ == "GateClosed")
        .map(|c| (c.status, c.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firing_alerts_in_a_real_prometheus_hold_new_grants_but_never_a_reboot_under_way() {
    use e2e::prometheus::{ALARM_ALERT, Alarm, Prometheus, WATCHDOG_ALERT};
    // Reboots take 20 s: longer than Prometheus needs to fire (about 2 s) plus the
    // operator's answer cache (10 s), so the alarm raised during the first reboot is
    // seen before the second grant.
    let run = Run::start(2, Duration::from_secs(20), &[]).await;
    let alarm = Alarm::start(true).await.unwrap();
    let prometheus = Prometheus::start(&alarm).await.unwrap();
    prometheus.wait_alarm(true).await.unwrap();
    assert_eq!(
        prometheus.firing().await.unwrap(),
        [ALARM_ALERT, WATCHDOG_ALERT]
    );

    // Unreachable first: the gate fails closed.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    run.policy(serde_json::json!({"health": {"prometheus": {"url": nowhere, "alertFilter": "^Watchdog$"}, "rebootTimeout": "5m"}})).await;
    run.cluster
        .wait_for("the gate to close on an unreachable Prometheus", || async {
            gate_condition(&run)
                .await
                .is_some_and(|(s, m)| s == "True" && m.contains("cannot query Prometheus"))
        })
        .await
        .unwrap();

    // The real Prometheus with the alarm firing: still closed, naming the alarm and not
    // the filtered Watchdog.
    let policies: Api<UpdatePolicy> = Api::all(run.client.clone());
    let patch = serde_json::json!({"spec": {"health": {"prometheus": {"url": prometheus.url()}}}});
    policies
        .patch("workers", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    run.cluster
        .wait_for("the gate to name the firing alert", || async {
            gate_condition(&run).await.is_some_and(|(s, m)| {
                s == "True" && m == format!("alerts firing in Prometheus: {ALARM_ALERT}")
            })
        })
        .await
        .unwrap();
    assert!(
        run.leases().await.is_empty(),
        "granted while the gate was closed"
    );
    assert!(run.observed.lock().await.cordon_order.is_empty());
    assert!(
        run.events("GateClosed")
            .await
            .iter()
            .any(|e| e.contains("cannot query Prometheus")),
        "{:?}",
        run.events("GateClosed").await
    );
    assert!(
        run.metrics
            .encode()
            .contains("baton_gate_closed{policy=\"workers\"} 1")
    );

    // Cleared: one node is granted. The alarm fires again during its reboot: that
    // reboot completes, and the other node waits.
    alarm.set(false);
    run.cluster
        .wait_for("a grant once the alarm resolved", || async {
            !run.leases().await.is_empty()
        })
        .await
        .unwrap();
    alarm.set(true);
    let first = run.leases().await[0]
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap();
    let nodes = run.nodes();
    run.cluster
        .wait_for("the node rebooting under the alarm to finish", || async {
            version(&nodes.get(&first).await.unwrap()) == Some("2.0.0")
                && run.leases().await.is_empty()
        })
        .await
        .unwrap();
    run.cluster
        .wait_for("the gate to report the alarm again", || async {
            gate_condition(&run).await.is_some_and(|(s, _)| s == "True")
        })
        .await
        .unwrap();
    let other = run.names.iter().find(|n| **n != first).unwrap().clone();
    assert_eq!(version(&nodes.get(&other).await.unwrap()), Some("1.0.0"));
    assert!(run.leases().await.is_empty());

    // Cleared for good: the rollout completes and the gate reads open.
    alarm.set(false);
    run.wait_all_updated(&[]).await;
    assert_eq!(
        run.observed.lock().await.max_leases,
        1,
        "one at a time throughout"
    );
}

/// A loopback port nothing listens on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
