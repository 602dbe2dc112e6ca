//! The simulation's model API server (`sim::apiserver`) against the real control plane:
//! the same short script runs on both, and what a client observes matches — every
//! answer (201/200, 404, 409 on a stale resourceVersion, a failed precondition or a
//! duplicate, 429 from a PodDisruptionBudget), the order in which a watch shows one
//! object's versions, and a finalizer holding a deleted policy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use harness::TestCluster;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod, policy::v1::PodDisruptionBudget};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, EvictParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::watcher,
};
use serde_json::{Value, json};

use crds::UpdatePolicy;
use sim::apiserver::{self, ApiError, ApiServer, Kind, Object};

const NS: &str = "model";

/// One step of the script.
#[derive(Debug, Clone)]
enum Op {
    CreateLease,
    /// A merge patch setting annotation `step`, guarded by the resourceVersion the
    /// named earlier answer returned (`None`: unguarded).
    PatchLease(&'static str, Option<&'static str>),
    /// A delete with preconditions: the resourceVersion of a named answer, and the
    /// true uid or a wrong one.
    DeleteLease(Option<&'static str>, bool),
    CreatePod,
    NeverEvict,
    DeleteBudget,
    Evict,
    CreatePolicy,
    DeletePolicy,
    /// Is the policy there, and marked for deletion?
    ReadPolicy,
    DropFinalizer,
}

const SCRIPT: &[(&str, Op)] = &[
    ("created", Op::CreateLease),
    ("duplicate", Op::CreateLease),
    ("one", Op::PatchLease("1", Some("created"))),
    ("stale", Op::PatchLease("2", Some("created"))),
    ("three", Op::PatchLease("3", Some("one"))),
    ("unguarded", Op::PatchLease("4", None)),
    ("delete-stale", Op::DeleteLease(Some("three"), true)),
    ("delete-wrong-uid", Op::DeleteLease(None, false)),
    ("delete", Op::DeleteLease(Some("unguarded"), true)),
    ("delete-again", Op::DeleteLease(None, true)),
    ("patch-gone", Op::PatchLease("5", None)),
    ("pod", Op::CreatePod),
    ("budget", Op::NeverEvict),
    ("evict-refused", Op::Evict),
    ("budget-gone", Op::DeleteBudget),
    ("evict", Op::Evict),
    ("policy", Op::CreatePolicy),
    ("delete-policy", Op::DeletePolicy),
    ("held", Op::ReadPolicy),
    ("finalizer-gone", Op::DropFinalizer),
    ("gone", Op::ReadPolicy),
];

/// What one answer shows: its status, and the resourceVersion it returned.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    outcome: String,
    rv: Option<String>,
}

fn ok(rv: Option<String>) -> Answer {
    Answer {
        outcome: "ok".into(),
        rv,
    }
}

fn refused(code: u16) -> Answer {
    Answer {
        outcome: code.to_string(),
        rv: None,
    }
}

fn lease() -> Lease {
    serde_json::from_value(json!({"metadata": {"name": "l1", "namespace": NS},
        "spec": {"holderIdentity": "n1"}}))
    .unwrap()
}

fn pod(node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "p1", "namespace": NS, "labels": {"app": "model"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/c:1"}]},
    }))
    .unwrap()
}

fn never_evict() -> PodDisruptionBudget {
    serde_json::from_value(json!({"metadata": {"name": "never", "namespace": NS},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "model"}}}}))
    .unwrap()
}

fn policy() -> UpdatePolicy {
    serde_json::from_value(
        json!({"apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy",
        "metadata": {"name": "model-pool", "finalizers": [crds::policy::FINALIZER]},
        "spec": {"nodeSelector": {"matchLabels": {"pool": "model"}}}}),
    )
    .unwrap()
}

fn step_patch(step: &str, rv: Option<&String>) -> Value {
    let mut meta = json!({"annotations": {"step": step}});
    if let Some(rv) = rv {
        meta["resourceVersion"] = json!(rv);
    }
    json!({ "metadata": meta })
}

fn rv_of(answers: &[(&str, Answer)], name: &str) -> Option<String> {
    answers
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, a)| a.rv.clone())
}

