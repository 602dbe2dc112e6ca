//! Leader election on the real API server: what it costs (counted from the audit log),
//! how fast a clean shutdown hands over, that a killed leader is replaced only after
//! its term, that a leader whose Lease is taken stops, and that a leader whose renewal
//! hangs stops writing before a follower takes over.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use harness::{TestCluster, audit};
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
    let kubeconfig = harness::identity::kubeconfig_for(
        cluster,
        NAMESPACE,
        name,
        serde_json::json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
            "verbs": ["get", "list", "watch", "create", "update"]}]),
    )
    .await
    .unwrap();
    let client = harness::cluster::client_from(&kubeconfig).await.unwrap();
    Arc::new(Elector::new(
        Api::namespaced(client, NAMESPACE),
        name.into(),
        duration,
        duration * 2 / 3,
        operator::fence::Fence::leading_never(),
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

/// A replica as its own ServiceAccount, with the operator's rules, whose API traffic
/// goes to the API server or through `proxy`.
async fn replica(
    cluster: &TestCluster,
    name: &str,
    proxy: Option<&harness::proxy::StallProxy>,
) -> tokio::task::JoinHandle<operator::replica::Ended> {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/baton");
    let rules = harness::identity::chart_rules(&chart, "baton-operator", &[]).unwrap();
    let kubeconfig = harness::identity::kubeconfig_for(cluster, NAMESPACE, name, rules)
        .await
        .unwrap();
    if let Some(proxy) = proxy {
        let yaml = std::fs::read_to_string(&kubeconfig).unwrap();
        let ca = cluster.ca_file();
        let yaml = yaml.replace(cluster.server(), &proxy.url()).replace(
            &ca.display().to_string(),
            &proxy.ca_file().display().to_string(),
        );
        std::fs::write(&kubeconfig, yaml).unwrap();
    }
    let client = harness::cluster::client_from(&kubeconfig).await.unwrap();
    let config = <operator::config::Config as clap::Parser>::try_parse_from([
        "baton-operator",
        "--namespace",
        NAMESPACE,
        "--identity",
        name,
        "--leader-lease-duration",
        "3s",
        "--leader-renew-interval",
        "500ms",
    ])
    .unwrap();
    config.validate().unwrap();
    tokio::spawn(operator::replica::run_replica_until(
        client,
        config,
        Arc::new(operator::metrics::Metrics::default()),
        Arc::new(operator::clock::Clock::system()),
        std::future::pending(),
    ))
}

/// One API server of an HA control plane dies under the leader's renewal: the renewal
/// hangs, while every other request (to a healthy server) still works. The leader must
/// stop every write once its last successful renewal was sent a renew deadline ago,
/// before the follower may take over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewal_hangs_writes_nothing_after_the_new_leader_starts() {
    use crds::UpdatePolicy;
    use kube::api::PostParams;
    let cluster = TestCluster::start().await.unwrap();
    cluster.create_namespace(NAMESPACE).await.unwrap();
    cluster.apply_crds().await.unwrap();
    cluster.add_nodes(2).await.unwrap();
    let proxy = harness::proxy::StallProxy::start(cluster.server(), cluster.ca_file())
        .await
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(cluster.client(), NAMESPACE);
    let policies: Api<UpdatePolicy> = Api::all(cluster.client());
    // Four policies the admin keeps pausing and resuming: each change is a status write
    // by the leader.
    let names: Vec<String> = (0..4).map(|i| format!("pool-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let spec = serde_json::json!({"nodeSelector": {"matchLabels": {"pool": format!("p{i}")}}});
        let policy = UpdatePolicy::new(name, serde_json::from_value(spec).unwrap());
        policies
            .create(&PostParams::default(), &policy)
            .await
            .unwrap();
    }
    let _a = replica(&cluster, "op-a", Some(&proxy)).await;
    cluster
        .wait_for("op-a to lead", || async {
            leases
                .get_opt(LEASE_NAME)
                .await
                .unwrap()
                .and_then(|l| l.spec?.holder_identity)
                == Some("op-a".into())
        })
        .await
        .unwrap();
    let _b = replica(&cluster, "op-b", None).await;
    let toggler = tokio::spawn({
        let (policies, names) = (policies.clone(), names.clone());
        async move {
            for round in 0u64.. {
                for name in &names {
                    let patch = serde_json::json!({"spec": {"paused": round % 2 == 0}});
                    let _ = policies
                        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stalled_at = jiff::Timestamp::now();
    proxy.stall_leader_renewals();
    cluster
        .wait_for("op-b to take over", || async {
            leases
                .get_opt(LEASE_NAME)
                .await
                .unwrap()
                .and_then(|l| l.spec?.holder_identity)
                == Some("op-b".into())
        })
        .await
        .unwrap();
    // Let both run on: a deposed leader that still acts writes now.
    tokio::time::sleep(Duration::from_secs(6)).await;
    toggler.abort();

    let log = audit::read(&cluster.audit_log()).unwrap();
    let writes = |who: &str| -> Vec<&audit::Request> {
        let user = audit::service_account(NAMESPACE, who);
        log.iter()
            .filter(|r| r.user.username == user)
            .filter(|r| matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete"))
            .collect()
    };
    let (a, b) = (writes("op-a"), writes("op-b"));
    let took_over = b
        .iter()
        .map(|r| r.request_received_timestamp)
        .min()
        .expect("op-b wrote");
    let a_before = a
        .iter()
        .filter(|r| r.request_received_timestamp < stalled_at)
        .count();
    let late: Vec<String> = a
        .iter()
        .filter(|r| r.request_received_timestamp >= took_over)
        .map(|r| {
            format!(
                "{} {} at {}",
                r.verb, r.request_uri, r.request_received_timestamp
            )
        })
        .collect();
    let last_a = a.iter().map(|r| r.request_received_timestamp).max();
    eprintln!(
        "[leader] op-a wrote {} times ({a_before} before the stall, last at {last_a:?}); op-b's first write at {took_over} (stalled at {stalled_at})",
        a.len()
    );
    assert!(a_before > 0, "op-a was writing before the stall");
    assert!(
        late.is_empty(),
        "the deposed leader wrote {} times after the new leader started: {:?}",
        late.len(),
        &late[..late.len().min(5)]
    );
}
