//! `cargo run -p e2e -- demo`: baton on a local control plane, live; or, given a
//! kubeconfig for a real cluster, how to install it there.
//!
//! Locally: the control plane with N kwok nodes, the chart installed with real helm,
//! `baton-operator` and one `baton-agent` per node (sim backend) as real processes
//! under the chart's ServiceAccounts, a release version set, the rollout shown live
//! (`kubectl baton status`), and a summary.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crds::{UpdatePolicy, node::NodeMarks, protocol::AgentState};
use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api,
    api::{ListParams, PostParams},
};

use harness::{
    Error, Result, TestCluster,
    binaries::Binaries,
    error::io,
    fleet::{Fleet, FleetOptions},
    identity,
};

/// The policy the demo installs: one node at a time, always open, release 2.0.0.
const DEMO_POLICY: &str = r#"
apiVersion: baton.dev/v1alpha1
kind: UpdatePolicy
metadata: {name: demo}
spec:
  maxUnavailable: 1
  health: {rebootTimeout: 10m, settleTime: 2s}
  release:
    version: "2.0.0"
    url: https://images.example/os-2.0.0.img
    sha256: "2f1d3b4c5a69788796a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3"
    signature: "c2ltdWxhdGVkIG1hY2hpbmVzIGRvIG5vdCBjaGVjayB0aGlzIHNpZ25hdHVyZTsgaXQgaGFzIHRoZSBzaGFwZS=="
"#;

/// Runs the demo.
pub fn run(nodes: usize, kubeconfig: Option<PathBuf>, keep: bool) -> Result<()> {
    if let Some(path) = kubeconfig {
        print_install(&path);
        return Ok(());
    }
    local(nodes, keep)
}

fn print_install(kubeconfig: &Path) {
    let k = kubeconfig.display();
    println!("A kubeconfig was given ({k}): starting nothing locally.\n");
    println!("Install baton on that cluster with the chart in this repository:");
    println!(
        "  helm install baton charts/baton --namespace baton-system --create-namespace --kubeconfig {k} \\"
    );
    println!("    --set agent.backend=flatcar   # or sentinel (kured-style reboot-required file)");
    println!("Describe a pool (see README.md), then watch it:");
    println!("  kubectl --kubeconfig {k} apply -f my-policy.yaml");
    println!("  cargo run -p kubectl-baton -- status -w     # or: kubectl baton status -w");
}

/// The operator and agent binaries: `$BATON_OPERATOR_BINARY` and `$BATON_AGENT_BINARY`
/// when both are set (as the tests set them), else a debug build of both.
fn binaries() -> Result<(PathBuf, PathBuf)> {
    if let (Some(operator), Some(agent)) = (
        std::env::var_os("BATON_OPERATOR_BINARY"),
        std::env::var_os("BATON_AGENT_BINARY"),
    ) {
        return Ok((operator.into(), agent.into()));
    }
    let target = build_binaries()?;
    Ok((target.join("baton-operator"), target.join("baton-agent")))
}

/// Builds the operator and agent binaries (debug) and returns the target directory.
fn build_binaries() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("Building baton-operator and baton-agent...");
    let status = Command::new(cargo)
        .args(["build", "--locked", "-p", "operator", "-p", "agent"])
        .status()
        .map_err(io("running cargo build"))?;
    if !status.success() {
        return Err(Error::Other("building baton failed".into()));
    }
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("debug"))
}

fn helm_install(helm: &Path, kubeconfig: &Path) -> Result<()> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/baton");
    let out = harness::binaries::helm_command(helm)
        .arg("install")
        .arg("baton")
        .arg(&chart)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args([
            "--namespace",
            "baton-system",
            "--create-namespace",
            "--set",
            "agent.backend=sim",
            "--wait",
            "--timeout",
            "3m",
        ])
        .output()
        .map_err(io("running helm"))?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "helm install failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// The state the node's agent reports.
fn state(node: &Node) -> Option<AgentState> {
    NodeMarks::read(node).agent.state
}

