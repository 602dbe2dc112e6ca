//! Rollouts under faults, on the real control plane with real agent processes (sim
//! backend) and the operator: the leader killed at random moments, agents killed
//! mid-staging and mid-reboot, API errors, a node deleted while it holds a lease, and a
//! PodDisruptionBudget that never allows an eviction. The invariant watcher
//! (`e2e::invariants`) records every node transition and lease and checks the budget,
//! the leases and halting over each whole run; its counts are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::Parser;
use crds::UpdatePolicy;
use e2e::{
    TestCluster,
    fleet::{Fleet, FleetOptions},
    invariants::{Report, Watcher},
};
use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
    runtime::{WatchStreamExt, watcher},
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

struct Scenario {
    cluster: TestCluster,
    client: Client,
    names: Vec<String>,
    fleet: Fleet,
    watcher: Watcher,
}

impl Scenario {
    async fn start(nodes: usize, budget: usize, agent_args: &[&str]) -> Scenario {
        let (cluster, names) = TestCluster::start_with_nodes(nodes).await.unwrap();
        let client = cluster.client();
        let mut args: Vec<String> = agent_args.iter().map(|a| a.to_string()).collect();
        if !args.iter().any(|a| a == "--sim-stage-time") {
            args.extend(["--sim-stage-time".to_string(), "1s".into()]);
        }
        let fleet = Fleet::start(
            &names,
            &FleetOptions::new(
                env!("CARGO_BIN_EXE_baton-agent"),
                cluster.kubeconfig(),
                Duration::from_secs(1),
                args,
            ),
        )
        .unwrap();
        let watcher = Watcher::start(client.clone(), "baton-system", budget, 1, None);
        Scenario {
            cluster,
            client,
            names,
            fleet,
            watcher,
        }
    }

