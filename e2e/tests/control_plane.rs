//! Control-plane nodes and the etcd quorum guard on a real control plane with a real
//! three-member etcd cluster on loopback (mutual TLS). Three kwok nodes are control-plane
//! nodes, each standing for one etcd member; a simulated reboot of such a node stops its
//! member's process for the machine's down time and starts it again on the same data
//! directory. A watcher polls every member's health every 100 ms.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use e2e::{
    quorum::QuorumWatcher,
    scenario::{Limits, NAMESPACE, Scenario, list, replica_config, state},
};
use harness::etcd::EtcdCluster;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};

const CONTROL_PLANE: &str = "node-role.kubernetes.io/control-plane";

/// Six nodes, the first three control-plane nodes with an etcd member each, real agents
/// (machines down 2 s, plus the members' own delays), and an operator with etcd access.
async fn cluster(budget: usize) -> (Scenario, Arc<EtcdCluster>, Vec<String>) {
    let mut s = Scenario::bare(6, Limits::budget(budget)).await;
    let cp: Vec<String> = s.names[..3].to_vec();
    let nodes = s.nodes();
    for name in &cp {
        let patch = serde_json::json!({"metadata": {"labels": {CONTROL_PLANE: ""}}});
        nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
    let etcd = EtcdCluster::start(&cp).await.expect("etcd starts");
    let mut options = s.fleet_options(Duration::from_secs(2), &[]);
    options.hooks = Some(etcd.clone());
    s.start_fleet(&options);
    (s, etcd, cp)
}

fn operator(s: &Scenario, etcd: &EtcdCluster) -> tokio::task::JoinHandle<()> {
    let flags = vec![
        format!("--etcd-endpoints={}", etcd.endpoints().join(",")),
        format!("--etcd-ca-file={}", etcd.pki.ca_cert.display()),
        format!("--etcd-cert-file={}", etcd.pki.client.0.display()),
        format!("--etcd-key-file={}", etcd.pki.client.1.display()),
    ];
    s.operator_with(s.client.clone(), replica_config("op-a", &flags), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_nodes_never_take_two_etcd_members_down_and_leaders_hand_over_first() {
    let (mut s, etcd, cp) = cluster(3).await;
    let watcher = QuorumWatcher::start(etcd.clone(), s.client.clone(), NAMESPACE);
    let _operator = operator(&s, &etcd);
    s.policy_staged(serde_json::json!({
        "maxUnavailable": 3,
        "ordering": {"oneZoneAtATime": false},
        "health": {"rebootTimeout": "3m"},
    }))
    .await;
    s.wait_done(&[]).await;
    let quorum = watcher.stop();
    let report = s.finish("3 control-plane + 3 workers, maxUnavailable 3");
    let outages = quorum.outages();
    eprintln!(
        "[quorum] {} samples; at most {} member(s) down; member IDs {:?}; leaders over time {:?}; outages {:?}; workers at most {} disrupted",
        quorum.samples.len(),
        quorum.max_down(),
        quorum.ids,
        quorum.leaders(),
        outages
            .iter()
            .map(|(m, leader, _, _)| (
                m,
                quorum
                    .ids
                    .iter()
                    .find(|(_, id)| **id == *leader)
                    .map(|(n, _)| n)
            ))
            .collect::<Vec<_>>(),
        report.max_disrupted,
    );
    assert_eq!(quorum.max_down(), 1, "one member down at a time, never two");
    for name in &cp {
        assert_eq!(s.fleet().log(name).reboots, 1, "{name} rebooted once");
        assert!(
            outages.iter().any(|(m, ..)| m == name),
            "{name}'s member went down with its machine"
        );
    }
    for (member, leader_before, ..) in &outages {
        assert_ne!(
            Some(leader_before),
            quorum.ids.get(member),
            "{member} was not the leader when it went down"
        );
    }
    assert!(
        quorum.leaders().len() >= 2,
        "the first leader's node rebooted too, so leadership moved: {:?}",
        quorum.leaders()
    );
    let moved = s.events("EtcdLeaderMoved").await;
    assert!(!moved.is_empty(), "the move is recorded as an Event");
    assert!(report.max_disrupted >= 2, "the workers went in parallel");
    // The workers went first (the default order): every control-plane grant came after
    // the last worker's.
    let last_worker = s.names[3..]
        .iter()
        .filter_map(|n| quorum.first_leased(n))
        .max()
        .unwrap();
    for name in &cp {
        assert!(
            quorum.first_leased(name).unwrap() > last_worker,
            "{name} after the workers"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_etcd_member_blocks_every_control_plane_grant_with_its_reason() {
    let (mut s, etcd, cp) = cluster(3).await;
    // The third member's process is down before the rollout starts.
    etcd.stop_member(&cp[2]);
    let _operator = operator(&s, &etcd);
    s.policy_staged(serde_json::json!({"maxUnavailable": 3}))
        .await;
    s.wait_done(&cp).await;
    let nodes = s.nodes();
    let wanted = format!("etcd member {} is unhealthy", cp[2]);
    s.cluster
        .wait_for("a Waiting Event naming the unhealthy member", || async {
            s.events("Waiting")
                .await
                .iter()
                .any(|e| e.contains(&wanted))
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for name in &cp {
        let node: Node = nodes.get(name).await.unwrap();
        assert_eq!(
            state(&node),
            Some("RebootRequired"),
            "{name} was never granted"
        );
    }
    assert!(s.reboot_leases().await.is_empty(), "no control-plane lease");
    let why = s.why(&cp[0]).await;
    assert!(why.contains(&wanted), "kubectl baton why says so:\n{why}");
    // Once the member is back, they go.
    etcd.start_member(&cp[2]).unwrap();
    s.wait_done(&[]).await;
    let report = s.finish("an unhealthy member");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert!(list(&nodes).await.iter().all(|n| state(n) == Some("Done")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_etcd_rejoin_holds_the_next_control_plane_grant_until_the_member_caught_up() {
    let (mut s, etcd, cp) = cluster(3).await;
    // Each member comes back 8 s after its machine (whose agent reports Done at once).
    for name in &cp {
        etcd.slow_rejoin(name, Duration::from_secs(8));
    }
    let watcher = QuorumWatcher::start(etcd.clone(), s.client.clone(), NAMESPACE);
    let _operator = operator(&s, &etcd);
    s.policy_staged(serde_json::json!({
        "maxUnavailable": 3,
        "ordering": {"controlPlane": "First"},
        "health": {"rebootTimeout": "3m", "settleTime": "0s"},
    }))
    .await;
    s.wait_done(&[]).await;
    let quorum = watcher.stop();
    s.finish("slow etcd rejoins");
    let outages = quorum.outages();
    let mut grants: Vec<_> = cp
        .iter()
        .map(|n| (quorum.first_leased(n).unwrap(), n.clone()))
        .collect();
    grants.sort();
    eprintln!(
        "[rejoin] grants {:?}; outages {:?}",
        grants.iter().map(|(_, n)| n).collect::<Vec<_>>(),
        outages
            .iter()
            .map(|(m, _, down, up)| (m, up.map(|u| u.duration_since(*down))))
            .collect::<Vec<_>>()
    );
    for pair in grants.windows(2) {
        let (previous, next) = (&pair[0].1, pair[1].0);
        let (_, _, _, back) = outages.iter().find(|(m, ..)| m == previous).unwrap();
        let back = back.expect("the member came back");
        let restarted = etcd.started(previous).unwrap();
        // A sample polls the members before the Leases: the next grant seen in the
        // sample where the member is back came after it.
        assert!(
            next >= back,
            "the next control-plane grant came {:?} before {previous}'s member was back",
            back.duration_since(next)
        );
        assert!(
            back >= restarted && back.duration_since(pair[0].0) >= Duration::from_secs(8),
            "its member was back only after its slow restart"
        );
    }
}

/// The operator's etcd client against the real members: what it sees of each, how a
/// stopped member and a client without a certificate look, and a leader move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_etcd_client_reads_members_moves_the_leader_and_reports_failures() {
    use operator::{
        cache::CachedNode,
        etcd::{EtcdAccess, EtcdClient},
    };
    use rollout::etcd::Etcd;

    let names: Vec<String> = ["cp-a", "cp-b", "cp-c"].map(String::from).to_vec();
    let etcd = EtcdCluster::start(&names).await.expect("etcd starts");
    let access = EtcdAccess {
        endpoints: etcd.endpoints(),
        ca: Some(etcd.pki.ca_cert.clone()),
        cert: Some(etcd.pki.client.0.clone()),
        key: Some(etcd.pki.client.1.clone()),
    };
    let client = EtcdClient::new(&access).unwrap().unwrap();
    let nodes: Vec<Arc<CachedNode>> = names
        .iter()
        .map(|n| {
            let mut node = Node::default();
            node.metadata.name = Some(n.clone());
            Arc::new(CachedNode::from_node(&node))
        })
        .collect();
    let seen = client.observe(&nodes).await;
    let Etcd::Members(members) = &seen else {
        panic!("{seen:?}")
    };
    assert_eq!(members.len(), 3);
    assert!(
        members
            .iter()
            .all(|m| m.healthy && m.node.as_ref() == Some(&m.name))
    );
    assert_eq!(members.iter().filter(|m| m.leader).count(), 1);
    assert!(seen.may_go_down("cp-a").is_ok());

    // Move leadership to another member; the next observation sees it.
    let leader = seen.leader().unwrap().clone();
    let next = members.iter().find(|m| !m.leader).unwrap().clone();
    client
        .move_leader(leader.client_url.as_deref().unwrap(), next.id)
        .await
        .unwrap();
    let seen = client.observe(&nodes).await;
    assert_eq!(
        seen.leader().map(|m| m.name.clone()),
        Some(next.name.clone())
    );

    // A stopped member: unhealthy, with the connection error, and it holds the others.
    etcd.stop_member("cp-c");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let seen = client.observe(&nodes).await;
    let stopped = seen.member_of("cp-c").unwrap();
    assert!(!stopped.healthy);
    let problem = stopped.problem.clone().unwrap();
    assert!(
        problem.contains("Connection refused") || problem.contains("connection refused"),
        "{problem}"
    );
    assert!(seen.may_go_down("cp-a").is_err());

    // Without the client certificate, etcd refuses the handshake: unreachable, saying so.
    let anonymous = EtcdClient::new(&EtcdAccess {
        cert: None,
        key: None,
        ..access
    })
    .unwrap()
    .unwrap();
    let seen = anonymous.observe(&nodes).await;
    assert!(
        matches!(&seen, Etcd::Unreachable(why) if why.contains("CertificateRequired")),
        "the TLS refusal is named: {seen:?}"
    );
    eprintln!("[etcd] without a client certificate: {}", seen.summary());
}
