//! The operator against a real control plane: kwok nodes, agents faked by the test
//! (they flip the node's boot id when granted, as a reboot would), and a watcher that
//! checks the invariants over the whole run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use clap::Parser;
use crds::UpdatePolicy;
use e2e::TestCluster;
use futures::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, Node},
};
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
/// "reboots" (new boot id) and reports Done on the new version.
async fn fake_agents(client: Client, names: Vec<String>) {
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
            let new_boot = boot.replace("-000000000001", "-000000000002");
            tokio::time::sleep(Duration::from_millis(300)).await; // the "reboot"
            set_annotations(
                &nodes,
                &node.name_any(),
                &[
                    ("baton.dev/state", "Done"),
                    ("baton.dev/reboot-required", "false"),
                    ("baton.dev/boot-id", &new_boot),
                    ("baton.dev/current-version", "2.0.0"),
                ],
            )
            .await;
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
        let held = leases
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len();
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
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_update_one_at_a_time() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.apply_crds().await.unwrap();
    let client = cluster.client();
    let names = cluster.add_nodes(5).await.unwrap();
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "baton-system"}}))
                .unwrap(),
        )
        .await
        .unwrap();

    let observed = Arc::new(Mutex::new(Observed::default()));
    let watcher_task = tokio::spawn(watch_invariants(client.clone(), observed.clone()));
    let config =
        operator::config::Config::try_parse_from(["baton-operator", "--namespace", "baton-system"])
            .unwrap();
    let operator_task = tokio::spawn(operator::controller::run(client.clone(), config));
    let policy: UpdatePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy",
        "metadata": {"name": "workers"},
        "spec": {"nodeSelector": {"matchLabels": {"type": "kwok"}}, "maxUnavailable": 1, "health": {"rebootTimeout": "2m"}},
    }))
    .unwrap();
    let policies: Api<UpdatePolicy> = Api::all(client.clone());
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let agents = tokio::spawn(fake_agents(client.clone(), names.clone()));

    let nodes: Api<Node> = Api::all(client.clone());
    cluster
        .wait_for(
            "every node on 2.0.0, uncordoned, with no lease left",
            || async {
                let all = nodes.list(&ListParams::default()).await.unwrap().items;
                let leases = Api::<Lease>::namespaced(client.clone(), "baton-system")
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items;
                leases.is_empty()
                    && all.iter().all(|n| {
                        n.annotations()
                            .get("baton.dev/current-version")
                            .map(String::as_str)
                            == Some("2.0.0")
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
    let status = policies.get("workers").await.unwrap().status.unwrap();
    operator_task.abort();
    agents.abort();
    watcher_task.abort();

    let o = observed.lock().await;
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
}
