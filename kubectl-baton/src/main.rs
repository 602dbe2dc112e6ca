//! `kubectl-baton` entry point.

use std::{collections::BTreeMap, process::ExitCode};

use clap::{Parser, Subcommand};
use futures::StreamExt;
use jiff::{SignedDuration, Timestamp, tz::TimeZone};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{WatchStreamExt, reflector, watcher},
};

use crds::UpdatePolicy;
use kubectl_baton::{
    Error,
    plan::{self, PlanOptions},
    status, steer,
};

/// Plan, watch and steer baton rollouts.
#[derive(Debug, Parser)]
#[command(name = "kubectl-baton", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Simulate a rollout of a policy and print its timeline.
    Plan(PlanArgs),
    /// The rollout now: per policy a progress bar, per node its state, version,
    /// lease and cordon. `-w` keeps it live (from watches).
    Status {
        /// Only this policy.
        policy: Option<String>,
        /// Keep watching and redraw on every change.
        #[arg(short = 'w', long)]
        watch: bool,
        /// The operator's namespace (where the reboot Leases are).
        #[arg(short = 'n', long, default_value = "baton-system")]
        namespace: String,
    },
    /// Pause a policy (nothing new starts; nodes in flight finish) or, with --node, a node.
    Pause(Target),
    /// Resume a paused policy or node.
    Resume(Target),
    /// After fixing the cause: clear failed nodes (every failed node of a policy, or
    /// the --node ones) so that a halted pool resumes. See docs/operations.md.
    Retry {
        /// The policy whose failed nodes to retry.
        policy: Option<String>,
        /// Retry these nodes instead.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// The operator's namespace (where the reboot Leases are).
        #[arg(short = 'n', long, default_value = "baton-system")]
        namespace: String,
    },
}

/// A policy, or nodes.
#[derive(Debug, clap::Args)]
struct Target {
    /// The policy.
    policy: Option<String>,
    /// Nodes instead of a policy.
    #[arg(long = "node")]
    nodes: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct PlanArgs {
    /// The UpdatePolicy to simulate: a name in the cluster, or a YAML file with --file.
    policy: String,
    /// Read the policy from this file instead of the cluster.
    #[arg(long, short = 'f')]
    file: bool,
    /// A YAML or JSON NodeList (`kubectl get nodes -o yaml`); the cluster's nodes when unset.
    #[arg(long)]
    nodes: Option<String>,
    /// How long a node takes from its reboot grant to back and healthy.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    reboot_time: SignedDuration,
    /// Per-node reboot time, as NODE=DURATION; repeatable.
    #[arg(long = "node-reboot-time", value_parser = parse_node_duration)]
    node_reboot_times: Vec<(String, SignedDuration)>,
    /// When the rollout starts (RFC 3339); now when unset.
    #[arg(long)]
    start: Option<Timestamp>,
    /// How far ahead to simulate.
    #[arg(long, default_value = "720h", value_parser = parse_duration)]
    horizon: SignedDuration,
    /// The time zone to print times in.
    #[arg(long, default_value = "UTC")]
    time_zone: String,
    /// The node the operator runs on (it goes last).
    #[arg(long)]
    operator_node: Option<String>,
}

/// A `kind: List` or `kind: NodeList` document, as `kubectl get nodes -o yaml` prints.
#[derive(serde::Deserialize)]
struct NodeItems {
    items: Vec<Node>,
}

fn parse_duration(text: &str) -> Result<SignedDuration, String> {
    crds::duration::parse(text)
        .map_err(|e| e.to_string())
        .and_then(|d| SignedDuration::try_from(d).map_err(|e| e.to_string()))
}

fn parse_node_duration(text: &str) -> Result<(String, SignedDuration), String> {
    let (node, d) = text
        .split_once('=')
        .ok_or("expected NODE=DURATION, such as node-3=25m")?;
    Ok((node.to_string(), parse_duration(d)?))
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &str, what: &'static str) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    serde_yaml_ng::from_str(&text).map_err(|source| Error::Parse {
        path: path.into(),
        what,
        source,
    })
}

