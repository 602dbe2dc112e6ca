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
use harness::{
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
    let out = harness::binaries::helm_command(&helm())
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

/// The values the ab backend needs (harmless for the others).
const AB: [&str; 2] = [
    "agent.ab.device=/dev/sda",
    "agent.ab.publicKeys[0]=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
];

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
            let r = format!("metrics.prometheusRule.enabled={monitor}");
            let mut sets = vec![b.clone(), m.clone(), r];
            sets.extend(AB.iter().map(|s| s.to_string()));
            let mut lint = vec!["lint", chart, "--strict"];
            for s in &sets {
                lint.extend(["--set", s.as_str()]);
            }
            run_helm(&lint);
            sets.extend([
                "defaultPolicy.enabled=true".into(),
                "dashboard.enabled=true".into(),
            ]);
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            let docs = template(&sets);
            assert_eq!(
                find(&docs, "ServiceMonitor").is_some(),
                monitor,
                "{backend} monitor={monitor}"
            );
            assert_eq!(find(&docs, "PrometheusRule").is_some(), monitor);
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
                volumes.contains("\"/run/baton\""),
                backend == "sentinel",
                "{backend}: {volumes}"
            );
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{backend}");
            assert_eq!(pod["securityContext"]["runAsUser"], 65532, "{backend}");
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
    let out = harness::binaries::helm_command(&helm())
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
    let out = harness::binaries::helm_command(&helm())
        .args(["template", "baton", chart, "--set", "agent.backend=yum"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backend") && err.contains("flatcar"), "{err}");
}

/// The host access each backend and reboot method renders, as docs/agent.md's table
/// says: `privileged` only for rebootMethod=command (nsenter); UID 0 only for signal
/// (CAP_KILL on the host's PID 1) and command; otherwise the non-root UID 65532 with
/// every capability dropped; the init step is root with CAP_CHOWN alone; hostPID only
/// for signal and command; and no hostPath is `/`, `/run`, `/var`, `/var/run`, `/etc`
/// or `/dev` (or a parent of one).
#[test]
fn every_backend_renders_with_only_the_privileges_its_table_lists() {
    let forbidden = [
        "/", "/run", "/var", "/var/run", "/etc", "/dev", "/var/lib", "/usr",
    ];
    let mut rows = vec![("sim".to_string(), "logind".to_string())];
    for backend in ["flatcar", "sentinel", "ab"] {
        for method in ["logind", "signal", "command"] {
            rows.push((backend.into(), method.into()));
        }
    }
    for (backend, method) in rows {
        let mut sets = vec![
            format!("agent.backend={backend}"),
            format!("agent.rebootMethod={method}"),
        ];
        if method == "command" {
            sets.push("agent.rebootCommand=nsenter -t 1 -m -- systemctl reboot".into());
        }
        sets.extend(AB.iter().map(|s| s.to_string()));
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let docs = template(&sets);
        let row = format!("{backend}/{method}");
        let pod = &find(&docs, "DaemonSet").unwrap()["spec"]["template"]["spec"];
        let agent = &pod["containers"][0]["securityContext"];
        let root = backend != "sim" && (method == "signal" || method == "command");
        assert_eq!(
            agent["privileged"] == true,
            backend != "sim" && method == "command",
            "{row}"
        );
        assert_eq!(pod["hostPID"] == true, root, "{row}");
        if root {
            assert_eq!(pod["securityContext"]["runAsUser"], 0, "{row}");
        } else {
            assert_eq!(pod["securityContext"]["runAsUser"], 65532, "{row}");
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{row}");
        }
        if agent["privileged"] != true {
            assert_eq!(agent["capabilities"]["drop"], json!(["ALL"]), "{row}");
            assert_eq!(agent["allowPrivilegeEscalation"], false, "{row}");
            let add = &agent["capabilities"]["add"];
            if method == "signal" && backend != "sim" {
                assert_eq!(add, &json!(["KILL"]), "{row}");
            } else {
                assert!(add.is_null(), "{row}: {add}");
            }
        }
        if backend != "sim" {
            let init = &pod["initContainers"][0]["securityContext"];
            assert_eq!(init["capabilities"]["add"], json!(["CHOWN"]), "{row}");
            assert_eq!(init["capabilities"]["drop"], json!(["ALL"]), "{row}");
            assert!(init["privileged"].is_null(), "{row}");
        }
        for volume in pod["volumes"].as_array().unwrap() {
            let Some(path) = volume["hostPath"]["path"].as_str() else {
                continue;
            };
            for f in forbidden {
                let parent =
                    f == path || f.starts_with(&format!("{}/", path.trim_end_matches('/')));
                assert!(!parent, "{row}: hostPath {path} is {f} or a parent of it");
            }
        }
        if backend == "ab" {
            let device = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "ab-device")
                .unwrap();
            assert_eq!(device["hostPath"]["type"], "BlockDevice", "{row}");
            assert_eq!(device["hostPath"]["path"], "/dev/sda", "{row}");
            // Staging is gentle by default: the agent parses what the chart renders.
            let args = pod["containers"][0]["args"].as_array().unwrap().iter();
            let config = agent::config::Config::try_parse_from(
                ["baton-agent", "--node-name=n"]
                    .into_iter()
                    .map(String::from)
                    .chain(args.map(|a| a.as_str().unwrap().to_string())),
            )
            .unwrap();
            assert_eq!(
                (
                    config.stage_io_class,
                    config.stage_nice,
                    config.stage_rate_limit,
                    config.stage_request_kib
                ),
                (agent::pace::IoClass::Idle, 19, 0, 64),
                "{row}"
            );
            if !root {
                assert_eq!(
                    pod["securityContext"]["supplementalGroups"],
                    json!([6]),
                    "{row}"
                );
            }
        }
    }
    // Values that would open the host, or that do nothing, are refused with what to
    // change.
    let refused = |sets: &[&str], says: &str| {
        let mut args = vec!["template", "baton", chart_str()];
        for s in sets {
            args.extend(["--set", s]);
        }
        let out = harness::binaries::helm_command(&helm())
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{sets:?} rendered");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{sets:?}: {err}");
    };
    refused(
        &["agent.backend=ab"],
        "agent.backend=ab needs agent.ab.device",
    );
    refused(
        &["agent.backend=ab", "agent.ab.device=/dev/sda"],
        "needs agent.ab.publicKeys",
    );
    refused(
        &["agent.rebootCommand=reboot"],
        "set agent.rebootMethod=command",
    );
    refused(
        &[
            "agent.backend=sentinel",
            "agent.sentinel.file=/var/run/reboot-required",
        ],
        "/agent/sentinel/file",
    );
    refused(&["agent.bootIdFile=/etc/x"], "/agent/bootIdFile");
    refused(
        &["agent.ab.staging.ioClass=realtime"],
        "/agent/ab/staging/ioClass",
    );
    refused(
        &[
            "defaultPolicy.enabled=true",
            "defaultPolicy.drain.onTimout=Force",
        ],
        "'onTimout' not allowed",
    );
    refused(
        &["agent.sentinel.command=check"],
        "set agent.backend=sentinel",
    );
    // The operator: pods delete only when Force drains are allowed, PDBs listed, status
    // only patched, scheduled first, pinned by digest when asked.
    let rules = |docs: &[serde_json::Value]| {
        docs.iter()
            .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "baton-operator")
            .unwrap()["rules"]
            .to_string()
    };
    let plain = template(&[]);
    let r = rules(&plain);
    assert!(!r.contains("\"delete\""), "{r}");
    assert!(r.contains("poddisruptionbudgets"), "{r}");
    assert!(r.contains("{\"apiGroups\":[\"baton.dev\"],\"resources\":[\"updatepolicies/status\"],\"verbs\":[\"patch\"]}"), "{r}");
    let force = template(&["operator.allowForceDrain=true"]);
    assert!(rules(&force).contains("\"delete\""));
    let deploy = find(&plain, "Deployment").unwrap();
    assert_eq!(
        deploy["spec"]["template"]["spec"]["priorityClassName"],
        "system-cluster-critical"
    );
    let digest = format!("sha256:{}", "a".repeat(64));
    let pinned = template(&[&format!("image.digest.operator={digest}")]);
    let image =
        find(&pinned, "Deployment").unwrap()["spec"]["template"]["spec"]["containers"][0]["image"]
            .clone();
    assert_eq!(image, format!("ghcr.io/baton-dev/baton-operator@{digest}"));
    let policies: Vec<_> = plain
        .iter()
        .filter(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        policies,
        ["baton-agent.baton.dev", "baton-operator.baton.dev"]
    );
    let netpol = template(&["networkPolicy.enabled=true"]);
    assert_eq!(
        find(&netpol, "NetworkPolicy").unwrap()["spec"]["ingress"],
        json!([])
    );
    // etcd access for the quorum guard: off by default; with it, the endpoints and the
    // client certificate's files, from a Secret mounted read-only, as the operator
    // parses them.
    let pod = &deploy["spec"]["template"]["spec"];
    assert!(!pod["containers"][0]["args"].to_string().contains("etcd"));
    assert!(pod["volumes"].is_null());
    let etcd = template(&[
        "operator.etcd.endpoints={https://10.0.0.1:2379,https://10.0.0.2:2379}",
        "operator.etcd.clientSecret=baton-etcd-client",
    ]);
    let pod = &find(&etcd, "Deployment").unwrap()["spec"]["template"]["spec"];
    let args: Vec<String> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let config = operator::config::Config::try_parse_from(
        std::iter::once("baton-operator".to_string()).chain(args),
    )
    .unwrap();
    assert_eq!(
        config.etcd.endpoints,
        ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
    );
    assert_eq!(
        config.etcd.key.unwrap().display().to_string(),
        "/etc/baton/etcd/tls.key"
    );
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "baton-etcd-client"
    );
    assert_eq!(
        pod["containers"][0]["volumeMounts"][0],
        json!({"name": "etcd-client", "mountPath": "/etc/baton/etcd", "readOnly": true})
    );
}

