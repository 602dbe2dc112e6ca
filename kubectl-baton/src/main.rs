//! `kubectl-baton` entry point.

use std::{collections::BTreeMap, process::ExitCode};

use clap::{Parser, Subcommand};
use jiff::{SignedDuration, Timestamp, tz::TimeZone};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client, api::ListParams};

use crds::UpdatePolicy;
use kubectl_baton::{
    Error,
    plan::{self, PlanOptions},
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => run_plan(args).await,
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
