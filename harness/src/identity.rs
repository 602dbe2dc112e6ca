//! ServiceAccount identities for processes the tests run outside the cluster: a
//! ServiceAccount, a ClusterRole and its binding, and a kubeconfig with a token.

use std::path::PathBuf;

use k8s_openapi::api::{
    core::v1::{Pod, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};

use crate::{
    TestCluster,
    error::{Error, Result, io},
};

/// Creates (or updates) `namespace/name` with a ClusterRole of `rules` (RBAC
/// PolicyRules as JSON), and writes a kubeconfig for it next to the cluster's files.
pub async fn kubeconfig_for(
    cluster: &TestCluster,
    namespace: &str,
    name: &str,
    rules: serde_json::Value,
) -> Result<PathBuf> {
    let client = cluster.client();
    let apply = PatchParams::apply("baton-e2e").force();
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace},
    }))
    .map_err(|e| Error::Other(e.to_string()))?;
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .patch(name, &apply, &Patch::Apply(&sa))
        .await?;
    let role_name = format!("{namespace}-{name}");
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": role_name}, "rules": rules,
    }))
    .map_err(|e| Error::Other(e.to_string()))?;
    Api::<ClusterRole>::all(client.clone())
        .patch(&role_name, &apply, &Patch::Apply(&role))
        .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }))
    .map_err(|e| Error::Other(e.to_string()))?;
    Api::<ClusterRoleBinding>::all(client)
        .patch(&role_name, &apply, &Patch::Apply(&binding))
        .await?;
    let token = cluster.token_for(namespace, name, None).await?;
    let path = cluster
        .kubeconfig()
        .with_file_name(format!("kubeconfig-{namespace}-{name}"));
    std::fs::write(&path, cluster.kubeconfig_with_token(&token))
        .map_err(io("writing a kubeconfig"))?;
    Ok(path)
}

/// A kubeconfig presenting a token of `namespace/service_account` bound to the pod
/// matching `pod_labels` on `node` (a DaemonSet's pod): the token carries the
/// `authentication.kubernetes.io/node-name` claim, as the kubelet's projected tokens do.
pub async fn pod_bound_kubeconfig(
    cluster: &TestCluster,
    namespace: &str,
    service_account: &str,
    pod_labels: &str,
    node: &str,
) -> Result<PathBuf> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let list = ListParams::default()
        .labels(pod_labels)
        .fields(&format!("spec.nodeName={node}"));
    let pod = pods
        .list(&list)
        .await?
        .items
        .into_iter()
        .next()
        .ok_or_else(|| Error::Other(format!("no pod {pod_labels} on {node}")))?;
    let uid = pod.uid().unwrap_or_default();
    let token = cluster
        .token_for(namespace, service_account, Some((&pod.name_any(), &uid)))
        .await?;
    let path = cluster
        .kubeconfig()
        .with_file_name(format!("kubeconfig-{service_account}-{node}"));
    std::fs::write(&path, cluster.kubeconfig_with_token(&token))
        .map_err(io("writing a kubeconfig"))?;
    Ok(path)
}

/// A kubeconfig presenting a token of an existing `namespace/service_account`.
pub async fn service_account_kubeconfig(
    cluster: &TestCluster,
    namespace: &str,
    service_account: &str,
) -> Result<PathBuf> {
    let token = cluster.token_for(namespace, service_account, None).await?;
    let path = cluster
        .kubeconfig()
        .with_file_name(format!("kubeconfig-{namespace}-{service_account}"));
    std::fs::write(&path, cluster.kubeconfig_with_token(&token))
        .map_err(io("writing a kubeconfig"))?;
    Ok(path)
}

/// The RBAC rules the Helm chart at `chart` gives the ServiceAccount `name`: its
/// ClusterRole's, and its namespaced Role's made cluster-wide for brevity, rendered by
/// the real helm, so that tests run with the chart's permissions and no copy of them.
pub fn chart_rules(
    chart: &std::path::Path,
    name: &str,
    sets: &[&str],
) -> Result<serde_json::Value> {
    let helm = crate::binaries::Binaries::ensure()?.path("helm");
    let mut args = vec![
        "template".to_string(),
        "baton".into(),
        chart.display().to_string(),
        "--namespace".into(),
        "baton-system".into(),
    ];
    for s in sets {
        args.extend(["--set".into(), s.to_string()]);
    }
    let out = crate::binaries::helm_command(&helm)
        .args(&args)
        .output()
        .map_err(io("running helm template"))?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "helm template failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rules = Vec::new();
    for doc in text.split("\n---") {
        let Ok(v) = serde_yaml_ng::from_str::<serde_json::Value>(doc) else {
            continue;
        };
        let role = matches!(v["kind"].as_str(), Some("ClusterRole" | "Role"));
        if role && v["metadata"]["name"] == name {
            rules.extend(v["rules"].as_array().cloned().unwrap_or_default());
        }
    }
    if rules.is_empty() {
        return Err(Error::Other(format!("the chart gives {name} no rules")));
    }
    Ok(serde_json::Value::Array(rules))
}
