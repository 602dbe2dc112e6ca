//! Rollouts under faults, on the real control plane with real agent processes (sim
//! backend) and the operator: the leader killed at random moments, agents killed
//! mid-staging and mid-reboot, API errors, a node deleted while it holds a lease, and a
//! PodDisruptionBudget that never allows an eviction. The invariant watcher
//! (`e2e::invariants`, driven by `e2e::scenario`) records every node transition and lease and checks the budget,
//! the leases and halting over each whole run; its counts are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crds::protocol;
use e2e::{
    invariants::WindowFn,
    scenario::{
        Limits, POLICY, Scenario, annotation, cordoned_by_baton, first_in_state, replica_config,
        state,
    },
};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
};

/// A small deterministic generator (xorshift), so that "random" faults repeat.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_at_random_moments_breaks_no_rule() {
    let mut s = Scenario::start(6, 2, &[]).await;
    let replicas = Arc::new(Mutex::new(vec![
        ("op-a".to_string(), s.operator("op-a")),
        ("op-b".to_string(), s.operator("op-b")),
    ]));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (client, replicas, kills) =
            (s.client.clone(), Arc::clone(&replicas), Arc::clone(&kills));
        tokio::spawn(async move {
            let mut rng = Rng(20_261_126);
            let leases: Api<Lease> = Api::namespaced(client.clone(), e2e::scenario::NAMESPACE);
            loop {
                tokio::time::sleep(Duration::from_millis(rng.between(1500, 5000))).await;
                let Ok(lease) = leases.get("baton-operator-leader").await else {
                    continue;
                };
                let Some(leader) = lease.spec.and_then(|s| s.holder_identity) else {
                    continue;
                };
                let mut r = replicas.lock().unwrap();
                if let Some(slot) = r.iter_mut().find(|(id, _)| *id == leader) {
                    slot.1.abort();
                    kills.fetch_add(1, Ordering::SeqCst);
                    // It comes back (as a restarted pod would) and stands by.
                    slot.1 = tokio::spawn(operator::replica::run_replica(
                        client.clone(),
                        replica_config(&leader, &[]),
                    ));
                }
            }
        })
    };
    s.policy(serde_json::json!({"maxUnavailable": 2, "health": {"rebootTimeout": "5m"}}))
        .await;
    s.wait_done(&[]).await;
    killer.abort();
    let killed = kills.load(Ordering::SeqCst);
    eprintln!("[faults] leader killed {killed} times");
    assert!(killed >= 2, "the leader was killed during the rollout");
    let report = s.finish("leader killed at random moments");
    assert_eq!(report.reboots, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_killed_mid_staging_and_mid_reboot_restart_cleanly() {
    let mut s = Scenario::start(
        4,
        1,
        &["--sim-stage-time", "3s", "--before-reboot", "sleep 2"],
    )
    .await;
    let _operator = s.operator("op-a");
    let staging = tokio::spawn(first_in_state(s.nodes(), "Staging", None));
    s.policy(serde_json::json!({"maxUnavailable": 1})).await;
    let staged_victim = staging.await.unwrap();
    s.fleet().kill_agent(&staged_victim);
    eprintln!("[faults] killed {staged_victim} while staging");
    let rebooting = first_in_state(s.nodes(), "Rebooting", None).await;
    s.fleet().kill_agent(&rebooting);
    eprintln!("[faults] killed {rebooting} while rebooting");
    s.wait_done(&[]).await;
    for n in &s.names {
        assert_eq!(s.fleet().log(n).reboots, 1, "{n} rebooted exactly once");
    }
    assert!(s.fleet().log(&staged_victim).restarts >= 1 && s.fleet().log(&rebooting).restarts >= 1);
    eprintln!("[faults] killed {staged_victim} mid-staging and {rebooting} mid-reboot");
    let report = s.finish("agents killed mid-staging and mid-reboot");
    assert_eq!(report.reboots, 4);
}

/// Fails about `per_mille`/1000 of the requests passing through, before they reach the
/// API server, as a flaky network or an overloaded API server would.
#[derive(Clone)]
struct Flaky<S> {
    inner: S,
    rng: Arc<Mutex<Rng>>,
    per_mille: u64,
    injected: Arc<AtomicUsize>,
}

impl<S> tower::Service<http::Request<kube::client::Body>> for Flaky<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Error = tower::BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, tower::BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let watch = request
            .uri()
            .query()
            .is_some_and(|q| q.contains("watch=true"));
        let fail = !watch && self.rng.lock().unwrap().next() % 1000 < self.per_mille;
        if fail {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Box::pin(async { Err("injected API fault".into()) });
        }
        Box::pin(self.inner.call(request))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_delay_the_rollout_but_break_no_rule() {
    let mut s = Scenario::start(5, 2, &[]).await;
    let kubeconfig = kube::config::Kubeconfig::read_from(s.cluster.kubeconfig()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.default_retry = false;
    let injected = Arc::new(AtomicUsize::new(0));
    let flaky = {
        let injected = Arc::clone(&injected);
        tower::layer::layer_fn(move |inner| Flaky {
            inner,
            rng: Arc::new(Mutex::new(Rng(7))),
            per_mille: 150,
            injected: Arc::clone(&injected),
        })
    };
    let client = kube::client::ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&flaky)
        .build();
    let _operator = s.operator_on(client, "op-a", None);
    s.policy(serde_json::json!({"maxUnavailable": 2})).await;
    s.wait_done(&[]).await;
    let n = injected.load(Ordering::SeqCst);
    eprintln!("[faults] {n} API requests of the operator failed on purpose (15 %)");
    assert!(n > 0);
    let report = s.finish("API errors");
    assert_eq!(report.reboots, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_while_it_holds_a_lease_frees_its_slot() {
    let mut s = Scenario::start(4, 1, &["--before-reboot", "sleep 3"]).await;
    let _operator = s.operator("op-a");
    let rebooting = tokio::spawn(first_in_state(s.nodes(), "Rebooting", None));
    s.policy(serde_json::json!({"maxUnavailable": 1})).await;
    let gone = rebooting.await.unwrap();
    s.nodes()
        .delete(&gone, &DeleteParams::default())
        .await
        .unwrap();
    eprintln!("[faults] deleted {gone} while it held its lease");
    s.wait_done(std::slice::from_ref(&gone)).await;
    let report = s.finish("node deleted while holding a lease");
    assert!(
        report.releases >= 4,
        "the deleted node's lease was released too: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdb_that_never_allows_an_eviction_fails_its_node_and_halts_the_pool() {
    let mut s = Scenario::start(3, 1, &[]).await;
    // One pod on the first node that no eviction may ever remove.
    let blocked = s.names[0].clone();
    let ledger = s.unevictable_pod(&blocked).await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.client.clone(), "app");
    let _operator = s.operator("op-a");
    s.policy(
        serde_json::json!({"maxUnavailable": 1, "drain": {"timeout": "5s", "onTimeout": "Abort"}}),
    )
    .await;
    s.wait_condition("Halted").await;
    // Whatever was in flight finishes; then nothing moves.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let node = s.nodes().get(&blocked).await.unwrap();
    assert!(
        annotation(&node, protocol::FAILURE.name).is_some_and(|f| f.contains("drain")),
        "{:?}",
        node.annotations()
    );
    assert_eq!(
        pods.get(&ledger).await.unwrap().metadata.deletion_timestamp,
        None,
        "the protected pod was never evicted"
    );
    let report = s.finish("a PDB that never allows an eviction");
    assert_eq!(report.failures.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jump_out_of_the_window_lets_the_reboot_in_flight_finish_and_starts_nothing() {
    use std::sync::atomic::AtomicBool;
    // Grants are judged on the operator's clock: while it reads 2 h ahead, the window is
    // closed.
    let jumped = Arc::new(AtomicBool::new(false));
    let window = {
        let jumped = Arc::clone(&jumped);
        Arc::new(move |_| !jumped.load(Ordering::SeqCst)) as WindowFn
    };
    let mut s = Scenario::bare(
        3,
        Limits {
            window: Some(window),
            ..Limits::budget(1)
        },
    )
    .await;
    let options = s.fleet_options(Duration::from_secs(1), &["--before-reboot", "sleep 3"]);
    s.start_fleet(&options);
    let clock = Arc::new(operator::clock::Clock::system());
    let _operator = s.operator_on(s.client.clone(), "op-a", Some(Arc::clone(&clock)));
    // A daily one-hour window that opened 5 minutes ago.
    let start = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .checked_sub(jiff::SignedDuration::from_mins(5))
        .unwrap();
    let nodes = s.nodes();
    let rebooting = tokio::spawn(first_in_state(nodes.clone(), "Rebooting", None));
    s.policy(serde_json::json!({
        "maxUnavailable": 1,
        "health": {"rebootTimeout": "4h"},
        "maintenanceWindows": [{"weekdays": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"], "start": start.strftime("%H:%M").to_string(), "duration": "1h", "timeZone": "UTC"}],
    }))
    .await;
    let first = rebooting.await.unwrap();
    jumped.store(true, Ordering::SeqCst);
    clock.set_offset(jiff::SignedDuration::from_hours(2));
    eprintln!("[faults] the operator's clock jumped 2 h ahead while {first} was rebooting");
    s.cluster
        .wait_for("the reboot in flight to finish", || async {
            state(&nodes.get(&first).await.unwrap()) == Some("Done")
                && s.reboot_leases().await.is_empty()
        })
        .await
        .unwrap();
    s.cluster
        .wait_for("the status to show the closed window", || async {
            s.status().await.window.as_deref() == Some("Closed")
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        s.reboot_leases().await.is_empty(),
        "nothing started outside the window"
    );
    // The clock comes back: the window is open again and the rest follows.
    clock.set_offset(jiff::SignedDuration::ZERO);
    jumped.store(false, Ordering::SeqCst);
    s.wait_done(&[]).await;
    let report = s.finish("a clock jump out of the window and back");
    assert_eq!(report.reboots, 3);
    for n in &s.names {
        assert_eq!(s.fleet().log(n).reboots, 1);
    }
}

// === Safety: admin actions and the grant (issue 14's regressions) ===

/// A before-reboot command that fails while `marker` exists: the admin "fixes the
/// cause" by removing it.
fn failing_while(marker: &std::path::Path) -> String {
    format!("test ! -e {}", marker.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_failed_before_reboot_command_never_reboots_without_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    std::fs::write(&broken, "").unwrap();
    let command = failing_while(&broken);
    let mut s = Scenario::start(4, 1, &["--before-reboot", &command]).await;
    let _operator = s.operator("op-a");
    s.policy_staged(serde_json::json!({"maxUnavailable": 1}))
        .await;
    s.wait_condition("Halted").await;
    let order = s.rollout_order().await;
    let first = order[0].clone();
    let failed = s.nodes().get(&first).await.unwrap();

    assert!(annotation(&failed, protocol::FAILURE.name).is_some());
    assert!(
        annotation(&failed, protocol::REBOOT_OK.name).is_none(),
        "failing the node ended its grant: {:?}",
        failed.annotations()
    );
    // The admin fixes the cause, then retries the pool.
    std::fs::remove_file(&broken).unwrap();
    assert_eq!(s.retry_pool().await, std::slice::from_ref(&first));
    s.wait_done(&[]).await;
    for n in &s.names {
        assert_eq!(s.fleet().log(n).reboots, 1, "{n} rebooted exactly once");
    }
    let report = s.finish("a retry after a failed before-reboot command");
    assert_eq!(report.reboots, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_node_deleted_by_an_admin_halts_the_pool_until_a_retry_clears_it() {
    let mut s = Scenario::start(4, 1, &[]).await;
    let order = s.rollout_order().await;
    s.fleet().fail_next_boot(&order[0]).unwrap();
    let _operator = s.operator("op-a");
    s.policy_staged(serde_json::json!({"maxUnavailable": 1}))
        .await;
    s.wait_condition("Halted").await;
    s.nodes()
        .delete(&order[0], &DeleteParams::default())
        .await
        .unwrap();
    eprintln!("[faults] deleted the failed node {}", order[0]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        s.condition("Halted").await,
        "a failure counts until a retry"
    );
    let held = s.reboot_leases().await;
    assert_eq!(held.len(), 1, "only the failed node's Lease: {held:?}");
    // `kubectl baton retry pool` finds the deleted node's failed Lease.
    assert_eq!(s.retry_pool().await, [order[0].clone()]);
    s.wait_done(std::slice::from_ref(&order[0])).await;
    s.finish("a failed node deleted, then retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_failure_halts_the_pool_until_a_retry_even_once_the_agent_stops_reporting_it() {
    let mut s = Scenario::start(3, 1, &["--check-interval", "2s"]).await;
    let order = s.rollout_order().await;
    let broken = order[2].clone();
    s.fleet().fail_staging(&broken, true).unwrap();
    let _operator = s.operator("op-a");
    s.policy(serde_json::json!({"maxUnavailable": 1})).await;
    s.wait_condition("Halted").await;
    // The payload comes right: the agent stages and asks for a reboot again.
    s.fleet().fail_staging(&broken, false).unwrap();
    let nodes = s.nodes();
    s.cluster
        .wait_for("the agent to stop reporting its failure", || async {
            state(&nodes.get(&broken).await.unwrap()) == Some("RebootRequired")
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(s.condition("Halted").await, "a halt never lifts by itself");
    let n = nodes.get(&broken).await.unwrap();
    assert!(
        annotation(&n, protocol::FAILURE.name).is_some_and(|f| f.contains("staging failure")),
        "{:?}",
        n.annotations()
    );
    assert_eq!(s.retry_pool().await, std::slice::from_ref(&broken));
    s.wait_done(&[]).await;
    s.finish("a staging failure, recovered, then retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_in_flight_relabelled_out_of_the_pool_keeps_its_slot_until_it_is_done() {
    let mut s = Scenario::start(4, 1, &[]).await;
    for n in &s.names {
        label(&s.nodes(), n, "a").await;
    }
    let order = s.rollout_order().await;
    s.unevictable_pod(&order[0]).await;
    let _operator = s.operator("op-a");
    s.policy_staged(
        serde_json::json!({"nodeSelector": {"matchLabels": {"pool": "a"}}, "maxUnavailable": 1,
        "drain": {"timeout": "15s", "onTimeout": "Proceed"}}),
    )
    .await;
    s.wait_draining(&order[0]).await;
    label(&s.nodes(), &order[0], "b").await;
    eprintln!("[faults] relabelled {} out of the pool mid-drain", order[0]);
    // The watcher fails the run if a second node is disrupted meanwhile.
    s.wait_done(&[]).await;
    s.finish("a node relabelled out of its pool mid-drain");
}

async fn label(nodes: &Api<Node>, node: &str, pool: &str) {
    let patch = serde_json::json!({"metadata": {"labels": {"pool": pool}}});
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_deleted_mid_drain_ends_its_grants_before_it_goes() {
    let mut s = Scenario::start(3, 1, &[]).await;
    let order = s.rollout_order().await;
    s.unevictable_pod(&order[0]).await;
    let _operator = s.operator("op-a");
    s.policy_staged(serde_json::json!({"maxUnavailable": 1, "drain": {"timeout": "10m"}}))
        .await;
    s.wait_draining(&order[0]).await;
    // `kubectl baton retry --node` on a node in flight that has not failed: refused,
    // and its Lease stays.
    let err = kubectl_baton::steer::retry(
        s.client.clone(),
        e2e::scenario::NAMESPACE,
        None,
        std::slice::from_ref(&order[0]),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("has not failed") && err.contains("in progress"),
        "{err}"
    );
    assert!(
        s.leases()
            .get_opt(&crds::grant::lease_name(&order[0]))
            .await
            .unwrap()
            .is_some()
    );
    let series = format!("policy=\"{POLICY}\"");
    assert!(
        s.metrics.encode().contains(&series),
        "its metrics are exported"
    );
    s.policies()
        .delete(POLICY, &DeleteParams::default())
        .await
        .unwrap();
    let (policies, nodes) = (s.policies(), s.nodes());
    s.cluster
        .wait_for("the policy to go, its grant ended", || async {
            policies.get_opt(POLICY).await.unwrap().is_none()
        })
        .await
        .unwrap();
    // Its metric series go with it: an alert on its last value would fire forever.
    let metrics = Arc::clone(&s.metrics);
    s.cluster
        .wait_for("the deleted policy's series to go", || async {
            !metrics.encode().contains(&series)
        })
        .await
        .unwrap();
    let n = nodes.get(&order[0]).await.unwrap();
    assert!(!cordoned_by_baton(&n), "baton's cordon is undone");
    assert!(!e2e::scenario::unschedulable(&n), "uncordoned");
    assert!(s.reboot_leases().await.is_empty());
    s.finish("a policy deleted mid-drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_mid_drain_undoes_batons_cordon_instead_of_freezing() {
    let mut s = Scenario::start(3, 1, &[]).await;
    let order = s.rollout_order().await;
    s.unevictable_pod(&order[0]).await;
    let _operator = s.operator("op-a");
    s.policy_staged(serde_json::json!({"maxUnavailable": 1, "drain": {"timeout": "10m"}}))
        .await;
    s.wait_draining(&order[0]).await;
    // An invalid drain.podSelector: it used to leave no pod alone (everything evicted)
    // and froze the nodes in flight.
    let bad = serde_json::json!({"spec": {"drain": {"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "Like", "values": ["ledger"]}]}}}});
    s.policies()
        .patch(POLICY, &PatchParams::default(), &Patch::Merge(&bad))
        .await
        .unwrap();
    s.wait_condition("InvalidSpec").await;
    let nodes = s.nodes();
    s.cluster
        .wait_for("the grant in flight to end", || async {
            !cordoned_by_baton(&nodes.get(&order[0]).await.unwrap())
                && s.reboot_leases().await.is_empty()
        })
        .await
        .unwrap();
    let message = s
        .status()
        .await
        .conditions
        .into_iter()
        .find(|c| c.type_ == "InvalidSpec")
        .unwrap()
        .message;
    assert!(message.contains("spec.drain.podSelector"), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        s.reboot_leases().await.is_empty(),
        "nothing new starts under an invalid spec"
    );
    s.finish("an invalid spec mid-drain");
}

/// One rollout, with every admin action an operations team takes mid-rollout: a failed
/// node retried, a failed node deleted (and retried), a node relabelled out of the
/// pool mid-drain, the policy deleted and re-created mid-drain, and a pause and a
/// resume. The invariant watcher must see no rule broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_mid_rollout_break_no_rule() {
    let mut s = Scenario::start(6, 1, &[]).await;
    for n in &s.names {
        label(&s.nodes(), n, "a").await;
    }
    let order = s.rollout_order().await;
    s.fleet().fail_next_boot(&order[0]).unwrap();
    s.fleet().fail_next_boot(&order[1]).unwrap();
    s.unevictable_pod(&order[2]).await;
    s.unevictable_pod(&order[3]).await;
    let _operator = s.operator("op-a");
    let spec = serde_json::json!({"nodeSelector": {"matchLabels": {"pool": "a"}}, "maxUnavailable": 1,
        "drain": {"timeout": "20s", "onTimeout": "Proceed"}});
    s.policy_staged(spec.clone()).await;

    // 1. The first node fails (its new version does not boot): retried.
    s.wait_condition("Halted").await;
    assert_eq!(s.retry_pool().await, [order[0].clone()]);
    eprintln!("[faults] retried {}", order[0]);
    // 2. The second fails too: its machine is deleted, then the pool retried.
    let nodes = s.nodes();
    s.cluster
        .wait_for("the second failure", || async {
            annotation(&nodes.get(&order[1]).await.unwrap(), protocol::FAILURE.name).is_some()
        })
        .await
        .unwrap();
    nodes
        .delete(&order[1], &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(s.condition("Halted").await);
    assert_eq!(s.retry_pool().await, [order[1].clone()]);
    eprintln!("[faults] deleted and retried {}", order[1]);
    // 3. The third is relabelled out of the pool while its drain is held by a PDB.
    s.wait_draining(&order[2]).await;
    label(&nodes, &order[2], "b").await;
    eprintln!("[faults] relabelled {} mid-drain", order[2]);
    // 4. The policy is deleted while the fourth drains, then re-created.
    s.wait_draining(&order[3]).await;
    s.policies()
        .delete(POLICY, &DeleteParams::default())
        .await
        .unwrap();
    let policies = s.policies();
    s.cluster
        .wait_for("the deleted policy to go", || async {
            policies.get_opt(POLICY).await.unwrap().is_none()
        })
        .await
        .unwrap();
    assert!(!cordoned_by_baton(&nodes.get(&order[3]).await.unwrap()));
    s.policy(spec).await;
    eprintln!(
        "[faults] deleted and re-created the policy while {} drained",
        order[3]
    );
    // 5. Pause while the fifth starts, then resume.
    s.wait_draining(&order[4]).await;
    kubectl_baton::steer::set_policy_paused(s.client.clone(), POLICY, true)
        .await
        .unwrap();
    s.cluster
        .wait_for("the node in flight to finish while paused", || async {
            s.reboot_leases().await.is_empty()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        s.reboot_leases().await.is_empty(),
        "nothing starts while paused"
    );
    kubectl_baton::steer::set_policy_paused(s.client.clone(), POLICY, false)
        .await
        .unwrap();
    eprintln!("[faults] paused and resumed");
    s.wait_done(std::slice::from_ref(&order[1])).await;
    s.finish("admin actions mid-rollout");
}