fn chart_str() -> &'static str {
    static CHART: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CHART.get_or_init(|| chart().to_str().unwrap().to_string())
}

/// The operator in a namespace that enforces the restricted Pod Security profile, the
/// agents (which mount host paths) in a namespace of their own that the chart creates
/// privileged: the real API server's Pod Security admission admits both, and the agent's
/// RBAC and admission policy follow it to its namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_under_restricted_pod_security_with_the_agents_apart() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.add_nodes(2).await.unwrap();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cluster.client());
    let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(json!({
        "metadata": {"name": "baton-system", "labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest"}},
    }))
    .unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let kubeconfig = cluster.kubeconfig();
    let notes = run_helm(&[
        "install",
        "baton",
        chart_str(),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--namespace",
        "baton-system",
        "--set",
        "agent.backend=flatcar",
        "--set",
        "agent.namespace=baton-agents",
        "--set",
        "agent.createNamespace=true",
        "--wait",
        "--timeout",
        "3m",
    ]);
    // The default repositories hold no published image: the NOTES say so, and how to
    // build and push the images.
    assert!(
        notes.contains(
            "WARNING: image.operatorRepository / image.agentRepository point at ghcr.io/baton-dev"
        ) && notes.contains(".ci/image")
            && notes.contains("skopeo copy --all oci:target/image/baton-operator:"),
        "{notes}"
    );
    let pods = |ns: &str| {
        let api: Api<Pod> = Api::namespaced(cluster.client(), ns);
        async move { api.list(&ListParams::default()).await.unwrap().items }
    };
    let operators = pods("baton-system").await;
    let agents = pods("baton-agents").await;
    eprintln!(
        "[helm] restricted: {} operator pod(s) in baton-system, {} agent pod(s) in baton-agents",
        operators.len(),
        agents.len()
    );
    assert_eq!(operators.len(), 2);
    assert_eq!(agents.len(), 2);
    let labels = namespaces
        .get("baton-agents")
        .await
        .unwrap()
        .labels()
        .clone();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged")
    );
    // The agents' DaemonSet pods would have been refused in the restricted namespace.
    let ds: k8s_openapi::api::apps::v1::DaemonSet = serde_json::from_value(
        find(&template(&["agent.backend=flatcar"]), "DaemonSet")
            .unwrap()
            .clone(),
    )
    .unwrap();
    let mut refused = ds.clone();
    refused.metadata.namespace = Some("baton-system".into());
    refused.metadata.name = Some("agents-here".into());
    let err =
        Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(cluster.client(), "baton-system")
            .create(&PostParams::default(), &refused)
            .await;
    match err {
        Ok(_) => {
            // A DaemonSet itself is admitted with a warning; its pods are not.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let here = pods("baton-system").await;
            assert!(
                here.iter()
                    .all(|p| !p.name_any().starts_with("agents-here")),
                "hostPath pods admitted under restricted"
            );
        }
        Err(e) => eprintln!("[helm] refused: {e}"),
    }
}