    fn operator(&self, client: Client, identity: &str) -> tokio::task::JoinHandle<()> {
        let config = operator::config::Config::try_parse_from([
            "baton-operator",
            "--namespace",
            "baton-system",
            "--identity",
            identity,
            "--leader-lease-duration",
            "3s",
            "--leader-renew-interval",
            "1s",
        ])
        .unwrap();
        // A replica ends when it loses leadership (the process exits); its Deployment
        // starts it again, and so does this loop.
        tokio::spawn(async move {
            loop {
                operator::controller::run_replica(client.clone(), config.clone()).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    async fn policy(&self, spec: serde_json::Value) {
        let mut spec = spec;
        spec["release"] = serde_json::json!({
            "version": "2.0.0", "url": "https://images.invalid/os-2.0.0.img",
            "sha256": "c".repeat(64), "signature": format!("{}==", "A".repeat(86)),
        });
        let policy: UpdatePolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy", "metadata": {"name": "pool"}, "spec": spec,
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

    async fn wait_done(&self, except: &[String]) {
        let nodes = self.nodes();
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "baton-system");
        self.cluster
            .wait_for("every node Done on 2.0.0 with no lease left", || async {
                let held = leases
                    .list(&ListParams::default().labels("app.kubernetes.io/managed-by=baton"))
                    .await
                    .unwrap()
                    .items;
                held.is_empty()
                    && nodes
                        .list(&ListParams::default())
                        .await
                        .unwrap()
                        .items
                        .iter()
                        .all(|n| {
                            except.contains(&n.name_any())
                                || (state(n) == Some("Done")
                                    && n.annotations()
                                        .get("baton.dev/current-version")
                                        .map(String::as_str)
                                        == Some("2.0.0")
                                    && !n
                                        .spec
                                        .as_ref()
                                        .and_then(|s| s.unschedulable)
                                        .unwrap_or(false))
                        })
            })
            .await
            .unwrap_or_else(|e| {
                let dump = futures::executor::block_on(async {
                    let mut out = String::new();
                    for n in nodes.list(&ListParams::default()).await.unwrap().items {
                        out.push_str(&format!(
                            "{} {:?} {:?} cordoned={:?} failure={:?}\n",
                            n.name_any(),
                            state(&n),
                            n.annotations().get("baton.dev/current-version"),
                            n.spec.as_ref().and_then(|s| s.unschedulable),
                            n.annotations().get("baton.dev/failure")
                        ));
                    }
                    for l in leases.list(&ListParams::default()).await.unwrap().items {
                        out.push_str(&format!("lease {} {:?}\n", l.name_any(), l.annotations()));
                    }
                    let p = Api::<UpdatePolicy>::all(self.client.clone())
                        .get("pool")
                        .await
                        .unwrap();
                    out.push_str(&format!("{:?}\n", p.status));
                    out
                });
                panic!("{e}\n{dump}");
            });
    }

    fn finish(self, name: &str) -> Report {
        let report = self.watcher.finish();
        eprintln!("[faults] {name}: {report}");
        for v in &report.violations {
            eprintln!("[faults]   violation: {v}");
        }
        assert!(
            report.violations.is_empty(),
            "{name}: {:?}",
            report.violations
        );
        report
    }
}

fn state(node: &Node) -> Option<&str> {
    node.annotations()
        .get("baton.dev/state")
        .map(String::as_str)
}

/// The first node seen in `wanted` state, excluding `not`.
async fn first_in_state(nodes: Api<Node>, wanted: &str, not: Option<String>) -> String {
    let mut events = watcher(nodes, watcher::Config::default())
        .applied_objects()
        .boxed();
    while let Some(Ok(n)) = events.next().await {
        if state(&n) == Some(wanted) && not.as_deref() != Some(n.name_any().as_str()) {
            return n.name_any();
        }
    }
    panic!("the node watch ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_at_random_moments_breaks_no_rule() {
    let s = Scenario::start(6, 2, &[]).await;
    let replicas = Arc::new(Mutex::new(vec![
        ("op-a".to_string(), s.operator(s.client.clone(), "op-a")),
        ("op-b".to_string(), s.operator(s.client.clone(), "op-b")),
    ]));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (client, replicas, kills) =
            (s.client.clone(), Arc::clone(&replicas), Arc::clone(&kills));
        let config = |id: &str| {
            operator::config::Config::try_parse_from([
                "baton-operator",
                "--namespace",
                "baton-system",
                "--identity",
                id,
                "--leader-lease-duration",
                "3s",
                "--leader-renew-interval",
                "1s",
            ])
            .unwrap()
        };
        tokio::spawn(async move {
            let mut rng = Rng(20_261_126);
            let leases: Api<Lease> = Api::namespaced(client.clone(), "baton-system");
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
                    slot.1 = tokio::spawn(operator::controller::run_replica(
                        client.clone(),
                        config(&leader),
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
    let s = Scenario::start(
        4,
        1,
        &["--sim-stage-time", "3s", "--before-reboot", "sleep 2"],
    )
    .await;
    let _operator = s.operator(s.client.clone(), "op-a");
    let staging = tokio::spawn(first_in_state(s.nodes(), "Staging", None));
    s.policy(serde_json::json!({"maxUnavailable": 1})).await;
    let staged_victim = staging.await.unwrap();
    s.fleet.kill_agent(&staged_victim);
    eprintln!("[faults] killed {staged_victim} while staging");
    let rebooting = first_in_state(s.nodes(), "Rebooting", None).await;
    s.fleet.kill_agent(&rebooting);
    eprintln!("[faults] killed {rebooting} while rebooting");
    s.wait_done(&[]).await;
    for n in &s.names {
        assert_eq!(s.fleet.log(n).reboots, 1, "{n} rebooted exactly once");
    }
    assert!(s.fleet.log(&staged_victim).restarts >= 1 && s.fleet.log(&rebooting).restarts >= 1);
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
    let s = Scenario::start(5, 2, &[]).await;
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
    let _operator = s.operator(client, "op-a");
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
    let s = Scenario::start(4, 1, &["--before-reboot", "sleep 3"]).await;
    let _operator = s.operator(s.client.clone(), "op-a");
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
    let s = Scenario::start(3, 1, &[]).await;
    // One pod on the first node that no eviction may ever remove.
    let blocked = s.names[0].clone();
    s.cluster.create_namespace("app").await.unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.client.clone(), "app");
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ledger", "labels": {"app": "ledger"}},
        "spec": {"nodeName": blocked, "containers": [{"name": "ledger", "image": "registry.invalid/ledger:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ledger-never"},
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "ledger"}}},
        }))
        .unwrap();
    Api::namespaced(s.client.clone(), "app")
        .create(&PostParams::default(), &pdb)
        .await
        .unwrap();
    let _operator = s.operator(s.client.clone(), "op-a");
    s.policy(
        serde_json::json!({"maxUnavailable": 1, "drain": {"timeout": "5s", "onTimeout": "Abort"}}),
    )
    .await;
    let policies: Api<UpdatePolicy> = Api::all(s.client.clone());
    s.cluster
        .wait_for("the pool to halt on the blocked drain", || async {
            policies
                .get("pool")
                .await
                .unwrap()
                .status
                .is_some_and(|st| {
                    st.conditions
                        .iter()
                        .any(|c| c.type_ == "Halted" && c.status == "True")
                })
        })
        .await
        .unwrap();
    // Whatever was in flight finishes; then nothing moves.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let node = s.nodes().get(&blocked).await.unwrap();
    assert!(
        node.annotations()
            .get("baton.dev/failure")
            .is_some_and(|f| f.contains("drain")),
        "{:?}",
        node.annotations()
    );
    assert_eq!(
        pods.get("ledger")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp,
        None,
        "the protected pod was never evicted"
    );
    let report = s.finish("a PDB that never allows an eviction");
    assert_eq!(report.failures.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jump_out_of_the_window_lets_the_reboot_in_flight_finish_and_starts_nothing() {
    use std::sync::atomic::AtomicBool;
    let (cluster, names) = TestCluster::start_with_nodes(3).await.unwrap();
    let client = cluster.client();
    let fleet = Fleet::start(
        &names,
        &FleetOptions::new(
            env!("CARGO_BIN_EXE_baton-agent"),
            cluster.kubeconfig(),
            Duration::from_secs(1),
            ["--sim-stage-time", "1s", "--before-reboot", "sleep 3"],
        ),
    )
    .unwrap();
    // Grants are judged on the operator's clock: while it reads 2 h ahead, the window is
    // closed.
    let jumped = Arc::new(AtomicBool::new(false));
    let window = {
        let jumped = Arc::clone(&jumped);
        Arc::new(move |_| !jumped.load(Ordering::SeqCst)) as e2e::invariants::WindowFn
    };
    let watcher = Watcher::start(client.clone(), "baton-system", 1, 1, Some(window));
    let clock = Arc::new(operator::clock::Clock::system());
    let config = operator::config::Config::try_parse_from([
        "baton-operator",
        "--namespace",
        "baton-system",
        "--identity",
        "op-a",
    ])
    .unwrap();
    let _operator = tokio::spawn(operator::controller::run_replica_with_clock(
        client.clone(),
        config,
        Arc::new(operator::metrics::Metrics::default()),
        Arc::clone(&clock),
    ));
    // A daily one-hour window that opened 5 minutes ago.
    let start = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .checked_sub(jiff::SignedDuration::from_mins(5))
        .unwrap();
    let spec = serde_json::json!({
        "maxUnavailable": 1,
        "health": {"rebootTimeout": "4h"},
        "maintenanceWindows": [{"weekdays": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"], "start": start.strftime("%H:%M").to_string(), "duration": "1h", "timeZone": "UTC"}],
        "release": {"version": "2.0.0", "url": "https://images.invalid/os.img", "sha256": "e".repeat(64), "signature": format!("{}==", "A".repeat(86))},
    });
    let policy: UpdatePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy", "metadata": {"name": "pool"}, "spec": spec,
    }))
    .unwrap();
    let policies: Api<UpdatePolicy> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let rebooting = tokio::spawn(first_in_state(nodes.clone(), "Rebooting", None));
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let first = rebooting.await.unwrap();
    jumped.store(true, Ordering::SeqCst);
    clock.set_offset(jiff::SignedDuration::from_hours(2));
    eprintln!("[faults] the operator's clock jumped 2 h ahead while {first} was rebooting");
    let leases: Api<Lease> = Api::namespaced(client.clone(), "baton-system");
    let reboot_leases = ListParams::default().labels("app.kubernetes.io/managed-by=baton");
    cluster
        .wait_for("the reboot in flight to finish", || async {
            state(&nodes.get(&first).await.unwrap()) == Some("Done")
                && leases.list(&reboot_leases).await.unwrap().items.is_empty()
        })
        .await
        .unwrap();
    cluster
        .wait_for("the status to show the closed window", || async {
            policies
                .get("pool")
                .await
                .unwrap()
                .status
                .and_then(|s| s.window)
                .as_deref()
                == Some("Closed")
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        leases.list(&reboot_leases).await.unwrap().items.is_empty(),
        "nothing started outside the window"
    );
    // The clock comes back: the window is open again and the rest follows.
    clock.set_offset(jiff::SignedDuration::ZERO);
    jumped.store(false, Ordering::SeqCst);
    cluster
        .wait_for("every node Done on 2.0.0", || async {
            nodes
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .all(|n| {
                    state(n) == Some("Done")
                        && n.annotations()
                            .get("baton.dev/current-version")
                            .map(String::as_str)
                            == Some("2.0.0")
                })
                && leases.list(&reboot_leases).await.unwrap().items.is_empty()
        })
        .await
        .unwrap();
    let report = watcher.finish();
    eprintln!("[faults] clock jump: {report}");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(report.reboots, 3);
    for n in &names {
        assert_eq!(fleet.log(n).reboots, 1);
    }
}
