//! The operator against a real control plane: kwok nodes, agents faked by the test
//! (they flip the node's boot id when granted, as a reboot would), and the invariant
//! watcher over the whole run (`e2e::scenario`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use crds::{UpdatePolicy, protocol};
use e2e::scenario::{Limits, NEW, OLD, POLICY, Scenario, annotation, list, version};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};

/// `nodes` kwok nodes with fake agents whose reboots take `reboot` (those at the
/// indices in `lost` never come back), the watcher holding the run to `budget`, and
/// one operator replica, `op-a` (its handle, to kill it).
async fn start(
    nodes: usize,
    budget: usize,
    reboot: Duration,
    lost: &[usize],
) -> (Scenario, tokio::task::JoinHandle<()>) {
    let s = Scenario::with_fake_agents(nodes, Limits::budget(budget), reboot, lost).await;
    let operator = s.operator("op-a");
    (s, operator)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_update_one_at_a_time() {
    let (mut s, _operator) = start(5, 1, Duration::from_millis(300), &[]).await;
    s.policy(serde_json::json!({"nodeSelector": {"matchLabels": {"type": "kwok"}}, "maxUnavailable": 1, "health": {"rebootTimeout": "2m"}})).await;
    s.wait_done(&[]).await;
    s.cluster
        .wait_for("the status to count 5 updated nodes", || async {
            s.status().await.up_to_date == 5
        })
        .await
        .unwrap();
    let status = s.status().await;
    let o = s.report();
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
    assert_eq!(s.events("Done").await.len(), 5);
    // Each waiting node was told why, once per reason (the budget's holder changing
    // is the same reason): no Event storm.
    let waiting = s.events("Waiting").await;
    eprintln!("[rollout] Waiting Events: {waiting:?}");
    assert!(!waiting.is_empty() && waiting.len() <= 8, "{waiting:?}");
    for w in &waiting {
        let (_, note) = w.split_once(": ").unwrap();
        assert!(
            note.starts_with("budget 1/1 in use by kwok-node-"),
            "the reason from decide, naming the holder: {w}"
        );
    }
    let metrics = s.metrics.encode();
    for needle in [
        "baton_nodes{policy=\"pool\",state=\"up_to_date\"} 5",
        "baton_leases_held{policy=\"pool\"} 0",
        "baton_drain_duration_seconds_count 5",
        "baton_is_leader 1",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }
    s.finish("five nodes one at a time (fake agents)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forty_percent_budget_on_ten_nodes_never_disrupts_more_than_four() {
    let (mut s, _operator) = start(10, 4, Duration::from_secs(2), &[]).await;
    s.policy(serde_json::json!({"maxUnavailable": "40%", "ordering": {"oneZoneAtATime": false}}))
        .await;
    s.wait_done(&[]).await;
    let o = s.report();
    eprintln!(
        "[percent] at most {} cordoned and {} leases at once",
        o.max_cordoned, o.max_leases
    );
    assert!(o.max_leases <= 4 && o.max_cordoned <= 4, "{o:?}");
    assert_eq!(o.max_leases, 4, "the budget is used in full");
    s.finish("40% of ten nodes (fake agents)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_comes_back_fails_at_reboot_timeout_and_halts_its_pool() {
    let am = harness::alertmanager::Alertmanager::start().await.unwrap();
    let (mut s, _operator) = start(3, 1, Duration::from_millis(300), &[0]).await;
    let lost = s.names[0].clone();
    am.fire("NodeDown", &lost).await.unwrap();
    s.policy(serde_json::json!({"health": {"rebootTimeout": "5s",
        "alertmanager": {"url": am.url(), "matchers": ["node={{node}}"], "extra": "10m"}}}))
        .await;
    // In flight, its alert is silenced...
    s.cluster
        .wait_for(
            "the lost node's alert silenced while it is in flight",
            || async {
                am.state("NodeDown", &lost)
                    .await
                    .is_ok_and(|st| st == "suppressed")
            },
        )
        .await
        .unwrap();
    let nodes = s.nodes();
    s.cluster
        .wait_for(
            "the lost node to be marked failed and the pool halted",
            || async {
                let node = nodes.get(&lost).await.unwrap();
                annotation(&node, protocol::FAILURE.name)
                    .is_some_and(|f| f.contains("rebootTimeout"))
                    && s.condition("Halted").await
            },
        )
        .await
        .unwrap();
    // A halted pool grants nothing more, and the failed node keeps its lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leases = s.reboot_leases().await;
    assert_eq!(leases.len(), 1);
    assert!(
        leases[0]
            .annotations()
            .contains_key(protocol::lease::FAILURE.name)
    );
    let o = s.report();
    assert_eq!(
        o.cordon_order,
        std::slice::from_ref(&lost),
        "no other node was touched"
    );
    let status = s.status().await;
    assert_eq!((status.failed, status.up_to_date), (1, 0), "{status:?}");
    assert!(!s.events("Failed").await.is_empty());
    // ...and once it failed, its silence is expired so that it pages (not kept for
    // the 10m extra a node that is done gets).
    s.cluster
        .wait_for("the failed node's alert to page again", || async {
            am.state("NodeDown", &lost)
                .await
                .is_ok_and(|st| st == "active")
        })
        .await
        .unwrap();
    let silences = am.silences().await.unwrap();
    assert_eq!(silences.len(), 1, "{silences:?}");
    assert_eq!(silences[0]["status"]["state"], "expired", "{silences:?}");
    let report = s.finish("a node that never comes back (fake agents)");
    assert_eq!(report.failures.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admins_cordon_is_never_undone_and_its_node_is_left_alone() {
    let (mut s, _operator) = start(3, 2, Duration::from_millis(300), &[]).await;
    let admin_cordoned = s.names[0].clone();
    s.nodes()
        .patch(
            &admin_cordoned,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    s.policy(serde_json::json!({"maxUnavailable": 2})).await;
    s.wait_done(std::slice::from_ref(&admin_cordoned)).await;
    let node = s.nodes().get(&admin_cordoned).await.unwrap();
    assert_eq!(
        node.spec.as_ref().unwrap().unschedulable,
        Some(true),
        "the admin's cordon stays"
    );
    assert_eq!(version(&node), Some(OLD), "never granted");
    let o = s.report();
    // The admin's node counts against the budget of 2: the others went one at a time.
    assert_eq!(o.max_cordoned, 2, "{o:?}");
    assert_eq!(o.max_leases, 1, "{o:?}");
    s.finish("an admin's cordon (fake agents)");
}

/// Two Ready pods, one per node, under a PodDisruptionBudget that never allows an
/// eviction.
async fn unevictable_app(s: &Scenario) {
    s.never_evict("web").await;
    Api::namespaced(s.client.clone(), "app")
        .create(&PostParams::default(), &harness::workload::spread("web", 2))
        .await
        .unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.client.clone(), "app");
    s.cluster
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
    let (mut s, _operator) = start(2, 1, Duration::from_millis(300), &[]).await;
    unevictable_app(&s).await;
    s.policy(serde_json::json!({"drain": {"timeout": "5s", "onTimeout": "Abort"}}))
        .await;
    let first = s.names[0].clone();
    let nodes = s.nodes();
    s.cluster
        .wait_for("the drain to be aborted and the node failed", || async {
            let n = nodes.get(&first).await.unwrap();
            annotation(&n, protocol::FAILURE.name).is_some_and(|f| f.contains("drain timed out"))
                && !e2e::scenario::unschedulable(&n)
        })
        .await
        .unwrap();
    let blocked = s.events("DrainBlocked").await;
    eprintln!("[pdb] {blocked:?}");
    assert!(
        blocked
            .iter()
            .any(|e| e.contains("PodDisruptionBudget web-never")),
        "{blocked:?}"
    );
    s.wait_condition("Halted").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let o = s.report();
    assert_eq!(
        o.cordon_order,
        std::slice::from_ref(&first),
        "no other node was touched"
    );
    let n = nodes.get(&first).await.unwrap();
    assert_eq!(version(&n), Some(OLD), "Abort never reboots");
    s.finish("a PDB that never allows an eviction, Abort (fake agents)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_deletes_what_the_pdb_protects_and_proceed_reboots_with_it_in_place() {
    for (on_timeout, reason) in [("Force", "DrainForced"), ("Proceed", "DrainTimedOut")] {
        let (mut s, _operator) = start(2, 1, Duration::from_millis(300), &[]).await;
        unevictable_app(&s).await;
        s.policy(serde_json::json!({"drain": {"timeout": "3s", "onTimeout": on_timeout}}))
            .await;
        s.wait_done(&[]).await;
        let events = s.events(reason).await;
        eprintln!("[{on_timeout}] {events:?}");
        assert!(
            events
                .iter()
                .any(|e| e.contains(&format!("onTimeout: {on_timeout}"))),
            "{events:?}"
        );
        let o = s.report();
        assert_eq!(o.max_cordoned, 1, "{o:?}");
        s.finish(&format!(
            "a PDB that never allows an eviction, {on_timeout} (fake agents)"
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_replica_takes_over_when_the_leader_dies_mid_drain() {
    let (mut s, operator_a) = start(2, 1, Duration::from_millis(300), &[]).await;
    unevictable_app(&s).await;
    s.policy(serde_json::json!({"drain": {"timeout": "8s", "onTimeout": "Proceed"}}))
        .await;
    let leases: Api<Lease> = s.leases();
    let first = s.names[0].clone();
    let lease = crds::grant::lease_name(&first);
    let started_at = protocol::lease::DRAIN_STARTED_AT.name;
    s.cluster
        .wait_for("the first node's drain to start", || async {
            leases
                .get_opt(&lease)
                .await
                .unwrap()
                .is_some_and(|l| l.annotations().contains_key(started_at))
        })
        .await
        .unwrap();
    let started = leases.get(&lease).await.unwrap().annotations()[started_at].clone();
    // Kill the leader (op-a, the operator task) mid-drain; start op-b.
    operator_a.abort();
    let _operator_b = s.operator("op-b");
    s.cluster
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
    if let Some(l) = leases.get_opt(&lease).await.unwrap() {
        assert_eq!(l.annotations().get(started_at), Some(&started));
    }
    s.wait_done(&[]).await;
    let o = s.report();
    eprintln!("[leader] {o:?}");
    assert_eq!((o.max_cordoned, o.max_leases), (1, 1), "{o:?}");
    let leader = leases
        .get("baton-operator-leader")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert!(leader.lease_transitions.unwrap_or(0) >= 1);
    s.finish("the leader killed mid-drain (fake agents)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_is_reported_and_other_policies_carry_on() {
    let (mut s, _operator) = start(3, 1, Duration::from_millis(300), &[]).await;
    let policies: Api<UpdatePolicy> = Api::all(s.client.clone());
    // Passes the CRD's shape checks, but no such zone exists: only the operator can tell.
    let invalid = UpdatePolicy::new(
        "mars",
        serde_json::from_value(serde_json::json!({
            "nodeSelector": {"matchLabels": {"topology.kubernetes.io/zone": "zone-a"}},
            "maintenanceWindows": [{"schedule": "0 2 * * *", "duration": "1h", "timeZone": "Mars/Olympus"}],
        }))
        .unwrap(),
    );
    policies
        .create(&PostParams::default(), &invalid)
        .await
        .unwrap();
    s.policy(serde_json::json!({"nodeSelector": {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": ["zone-a"]}]}})).await;
    s.wait_done(std::slice::from_ref(&s.names[0])).await;
    s.cluster
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
    let events = s.events("InvalidSpec").await;
    assert!(
        events.iter().any(|e| e.contains("Mars/Olympus")),
        "{events:?}"
    );
    let zone_a = s.nodes().get(&s.names[0]).await.unwrap();
    assert_eq!(
        version(&zone_a),
        Some(OLD),
        "the invalid policy touched nothing"
    );
    s.finish("an invalid policy beside a valid one (fake agents)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_starts_outside_a_window_and_a_reboot_running_when_it_closes_completes() {
    // Reboots take 65 s; the window opens at the next whole minute at least 15 s away and
    // stays open 1 minute: one node starts in it and finishes after it closed.
    // The watcher holds the run to the window too, once it is known.
    let window_at = Arc::new(std::sync::OnceLock::<(jiff::Timestamp, jiff::Timestamp)>::new());
    let window = {
        let window_at = Arc::clone(&window_at);
        Arc::new(move |t| window_at.get().is_some_and(|(o, c)| t >= *o && t < *c))
            as e2e::invariants::WindowFn
    };
    let limits = Limits {
        window: Some(window),
        ..Limits::budget(1)
    };
    let mut s = Scenario::with_fake_agents(2, limits, Duration::from_secs(65), &[]).await;
    let _operator = s.operator("op-a");
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
    let closes = opens
        .checked_add(jiff::SignedDuration::from_mins(1))
        .unwrap();
    window_at.set((opens, closes)).unwrap();
    let local = opens.to_zoned(jiff::tz::TimeZone::UTC);
    let day = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
        [local.weekday().to_monday_zero_offset() as usize];
    s.policy(serde_json::json!({
        "maintenanceWindows": [{"weekdays": [day], "start": local.strftime("%H:%M").to_string(), "duration": "1m", "timeZone": "UTC"}],
        "health": {"rebootTimeout": "5m"},
    }))
    .await;
    // Closed: nothing starts, and the status says when it opens.
    s.cluster
        .wait_for("the status to show the closed window", || async {
            s.status().await.window.as_deref() == Some("Closed")
        })
        .await
        .unwrap();
    assert_eq!(s.status().await.next_window.map(|t| t.0), Some(opens));
    while jiff::Timestamp::now()
        < opens
            .checked_sub(jiff::SignedDuration::from_secs(2))
            .unwrap()
    {
        assert!(
            s.reboot_leases().await.is_empty(),
            "granted before the window opened"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Open: the first node starts; the window closes during its reboot; it completes.
    let first = s.names[0].clone();
    let nodes = s.nodes();
    s.cluster
        .wait_for("the first node to be updated", || async {
            let n = nodes.get(&first).await.unwrap();
            version(&n) == Some(NEW) && s.reboot_leases().await.is_empty()
        })
        .await
        .unwrap();
    assert!(
        jiff::Timestamp::now() > closes,
        "the reboot ran past the window's end"
    );
    // The second node waits for next week's window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = nodes.get(&s.names[1]).await.unwrap();
    assert_eq!(version(&second), Some(OLD));
    assert!(s.reboot_leases().await.is_empty());
    assert_eq!(s.status().await.window.as_deref(), Some("Closed"));
    s.finish("a window that closes during a reboot (fake agents)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_pod_holds_its_node_back_until_it_is_gone() {
    let (mut s, _operator) = start(2, 1, Duration::from_millis(300), &[]).await;
    s.cluster.create_namespace("ops").await.unwrap();
    let blocked = s.names[0].clone();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.client.clone(), "ops");
    let backup: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "backup", "labels": {"app": "backup"}},
        "spec": {"nodeName": blocked, "containers": [{"name": "backup", "image": "registry.invalid/backup:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &backup).await.unwrap();
    s.cluster
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
    s.policy(serde_json::json!({"health": {"blockingPodSelectors": [{"matchLabels": {"app": "backup"}}]}})).await;
    // The other node goes first although the blocked one comes first in order.
    let nodes = s.nodes();
    let other = s.names[1].clone();
    s.cluster
        .wait_for("the unblocked node to be updated", || async {
            version(&nodes.get(&other).await.unwrap()) == Some(NEW)
                && s.reboot_leases().await.is_empty()
        })
        .await
        .unwrap();
    let held = nodes.get(&blocked).await.unwrap();
    assert_eq!(version(&held), Some(OLD));
    assert!(
        s.report().cordon_order == [other.clone()],
        "the blocked node was never touched"
    );
    // Once the pod is gone, the node proceeds (within the 30 s recheck).
    pods.delete("backup", &Default::default()).await.unwrap();
    s.wait_done(&[]).await;
    s.finish("a blocking pod (fake agents)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_leave_load_balancers_while_cordoned_and_come_back_after() {
    let (mut s, _operator) = start(2, 1, Duration::from_millis(500), &[]).await;
    s.policy(serde_json::json!({"drain": {"excludeFromLoadBalancers": true}}))
        .await;
    s.wait_done(&[]).await;
    let o = s.report();
    assert_eq!(o.excluded_from_lb.len(), 2, "{o:?}");
    for node in list(&s.nodes()).await {
        assert!(
            !node.labels().contains_key(crds::node::EXCLUDE_FROM_LB),
            "{} still excluded",
            node.name_any()
        );
        assert!(annotation(&node, protocol::LB_EXCLUDED.name).is_none());
    }
    s.finish("nodes out of load balancers while cordoned (fake agents)");
}

/// The GateClosed condition's status and message.
async fn gate_condition(s: &Scenario) -> Option<(String, String)> {
    s.status()
        .await
        .conditions
        .into_iter()
        .find(|c| c.type_ == "GateClosed")
        .map(|c| (c.status, c.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firing_alerts_in_a_real_prometheus_hold_new_grants_but_never_a_reboot_under_way() {
    use harness::prometheus::{ALARM_ALERT, Alarm, Prometheus, WATCHDOG_ALERT};
    // Reboots take 20 s: longer than Prometheus needs to fire (about 2 s) plus the
    // operator's answer cache (10 s), so the alarm raised during the first reboot is
    // seen before the second grant.
    let (mut s, _operator) = start(2, 1, Duration::from_secs(20), &[]).await;
    let alarm = Alarm::start(true).await.unwrap();
    let prometheus = Prometheus::start(&alarm).await.unwrap();
    prometheus.wait_alarm(true).await.unwrap();
    assert_eq!(
        prometheus.firing().await.unwrap(),
        [ALARM_ALERT, WATCHDOG_ALERT]
    );

    // Unreachable first: the gate fails closed.
    let nowhere = format!("http://127.0.0.1:{}", harness::port::free_port().unwrap());
    s.policy(serde_json::json!({"health": {"prometheus": {"url": nowhere, "alertFilter": "^Watchdog$"}, "rebootTimeout": "5m"}})).await;
    s.cluster
        .wait_for("the gate to close on an unreachable Prometheus", || async {
            gate_condition(&s)
                .await
                .is_some_and(|(s, m)| s == "True" && m.contains("cannot query Prometheus"))
        })
        .await
        .unwrap();

    // The real Prometheus with the alarm firing: still closed, naming the alarm and not
    // the filtered Watchdog.
    let policies: Api<UpdatePolicy> = Api::all(s.client.clone());
    let patch = serde_json::json!({"spec": {"health": {"prometheus": {"url": prometheus.url()}}}});
    policies
        .patch(POLICY, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    s.cluster
        .wait_for("the gate to name the firing alert", || async {
            gate_condition(&s).await.is_some_and(|(s, m)| {
                s == "True" && m == format!("alerts firing in Prometheus: {ALARM_ALERT}")
            })
        })
        .await
        .unwrap();
    assert!(
        s.reboot_leases().await.is_empty(),
        "granted while the gate was closed"
    );
    assert!(s.report().cordon_order.is_empty());
    assert!(
        s.events("GateClosed")
            .await
            .iter()
            .any(|e| e.contains("cannot query Prometheus")),
        "{:?}",
        s.events("GateClosed").await
    );
    assert!(
        s.metrics
            .encode()
            .contains("baton_gate_closed{policy=\"pool\"} 1")
    );

    // Cleared: one node is granted. The alarm fires again during its reboot: that
    // reboot completes, and the other node waits.
    alarm.set(false);
    s.cluster
        .wait_for("a grant once the alarm resolved", || async {
            !s.reboot_leases().await.is_empty()
        })
        .await
        .unwrap();
    alarm.set(true);
    let first = s.reboot_leases().await[0]
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap();
    let nodes = s.nodes();
    s.cluster
        .wait_for("the node rebooting under the alarm to finish", || async {
            version(&nodes.get(&first).await.unwrap()) == Some(NEW)
                && s.reboot_leases().await.is_empty()
        })
        .await
        .unwrap();
    s.cluster
        .wait_for("the gate to report the alarm again", || async {
            gate_condition(&s).await.is_some_and(|(s, _)| s == "True")
        })
        .await
        .unwrap();
    let other = s.names.iter().find(|n| **n != first).unwrap().clone();
    assert_eq!(version(&nodes.get(&other).await.unwrap()), Some(OLD));
    assert!(s.reboot_leases().await.is_empty());

    // Cleared for good: the rollout completes and the gate reads open.
    alarm.set(false);
    s.wait_done(&[]).await;
    assert_eq!(s.report().max_leases, 1, "one at a time throughout");
    s.finish("a Prometheus gate (fake agents)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_policies_both_say_so_at_once_and_both_clear_at_once() {
    let (mut s, _operator) = start(3, 1, Duration::from_millis(300), &[]).await;
    let policies = s.policies();
    // Every node, paused: nothing moves, only the conditions are watched.
    s.policy(serde_json::json!({"paused": true})).await;
    let condition = |name: &'static str, type_: &'static str| {
        let policies = policies.clone();
        async move {
            policies
                .get_opt(name)
                .await
                .unwrap()
                .and_then(|p| p.status)
                .and_then(|st| st.conditions.into_iter().find(|c| c.type_ == type_))
                .map(|c| c.status)
        }
    };
    s.cluster
        .wait_for("the first policy's status", || async {
            condition(POLICY, "Overlapping").await.as_deref() == Some("False")
        })
        .await
        .unwrap();
    let mut night = s.policies().get(POLICY).await.unwrap().spec;
    night.node_selector = serde_json::from_value(
        serde_json::json!({"matchLabels": {"topology.kubernetes.io/zone": "zone-a"}}),
    )
    .unwrap();
    let created = std::time::Instant::now();
    policies
        .create(&PostParams::default(), &UpdatePolicy::new("night", night))
        .await
        .unwrap();
    // Both policies say so within seconds (the first one's spec did not change: it
    // learns from the second's creation, not at its next resync 60 s later), and
    // neither calls its own valid spec invalid.
    let both = |want: &'static str| {
        let condition = &condition;
        async move {
            condition(POLICY, "Overlapping").await.as_deref() == Some(want)
                && condition("night", "Overlapping").await.as_deref() == Some(want)
        }
    };
    s.cluster
        .wait_for("Overlapping on both policies", || both("True"))
        .await
        .unwrap();
    let learned = created.elapsed();
    // `kubectl get upol -o wide`: the Condition column names the problem.
    let wide = wide_table(&s.cluster.client()).await;
    for name in [POLICY, "night"] {
        assert_eq!(wide[name]["Condition"], "Overlapping", "{wide:?}");
    }
    for name in [POLICY, "night"] {
        assert_eq!(
            condition(name, "InvalidSpec").await.as_deref(),
            Some("False"),
            "{name}'s spec is valid"
        );
        assert_eq!(condition(name, "Ready").await.as_deref(), Some("False"));
    }
    assert!(
        s.events("Overlapping").await.len() >= 2,
        "a Warning Event on each: {:?}",
        s.events("Overlapping").await
    );
    // Made disjoint: both clear within seconds.
    let fixed = std::time::Instant::now();
    policies
        .patch(
            "night",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"nodeSelector": {"matchLabels": {"pool": "none"}}}}),
            ),
        )
        .await
        .unwrap();
    s.cluster
        .wait_for("Overlapping cleared on both policies", || both("False"))
        .await
        .unwrap();
    let cleared = fixed.elapsed();
    // Disjoint again: the paused policy says Paused; `night`, unpaused, whose one window
    // opens on 29 February, is Ready and shows that opening in its own zone until then.
    policies
        .patch(
            "night",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"paused": false, "maintenanceWindows": [
                {"schedule": "0 3 29 2 *", "duration": "2h", "timeZone": "Europe/Berlin"}]}}),
            ),
        )
        .await
        .unwrap();
    let next_feb_29 = {
        let now = jiff::Zoned::now();
        (now.year()..now.year() + 8)
            .find(|y| jiff::civil::date(*y, 2, 1).in_leap_year())
            .map(|y| format!("{y}-02-29 03:00 Europe/Berlin"))
            .unwrap()
    };
    s.cluster
        .wait_for("night's Next-Window", || async {
            let wide = wide_table(&s.cluster.client()).await;
            wide["night"]["Next-Window"] == next_feb_29
        })
        .await
        .unwrap();
    let wide = wide_table(&s.cluster.client()).await;
    eprintln!("[overlap] kubectl get upol -o wide: {wide:?}");
    // `kubectl baton why` on a node of the paused policy, from the API's objects: the
    // reason decide gives, at the gate that stops it; and one Waiting Event per reason.
    let node = s.names[0].clone();
    let text = s.why(&node).await;
    eprintln!("[overlap] kubectl baton why {node}:\n{text}");
    assert!(text.contains("  decision  policy paused\n"), "{text}");
    let stop: Vec<&str> = text.lines().filter(|l| l.contains("STOP")).collect();
    assert_eq!(stop.len(), 1, "{text}");
    assert!(
        stop[0].contains("policy pause") && stop[0].ends_with("<- the reason"),
        "{text}"
    );
    assert!(
        text.contains("Goes when: kubectl baton resume <policy>"),
        "{text}"
    );
    s.cluster
        .wait_for("a Waiting Event saying the policy is paused", || async {
            s.events("Waiting")
                .await
                .iter()
                .any(|e| e == &format!("{node}: policy paused"))
        })
        .await
        .unwrap();
    let notes: Vec<String> = s
        .events("Waiting")
        .await
        .into_iter()
        .filter(|e| e.starts_with(&format!("{node}: ")))
        .collect();
    assert_eq!(
        notes,
        [format!("{node}: policy paused")],
        "one Event: the policy was paused throughout, so the reason never changed, \
         however often the overlap made the operator reconcile"
    );
    let metrics = s.metrics.encode();
    assert!(
        metrics.contains(&format!(
            "baton_nodes_waiting{{policy=\"{POLICY}\",reason=\"policy_paused\"}} 3"
        )),
        "{metrics}"
    );
    assert_eq!(wide[POLICY]["Condition"], "Paused", "{wide:?}");
    assert_eq!(wide["night"]["Condition"], "Ready", "{wide:?}");
    assert_eq!(wide["night"]["Window"], "Closed", "{wide:?}");
    assert_eq!(wide[POLICY]["Next-Window"], "", "{wide:?}");
    eprintln!(
        "[overlap] both policies said so after {learned:.1?}, both cleared after {cleared:.1?}"
    );
    let resync = operator::reconcile::RESYNC;
    assert!(
        learned < resync / 4 && cleared < resync / 4,
        "{learned:?} / {cleared:?}: not at the resync ({resync:?})"
    );
    s.finish("overlapping policies (fake agents)");
}

/// `kubectl get updatepolicies -o wide` as the API server renders it (a `Table`): per
/// policy, its cells by column name (an absent value is "").
async fn wide_table(
    client: &kube::Client,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> {
    let request = http::Request::get("/apis/baton.dev/v1alpha1/updatepolicies?includeObject=None")
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .unwrap();
    let table: serde_json::Value = client.request(request).await.unwrap();
    let columns: Vec<String> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let cells: std::collections::BTreeMap<String, String> = columns
                .iter()
                .zip(row["cells"].as_array().unwrap())
                .map(|(c, v)| {
                    let text = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => String::new(),
                        v => v.to_string(),
                    };
                    (c.clone(), text)
                })
                .collect();
            (cells["Name"].clone(), cells)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disrupted_nodes_alerts_are_silenced_until_it_is_done_plus_extra_and_no_one_elses() {
    let am = harness::alertmanager::Alertmanager::start().await.unwrap();
    let (mut s, _operator) = start(3, 1, Duration::from_secs(2), &[]).await;
    for node in &s.names {
        am.fire("NodeDown", node).await.unwrap();
    }
    s.policy(serde_json::json!({"health": {"rebootTimeout": "2m",
        "alertmanager": {"url": am.url(), "matchers": ["node=~\"{{node}}\""], "extra": "3s"}}}))
        .await;
    // While one node holds its Lease, its alert is suppressed and another's, waiting, is
    // not.
    let seen = std::sync::Mutex::new(None);
    s.cluster
        .wait_for(
            "a node in flight silenced while a waiting one is not",
            || async {
                let leases = s.reboot_leases().await;
                let [lease] = leases.as_slice() else {
                    return false;
                };
                let holder = lease
                    .spec
                    .as_ref()
                    .and_then(|sp| sp.holder_identity.clone())
                    .unwrap_or_default();
                let nodes = list(&s.nodes()).await;
                let waiting = nodes.iter().find(|n| {
                    n.name_any() != holder
                        && annotation(n, protocol::STATE.name) == Some("RebootRequired")
                });
                let Some(waiting) = waiting else {
                    return false;
                };
                let silenced = am
                    .state("NodeDown", &holder)
                    .await
                    .is_ok_and(|st| st == "suppressed");
                let other = am
                    .state("NodeDown", &waiting.name_any())
                    .await
                    .unwrap_or_default();
                if silenced && other == "active" {
                    *seen.lock().unwrap() = Some((holder, waiting.name_any()));
                }
                silenced && other == "active"
            },
        )
        .await
        .unwrap();
    eprintln!(
        "[silence] in flight and silenced, waiting and paging: {:?}",
        seen.lock().unwrap()
    );
    s.wait_done(&[]).await;
    // Done plus 3s: every silence has ended and every alert pages again.
    s.cluster
        .wait_for("every alert active again after done + extra", || async {
            let mut all = true;
            for node in &s.names {
                all &= am
                    .state("NodeDown", node)
                    .await
                    .is_ok_and(|st| st == "active");
            }
            all
        })
        .await
        .unwrap();
    // One silence per node, made once and never duplicated; each named its node.
    let silences = am.silences().await.unwrap();
    let mut named: Vec<String> = silences
        .iter()
        .map(|x| x["comment"].as_str().unwrap().to_string())
        .filter_map(|c| rollout::silence::parse_comment(&c).map(|(_, node)| node))
        .collect();
    named.sort();
    assert_eq!(named, s.names, "{silences:?}");
    assert!(
        silences
            .iter()
            .all(|x| x["createdBy"] == "baton" && x["status"]["state"] == "expired")
    );
    assert_eq!(s.events("Silenced").await.len(), 3);
    s.finish("silences (fake agents, real Alertmanager)");
}

/// A webhook receiver on loopback: it records each body and answers `status`.
async fn receiver(
    status: u16,
) -> (
    String,
    Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    tokio::task::JoinHandle<()>,
) {
    let got: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
    let kept = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let kept = Arc::clone(&kept);
            async move {
                kept.lock()
                    .unwrap()
                    .push(serde_json::from_str(&body).unwrap_or_default());
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, got, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_hear_the_rollout_in_order_and_a_failing_one_holds_nothing_back() {
    let (ok_url, heard, _a) = receiver(200).await;
    let (bad_url, refused, _b) = receiver(500).await;
    let (secret_url, secretly, _c) = receiver(200).await;
    let (mut s, _operator) = start(3, 1, Duration::from_millis(300), &[]).await;
    // A URL that carries a token lives in a Secret of the operator's namespace.
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hook", "namespace": "baton-system"},
        "stringData": {"url": secret_url},
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(s.client.clone(), "baton-system")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    s.policy(serde_json::json!({"notify": [
        {"url": ok_url},
        {"url": bad_url, "format": "slack", "events": ["Started", "Completed"]},
        {"urlFrom": {"name": "hook", "key": "url"}, "events": ["Completed"]},
    ]}))
    .await;
    s.wait_done(&[]).await;
    let rolled = started.elapsed();
    s.cluster
        .wait_for("the Completed notification", || async {
            heard
                .lock()
                .unwrap()
                .iter()
                .any(|b| b["event"] == "Completed")
        })
        .await
        .unwrap();
    let got = heard.lock().unwrap().clone();
    let events: Vec<String> = got
        .iter()
        .map(|b| match b["node"].as_str() {
            Some(node) => format!("{}:{node}", b["event"].as_str().unwrap()),
            None => b["event"].as_str().unwrap().to_string(),
        })
        .collect();
    eprintln!("[notify] heard in {rolled:.1?}: {events:?}");
    assert_eq!(
        events.first().map(String::as_str),
        Some("Started"),
        "{events:?}"
    );
    assert_eq!(
        events.last().map(String::as_str),
        Some("Completed"),
        "{events:?}"
    );
    let mut done: Vec<&str> = events
        .iter()
        .filter_map(|e| e.strip_prefix("NodeDone:"))
        .collect();
    done.sort();
    assert_eq!(done, s.names, "each node announced once: {events:?}");
    assert_eq!(events.len(), 5, "{events:?}");
    for b in &got {
        assert_eq!(b["apiVersion"], "baton.dev/v1alpha1");
        assert_eq!(b["kind"], "Notification");
        assert_eq!(b["policy"], POLICY);
        assert!(
            b["time"]
                .as_str()
                .unwrap()
                .parse::<jiff::Timestamp>()
                .is_ok()
        );
        assert!(b["message"].as_str().unwrap().contains(POLICY));
    }
    // The refusing webhook was retried (with backoff) in Slack's format, and it held
    // nothing back: the rollout took the same few seconds.
    s.cluster
        .wait_for("the refused Started notification to be retried", || async {
            refused.lock().unwrap().len() >= 3
        })
        .await
        .unwrap();
    let tries = refused.lock().unwrap().clone();
    assert!(
        tries[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("baton Started: "),
        "{tries:?}"
    );
    assert!(
        rolled < Duration::from_secs(30),
        "a failing webhook must not slow the rollout: {rolled:?}"
    );
    // The Secret's URL heard only what it asked for.
    s.cluster
        .wait_for("the Secret's webhook to hear Completed", || async {
            !secretly.lock().unwrap().is_empty()
        })
        .await
        .unwrap();
    let secret_heard: Vec<serde_json::Value> = secretly.lock().unwrap().clone();
    assert_eq!(secret_heard.len(), 1, "{secret_heard:?}");
    assert_eq!(secret_heard[0]["event"], "Completed");
    let metrics = s.metrics.encode();
    assert!(
        metrics.contains("baton_notifications_total{result=\"sent\"} 6"),
        "{metrics}"
    );
    s.finish("webhooks (fake agents)");
}

/// A promotion cycle (a after b, b after a) is an invalid spec on both policies, naming
/// the chain; a missing upstream is only a wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_cycle_is_an_invalid_spec_naming_the_chain() {
    let s = Scenario::bare(1, Limits::budget(1)).await;
    let _operator = s.operator("op-a");
    for (name, after) in [("a", "b"), ("b", "a")] {
        let spec = serde_json::json!({
            "nodeSelector": {"matchLabels": {"pool": name}},
            "promotion": {"after": after},
        });
        let policy = UpdatePolicy::new(name, serde_json::from_value(spec).unwrap());
        s.policies()
            .create(&kube::api::PostParams::default(), &policy)
            .await
            .unwrap();
    }
    let invalid = |name: &'static str| {
        let policies = s.policies();
        async move {
            policies
                .get(name)
                .await
                .ok()
                .and_then(|p| p.status)
                .and_then(|st| {
                    st.conditions
                        .into_iter()
                        .find(|c| c.type_ == "InvalidSpec" && c.status == "True")
                })
                .map(|c| c.message)
        }
    };
    s.cluster
        .wait_for("both policies InvalidSpec", || async {
            invalid("a").await.is_some() && invalid("b").await.is_some()
        })
        .await
        .unwrap();
    let message = invalid("a").await.unwrap();
    assert!(
        message.contains("spec.promotion.after: promotion cycle a → b → a"),
        "{message}"
    );
}