/// A kubeconfig presenting a token of the chart's agent ServiceAccount bound to the
/// agent pod on `node` (which gives it the node-name claim).
async fn agent_kubeconfig(cluster: &TestCluster, node: &str) -> PathBuf {
    harness::identity::pod_bound_kubeconfig(
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
    let notes = run_helm(&[
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
        "--set",
        "image.operatorRepository=registry.example/baton-operator",
        "--set",
        "image.agentRepository=registry.example/baton-agent",
        "--wait",
        "--timeout",
        "3m",
    ]);
    assert!(
        !notes.contains("WARNING: image."),
        "images of one's own registry: no warning\n{notes}"
    );
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
    let operator_task = tokio::spawn(operator::replica::run_replica(operator_client, config));

    // The agents, each under a token bound to its DaemonSet pod.
    let mut kubeconfigs = BTreeMap::new();
    for n in &names {
        kubeconfigs.insert(n.clone(), agent_kubeconfig(&cluster, n).await);
    }
    let fleet = Fleet::start(
        &names,
        &FleetOptions {
            kubeconfigs: kubeconfigs.clone(),
            ..FleetOptions::new(
                harness::binaries::workspace_binary("baton-agent").unwrap(),
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
    let forbidden = harness::audit::read(&cluster.audit_log())
        .unwrap()
        .into_iter()
        .filter(|r| r.response_status.as_ref().and_then(|s| s.code) == Some(403))
        .map(|r| format!("{} {} {}", r.user.username, r.verb, r.request_uri))
        .collect::<Vec<_>>();
    assert!(
        forbidden.is_empty(),
        "the chart's RBAC refused: {forbidden:?}"
    );
    // The rollout is over. From here on only this test writes the Nodes: the operator
    // undoes a `reboot-ok` or cordon mark that no Lease holds (ClearStaleGrant), so a
    // removal the test expects refused could find the key gone and pass as a no-op.
    operator_task.abort();
    let _ = operator_task.await;
    assert_eq!(fleet.failure(), None, "every agent ran");
    drop(fleet);

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
    // The operator's token, on Nodes: cordon, its own keys and the load-balancer label
    // only (its admission policy), whatever its RBAC allows.
    let as_operator: Api<Node> = Api::all(
        cluster
            .client_as("baton-system", "baton-operator")
            .await
            .unwrap(),
    );
    for (patch, says) in [
        (
            json!({"spec": {"taints": [{"key": "example.com/x", "effect": "NoSchedule"}]}}),
            "may change only spec.unschedulable",
        ),
        (
            json!({"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}}),
            "refused: node-role.kubernetes.io/control-plane",
        ),
        (
            json!({"metadata": {"annotations": {"example.com/owner": "me"}}}),
            "refused: example.com/owner",
        ),
        (
            json!({"metadata": {"annotations": {"baton.dev/paused": "true"}}}),
            "refused: baton.dev/paused",
        ),
        (
            json!({"metadata": {"finalizers": ["example.com/hold"]}}),
            "finalizers or ownerReferences",
        ),
    ] {
        let (code, message) = refused(
            as_operator
                .patch(other, &PatchParams::default(), &Patch::Merge(&patch))
                .await,
        );
        assert_eq!(code, 403, "{patch}: {message}");
        assert!(message.contains(says), "{patch}: {message}");
    }
    as_operator
        .patch(
            other,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true},
                "metadata": {"annotations": {"baton.dev/cordoned": "true"},
                             "labels": {"node.kubernetes.io/exclude-from-external-load-balancers": "true"}}})),
        )
        .await
        .unwrap();
    as_operator
        .patch(
            other,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": false},
                "metadata": {"annotations": {"baton.dev/cordoned": null},
                             "labels": {"node.kubernetes.io/exclude-from-external-load-balancers": null}}})),
        )
        .await
        .unwrap();
    eprintln!(
        "[helm] the operator's token: taints, foreign keys and finalizers refused; cordon allowed"
    );
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

