//! `cargo run -p e2e -- demo`: baton on a local control plane, or how to install it on
//! a real cluster.

use std::path::PathBuf;

use crds::UpdatePolicy;
use e2e::{Error, Result, TestCluster};
use jiff::{SignedDuration, Timestamp, tz::TimeZone};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use kubectl_baton::plan::{PlanOptions, render};

/// The policy the demo installs: one node at a time, always open.
const DEMO_POLICY: &str = r#"
apiVersion: baton.dev/v1alpha1
kind: UpdatePolicy
metadata: {name: demo}
spec:
  nodeSelector: {matchLabels: {type: kwok}}
  maxUnavailable: 1
  health: {rebootTimeout: 10m, settleTime: 10s}
"#;

/// Runs the demo.
pub fn run(nodes: usize, kubeconfig: Option<PathBuf>, keep: bool) -> Result<()> {
    if let Some(path) = kubeconfig {
        print_install(&path);
        return Ok(());
    }
    local(nodes, keep)
}

fn print_install(kubeconfig: &std::path::Path) {
    println!(
        "A kubeconfig was given ({}): starting nothing locally.",
        kubeconfig.display()
    );
    println!();
    println!("Install baton on that cluster with the chart in this repository:");
    println!(
        "  helm install baton charts/baton --namespace baton-system --create-namespace --kubeconfig {}",
        kubeconfig.display()
    );
    println!("Then describe a pool and watch it:");
    println!("  kubectl apply -f crds/tests/valid/full.yaml");
    println!("  kubectl get updatepolicies -w");
}

#[tokio::main]
async fn local(nodes: usize, keep: bool) -> Result<()> {
    println!(
        "Starting a local Kubernetes control plane (etcd, kube-apiserver, controllers, scheduler, kwok)..."
    );
    let cluster = TestCluster::start().await?;
    cluster.apply_crds().await?;
    let names = cluster.add_nodes(nodes).await?;
    println!("{} kwok nodes Ready: {}", names.len(), names.join(", "));
    let policy: UpdatePolicy =
        serde_yaml_ng::from_str(DEMO_POLICY).map_err(|e| Error::Other(e.to_string()))?;
    let client = cluster.client();
    Api::<UpdatePolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    println!("UpdatePolicy demo created (maxUnavailable: 1).");
    println!();
    let nodes: Vec<Node> = Api::<Node>::all(client)
        .list(&ListParams::default())
        .await?
        .items;
    let opts = PlanOptions {
        start: Timestamp::now(),
        horizon: SignedDuration::from_hours(24),
        reboot_time: SignedDuration::from_mins(2),
        node_reboot_times: Default::default(),
        time_zone: TimeZone::UTC,
        operator_node: None,
    };
    println!("kubectl baton plan demo --reboot-time 2m:");
    print!(
        "{}",
        render(&policy, &nodes, &opts).map_err(|e| Error::Other(e.to_string()))?
    );
    println!();
    println!(
        "The live rollout (baton-operator with simulated agents) is not wired into the demo yet;"
    );
    println!("the plan above is what the decision core will make it do.");
    if keep {
        println!(
            "Cluster kubeconfig: {} (Ctrl-C to stop)",
            cluster.kubeconfig().display()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    Ok(())
}
