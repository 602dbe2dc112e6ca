//! The harness itself: RBAC is enforced for ServiceAccount tokens from TokenRequest,
//! admission policies run, and no process outlives a cluster, even after a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use harness::TestCluster;
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::{
    Api,
    api::{ListParams, PostParams},
};

fn component_pids(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_are_subject_to_rbac_and_admission_policies_run() {
    let cluster = TestCluster::start().await.unwrap();
    let admin = cluster.client();
    Api::<ServiceAccount>::namespaced(admin.clone(), "default")
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "nobody"}})).unwrap(),
        )
        .await
        .unwrap();
    let nobody = cluster.client_as("default", "nobody").await.unwrap();
    match Api::<Node>::all(nobody).list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403);
            assert!(
                s.message.contains("system:serviceaccount:default:nobody"),
                "{}",
                s.message
            );
        }
        other => panic!("expected 403, got {other:?}"),
    }

    // A ValidatingAdmissionPolicy is enforced (the plugin is on, as in a real cluster).
    let policy: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "no-forbidden-configmaps"},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}]},
            "validations": [{"expression": "object.metadata.name != 'forbidden'", "message": "configmaps may not be called forbidden"}],
        },
    }))
    .unwrap();
    let binding: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "no-forbidden-configmaps"},
        "spec": {"policyName": "no-forbidden-configmaps", "validationActions": ["Deny"]},
    }))
    .unwrap();
    let gvk =
        |kind: &str| kube::api::GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
    let (vap, _) = kube::discovery::pinned_kind(&admin, &gvk("ValidatingAdmissionPolicy"))
        .await
        .unwrap();
    let (vapb, _) = kube::discovery::pinned_kind(&admin, &gvk("ValidatingAdmissionPolicyBinding"))
        .await
        .unwrap();
    Api::<kube::api::DynamicObject>::all_with(admin.clone(), &vap)
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    Api::<kube::api::DynamicObject>::all_with(admin.clone(), &vapb)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(admin.clone(), "default");
    let forbidden =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "forbidden"}})).unwrap();
    cluster
        .wait_for("the admission policy to take effect", || async {
            matches!(configmaps.create(&PostParams::default(), &forbidden).await, Err(kube::Error::Api(s)) if s.message.contains("configmaps may not be called forbidden"))
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_process_outlives_a_cluster_even_after_a_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = tokio::spawn(async move {
        let cluster = TestCluster::start().await.unwrap();
        let dir = cluster.dir().to_path_buf();
        tx.send(dir.clone()).unwrap();
        assert!(
            component_pids(&dir).len() >= 5,
            "components should be running"
        );
        panic!("a test fails while the cluster runs");
    })
    .await;
    assert!(outcome.is_err(), "the task panicked");
    let dir = rx.recv().unwrap();
    assert!(
        component_pids(&dir).is_empty(),
        "leaked: {:?}",
        component_pids(&dir)
    );
}