async fn run_plan(args: PlanArgs) -> Result<String, Error> {
    let time_zone = TimeZone::get(&args.time_zone).map_err(|_| {
        Error::Usage(format!(
            "--time-zone {:?} is not an IANA time zone",
            args.time_zone
        ))
    })?;
    let client = if args.file && args.nodes.is_some() {
        None
    } else {
        Some(Client::try_default().await?)
    };
    let policy: UpdatePolicy = match (&client, args.file) {
        (_, true) => read_yaml(&args.policy, "an UpdatePolicy")?,
        (Some(client), false) => {
            Api::<UpdatePolicy>::all(client.clone())
                .get(&args.policy)
                .await?
        }
        (None, false) => return Err(Error::Usage("no cluster client".into())),
    };
    let nodes: Vec<Node> = match (&args.nodes, &client) {
        (Some(path), _) => read_yaml::<NodeItems>(path, "a NodeList")?.items,
        (None, Some(client)) => {
            Api::<Node>::all(client.clone())
                .list(&ListParams::default())
                .await?
                .items
        }
        (None, None) => return Err(Error::Usage("no cluster client".into())),
    };
    let opts = PlanOptions {
        start: args.start.unwrap_or_else(Timestamp::now),
        horizon: args.horizon,
        reboot_time: args.reboot_time,
        node_reboot_times: args
            .node_reboot_times
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        time_zone,
        operator_node: args.operator_node,
    };
    plan::render(&policy, &nodes, &opts)
}

async fn snapshot(
    client: &Client,
    namespace: &str,
) -> Result<(Vec<UpdatePolicy>, Vec<Node>, Vec<Lease>), Error> {
    let policies = Api::<UpdatePolicy>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let leases = Api::<Lease>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=baton"))
        .await?
        .items;
    Ok((policies, nodes, leases))
}

async fn run_status(
    policy: Option<String>,
    watch: bool,
    namespace: String,
) -> Result<String, Error> {
    let client = Client::try_default().await?;
    if !watch {
        let (p, n, l) = snapshot(&client, &namespace).await?;
        return Ok(status::render(
            &p,
            &n,
            &l,
            policy.as_deref(),
            Timestamp::now(),
        ));
    }
    // Three watches feed three caches; every change redraws (at most every 250 ms).
    let (policies, pw) = reflector::store::<UpdatePolicy>();
    let (nodes, nw) = reflector::store::<Node>();
    let (leases, lw) = reflector::store::<Lease>();
    let p = watcher(
        Api::<UpdatePolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(pw)
    .map(|_| ());
    let n = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(nw)
        .map(|_| ());
    let l = watcher(
        Api::<Lease>::namespaced(client.clone(), &namespace),
        watcher::Config::default().labels("app.kubernetes.io/managed-by=baton"),
    )
    .default_backoff()
    .reflect(lw)
    .map(|_| ());
    let mut events = futures::stream::select(futures::stream::select(p, n), l).boxed();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            e = events.next() => if e.is_none() { return Ok(String::new()) },
            _ = ticker.tick() => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let text = status::render(
            &owned(policies.state()),
            &owned(nodes.state()),
            &owned(leases.state()),
            policy.as_deref(),
            Timestamp::now(),
        );
        if terminal {
            print!("\x1b[H\x1b[2J");
        }
        println!(
            "{}  (kubectl baton status -w; Ctrl-C to stop)\n{text}",
            Timestamp::now().strftime("%H:%M:%S")
        );
    }
}

fn owned<T: Clone>(items: Vec<std::sync::Arc<T>>) -> Vec<T> {
    items.into_iter().map(|o| (*o).clone()).collect()
}

async fn run_pause(target: Target, paused: bool) -> Result<String, Error> {
    let client = Client::try_default().await?;
    let word = if paused { "paused" } else { "resumed" };
    match (target.policy, target.nodes.is_empty()) {
        (Some(policy), true) => {
            steer::set_policy_paused(client, &policy, paused).await?;
            Ok(format!("updatepolicy/{policy} {word}\n"))
        }
        (None, false) => {
            let mut out = String::new();
            for node in &target.nodes {
                steer::set_node_paused(client.clone(), node, paused).await?;
                out.push_str(&format!("node/{node} {word}\n"));
            }
            Ok(out)
        }
        _ => Err(Error::Usage(
            "name a policy, or nodes with --node (not both)".into(),
        )),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => run_plan(args).await,
        Command::Status {
            policy,
            watch,
            namespace,
        } => run_status(policy, watch, namespace).await,
        Command::Pause(t) => run_pause(t, true).await,
        Command::Resume(t) => run_pause(t, false).await,
        Command::Retry {
            policy,
            nodes,
            namespace,
        } => match (&policy, nodes.is_empty()) {
            (Some(_), true) | (None, false) => {
                async {
                    let client = Client::try_default().await?;
                    let done = steer::retry(client, &namespace, policy.as_deref(), &nodes).await?;
                    Ok(if done.is_empty() {
                        "no failed node to retry\n".to_string()
                    } else {
                        done.iter().map(|n| format!("node/{n} retried\n")).collect()
                    })
                }
                .await
            }
            _ => Err(Error::Usage(
                "name a policy, or nodes with --node (not both)".into(),
            )),
        },
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kubectl-baton: {e}");
            ExitCode::FAILURE
        }
    }
}
