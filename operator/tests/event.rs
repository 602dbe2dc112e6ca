//! Events on the real API server, written with the chart's operator RBAC: a repeat of
//! the same event is a series on one Event, and a new note is a new Event (never an old
//! note with a higher count).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use harness::TestCluster;
use k8s_openapi::api::{core::v1::Node, events::v1::Event};
use kube::{
    Api, Resource,
    api::ListParams,
    runtime::events::EventType::{Normal, Warning},
};
use operator::event::Recorder;

/// The Events regarding `node`, oldest first: (reason, note, series count).
async fn events(client: &kube::Client, node: &str) -> Vec<(String, String, i32)> {
    let mut list = Api::<Event>::namespaced(client.clone(), "default")
        .list(&ListParams::default().fields(&format!("regarding.name={node}")))
        .await
        .unwrap()
        .items;
    list.sort_by_key(|e| e.event_time.clone().map(|t| t.0));
    list.into_iter()
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
                e.series.map_or(1, |s| s.count),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_is_a_series_and_a_new_note_a_new_event() {
    let cluster = TestCluster::start().await.unwrap();
    let nodes = cluster.add_nodes(2).await.unwrap();
    cluster.create_namespace("baton-system").await.unwrap();
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/baton");
    let rules = harness::identity::chart_rules(&chart, "baton-operator", &[]).unwrap();
    let kubeconfig =
        harness::identity::kubeconfig_for(&cluster, "baton-system", "baton-operator", rules)
            .await
            .unwrap();
    let client = harness::cluster::client_from(&kubeconfig).await.unwrap();
    let recorder = Recorder::new(client, "baton-operator", "op-a");
    let node: Node = Api::<Node>::all(cluster.client())
        .get(&nodes[0])
        .await
        .unwrap();
    let reference = node.object_ref(&());
    let drain = |deadline: &str| format!("draining; deadline {deadline}");
    // `DrainStarted` with a deadline, at a time.
    let drain_started = |type_, deadline: &'static str, at: &'static str| {
        let (recorder, reference) = (&recorder, &reference);
        async move {
            recorder
                .publish(
                    reference,
                    type_,
                    "DrainStarted",
                    &drain(deadline),
                    at.parse().unwrap(),
                )
                .await
                .unwrap();
        }
    };

    drain_started(Normal, "03:10", "2026-12-01T03:00:00Z").await;
    drain_started(Normal, "03:10", "2026-12-01T03:00:05Z").await;
    // The same reason with another note (a later drain's deadline): a new Event.
    drain_started(Normal, "04:10", "2026-12-01T04:00:00Z").await;
    // The same note as a Warning is another event too.
    drain_started(Warning, "04:10", "2026-12-01T04:00:01Z").await;
    // The first note once more: its own series grows.
    drain_started(Normal, "03:10", "2026-12-01T04:00:02Z").await;
    let admin = cluster.client();
    assert_eq!(
        events(&admin, &nodes[0]).await,
        vec![
            ("DrainStarted".into(), drain("03:10"), 3),
            ("DrainStarted".into(), drain("04:10"), 1),
            ("DrainStarted".into(), drain("04:10"), 1),
        ]
    );
    // Another node's Events are its own.
    assert!(events(&admin, &nodes[1]).await.is_empty());
    // A series whose Event is gone (the API server's TTL, or deleted) starts afresh.
    Api::<Event>::namespaced(admin.clone(), "default")
        .delete_collection(
            &Default::default(),
            &ListParams::default().fields(&format!("regarding.name={}", nodes[0])),
        )
        .await
        .unwrap();
    drain_started(Normal, "03:10", "2026-12-01T04:00:03Z").await;
    assert_eq!(
        events(&admin, &nodes[0]).await,
        vec![("DrainStarted".into(), drain("03:10"), 1)]
    );
}
