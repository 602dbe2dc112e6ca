//! The Helm chart with the real helm on a real API server: lint and template across
//! the values that matter, install, then prove that the chart's RBAC is enough (the
//! operator and the agents run under its ServiceAccounts and roll nodes) and no more
//! (the agent's token cannot touch another Node, any key but its own, finalizers, or
//! Pods, and reads only the reboot Leases).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;
use e2e::{
    TestCluster,
    binaries::Binaries,
    fleet::{Fleet, FleetOptions},
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, ResourceExt,
    api::{EvictParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/baton")
}

fn helm() -> PathBuf {
    Binaries::ensure().unwrap().path("helm")
}

/// Runs helm; returns stdout, or panics with stderr.
fn run_helm(args: &[&str]) -> String {
    let out = e2e::binaries::helm_command(&helm())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The rendered manifests for `sets`, as JSON values.
fn template(sets: &[&str]) -> Vec<serde_json::Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "baton",
        chart.to_str().unwrap(),
        "--namespace",
        "baton-system",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    run_helm(&args)
        .split("\n---")
        .filter_map(|doc| serde_yaml_ng::from_str::<serde_json::Value>(doc).ok())
        .filter(|v| v.is_object())
        .collect()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str) -> Option<&'a serde_json::Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

#[test]
fn the_chart_lints_and_renders_for_every_backend_with_and_without_a_service_monitor() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    run_helm(&["lint", chart, "--strict"]);
    for backend in ["flatcar", "sentinel", "sim", "ab"] {
        for monitor in [false, true] {
            let b = format!("agent.backend={backend}");
            let m = format!("metrics.serviceMonitor.enabled={monitor}");
            run_helm(&["lint", chart, "--strict", "--set", &b, "--set", &m]);
            let docs = template(&[
                &b,
                &m,
                "defaultPolicy.enabled=true",
                "dashboard.enabled=true",
            ]);
            assert_eq!(
                find(&docs, "ServiceMonitor").is_some(),
                monitor,
                "{backend} monitor={monitor}"
            );
            let ds = find(&docs, "DaemonSet").unwrap();
            let pod = &ds["spec"]["template"]["spec"];
            let args: Vec<&str> = pod["containers"][0]["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            assert!(
                args.contains(&format!("--backend={backend}").as_str()),
                "{args:?}"
            );
            let volumes = pod["volumes"].to_string();
            assert_eq!(
                volumes.contains("system_bus_socket"),
                backend != "sim",
                "{backend} (logind reboots): {volumes}"
            );
            assert_eq!(
                volumes.contains("reboot-required") || volumes.contains("\"/var/run\""),
                backend == "sentinel",
                "{backend}: {volumes}"
            );
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"] == true,
                backend == "sim",
                "{backend}"
            );
            let dashboard = find(&docs, "ConfigMap").unwrap();
            let json: serde_json::Value =
                serde_json::from_str(dashboard["data"]["baton.json"].as_str().unwrap()).unwrap();
            assert_eq!(json["uid"], "baton-rollout");
            assert_eq!(
                find(&docs, "UpdatePolicy").unwrap()["spec"]["maxUnavailable"],
                1
            );
        }
    }
    // Each reboot method asks for its own host access and nothing more.
    let signal = template(&["agent.backend=sentinel", "agent.rebootMethod=signal"]);
    let pod = &find(&signal, "DaemonSet").unwrap()["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(
        pod["containers"][0]["securityContext"]["capabilities"]["add"],
        json!(["KILL"])
    );
    assert!(pod["containers"][0]["securityContext"]["privileged"].is_null());
    let logind = template(&["agent.backend=sentinel"]);
    let pod = &find(&logind, "DaemonSet").unwrap()["spec"]["template"]["spec"];
    assert!(
        pod["hostPID"].is_null(),
        "logind needs no host PID namespace"
    );
    // The operator: two replicas, its own PDB, hardened.
    let deploy = find(&logind, "Deployment").unwrap();
    assert_eq!(deploy["spec"]["replicas"], 2);
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        deploy["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert!(find(&logind, "PodDisruptionBudget").is_some());
    assert!(
        deploy["spec"]["strategy"].is_null(),
        "rolling, with a standby"
    );
    // Without leader election: one replica, never two at once.
    let single = template(&[
        "operator.leaderElection.enabled=false",
        "operator.replicas=1",
    ]);
    let deploy = find(&single, "Deployment").unwrap();
    assert_eq!(deploy["spec"]["strategy"]["type"], "Recreate");
    let args = deploy["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--leader-elect=false"), "{args}");
    let out = e2e::binaries::helm_command(&helm())
        .args([
            "template",
            "baton",
            chart,
            "--set",
            "operator.leaderElection.enabled=false",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "two replicas without an election");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("set operator.replicas=1"), "{err}");
    // values.schema.json refuses nonsense with a clear message.
    let out = e2e::binaries::helm_command(&helm())
        .args(["template", "baton", chart, "--set", "agent.backend=yum"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backend") && err.contains("flatcar"), "{err}");
}

/// A kubeconfig presenting a token of the chart's agent ServiceAccount bound to the
/// agent pod on `node` (which gives it the node-name claim).
async fn agent_kubeconfig(cluster: &TestCluster, node: &str) -> PathBuf {
    e2e::identity::pod_bound_kubeconfig(
        cluster,
        "baton-system",
        "baton-agent",
        "app.kubernetes.io/component=agent",
        node,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installed_charts_service_accounts_can_roll_nodes_and_the_agent_can_do_nothing_else() {
    let cluster = TestCluster::start().await.unwrap();
    let names = cluster.add_nodes(3).await.unwrap();
    let kubeconfig = cluster.kubeconfig();
    let chart = chart();
    run_helm(&[
        "install",
        "baton",
        chart.to_str().unwrap(),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--namespace",
        "baton-system",
        "--create-namespace",
        "--set",
        "agent.backend=sim",
        "--wait",
        "--timeout",
        "3m",
    ]);
    let nodes: Api<Node> = Api::all(cluster.client());

    // The operator, under the chart's ServiceAccount.
    let operator_client = cluster
        .client_as("baton-system", "baton-operator")
        .await
        .unwrap();
    let config = operator::config::Config::try_parse_from([
        "baton-operator",
        "--namespace",
        "baton-system",
        "--identity",
        "op-chart",
    ])
    .unwrap();
    let _operator = tokio::spawn(operator::controller::run_replica(operator_client, config));

    // The agents, each under a token bound to its DaemonSet pod.
    let mut kubeconfigs = BTreeMap::new();
    for n in &names {
        kubeconfigs.insert(n.clone(), agent_kubeconfig(&cluster, n).await);
    }
    let _fleet = Fleet::start(
        &names,
        &FleetOptions {
            kubeconfigs: kubeconfigs.clone(),
            ..FleetOptions::new(
                env!("CARGO_BIN_EXE_baton-agent"),
                kubeconfig.clone(),
                Duration::from_millis(500),
                ["--sim-stage-time", "500ms"],
            )
        },
    )
    .unwrap();
    let policy: crds::UpdatePolicy = serde_json::from_value(json!({
        "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy", "metadata": {"name": "workers"},
        "spec": {"release": {
            "version": "2.0.0", "url": "https://images.invalid/os-2.0.0.img",
            "sha256": "b".repeat(64), "signature": format!("{}==", "A".repeat(86)),
        }},
    }))
    .unwrap();
    Api::<crds::UpdatePolicy>::all(cluster.client())
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    cluster
        .wait_for(
            "the chart's identities to roll every node to 2.0.0",
            || async {
                nodes
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .iter()
                    .all(|n| {
                        let a = n.annotations();
                        a.get("baton.dev/state").map(String::as_str) == Some("Done")
                            && a.get("baton.dev/current-version").map(String::as_str)
                                == Some("2.0.0")
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
    let forbidden = e2e::audit::read(&cluster.audit_log())
        .unwrap()
        .into_iter()
        .filter(|r| r.response_status.as_ref().and_then(|s| s.code) == Some(403))
        .map(|r| format!("{} {} {}", r.user.username, r.verb, r.request_uri))
        .collect::<Vec<_>>();
    assert!(
        forbidden.is_empty(),
        "the chart's RBAC refused: {forbidden:?}"
    );

    // And nothing more: the agent on the first node, with its own token.
    let (mine, other) = (&names[0], &names[1]);
    let token = cluster
        .token_for(
            "baton-system",
            "baton-agent",
            {
                let pods: Api<Pod> = Api::namespaced(cluster.client(), "baton-system");
                let list = ListParams::default()
                    .labels("app.kubernetes.io/component=agent")
                    .fields(&format!("spec.nodeName={mine}"));
                let pod = pods.list(&list).await.unwrap().items.remove(0);
                Some((pod.name_any(), pod.uid().unwrap()))
            }
            .as_ref()
            .map(|(a, b)| (a.as_str(), b.as_str())),
        )
        .await
        .unwrap();
    let agent = cluster.client_with_token(&token).await.unwrap();
    let as_agent: Api<Node> = Api::all(agent.clone());
    let refused = |result: Result<Node, kube::Error>| match result {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let patch = |annotations: serde_json::Value| {
        Patch::Merge(json!({"metadata": {"annotations": annotations}}))
    };
    let (code, message) = refused(
        as_agent
            .patch(
                other,
                &PatchParams::default(),
                &patch(json!({"baton.dev/state": "Idle"})),
            )
            .await,
    );
    eprintln!("[helm] another node: {code} {message}");
    assert_eq!(code, 403);
    assert!(message.contains(&format!("baton-agent may change only its own Node: this token is bound to a pod on node {mine}, not {other}")), "{message}");
    let (code, message) = refused(
        as_agent
            .patch(
                mine,
                &PatchParams::default(),
                &patch(json!({"example.com/owner": "me"})),
            )
            .await,
    );
    eprintln!("[helm] a foreign annotation: {code} {message}");
    assert_eq!(code, 403);
    assert!(
        message.contains("baton-agent may change only its own annotations")
            && message.contains("refused: example.com/owner"),
        "{message}"
    );
    // Every key whose writer is not the agent is refused, set or removed, with the key
    // named (the list comes from crds/src/protocol.rs, as the policy's does).
    use crds::protocol::{AGENT_REMOVES, Kind, NODE_KEYS, Writer};
    for (key, kind, writer) in NODE_KEYS {
        if *writer == Writer::Agent {
            continue;
        }
        let value = if key.ends_with("reboot-ok") || key.ends_with("retry") {
            "0b0b0b0b-0000-4000-8000-000000000001"
        } else {
            "true"
        };
        let field = match kind {
            Kind::Annotation => "annotations",
            Kind::Label => "labels",
        };
        let (code, message) = refused(
            as_agent
                .patch(
                    mine,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {field: {*key: value}}})),
                )
                .await,
        );
        assert_eq!(code, 403, "{key}: {message}");
        assert!(
            message.contains(&format!("refused: {key}")),
            "{key}: {message}"
        );
        if AGENT_REMOVES.contains(key) {
            continue;
        }
        // Nor may it remove one the operator set.
        nodes
            .patch(
                mine,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {field: {*key: value}}})),
            )
            .await
            .unwrap();
        let (code, message) = refused(
            as_agent
                .patch(
                    mine,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {field: {*key: null}}})),
                )
                .await,
        );
        assert_eq!(code, 403, "removing {key}: {message}");
        nodes
            .patch(
                mine,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {field: {*key: null}}})),
            )
            .await
            .unwrap();
    }
    eprintln!("[helm] every operator and admin key refused to the agent, set or removed");
    // The admin's retry mark: the agent may remove it (once acted on), not set it.
    nodes
        .patch(
            mine,
            &PatchParams::default(),
            &patch(json!({"baton.dev/retry": "0b0b0b0b-0000-4000-8000-000000000001"})),
        )
        .await
        .unwrap();
    as_agent
        .patch(
            mine,
            &PatchParams::default(),
            &patch(json!({"baton.dev/retry": null})),
        )
        .await
        .unwrap();
    // Finalizers and owner references: refused.
    for metadata in [
        json!({"finalizers": ["example.com/hold"]}),
        json!({"ownerReferences": [{"apiVersion": "v1", "kind": "Namespace", "name": "default", "uid": "0b0b0b0b-0000-4000-8000-000000000001"}]}),
    ] {
        let (code, message) = refused(
            as_agent
                .patch(
                    mine,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": metadata})),
                )
                .await,
        );
        assert_eq!(code, 403, "{message}");
        assert!(
            message.contains("finalizers or ownerReferences"),
            "{message}"
        );
    }
    // The agent reads reboot Leases in the release namespace (get, nothing more).
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(agent.clone(), "baton-system");
    assert!(
        leases
            .get_opt("baton-reboot-nosuch")
            .await
            .unwrap()
            .is_none()
    );
    match leases.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{}", s.message),
        other => panic!("the agent listed Leases: {other:?}"),
    }
    let elsewhere: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(agent.clone(), "kube-system");
    match elsewhere.get("baton-reboot-nosuch").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{}", s.message),
        other => panic!("the agent read Leases outside its namespace: {other:?}"),
    }
    let (code, message) = refused(
        as_agent
            .patch(
                mine,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"unschedulable": true}})),
            )
            .await,
    );
    assert_eq!(code, 403);
    assert!(
        message.contains("may not change a Node's spec"),
        "{message}"
    );
    // Its own node's baton.dev/* keys: allowed.
    as_agent
        .patch(
            mine,
            &PatchParams::default(),
            &patch(json!({"baton.dev/message": "still allowed"})),
        )
        .await
        .unwrap();
    // Evicting a pod: not in its RBAC at all.
    let pods: Api<Pod> = Api::namespaced(agent, "baton-system");
    let victim = Api::<Pod>::namespaced(cluster.client(), "baton-system")
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .unwrap()
        .items
        .remove(0)
        .name_any();
    match pods.evict(&victim, &EvictParams::default()).await {
        Err(kube::Error::Api(s)) => {
            eprintln!("[helm] an eviction: {} {}", s.code, s.message);
            assert_eq!(s.code, 403);
            assert!(
                s.message
                    .contains("cannot create resource \"pods/eviction\""),
                "{}",
                s.message
            );
        }
        other => panic!("the agent evicted a pod: {other:?}"),
    }
}
