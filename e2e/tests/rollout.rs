//! Real agents and the operator on a real control plane: one `baton-agent` process
//! (sim or ab backend) per kwok node, the operator in-process, the plugin's commands,
//! and the invariant watcher over every run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, time::Duration};

use crds::protocol;
use e2e::scenario::{
    Limits, NEW, OLD, POLICY, Scenario, annotation, first_in_state, list, state, version,
};
use harness::fleet::FleetOptions;
use k8s_openapi::api::core::v1::Node;
use kube::{ResourceExt, api::ListParams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agents_and_the_operator_roll_five_nodes_one_at_a_time() {
    let mut s = Scenario::bare(5, Limits::budget(1)).await;
    // The agents: staging takes 1 s, a before-reboot step 2 s (the window in which one
    // agent is killed), a machine is down 1 s.
    let options = s.fleet_options(
        Duration::from_secs(1),
        &["--before-reboot", "sleep 2", "--check-interval", "1h"],
    );
    s.start_fleet(&options);
    let nodes = s.nodes();
    s.cluster
        .wait_for("every agent to report Idle on 1.0.0", || async {
            list(&nodes)
                .await
                .iter()
                .all(|n| state(n) == Some("Idle") && version(n) == Some(OLD))
        })
        .await
        .unwrap();
    let first_boots: BTreeMap<String, String> = list(&nodes)
        .await
        .iter()
        .map(|n| {
            let boot = annotation(n, protocol::BOOT_ID.name).unwrap();
            (n.name_any(), boot.to_string())
        })
        .collect();
    let _operator = s.operator("op-a");
    // Kill the first agent that starts rebooting, during its before-reboot step.
    let killer = tokio::spawn(first_in_state(nodes.clone(), "Rebooting", None));
    s.policy(serde_json::json!({"maxUnavailable": 1, "health": {"rebootTimeout": "3m"}}))
        .await;
    let killed = tokio::time::timeout(Duration::from_secs(120), killer)
        .await
        .unwrap()
        .unwrap();
    s.fleet().kill_agent(&killed);
    s.wait_done(&[]).await;

    let report = s.finish("five nodes, one agent killed mid-reboot");
    let logs: BTreeMap<&String, _> = s.names.iter().map(|n| (n, s.fleet().log(n))).collect();
    eprintln!(
        "[agents] at most {} disrupted at once; killed {killed}; machines {logs:?}; states {:?}",
        report.max_disrupted, report.states
    );
    assert_eq!(report.max_disrupted, 1, "never two nodes disrupted at once");
    for name in &s.names {
        let log = &logs[name];
        assert_eq!(log.reboots, 1, "{name} rebooted exactly once: {log:?}");
        let node = nodes.get(name).await.unwrap();
        assert_ne!(
            annotation(&node, protocol::BOOT_ID.name),
            first_boots.get(name).map(String::as_str),
            "{name} booted anew"
        );
        assert_eq!(annotation(&node, protocol::SLOT.name), Some("SIM-B"));
    }
    assert!(
        logs[&killed].restarts >= 1,
        "the killed agent was restarted"
    );
    let states = &report.states[&killed];
    let rebooting_runs = states.iter().filter(|st| *st == "Rebooting").count();
    assert_eq!(
        rebooting_runs, 1,
        "the restart kept it Rebooting (no Done in between): {states:?}"
    );
}

/// Two sim machines with agents, staging 500 ms, down 500 ms per reboot.
async fn two_quick_machines() -> Scenario {
    let mut s = Scenario::bare(2, Limits::budget(1)).await;
    let options = s.fleet_options(Duration::from_millis(500), &["--sim-stage-time", "500ms"]);
    s.start_fleet(&options);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_falls_back_to_its_old_slot_reports_rolled_back_and_halts_the_pool() {
    let mut s = two_quick_machines().await;
    // Both machines' next boot fails; whichever goes first must halt the pool.
    for n in &s.names {
        s.fleet().fail_next_boot(n).unwrap();
    }
    let _operator = s.operator("op-a");
    s.policy(serde_json::json!({})).await;
    s.wait_condition("Halted").await;
    let all = list(&s.nodes()).await;
    let rolled: Vec<&Node> = all
        .iter()
        .filter(|n| state(n) == Some("RolledBack"))
        .collect();
    assert_eq!(rolled.len(), 1, "exactly one node tried");
    let message = annotation(rolled[0], protocol::MESSAGE.name).unwrap();
    assert!(
        message.contains("booted 1.0.0 (slot SIM-A) instead of 2.0.0 (slot SIM-B)"),
        "{message}"
    );
    assert_eq!(version(rolled[0]), Some(OLD));
    assert!(
        annotation(rolled[0], protocol::FAILURE.name).is_some(),
        "the operator marked it failed"
    );
    let other = all
        .iter()
        .find(|n| n.name_any() != rolled[0].name_any())
        .unwrap();
    assert_eq!(
        s.fleet().log(&other.name_any()).reboots,
        0,
        "the halted pool rebooted nothing else"
    );
    assert_eq!(state(other), Some("RebootRequired"));
    let report = s.finish("a machine falls back to its old slot");
    assert_eq!(report.failures.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_machines_on_gpt_images_stage_a_signed_release_boot_it_and_commit_or_fall_back() {
    use base64::Engine;
    use ed25519_dalek::Signer;
    use sha2::Digest;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut s = Scenario::bare(3, Limits::budget(1)).await;

    // The release: 3 MiB signed with the key the agents trust, served over HTTPS.
    let dir = tempfile::tempdir().unwrap();
    let image: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("os-2.0.0.img"), &image).unwrap();
    let digest = sha2::Sha256::digest(&image);
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let server = harness::image_server::ImageServer::start(&dir.path().join("os-2.0.0.img"))
        .await
        .unwrap();
    let os_release = dir.path().join("os-release");
    std::fs::write(&os_release, "ID=baton-demo\nVERSION_ID=1.0.0\n").unwrap();
    let mut node_args = BTreeMap::new();
    for n in &s.names {
        let disk = dir.path().join(format!("{n}.img"));
        agent::slot::create_image(&disk, ["USR-A", "USR-B"], 8 << 20).unwrap();
        node_args.insert(
            n.clone(),
            vec!["--ab-device".to_string(), disk.display().to_string()],
        );
    }
    let public_key = b64(key.verifying_key().as_bytes());
    let (os_release, ca_file) = (
        os_release.display().to_string(),
        server.ca_file().display().to_string(),
    );
    let options = FleetOptions {
        node_args,
        ..s.fleet_options(
            Duration::from_millis(500),
            &[
                "--backend",
                "ab",
                "--ab-simulate",
                // The slot baton never wrote runs what its os-release says.
                "--os-release",
                &os_release,
                "--release-public-key",
                &public_key,
                "--release-ca-file",
                &ca_file,
            ],
        )
    };
    s.start_fleet(&options);
    // The last machine's new slot will not boot; it is held back (paused) until the
    // others are done, so that the order is known.
    let unlucky = s.names[2].clone();
    s.fleet().fail_next_boot(&unlucky).unwrap();
    s.pause_node(&unlucky, true).await;
    let _operator = s.operator("op-a");
    s.policy(serde_json::json!({"release": {
        "version": NEW, "url": server.url(),
        "sha256": hex::encode(digest), "signature": b64(&key.sign(&digest).to_bytes()),
    }}))
    .await;
    s.cluster
        .wait_for("two machines Done on USR-B", || async {
            s.status().await.up_to_date == 2
        })
        .await
        .unwrap();
    s.pause_node(&unlucky, false).await;
    let waited = s
        .cluster
        .wait_for(
            "the third machine to fall back and halt the pool",
            || async { s.status().await.up_to_date == 2 && s.condition("Halted").await },
        )
        .await;
    if let Err(e) = waited {
        for n in &s.names {
            let dir = s.fleet().state_dir(n);
            let mut logs: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            logs.sort();
            for log in logs {
                eprintln!(
                    "== {}\n{}",
                    log.display(),
                    harness::process::log_tail(&log, 15)
                );
            }
        }
        panic!("{e}");
    }
    let nodes = s.nodes();
    for n in &s.names {
        let node = nodes.get(n).await.unwrap();
        let disk = dir.path().join(format!("{n}.img"));
        let slots = agent::slot::Slots::open(&disk, ["USR-A", "USR-B"]).unwrap();
        let (a, b) = (slots.slots[0].attributes, slots.slots[1].attributes);
        if *n == unlucky {
            assert_eq!(state(&node), Some("RolledBack"));
            assert_eq!(annotation(&node, protocol::SLOT.name), Some("USR-A"));
            assert!(
                annotation(&node, protocol::MESSAGE.name)
                    .unwrap()
                    .contains("booted 1.0.0 (slot USR-A) instead of 2.0.0 (slot USR-B)")
            );
            assert!(a.successful && !b.successful && b.tries == 0, "{a:?} {b:?}");
        } else {
            assert_eq!(state(&node), Some("Done"), "{n}");
            assert_eq!(annotation(&node, protocol::SLOT.name), Some("USR-B"));
            assert_eq!(version(&node), Some(NEW));
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
    s.finish("ab machines commit or fall back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_baton_pauses_resumes_and_retries_a_halted_pool() {
    let mut s = two_quick_machines().await;
    let first = s.names[0].clone();
    s.fleet().fail_next_boot(&first).unwrap();
    let _operator = s.operator("op-a");
    s.policy(serde_json::json!({"paused": true})).await;
    let status = || async {
        let p = s
            .policies()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        let n = list(&s.nodes()).await;
        let l = s.leases().list(&ListParams::default()).await.unwrap().items;
        kubectl_baton::status::render(&p, &n, &l, None, jiff::Timestamp::now())
    };

    // Paused: both nodes stage and ask, nothing is granted, and the status says why
    // they wait (the reason `decide` gives).
    s.cluster
        .wait_for(
            "the pool to report Paused with both nodes asking",
            || async {
                let text = status().await;
                s.condition("Paused").await && text.matches("Waiting: policy paused").count() == 2
            },
        )
        .await
        .unwrap();
    assert_eq!(
        s.fleet().log(&first).reboots + s.fleet().log(&s.names[1]).reboots,
        0
    );

    // Resumed: the first node's new version fails to boot; the pool halts.
    kubectl_baton::steer::set_policy_paused(s.client.clone(), POLICY, false)
        .await
        .unwrap();
    s.wait_condition("Halted").await;
    let halted = status().await;
    eprintln!("[kubectl-baton] halted:\n{halted}");
    assert!(halted.contains("! Halted:"), "{halted}");
    assert!(halted.contains("RolledBack"), "{halted}");

    // Retried, after "fixing the cause" (the failing boot was one-off): the node
    // restages, reboots into 2.0.0, and the pool finishes.
    assert_eq!(s.retry_pool().await, std::slice::from_ref(&first));
    s.wait_done(&[]).await;
    s.cluster
        .wait_for("the status to read done", || async {
            !s.condition("Halted").await && status().await.contains("updated 2/2")
        })
        .await
        .unwrap();
    let done = status().await;
    eprintln!("[kubectl-baton] done:\n{done}");
    let node = s.nodes().get(&first).await.unwrap();
    assert!(
        annotation(&node, protocol::RETRY.name).is_none(),
        "the agent removed the retry mark"
    );
    assert_eq!(
        s.fleet().log(&first).reboots,
        2,
        "one failed boot, one good"
    );
    s.finish("kubectl baton pause, resume and retry");
}

/// `maxUnavailablePerZone` with real agents: six nodes in three zones, a budget of six,
/// one per zone; a sampler of the reboot Leases every 100 ms sees at most one holder
/// per zone, and three at once (the zones in parallel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_zone_cap_holds_in_every_zone_while_zones_go_in_parallel() {
    let mut s = Scenario::bare(6, Limits::budget(6)).await;
    let options = s.fleet_options(Duration::from_secs(2), &[]);
    s.start_fleet(&options);
    let zone_of: BTreeMap<String, String> = list(&s.nodes())
        .await
        .iter()
        .map(|n| {
            (
                n.name_any(),
                n.labels()["topology.kubernetes.io/zone"].clone(),
            )
        })
        .collect();
    let _operator = s.operator("op-a");
    // The most Lease holders seen per zone, and in all, sampled every 100 ms.
    let seen = std::sync::Arc::new(std::sync::Mutex::new((
        BTreeMap::<String, usize>::new(),
        0usize,
    )));
    let sampler = {
        let (leases, seen) = (s.leases(), seen.clone());
        tokio::spawn(async move {
            loop {
                let held = e2e::scenario::lease_holders(&leases).await;
                let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
                for node in &held {
                    *per_zone.entry(zone_of[node].clone()).or_default() += 1;
                }
                {
                    let mut seen = seen.lock().unwrap();
                    for (zone, n) in per_zone {
                        let most = seen.0.entry(zone).or_default();
                        *most = (*most).max(n);
                    }
                    seen.1 = seen.1.max(held.len());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    s.policy_staged(serde_json::json!({
        "maxUnavailable": 6,
        "maxUnavailablePerZone": 1,
        "ordering": {"oneZoneAtATime": false},
        "health": {"rebootTimeout": "3m"},
    }))
    .await;
    s.wait_done(&[]).await;
    sampler.abort();
    let (most, at_once): (BTreeMap<String, usize>, usize) = seen.lock().unwrap().clone();
    let report = s.finish("per-zone cap 1 over three zones");
    eprintln!("[zones] most Lease holders per zone {most:?}; at most {at_once} at once");
    assert!(most.values().all(|n| *n == 1), "one per zone: {most:?}");
    assert_eq!(most.len(), 3, "every zone went");
    assert!(at_once >= 2, "zones went in parallel");
    assert!(report.max_disrupted <= 3);
}

/// A freeze with real agents: while it is in force nothing is granted (the status names
/// it, the nodes wait with its reason); lifting it (an admin edits the policy) lets the
/// rollout run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_starts_during_a_freeze_and_the_rollout_runs_once_it_is_lifted() {
    let s = Scenario::start(3, 1, &[]).await;
    let _operator = s.operator("op-a");
    let now = jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::UTC);
    let local = |z: jiff::Zoned| z.strftime("%Y-%m-%dT%H:%M").to_string();
    let freeze = serde_json::json!([{
        "start": local(now.checked_sub(jiff::SignedDuration::from_hours(1)).unwrap()),
        "end": local(now.checked_add(jiff::SignedDuration::from_hours(24)).unwrap()),
        "timeZone": "UTC",
        "reason": "change freeze",
    }]);
    s.policy(serde_json::json!({"freezes": freeze, "health": {"rebootTimeout": "3m"}}))
        .await;
    s.wait_requested().await;
    s.cluster
        .wait_for("the status to name the freeze", || async {
            s.status()
                .await
                .freeze
                .is_some_and(|f| f.starts_with("active: change freeze"))
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        s.reboot_leases().await.is_empty(),
        "nothing granted in the freeze"
    );
    let why = s.why(&s.names[0]).await;
    assert!(why.contains("frozen: change freeze"), "{why}");
    // An admin lifts it.
    let patch = serde_json::json!({"spec": {"freezes": []}});
    s.policies()
        .patch(
            POLICY,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    s.wait_done(&[]).await;
    assert_eq!(s.status().await.freeze, None);
}

/// An urgent release with real agents: the only window opens on 1 January, so nothing
/// starts; `kubectl baton urgent --by` a deadline seconds away, and past it the rollout
/// runs (one at a time: the budget still holds), with the `Urgent` condition and its
/// Warning Event saying that urgency took over, and when.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_an_urgency_deadline_windows_stop_gating_and_the_status_says_since_when() {
    let mut s = Scenario::start(3, 1, &[]).await;
    let _operator = s.operator("op-a");
    s.policy(serde_json::json!({
        "maintenanceWindows": [{"schedule": "0 0 1 1 *", "duration": "1h"}],
        "health": {"rebootTimeout": "3m"},
    }))
    .await;
    s.wait_requested().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.reboot_leases().await.is_empty(), "outside the window");
    let deadline = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(5))
        .unwrap();
    kubectl_baton::steer::set_policy_urgency(s.client.clone(), POLICY, Some(deadline), false)
        .await
        .unwrap();
    s.wait_done(&[]).await;
    let report = s.finish("urgent past the deadline");
    assert_eq!(report.max_disrupted, 1, "the budget still held");
    let urgent = s
        .policies()
        .get(POLICY)
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == crds::policy::condition::URGENT)
        .unwrap();
    let events = s.events("Urgent").await;
    eprintln!("[urgent] condition now {urgent:?}; events {events:?}");
    assert!(
        events
            .iter()
            .any(|e| e.contains("passed with 3 node(s) not updated")),
        "{events:?}"
    );
    // Done: no longer urgent, since the last transition.
    assert_eq!(urgent.status, "False");
    assert!(urgent.last_transition_time.0 > deadline);
}

/// Canary promotion with real agents: `prod` (two nodes) goes only once `canary` (one
/// node) has completed the release and soaked 5 s; a sampler of the reboot Leases sees
/// prod's first grant after canary's completion plus the soak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_pool_starts_only_after_its_upstream_completed_and_soaked() {
    let mut s = Scenario::bare(3, Limits::budget(2)).await;
    let nodes = s.nodes();
    for (i, name) in s.names.iter().enumerate() {
        let pool = if i == 0 { "canary" } else { "prod" };
        let patch = serde_json::json!({"metadata": {"labels": {"pool": pool}}});
        nodes
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .unwrap();
    }
    let options = s.fleet_options(Duration::from_secs(1), &[]);
    s.start_fleet(&options);
    let _operator = s.operator("op-a");
    let release = serde_json::json!({
        "version": NEW, "url": "https://images.invalid/os-2.0.0.img",
        "sha256": "c".repeat(64), "signature": format!("{}==", "A".repeat(86)),
    });
    let first_seen = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<
        String,
        std::time::SystemTime,
    >::new()));
    let sampler = {
        let (leases, first_seen) = (s.leases(), first_seen.clone());
        tokio::spawn(async move {
            loop {
                for node in e2e::scenario::lease_holders(&leases).await {
                    first_seen
                        .lock()
                        .unwrap()
                        .entry(node)
                        .or_insert_with(std::time::SystemTime::now);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    for (name, spec) in [
        (
            "prod",
            serde_json::json!({"nodeSelector": {"matchLabels": {"pool": "prod"}},
            "promotion": {"after": "canary", "soak": "5s"}, "release": release,
            "health": {"rebootTimeout": "3m"}}),
        ),
        (
            "canary",
            serde_json::json!({"nodeSelector": {"matchLabels": {"pool": "canary"}},
            "release": release, "health": {"rebootTimeout": "3m"}}),
        ),
    ] {
        let policy = crds::UpdatePolicy::new(name, serde_json::from_value(spec).unwrap());
        s.policies()
            .create(&kube::api::PostParams::default(), &policy)
            .await
            .unwrap();
    }
    s.wait_done(&[]).await;
    sampler.abort();
    let canary = s.policies().get("canary").await.unwrap().status.unwrap();
    let completed = canary.completed.expect("canary completed");
    assert_eq!(completed.version, NEW);
    let since = std::time::SystemTime::from(completed.since.0);
    let seen = first_seen.lock().unwrap().clone();
    let prod_first = s.names[1..].iter().map(|n| seen[n]).min().unwrap();
    let waited = prod_first.duration_since(since).unwrap_or_default();
    eprintln!(
        "[promotion] canary completed {NEW} at {}; prod's first grant {waited:?} later (soak 5s)",
        completed.since.0
    );
    assert!(
        waited >= Duration::from_secs(5),
        "prod waited out the soak: {waited:?}"
    );
    assert!(seen[&s.names[0]] < since, "canary went first");
    let prod = s.policies().get("prod").await.unwrap().status.unwrap();
    assert_eq!(prod.completed.map(|c| c.version), Some(NEW.to_string()));
    s.finish("canary then prod");
}
