//! Workloads tests place on kwok nodes.

use k8s_openapi::api::apps::v1::Deployment;

/// A Deployment of `replicas` pods labelled `app=<name>`, at most one per node
/// (required pod anti-affinity on the hostname), so draining a node always hits one.
pub fn spread(name: &str, replicas: i32) -> Deployment {
    let value = serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [{"name": name, "image": format!("registry.invalid/{name}:1")}],
                    "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                        {"labelSelector": {"matchLabels": {"app": name}}, "topologyKey": "kubernetes.io/hostname"}
                    ]}},
                },
            },
        },
    });
    serde_json::from_value(value).unwrap_or_default()
}