/// The script on the model.
fn on_model() -> (Vec<(&'static str, Answer)>, Vec<String>) {
    let mut api = ApiServer::default();
    let mut answers: Vec<(&str, Answer)> = Vec::new();
    let node = "n1";
    let of_err = |e: ApiError| refused(e.code());
    for (name, op) in SCRIPT {
        let answer = match op {
            Op::CreateLease => api
                .create_lease(lease())
                .map_or_else(of_err, |l| ok(l.resource_version())),
            Op::PatchLease(step, guard) => {
                let rv = guard.and_then(|g| rv_of(&answers, g));
                api.patch_lease("l1", &step_patch(step, rv.as_ref()))
                    .map_or_else(of_err, |l| ok(l.resource_version()))
            }
            Op::DeleteLease(guard, true_uid) => {
                let uid = api.leases.get("l1").and_then(|l| l.uid());
                let pre = apiserver::Preconditions {
                    uid: if *true_uid { uid } else { Some("wrong".into()) },
                    resource_version: guard.and_then(|g| rv_of(&answers, g)),
                };
                api.delete_lease("l1", &pre)
                    .map_or_else(of_err, |()| ok(None))
            }
            Op::CreatePod => {
                let mut p = pod(node);
                p.status = serde_json::from_value(json!({"phase": "Running"})).ok();
                api.create_pod(p).map_or_else(of_err, |()| ok(None))
            }
            Op::NeverEvict => api
                .create_pdb(never_evict())
                .map_or_else(of_err, |()| ok(None)),
            Op::DeleteBudget => api
                .delete_pdb(NS, "never")
                .map_or_else(of_err, |()| ok(None)),
            Op::Evict => api.evict(NS, "p1").map_or_else(of_err, |_| ok(None)),
            Op::CreatePolicy => api
                .create_policy(policy())
                .map_or_else(of_err, |p| ok(p.resource_version())),
            Op::DeletePolicy => api
                .delete_policy("model-pool")
                .map_or_else(of_err, |()| ok(None)),
            Op::ReadPolicy => read_policy(api.policies.get("model-pool").map(|p| &**p)),
            Op::DropFinalizer => {
                let rv = api
                    .policies
                    .get("model-pool")
                    .and_then(|p| p.resource_version());
                let patch = json!({"metadata": {"finalizers": [], "resourceVersion": rv}});
                api.patch_policy("model-pool", &patch)
                    .map_or_else(of_err, |()| ok(None))
            }
        };
        answers.push((name, answer));
    }
    // What a watch of the Lease shows, in order.
    let seen = api
        .log
        .iter()
        .filter(|c| c.kind == Kind::Lease && c.name == "l1")
        .map(|c| match &c.object {
            Some(Object::Lease(l)) => step_of(l),
            _ => "deleted".into(),
        })
        .collect();
    (answers, seen)
}

fn read_policy(p: Option<&UpdatePolicy>) -> Answer {
    match p {
        Some(p) if p.metadata.deletion_timestamp.is_some() => Answer {
            outcome: "terminating".into(),
            rv: None,
        },
        Some(_) => ok(None),
        None => refused(404),
    }
}

fn step_of(l: &Lease) -> String {
    l.annotations()
        .get("step")
        .cloned()
        .unwrap_or_else(|| "none".into())
}

fn of_kube(e: kube::Error) -> Answer {
    match e {
        kube::Error::Api(s) => refused(s.code),
        other => panic!("no answer from the API server: {other}"),
    }
}

/// The script on the real control plane.
async fn on_real(cluster: &TestCluster, node: &str) -> (Vec<(&'static str, Answer)>, Vec<String>) {
    let client = cluster.client();
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);
    let policies: Api<UpdatePolicy> = Api::all(client.clone());
    // Every version of the Lease a watch shows, from before the first write.
    let watch = watcher(
        leases.clone(),
        watcher::Config::default().fields("metadata.name=l1"),
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watching = tokio::spawn(async move {
        let mut events = watch.boxed();
        while let Some(Ok(e)) = events.next().await {
            match e {
                watcher::Event::Apply(l) => tx.send(step_of(&l)).unwrap(),
                watcher::Event::Delete(_) => tx.send("deleted".into()).unwrap(),
                watcher::Event::InitDone => tx.send("ready".into()).unwrap(),
                _ => {}
            }
        }
    });
    assert_eq!(rx.recv().await.as_deref(), Some("ready"));

    let post = PostParams::default();
    let merge = PatchParams::default();
    let mut answers: Vec<(&str, Answer)> = Vec::new();
    for (name, op) in SCRIPT {
        let answer = match op {
            Op::CreateLease => leases
                .create(&post, &lease())
                .await
                .map_or_else(of_kube, |l| ok(l.resource_version())),
            Op::PatchLease(step, guard) => {
                let rv = guard.and_then(|g| rv_of(&answers, g));
                leases
                    .patch("l1", &merge, &Patch::Merge(step_patch(step, rv.as_ref())))
                    .await
                    .map_or_else(of_kube, |l| ok(l.resource_version()))
            }
            Op::DeleteLease(guard, true_uid) => {
                let uid = leases.get_opt("l1").await.unwrap().and_then(|l| l.uid());
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: if *true_uid { uid } else { Some("wrong".into()) },
                        resource_version: guard.and_then(|g| rv_of(&answers, g)),
                    }),
                    ..Default::default()
                };
                leases
                    .delete("l1", &params)
                    .await
                    .map_or_else(of_kube, |_| ok(None))
            }
            Op::CreatePod => {
                let created = pods
                    .create(&post, &pod(node))
                    .await
                    .map_or_else(of_kube, |_| ok(None));
                // A Pending pod is evicted whatever its budgets say: wait for kwok's
                // "kubelet" to run it, as the model's pods run from the start.
                cluster
                    .wait_for("the pod to run", || async {
                        pods.get_opt("p1").await.ok().flatten().is_some_and(|p| {
                            p.status.and_then(|s| s.phase).as_deref() == Some("Running")
                        })
                    })
                    .await
                    .unwrap();
                created
            }
            Op::NeverEvict => budgets
                .create(&post, &never_evict())
                .await
                .map_or_else(of_kube, |_| ok(None)),
            Op::DeleteBudget => budgets
                .delete("never", &DeleteParams::default())
                .await
                .map_or_else(of_kube, |_| ok(None)),
            Op::Evict => pods
                .evict("p1", &EvictParams::default())
                .await
                .map_or_else(of_kube, |_| ok(None)),
            Op::CreatePolicy => policies
                .create(&post, &policy())
                .await
                .map_or_else(of_kube, |p| ok(p.resource_version())),
            Op::DeletePolicy => policies
                .delete("model-pool", &DeleteParams::default())
                .await
                .map_or_else(of_kube, |_| ok(None)),
            Op::ReadPolicy => read_policy(policies.get_opt("model-pool").await.unwrap().as_ref()),
            Op::DropFinalizer => {
                let rv = policies.get("model-pool").await.unwrap().resource_version();
                let patch = json!({"metadata": {"finalizers": [], "resourceVersion": rv}});
                policies
                    .patch("model-pool", &merge, &Patch::Merge(patch))
                    .await
                    .map_or_else(of_kube, |_| ok(None))
            }
        };
        answers.push((name, answer));
    }
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("deleted") {
        let next = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("the watch shows the Lease's deletion within 30 s")
            .expect("the watch runs");
        seen.push(next);
    }
    watching.abort();
    (answers, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_api_server_answers_as_the_real_one_does() {
    let (cluster, nodes) = TestCluster::start_with_nodes(1).await.unwrap();
    cluster.apply_crds().await.unwrap();
    cluster.create_namespace(NS).await.unwrap();
    // Pods need the namespace's default ServiceAccount, which a controller creates.
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(cluster.client(), NS);
    cluster
        .wait_for("the default ServiceAccount of the namespace", || async {
            accounts.get_opt("default").await.ok().flatten().is_some()
        })
        .await
        .unwrap();

    let (model, model_watch) = on_model();
    let (real, real_watch) = on_real(&cluster, &nodes[0]).await;

    // resourceVersions differ between servers: compare outcomes, and that an answer
    // returned one exactly when the other did.
    let outcomes = |a: &[(&str, Answer)]| -> Vec<String> {
        a.iter()
            .map(|(n, a)| {
                format!(
                    "{n}: {}{}",
                    a.outcome,
                    if a.rv.is_some() { " (rv)" } else { "" }
                )
            })
            .collect()
    };
    assert_eq!(outcomes(&model), outcomes(&real));
    // The answers the script is about, spelled out.
    let expect = [
        ("duplicate", "409"),
        ("stale", "409"),
        ("delete-stale", "409"),
        ("delete-wrong-uid", "409"),
        ("delete-again", "404"),
        ("patch-gone", "404"),
        ("evict-refused", "429"),
        ("evict", "ok"),
        ("held", "terminating"),
        ("gone", "404"),
    ];
    for (name, outcome) in expect {
        let got = real
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| &a.outcome);
        assert_eq!(got.map(String::as_str), Some(outcome), "{name}");
    }
    // One object's versions, in the order they were written; a watch may fold
    // versions together but never reorders them.
    assert_eq!(model_watch, ["none", "1", "3", "4", "deleted"]);
    let mut folded = real_watch.clone();
    folded.dedup();
    let in_order = folded.iter().all(|s| model_watch.contains(s))
        && folded.windows(2).all(|w| {
            let at = |s: &String| model_watch.iter().position(|m| m == s);
            at(&w[0]) < at(&w[1])
        });
    assert!(in_order, "real watch {real_watch:?}, model {model_watch:?}");
}