#[tokio::main]
async fn local(n: usize, keep: bool) -> Result<()> {
    let (operator_binary, agent_binary) = tokio::task::spawn_blocking(binaries)
        .await
        .map_err(|e| Error::Other(e.to_string()))??;
    harness::process::check_runnable(&operator_binary)?;
    harness::process::check_runnable(&agent_binary)?;
    let binaries = tokio::task::spawn_blocking(Binaries::ensure)
        .await
        .map_err(|e| Error::Other(e.to_string()))??;
    println!(
        "Starting a local Kubernetes control plane (etcd, kube-apiserver, controllers, scheduler, kwok)..."
    );
    let cluster = TestCluster::start().await?;
    println!(
        "Cluster kubeconfig: {}\n  KUBECONFIG={} cargo run -p kubectl-baton -- status -w",
        cluster.kubeconfig().display(),
        cluster.kubeconfig().display()
    );
    let names = cluster.add_nodes(n).await?;
    println!("{} kwok nodes Ready.", names.len());
    println!(
        "Installing the chart with helm (CRD, RBAC, admission policy, operator, agent DaemonSet)..."
    );
    helm_install(&binaries.path("helm"), &cluster.kubeconfig())?;

    // The chart's pods run on kwok nodes, which run no containers: baton's processes
    // run here instead, under the chart's ServiceAccounts.
    let operator_kc =
        identity::service_account_kubeconfig(&cluster, "baton-system", "baton-operator").await?;
    let mut kubeconfigs = std::collections::BTreeMap::new();
    for node in &names {
        let kc = identity::pod_bound_kubeconfig(
            &cluster,
            "baton-system",
            "baton-agent",
            "app.kubernetes.io/component=agent",
            node,
        )
        .await?;
        kubeconfigs.insert(node.clone(), kc);
    }
    let logs = cluster.kubeconfig().with_file_name("demo-operator.log");
    let logs_path = logs.clone();
    let _operator = harness::process::spawn_with_kubeconfig(
        "baton-operator",
        &operator_binary,
        &operator_kc,
        &[
            "--namespace",
            "baton-system",
            "--identity",
            "demo-operator",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        logs,
    )?;
    let fleet = Fleet::start(
        &names,
        &FleetOptions {
            kubeconfigs,
            ..FleetOptions::new(
                agent_binary,
                cluster.kubeconfig(),
                Duration::from_secs(3),
                ["--sim-stage-time", "2s"],
            )
        },
    )?;
    if let Some(first) = names.first() {
        println!(
            "Logs: the operator's in {}, each agent's in {} (and beside it for the other nodes)",
            logs_path.display(),
            fleet.state_dir(first).join("agent-1.log").display()
        );
    }
    let client = cluster.client();
    let nodes: Api<Node> = Api::all(client.clone());
    cluster
        .wait_for("every agent to report Idle on 1.0.0", || async {
            fleet.failure().is_some()
                || nodes
                    .list(&ListParams::default())
                    .await
                    .is_ok_and(|l| l.items.iter().all(|n| state(n) == Some(AgentState::Idle)))
        })
        .await?;
    if let Some(failure) = fleet.failure() {
        return Err(Error::Other(failure));
    }
    println!(
        "baton-operator and {} baton-agent processes running. Setting the release to 2.0.0...",
        names.len()
    );
    let policy: UpdatePolicy =
        serde_yaml_ng::from_str(DEMO_POLICY).map_err(|e| Error::Other(e.to_string()))?;
    Api::<UpdatePolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last = String::new();
    let mut max_disrupted = 0;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "baton-system");
    let policies: Api<UpdatePolicy> = Api::all(client.clone());
    loop {
        let p = policies.list(&ListParams::default()).await?.items;
        let all = nodes.list(&ListParams::default()).await?.items;
        let held = leases
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=baton"))
            .await?
            .items;
        let disrupted = all
            .iter()
            .filter(|n| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false)
                    || matches!(
                        state(n),
                        Some(AgentState::Rebooting | AgentState::Verifying)
                    )
            })
            .count();
        max_disrupted = max_disrupted.max(disrupted);
        let text = kubectl_baton::status::render(&p, &all, &held, None, Timestamp::now());
        let stable: String = text
            .lines()
            .map(|l| l.split(" held ").next().unwrap_or(l))
            .collect();
        if terminal {
            print!("\x1b[H\x1b[2J");
            println!(
                "baton demo: {} nodes, one at a time  (elapsed {:.0?})\n",
                names.len(),
                started.elapsed()
            );
            print!("{text}");
        } else if stable != last {
            println!("--- {:.0?}", started.elapsed());
            print!("{text}");
        }
        last = stable;
        let done = held.is_empty()
            && all.iter().all(|n| {
                let marks = NodeMarks::read(n);
                marks.agent.state == Some(AgentState::Done)
                    && marks.agent.current_version.as_ref().map(|v| v.as_str()) == Some("2.0.0")
            });
        if done {
            break;
        }
        if let Some(failure) = fleet.failure() {
            return Err(Error::Other(failure));
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(Error::Other(
                "the rollout did not finish within 10 minutes".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let reboots: u32 = names.iter().map(|n| fleet.log(n).reboots).sum();
    println!();
    println!("Summary");
    println!(
        "  {} of {} nodes updated 1.0.0 -> 2.0.0 in {:.1?}",
        names.len(),
        names.len(),
        started.elapsed()
    );
    println!(
        "  {reboots} reboots, each verified by a new boot id; at most {max_disrupted} node(s) disrupted at once (budget 1)"
    );
    println!(
        "  the operator and agents ran under the chart's ServiceAccounts and admission policy"
    );
    if keep {
        println!();
        println!("Cluster kubeconfig: {}", cluster.kubeconfig().display());
        println!(
            "  KUBECONFIG={} cargo run -p kubectl-baton -- status",
            cluster.kubeconfig().display()
        );
        println!("Ctrl-C to stop.");
        // harness::interrupt stops the cluster and exits 130 on Ctrl-C.
        std::future::pending::<()>().await;
    }
    Ok(())
}
