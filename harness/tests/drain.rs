//! The simulated cluster drains like a real one: a PodDisruptionBudget blocks an
//! eviction with 429 until replacements are Ready elsewhere, then the eviction
//! succeeds and the pod goes away. The disruption controller, the scheduler, the
//! ReplicaSet controller and kwok's pod lifecycle all take part.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use harness::TestCluster;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Node, Pod},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, ResourceExt,
    api::{EvictParams, ListParams, Patch, PatchParams, PostParams},
};

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).unwrap()
}

async fn running_pods(pods: &Api<Pod>) -> Vec<Pod> {
    pods.list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .collect()
}

async fn disruptions_allowed(pdbs: &Api<PodDisruptionBudget>) -> Option<i32> {
    let pdb = pdbs.get("web").await.ok()?;
    let status = pdb.status?;
    (status.observed_generation == pdb.metadata.generation).then_some(status.disruptions_allowed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdb_blocks_evictions_with_429_until_replacements_are_ready_elsewhere() {
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[drain] {:>6.1?} {what}", t0.elapsed());
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    cluster.add_nodes(4).await.unwrap();
    phase("4 nodes Ready");

    let ns = "drain";
    cluster.create_namespace(ns).await.unwrap();
    phase("namespace ready");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments
        .create(&PostParams::default(), &harness::workload::spread("web", 3))
        .await
        .unwrap();
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    pdbs.create(
        &PostParams::default(),
        &object(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"minAvailable": 3, "selector": {"matchLabels": {"app": "web"}}},
        })),
    )
    .await
    .unwrap();

    // Three Ready pods, one per node, and a PDB that allows no disruption.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    cluster
        .wait_for("3 Ready web pods", || async {
            running_pods(&pods).await.len() == 3
        })
        .await
        .unwrap();
    phase("3 pods Ready");
    cluster
        .wait_for("the PDB to be observed", || async {
            disruptions_allowed(&pdbs).await == Some(0)
        })
        .await
        .unwrap();
    phase("PDB observed");

    // Cordon the node of one pod, as a drain does.
    let victim = running_pods(&pods).await.remove(0);
    let node = victim.spec.as_ref().unwrap().node_name.clone().unwrap();
    Api::<Node>::all(client.clone())
        .patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();

    // While the PDB forbids it, the eviction is refused with 429.
    match pods
        .evict(&victim.name_any(), &EvictParams::default())
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 429, "{status:?}");
            assert!(
                status.message.contains("disruption budget"),
                "{}",
                status.message
            );
            eprintln!(
                "[drain] eviction refused: {} {}",
                status.code, status.message
            );
        }
        other => panic!("eviction should be refused with 429, got {other:?}"),
    }

    // A replacement lands on the free node (not the cordoned one) and becomes Ready.
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    cluster
        .wait_for("4 Ready web pods", || async {
            running_pods(&pods).await.len() == 4
        })
        .await
        .unwrap();
    for pod in running_pods(&pods).await {
        if pod.name_any() != victim.name_any() {
            assert_ne!(
                pod.spec.unwrap().node_name.unwrap(),
                node,
                "a pod was scheduled onto the cordoned node"
            );
        }
    }
    phase("4 pods Ready");
    cluster
        .wait_for("the PDB to allow one disruption", || async {
            disruptions_allowed(&pdbs).await == Some(1)
        })
        .await
        .unwrap();

    // Now the eviction succeeds and the pod goes away.
    pods.evict(&victim.name_any(), &EvictParams::default())
        .await
        .expect("eviction allowed once a replacement is Ready");
    let uid = victim.uid().unwrap();
    cluster
        .wait_for("the evicted pod to be gone", || async {
            pods.get_opt(&victim.name_any())
                .await
                .unwrap()
                .is_none_or(|p| p.uid().as_deref() != Some(uid.as_str()))
        })
        .await
        .unwrap();
    eprintln!(
        "[drain] eviction succeeded once a replacement was Ready elsewhere; {} drained",
        node
    );
}