/// The chart's example alerts (`metrics.prometheusRule`), rendered by helm with the
/// defaults, under `promtool test rules` from Debian's prometheus package: each alert
/// fires when it should, with its labels and words, and stays quiet otherwise
/// (e2e/alerts/baton.test.yaml).
#[test]
fn the_example_alerts_pass_promtool_test_rules() {
    assert!(
        find(&template(&[]), "PrometheusRule").is_none(),
        "off unless asked for"
    );
    let docs = template(&[
        "metrics.prometheusRule.enabled=true",
        "metrics.prometheusRule.labels.release=prom",
    ]);
    let rule = find(&docs, "PrometheusRule").unwrap();
    assert_eq!(rule["metadata"]["labels"]["release"], "prom");
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert_eq!(
        alerts,
        [
            "BatonPoolHalted",
            "BatonNodeFailed",
            "BatonRolloutStuck",
            "BatonReconcileErrors",
            "BatonNoLeader"
        ]
    );
    harness::packages::ensure().unwrap();
    let promtool = harness::packages::find("promtool").expect("promtool ships with prometheus");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml_ng::to_string(&rule["spec"]).unwrap(),
    )
    .unwrap();
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("alerts/baton.test.yaml");
    std::fs::copy(&tests, dir.path().join("baton.test.yaml")).unwrap();
    let check = std::process::Command::new(&promtool)
        .args(["check", "rules", "rules.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let out = std::process::Command::new(&promtool)
        .args(["test", "rules", "baton.test.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("[alerts] promtool test rules:\n{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

/// The Grafana dashboard: a cluster variable that every query filters by, the panels an
/// SRE looks for first, and queries that parse (each as a recording rule under
/// `promtool check rules`, the dashboard's variables replaced).
#[test]
fn the_dashboard_filters_by_cluster_and_its_queries_parse() {
    let docs = template(&["dashboard.enabled=true"]);
    let dashboard: serde_json::Value = serde_json::from_str(
        find(&docs, "ConfigMap").unwrap()["data"]["baton.json"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "cluster", "policy"]);
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Rollout progress (updated / selected)",
        "Failed nodes",
        "Next window opens",
        "Nodes by phase",
        "Waiting nodes by reason",
    ] {
        assert!(titles.contains(&want), "{want} missing from {titles:?}");
    }
    let exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        assert!(e.contains("cluster=~\"$cluster\""), "{e}");
        let concrete = e
            .replace("$cluster", ".*")
            .replace("$policy", ".*")
            .replace("$__rate_interval", "5m");
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&concrete).unwrap()
        ));
    }
    harness::packages::ensure().unwrap();
    let promtool = harness::packages::find("promtool").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yaml"), rules).unwrap();
    let out = std::process::Command::new(&promtool)
        .args(["check", "rules", "dashboard.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
