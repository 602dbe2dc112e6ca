//! Real agents and the operator on a real control plane: one `baton-agent` process
//! (sim backend) per kwok node, the operator in-process, and a watcher that checks
//! every node transition.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::Parser;
use crds::UpdatePolicy;
use e2e::{
    TestCluster,
    fleet::{Fleet, FleetOptions},
};
use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};

/// What the watcher saw.
#[derive(Debug, Default)]
struct Seen {
    /// The most nodes disrupted at once (cordoned, rebooting or verifying).
    max_disrupted: usize,
    /// (node, boot id) pairs seen Rebooting: a node must never be Verifying or Done
    /// under one of them.
    rebooting_boots: BTreeSet<(String, String)>,
    /// Claims of a finished reboot under the boot it rebooted out of.
    violations: Vec<String>,
    /// Each node's states, in order, without repeats.
    states: BTreeMap<String, Vec<String>>,
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.annotations().get(key).map(String::as_str)
}

fn disrupted(node: &Node) -> bool {
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    cordoned
        || matches!(
            annotation(node, "baton.dev/state"),
            Some("Rebooting" | "Verifying")
        )
}

async fn watch(client: Client, seen: Arc<Mutex<Seen>>) {
    let api: Api<Node> = Api::all(client);
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut events = watcher(api, watcher::Config::default())
        .applied_objects()
        .boxed();
    while let Some(Ok(node)) = events.next().await {
        let name = node.name_any();
        let state = annotation(&node, "baton.dev/state")
            .unwrap_or("")
            .to_string();
        let boot = annotation(&node, "baton.dev/boot-id")
            .unwrap_or("")
            .to_string();
        let mut s = seen.lock().unwrap();
        if state == "Rebooting" {
            s.rebooting_boots.insert((name.clone(), boot.clone()));
        }
        if matches!(state.as_str(), "Verifying" | "Done")
            && s.rebooting_boots.contains(&(name.clone(), boot.clone()))
        {
            s.violations.push(format!(
                "{name} reported {state} under boot {boot}, the boot it rebooted out of"
            ));
        }
        let states = s.states.entry(name.clone()).or_default();
        if states.last() != Some(&state) && !state.is_empty() {
            states.push(state);
        }
        nodes.insert(name, node);
        let now = nodes.values().filter(|n| disrupted(n)).count();
        s.max_disrupted = s.max_disrupted.max(now);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agents_and_the_operator_roll_five_nodes_one_at_a_time() {
    let (cluster, names) = TestCluster::start_with_nodes(5).await.unwrap();
    let client = cluster.client();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recorder = tokio::spawn(watch(client.clone(), seen.clone()));

    // The agents: staging takes 1 s, a before-reboot step 2 s (the window in which one
    // agent is killed), a machine is down 1 s.
    let fleet = Fleet::start(
        &names,
        &FleetOptions::new(
            env!("CARGO_BIN_EXE_baton-agent"),
            cluster.kubeconfig(),
            Duration::from_secs(1),
            [
                "--sim-stage-time",
                "1s",
                "--before-reboot",
                "sleep 2",
                "--check-interval",
                "1h",
            ],
        ),
    )
    .unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    cluster
        .wait_for("every agent to report Idle on 1.0.0", || async {
            nodes
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .all(|n| {
                    annotation(n, "baton.dev/state") == Some("Idle")
                        && annotation(n, "baton.dev/current-version") == Some("1.0.0")
                })
        })
        .await
        .unwrap();
    let first_boots: BTreeMap<String, String> = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| {
            (
                n.name_any(),
                annotation(n, "baton.dev/boot-id").unwrap().to_string(),
            )
        })
        .collect();

    let config = operator::config::Config::try_parse_from([
        "baton-operator",
        "--namespace",
        "baton-system",
        "--identity",
        "op-a",
        "--leader-lease-duration",
        "3s",
        "--leader-renew-interval",
        "1s",
    ])
    .unwrap();
    let operator = tokio::spawn(operator::replica::run_replica(client.clone(), config));

    // Kill the first agent that starts rebooting, during its before-reboot step.
    let killer = {
        let (nodes, fleet_nodes) = (nodes.clone(), names.clone());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1);
        tokio::spawn(async move {
            let mut events = watcher(nodes, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(Ok(n)) = events.next().await {
                if annotation(&n, "baton.dev/state") == Some("Rebooting")
                    && fleet_nodes.contains(&n.name_any())
                {
                    let _ = tx.send(n.name_any()).await;
                    return;
                }
            }
        });
        async move { rx.recv().await }
    };

    let policy: UpdatePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy", "metadata": {"name": "workers"},
        "spec": {
            "maxUnavailable": 1,
            "health": {"rebootTimeout": "3m"},
            "release": {
                "version": "2.0.0", "url": "https://images.invalid/os-2.0.0.img",
                "sha256": "a".repeat(64), "signature": format!("{}==", "A".repeat(86)),
            },
        },
    }))
    .unwrap();
    Api::<UpdatePolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();

    let killed = tokio::time::timeout(Duration::from_secs(120), killer)
        .await
        .unwrap()
        .unwrap();
    fleet.kill_agent(&killed);

    let leases: Api<Lease> = Api::namespaced(client.clone(), "baton-system");
    cluster
        .wait_for(
            "every node Done on 2.0.0, uncordoned, with no lease left",
            || async {
                let all = nodes.list(&ListParams::default()).await.unwrap().items;
                let held = leases
                    .list(&ListParams::default().labels("app.kubernetes.io/managed-by=baton"))
                    .await
                    .unwrap()
                    .items;
                held.is_empty()
                    && all.iter().all(|n| {
                        annotation(n, "baton.dev/state") == Some("Done")
                            && annotation(n, "baton.dev/current-version") == Some("2.0.0")
                            && !n
                                .spec
                                .as_ref()
                                .and_then(|s| s.unschedulable)
                                .unwrap_or(false)
                    })
            },
        )
        .await
        .unwrap();
    operator.abort();
    recorder.abort();

    let s = std::mem::take(&mut *seen.lock().unwrap());
    let logs: BTreeMap<&String, _> = names.iter().map(|n| (n, fleet.log(n))).collect();
    eprintln!(
        "[agents] at most {} disrupted at once; killed {killed}; machines {logs:?}; states {:?}",
        s.max_disrupted, s.states
    );
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert_eq!(s.max_disrupted, 1, "never two nodes disrupted at once");
    for name in &names {
        let log = &logs[name];
        assert_eq!(log.reboots, 1, "{name} rebooted exactly once: {log:?}");
        let node = nodes.get(name).await.unwrap();
        assert_ne!(
            annotation(&node, "baton.dev/boot-id"),
            first_boots.get(name).map(String::as_str),
            "{name} booted anew"
        );
        assert_eq!(annotation(&node, "baton.dev/slot"), Some("SIM-B"));
    }
    assert!(
        logs[&killed].restarts >= 1,
        "the killed agent was restarted"
    );
    let states = &s.states[&killed];
    let rebooting_runs = states.iter().filter(|st| *st == "Rebooting").count();
    assert_eq!(
        rebooting_runs, 1,
        "the restart kept it Rebooting (no Done in between): {states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_falls_back_to_its_old_slot_reports_rolled_back_and_halts_the_pool() {
    let (cluster, names) = TestCluster::start_with_nodes(2).await.unwrap();
    let client = cluster.client();
    let fleet = Fleet::start(
        &names,
        &FleetOptions::new(
            env!("CARGO_BIN_EXE_baton-agent"),
            cluster.kubeconfig(),
            Duration::from_millis(500),
            ["--sim-stage-time", "500ms"],
        ),
    )
    .unwrap();
    // Both machines' next boot fails; whichever goes first must halt the pool.
    for n in &names {
        fleet.fail_next_boot(n).unwrap();
    }
    let config = operator::config::Config::try_parse_from([
        "baton-operator",
        "--namespace",
        "baton-system",
        "--identity",
        "op-a",
    ])
    .unwrap();
    let _operator = tokio::spawn(operator::replica::run_replica(client.clone(), config));
    let policy: UpdatePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy", "metadata": {"name": "workers"},
        "spec": {"release": {
            "version": "2.0.0", "url": "https://images.invalid/os-2.0.0.img",
            "sha256": "a".repeat(64), "signature": format!("{}==", "A".repeat(86)),
        }},
    }))
    .unwrap();
    Api::<UpdatePolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let policies: Api<UpdatePolicy> = Api::all(client.clone());
    cluster
        .wait_for("the pool to halt", || async {
            policies
                .get("workers")
                .await
                .unwrap()
                .status
                .is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Halted" && c.status == "True")
                })
        })
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    let all = nodes.list(&ListParams::default()).await.unwrap().items;
    let rolled: Vec<&Node> = all
        .iter()
        .filter(|n| annotation(n, "baton.dev/state") == Some("RolledBack"))
        .collect();
    assert_eq!(rolled.len(), 1, "exactly one node tried");
    let message = annotation(rolled[0], "baton.dev/message").unwrap();
    assert!(
        message.contains("booted 1.0.0 (slot SIM-A) instead of 2.0.0 (slot SIM-B)"),
        "{message}"
    );
    assert_eq!(
        annotation(rolled[0], "baton.dev/current-version"),
        Some("1.0.0")
    );
    assert!(
        annotation(rolled[0], "baton.dev/failure").is_some(),
        "the operator marked it failed"
    );
    let other = all
        .iter()
        .find(|n| n.name_any() != rolled[0].name_any())
        .unwrap();
    assert_eq!(
        fleet.log(&other.name_any()).reboots,
        0,
        "the halted pool rebooted nothing else"
    );
    assert_eq!(annotation(other, "baton.dev/state"), Some("RebootRequired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_machines_on_gpt_images_stage_a_signed_release_boot_it_and_commit_or_fall_back() {
    use base64::Engine;
    use ed25519_dalek::Signer;
    use sha2::Digest;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (cluster, names) = TestCluster::start_with_nodes(3).await.unwrap();
    let client = cluster.client();

    // The release: 3 MiB signed with the key the agents trust, served over HTTPS.
    let dir = tempfile::tempdir().unwrap();
    let image: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("os-2.0.0.img"), &image).unwrap();
    let digest = sha2::Sha256::digest(&image);
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let server = e2e::image_server::ImageServer::start(&dir.path().join("os-2.0.0.img"))
        .await
        .unwrap();
    let os_release = dir.path().join("os-release");
    std::fs::write(&os_release, "ID=baton-demo\nVERSION_ID=1.0.0\n").unwrap();
    let mut node_args = BTreeMap::new();
    for n in &names {
        let disk = dir.path().join(format!("{n}.img"));
        agent::slot::create_image(&disk, ["USR-A", "USR-B"], 8 << 20).unwrap();
        node_args.insert(
            n.clone(),
            vec!["--ab-device".to_string(), disk.display().to_string()],
        );
    }
    let fleet = Fleet::start(
        &names,
        &FleetOptions {
            node_args,
            ..FleetOptions::new(
                env!("CARGO_BIN_EXE_baton-agent"),
                cluster.kubeconfig(),
                Duration::from_millis(500),
                vec![
                    "--backend".into(),
                    "ab".into(),
                    "--ab-simulate".into(),
                    // The slot baton never wrote runs what its os-release says.
                    "--os-release".into(),
                    os_release.display().to_string(),
                    "--release-public-key".into(),
                    b64(key.verifying_key().as_bytes()),
                    "--release-ca-file".into(),
                    server.ca_file().display().to_string(),
                ],
            )
        },
    )
    .unwrap();
    // The last machine's new slot will not boot; it is held back (paused) until the
    // others are done, so that the order is known.
    let unlucky = names[2].clone();
    fleet.fail_next_boot(&unlucky).unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    let pause = |on: bool| serde_json::json!({"metadata": {"annotations": {"baton.dev/paused": if on { serde_json::Value::from("true") } else { serde_json::Value::Null }}}});
    nodes
        .patch(
            &unlucky,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(pause(true)),
        )
        .await
        .unwrap();

    let config = operator::config::Config::try_parse_from([
        "baton-operator",
        "--namespace",
        "baton-system",
        "--identity",
        "op-a",
    ])
    .unwrap();
    let _operator = tokio::spawn(operator::replica::run_replica(client.clone(), config));
    let policy: UpdatePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy", "metadata": {"name": "workers"},
        "spec": {"release": {
            "version": "2.0.0", "url": server.url(),
            "sha256": hex::encode(digest), "signature": b64(&key.sign(&digest).to_bytes()),
        }},
    }))
    .unwrap();
    Api::<UpdatePolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let policies: Api<UpdatePolicy> = Api::all(client.clone());
    cluster
        .wait_for("two machines Done on USR-B", || async {
            policies
                .get("workers")
                .await
                .unwrap()
                .status
                .is_some_and(|s| s.up_to_date == 2)
        })
        .await
        .unwrap();
    nodes
        .patch(
            &unlucky,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(pause(false)),
        )
        .await
        .unwrap();
    cluster
        .wait_for(
            "the third machine to fall back and halt the pool",
            || async {
                policies
                    .get("workers")
                    .await
                    .unwrap()
                    .status
                    .is_some_and(|s| {
                        s.up_to_date == 2
                            && s.conditions
                                .iter()
                                .any(|c| c.type_ == "Halted" && c.status == "True")
                    })
            },
        )
        .await
        .unwrap_or_else(|e| {
            for n in &names {
                let dir = fleet.state_dir(n);
                let mut logs: Vec<_> = std::fs::read_dir(&dir)
                    .unwrap()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect();
                logs.sort();
                for log in logs {
                    eprintln!("== {}\n{}", log.display(), e2e::process::log_tail(&log, 15));
                }
            }
            panic!("{e}");
        });
    for n in &names {
        let node = nodes.get(n).await.unwrap();
        let disk = dir.path().join(format!("{n}.img"));
        let slots = agent::slot::Slots::open(&disk, ["USR-A", "USR-B"]).unwrap();
        let (a, b) = (slots.slots[0].attributes, slots.slots[1].attributes);
        if *n == unlucky {
            assert_eq!(annotation(&node, "baton.dev/state"), Some("RolledBack"));
            assert_eq!(annotation(&node, "baton.dev/slot"), Some("USR-A"));
            assert!(
                annotation(&node, "baton.dev/message")
                    .unwrap()
                    .contains("booted 1.0.0 (slot USR-A) instead of 2.0.0 (slot USR-B)")
            );
            assert!(a.successful && !b.successful && b.tries == 0, "{a:?} {b:?}");
        } else {
            assert_eq!(annotation(&node, "baton.dev/state"), Some("Done"), "{n}");
            assert_eq!(annotation(&node, "baton.dev/slot"), Some("USR-B"));
            assert_eq!(
                annotation(&node, "baton.dev/current-version"),
                Some("2.0.0")
            );
            assert!(
                b.successful && b.tries == 0,
                "committed after its checks: {b:?}"
            );
            assert!(a.successful, "the old slot stays a fallback");
            let hashed =
                agent::payload::hash_back(&disk, slots.slots[1].offset, image.len() as u64)
                    .unwrap();
            assert_eq!(hashed, hex::encode(digest));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_baton_pauses_resumes_and_retries_a_halted_pool() {
    let (cluster, names) = TestCluster::start_with_nodes(2).await.unwrap();
    let client = cluster.client();
    let fleet = Fleet::start(
        &names,
        &FleetOptions::new(
            env!("CARGO_BIN_EXE_baton-agent"),
            cluster.kubeconfig(),
            Duration::from_millis(500),
            ["--sim-stage-time", "500ms"],
        ),
    )
    .unwrap();
    let first = names[0].clone();
    fleet.fail_next_boot(&first).unwrap();
    let config = operator::config::Config::try_parse_from([
        "baton-operator",
        "--namespace",
        "baton-system",
        "--identity",
        "op-a",
    ])
    .unwrap();
    let _operator = tokio::spawn(operator::replica::run_replica(client.clone(), config));
    let policy: UpdatePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy", "metadata": {"name": "workers"},
        "spec": {"paused": true, "release": {
            "version": "2.0.0", "url": "https://images.invalid/os-2.0.0.img",
            "sha256": "a".repeat(64), "signature": format!("{}==", "A".repeat(86)),
        }},
    }))
    .unwrap();
    let policies: Api<UpdatePolicy> = Api::all(client.clone());
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let condition = |name: &'static str| {
        let policies = policies.clone();
        async move {
            policies
                .get("workers")
                .await
                .unwrap()
                .status
                .is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == name && c.status == "True")
                })
        }
    };
    let status = || async {
        let p = policies.list(&ListParams::default()).await.unwrap().items;
        let n = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        let l = Api::<Lease>::namespaced(client.clone(), "baton-system")
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        kubectl_baton::status::render(&p, &n, &l, None, jiff::Timestamp::now())
    };

    // Paused: both nodes stage and ask, nothing is granted.
    cluster
        .wait_for(
            "the pool to report Paused with both nodes asking",
            || async {
                let text = status().await;
                condition("Paused").await && text.matches("RebootRequired").count() == 2
            },
        )
        .await
        .unwrap();
    assert_eq!(fleet.log(&first).reboots + fleet.log(&names[1]).reboots, 0);

    // Resumed: the first node's new version fails to boot; the pool halts.
    kubectl_baton::steer::set_policy_paused(client.clone(), "workers", false)
        .await
        .unwrap();
    cluster
        .wait_for("the pool to halt", || condition("Halted"))
        .await
        .unwrap();
    let halted = status().await;
    eprintln!("[kubectl-baton] halted:\n{halted}");
    assert!(halted.contains("! Halted:"), "{halted}");
    assert!(halted.contains("RolledBack"), "{halted}");

    // Retried, after "fixing the cause" (the failing boot was one-off): the node
    // restages, reboots into 2.0.0, and the pool finishes.
    let retried = kubectl_baton::steer::retry(client.clone(), "baton-system", Some("workers"), &[])
        .await
        .unwrap();
    assert_eq!(retried, std::slice::from_ref(&first));
    cluster
        .wait_for("both nodes Done on 2.0.0", || async {
            Api::<Node>::all(client.clone())
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .all(|n| {
                    annotation(n, "baton.dev/state") == Some("Done")
                        && annotation(n, "baton.dev/current-version") == Some("2.0.0")
                })
                && !condition("Halted").await
                // The operator releases the last lease after the agent reports Done.
                && status().await.contains("updated 2/2")
        })
        .await
        .unwrap();
    let done = status().await;
    eprintln!("[kubectl-baton] done:\n{done}");
    assert!(done.contains("updated 2/2"), "{done}");
    let node = Api::<Node>::all(client.clone()).get(&first).await.unwrap();
    assert!(
        annotation(&node, "baton.dev/retry").is_none(),
        "the agent removed the retry mark"
    );
    assert_eq!(fleet.log(&first).reboots, 2, "one failed boot, one good");
}
