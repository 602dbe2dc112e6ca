//! Leader election on the real API server: what it costs (counted from the audit log),
//! how fast a clean shutdown hands over, that a killed leader is replaced only after
//! its term, and that a leader whose Lease is taken stops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use e2e::{TestCluster, audit};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use operator::leader::{Elector, LEASE_NAME};
use tokio::time::Instant;

const NAMESPACE: &str = "baton-system";

/// An elector running as its own ServiceAccount (so its requests can be counted).
async fn elector(cluster: &TestCluster, name: &str, duration: Duration) -> Arc<Elector> {
    let kubeconfig = e2e::identity::kubeconfig_for(
        cluster,
        NAMESPACE,
        name,
        serde_json::json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
            "verbs": ["get", "list", "watch", "create", "update"]}]),
    )
    .await
    .unwrap();
    let client = e2e::cluster::client_from(&kubeconfig).await.unwrap();
    Arc::new(Elector::new(
        Api::namespaced(client, NAMESPACE),
        name.into(),
        duration,
    ))
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get(LEASE_NAME)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity)
}

/// A cluster where `elector-a` leads (renewing every second) and `elector-b` waits.
struct Race {
    cluster: TestCluster,
    leases: Api<Lease>,
    a: Arc<Elector>,
    b: Arc<Elector>,
    hold_a: tokio::task::JoinHandle<()>,
    acquire_b: tokio::task::JoinHandle<()>,
}

impl Race {
    async fn start(term: Duration) -> Race {
        let cluster = TestCluster::start().await.unwrap();
        cluster.create_namespace(NAMESPACE).await.unwrap();
        let leases: Api<Lease> = Api::namespaced(cluster.client(), NAMESPACE);
        let a = elector(&cluster, "elector-a", term).await;
        let b = elector(&cluster, "elector-b", term).await;
        a.acquire().await;
        let hold_a = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.hold(Duration::from_secs(1)).await }
        });
        let acquire_b = tokio::spawn({
            let b = Arc::clone(&b);
            async move { b.acquire().await }
        });
        Race {
            cluster,
            leases,
            a,
            b,
            hold_a,
            acquire_b,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leading_costs_one_update_per_renewal_and_following_costs_only_a_watch() {
    let Race {
        cluster,
        leases,
        a,
        hold_a,
        acquire_b,
        ..
    } = Race::start(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from = jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let to = jiff::Timestamp::now();
    assert!(!acquire_b.is_finished(), "the follower waits");
    assert_eq!(holder(&leases).await.as_deref(), Some("elector-a"));

    let log = audit::read(&cluster.audit_log()).unwrap();
    let window = |who: &str| -> Vec<String> {
        let user = audit::service_account(NAMESPACE, who);
        log.iter()
            .filter(|r| r.user.username == user)
            .filter(|r| r.request_received_timestamp >= from && r.request_received_timestamp < to)
            .map(|r| r.verb.clone())
            .collect()
    };
    let leader = window("elector-a");
    let follower = window("elector-b");
    eprintln!("[leader] leader in 10 s: {leader:?}; follower: {follower:?}");
    assert!(
        leader.iter().all(|v| v == "update"),
        "the leader only updates: {leader:?}"
    );
    assert!(
        (9..=11).contains(&leader.len()),
        "one update per 1 s renewal: {leader:?}"
    );
    assert!(
        follower.iter().all(|v| v == "watch"),
        "the follower only watches: {follower:?}"
    );

    // A clean shutdown hands over at once, not after the 30 s term.
    hold_a.abort();
    let released = Instant::now();
    a.release().await;
    tokio::time::timeout(Duration::from_secs(10), acquire_b)
        .await
        .expect("the follower takes over well before the term")
        .unwrap();
    eprintln!("[leader] handed over in {:?}", released.elapsed());
    assert_eq!(holder(&leases).await.as_deref(), Some("elector-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_after_its_term_and_a_taken_lease_stops_the_leader() {
    let term = Duration::from_secs(3);
    let Race {
        cluster: _cluster,
        leases,
        b,
        hold_a,
        acquire_b,
        ..
    } = Race::start(term).await;

    // Someone else writes the Lease (a label): the leader's next renewal conflicts,
    // it looks, finds itself still the holder, and keeps leading.
    leases
        .patch(
            LEASE_NAME,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !hold_a.is_finished(),
        "a conflict alone does not end leadership"
    );
    assert!(
        !acquire_b.is_finished(),
        "the follower waits while the leader renews"
    );
    assert_eq!(holder(&leases).await.as_deref(), Some("elector-a"));

    // The leader dies without releasing: the follower takes over only once it has
    // seen the Lease unrenewed for a whole term.
    hold_a.abort();
    let killed = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), acquire_b)
        .await
        .expect("the follower takes over")
        .unwrap();
    let gap = killed.elapsed();
    eprintln!("[leader] took over {gap:?} after the leader died (term {term:?})");
    assert!(
        gap >= term - Duration::from_secs(1),
        "not before the term: {gap:?}"
    );
    assert_eq!(holder(&leases).await.as_deref(), Some("elector-b"));

    // Another party takes the Lease: the leader notices at its next renewal and stops.
    let hold_b = tokio::spawn({
        let b = Arc::clone(&b);
        async move { b.hold(Duration::from_secs(1)).await }
    });
    leases
        .patch(
            LEASE_NAME,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"holderIdentity": "someone-else"}})),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), hold_b)
        .await
        .expect("the leader stops once its Lease is taken")
        .unwrap();
    assert_eq!(holder(&leases).await.as_deref(), Some("someone-else"));
}
