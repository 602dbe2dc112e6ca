//! An idle agent costs the API server nothing but its watch: counted from the API
//! server's audit log, with the agent running under its own ServiceAccount.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crds::protocol;
use harness::{
    TestCluster, audit,
    fleet::{Fleet, FleetOptions},
};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, ResourceExt, api::ListParams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_agents_make_no_requests_besides_their_watches() {
    let cluster = TestCluster::start().await.unwrap();
    let names = cluster.add_nodes(3).await.unwrap();
    cluster.create_namespace("baton-system").await.unwrap();
    let kubeconfig = harness::identity::kubeconfig_for(
        &cluster,
        "baton-system",
        "baton-agent",
        e2e::footprint::agent_rules().unwrap(),
    )
    .await
    .unwrap();
    // Local re-checks every second: they must never turn into API requests.
    let _fleet = Fleet::start(
        &names,
        &FleetOptions::new(
            harness::binaries::workspace_binary("baton-agent").unwrap(),
            kubeconfig,
            Duration::from_secs(1),
            ["--check-interval", "1s"],
        ),
    )
    .unwrap();
    let nodes: Api<Node> = Api::all(cluster.client());
    cluster
        .wait_for("every agent to report Idle", || async {
            nodes
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .all(|n| {
                    n.annotations()
                        .get(protocol::STATE.name)
                        .map(String::as_str)
                        == Some("Idle")
                })
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from = jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let agent = audit::service_account("baton-system", "baton-agent");
    let all = audit::read(&cluster.audit_log()).unwrap();
    let mine: Vec<_> = all.iter().filter(|r| r.user.username == agent).collect();
    let startup: Vec<_> = mine.iter().map(|r| r.verb.as_str()).collect();
    eprintln!("[idle] requests of 3 agents since start: {startup:?}");
    assert!(
        mine.iter()
            .all(|r| r.response_status.as_ref().and_then(|s| s.code) != Some(403)),
        "the agent's RBAC is enough"
    );
    let idle: Vec<_> = mine
        .iter()
        .filter(|r| r.request_received_timestamp >= from && r.verb != "watch")
        .map(|r| format!("{} {}", r.verb, r.request_uri))
        .collect();
    assert!(idle.is_empty(), "requests while idle: {idle:?}");
    // Each agent lists and watches only its own Node.
    for r in mine
        .iter()
        .filter(|r| r.verb == "list" || r.verb == "watch")
    {
        assert!(
            r.request_uri.contains("fieldSelector=metadata.name"),
            "{}",
            r.request_uri
        );
    }
}
