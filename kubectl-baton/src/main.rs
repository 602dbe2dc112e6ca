//! `kubectl-baton` entry point: parses the command line, runs one command, prints one
//! line on failure and exits with a documented code (see [`kubectl_baton::error`]).

use std::{collections::BTreeMap, process::ExitCode};

use clap::{Parser, Subcommand};
use jiff::{SignedDuration, Timestamp, tz::TimeZone};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kube::{Api, ResourceExt, api::ListParams};

use crds::UpdatePolicy;
use kubectl_baton::{
    Error,
    cluster::{Cluster, ClusterArgs},
    live::{self, Screen},
    output::{self, Format},
    plan::{self, PlanOptions},
    status, steer, why,
};

/// Exit codes, shown under `--help`.
const EXIT_CODES: &str = "Exit codes: 0 done; 1 the API server refused or failed the request; \
2 a wrong flag or value; 3 the named policy or node does not exist; 4 no cluster (no \
usable kubeconfig, the API server is unreachable or silent, or it refused the \
credentials). `status -w` exits 0 when its output pipe closes.";

/// Plan, watch and steer baton rollouts.
#[derive(Debug, Parser)]
#[command(name = "kubectl baton", bin_name = "kubectl baton", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Simulate a rollout of a policy and print its timeline.
    Plan(PlanArgs),
    /// The rollout now: per policy a progress bar, per node its combined state
    /// (operator and agent), version, lease and cordon. `-w` keeps it live.
    Status {
        /// Only this policy.
        policy: Option<String>,
        /// Keep watching; print on every change.
        #[arg(short = 'w', long)]
        watch: bool,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Why a node is (or is not) updating: its policy, the operator's decision, every
    /// gate in order with what it saw, what would let it go and the predicted start.
    Why {
        /// The node.
        node: String,
    },
    /// Pause a policy (nothing new starts; nodes in flight finish) or, with --node, a node.
    Pause(Target),
    /// Resume a paused policy or node.
    Resume(Target),
    /// After fixing the cause: clear failed nodes (every failed node of a policy, or
    /// the --node ones) so that a halted pool resumes. See docs/operations.md.
    Retry(Target),
    /// Make a policy's release urgent: if it is not done on every node by the
    /// deadline, windows (and, with --override-freezes, freezes) stop gating it. The
    /// budget, PDBs, blocking pods, alert gates and halts still hold.
    Urgent {
        /// The policy.
        policy: String,
        /// The deadline: RFC 3339 (2026-12-05T00:00:00Z) or a duration from now (6h).
        #[arg(long, value_parser = parse_deadline, required_unless_present = "clear")]
        by: Option<Timestamp>,
        /// Past the deadline, freezes stop gating too.
        #[arg(long)]
        override_freezes: bool,
        /// Remove the urgency instead.
        #[arg(long, conflicts_with_all = ["by", "override_freezes"])]
        clear: bool,
    },
}

/// A deadline: RFC 3339, or a duration from now.
fn parse_deadline(s: &str) -> Result<Timestamp, String> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    let d = crds::duration::parse(s).map_err(|_| {
        format!("{s:?} is neither an RFC 3339 time (2026-12-05T00:00:00Z) nor a duration (6h)")
    })?;
    let d = SignedDuration::try_from(d).map_err(|e| e.to_string())?;
    Timestamp::now().checked_add(d).map_err(|e| e.to_string())
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

impl Target {
    fn check(&self) -> Result<(), Error> {
        match (&self.policy, self.nodes.is_empty()) {
            (Some(_), true) | (None, false) => Ok(()),
            _ => Err(Error::Usage(
                "name a policy, or nodes with --node (not both)".into(),
            )),
        }
    }
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
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Format,
    /// Also draw the timeline as an SVG Gantt chart into this file.
    #[arg(long, value_name = "FILE")]
    svg: Option<String>,
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

/// The connected cluster, once; commands that need none never connect.
struct Session {
    args: ClusterArgs,
    cluster: Option<Cluster>,
}

impl Session {
    async fn cluster(&mut self) -> Result<&Cluster, Error> {
        if self.cluster.is_none() {
            self.cluster = Some(Cluster::connect(&self.args).await?);
        }
        self.cluster
            .as_ref()
            .ok_or_else(|| Error::Other("no cluster".into()))
    }

    fn server(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| c.server.as_str())
    }
}

async fn run_plan(session: &mut Session, args: PlanArgs) -> Result<String, Error> {
    let time_zone = TimeZone::get(&args.time_zone).map_err(|_| {
        Error::Usage(format!(
            "--time-zone {:?} is not an IANA time zone",
            args.time_zone
        ))
    })?;
    let policy: UpdatePolicy = if args.file {
        read_yaml(&args.policy, "an UpdatePolicy")?
    } else {
        let c = session.cluster().await?;
        c.bounded(async {
            Api::<UpdatePolicy>::all(c.client.clone())
                .get_opt(&args.policy)
                .await?
                .ok_or(Error::NotFound {
                    kind: "updatepolicy",
                    name: args.policy.clone(),
                })
        })
        .await?
    };
    let nodes: Vec<Node> = match &args.nodes {
        Some(path) => read_yaml::<NodeItems>(path, "a NodeList")?.items,
        None => {
            let c = session.cluster().await?;
            c.bounded(async {
                Ok(Api::<Node>::all(c.client.clone())
                    .list(&ListParams::default())
                    .await?
                    .items)
            })
            .await?
        }
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
    let report = match (&policy.spec.promotion, args.file) {
        (Some(_), false) => {
            let c = session.cluster().await?;
            let policies = c
                .bounded(async {
                    Ok(Api::<UpdatePolicy>::all(c.client.clone())
                        .list(&ListParams::default())
                        .await?
                        .items)
                })
                .await?;
            plan::simulate_chain(&policies, &policy, &nodes, &opts)?
        }
        _ => plan::simulate(&policy, &nodes, &opts)?,
    };
    if let Some(path) = &args.svg {
        let rules = rollout::Policy::from_spec(&report.policy, &policy.spec).map_err(|errors| {
            Error::InvalidPolicy {
                name: report.policy.clone(),
                errors: errors.iter().map(ToString::to_string).collect(),
            }
        })?;
        let until = opts.start.checked_add(opts.horizon).unwrap_or(opts.start);
        let open = rules.windows.open_spans(opts.start, until);
        let picture = kubectl_baton::gantt::svg(&report, &open, &opts.time_zone);
        std::fs::write(path, picture).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(match args.output.encode(&report)? {
        Some(text) => text,
        None => plan::text(&report, &opts),
    })
}

async fn snapshot(c: &Cluster) -> Result<(Vec<UpdatePolicy>, Vec<Node>, Vec<Lease>), Error> {
    c.bounded(async {
        let policies = Api::<UpdatePolicy>::all(c.client.clone())
            .list(&ListParams::default())
            .await?
            .items;
        let nodes = Api::<Node>::all(c.client.clone())
            .list(&ListParams::default())
            .await?
            .items;
        let leases = Api::<Lease>::namespaced(c.client.clone(), &c.namespace)
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=baton"))
            .await?
            .items;
        Ok((policies, nodes, leases))
    })
    .await
}

/// The running pods that block a reboot (`health.blockingPodSelectors` of every valid
/// policy), by node: the same list the operator makes, so that `status` and `why`
/// name the pod. One list per selector; none when no policy has selectors.
async fn blocking_pods(
    c: &Cluster,
    policies: &[UpdatePolicy],
) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for policy in policies {
        let Ok(rules) = rollout::Policy::from_spec(&policy.name_any(), &policy.spec) else {
            continue;
        };
        for selector in &rules.blocking_pod_selectors {
            let params = ListParams::default()
                .labels(&selector.to_query())
                .fields("status.phase=Running");
            for pod in Api::<Pod>::all(c.client.clone()).list(&params).await?.items {
                if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
                    out.entry(node).or_insert_with(|| {
                        format!(
                            "pod {}/{}",
                            pod.namespace().unwrap_or_default(),
                            pod.name_any()
                        )
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The terminal's width: `$COLUMNS`, else the terminal's, else none (no wrapping).
fn width() -> Option<usize> {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .or_else(|| terminal_size::terminal_size().map(|(w, _)| usize::from(w.0)))
}

async fn run_status(
    session: &mut Session,
    policy: Option<String>,
    watch: bool,
    format: Format,
) -> Result<String, Error> {
    let c = session.cluster().await?;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    if watch {
        let mut screen = Screen::new(&c.server, terminal, width().filter(|_| terminal), format);
        screen.only = policy;
        live::watch(c, screen).await?;
        return Ok(String::new());
    }
    let (p, n, l) = snapshot(c).await?;
    let blocking = c.bounded(blocking_pods(c, &p)).await?;
    let report = status::report(&p, &n, &l, &blocking, policy.as_deref(), Timestamp::now());
    if let (Some(name), true) = (&policy, report.policies.is_empty()) {
        return Err(Error::NotFound {
            kind: "updatepolicy",
            name: name.clone(),
        });
    }
    Ok(match format.encode(&report)? {
        Some(text) => text,
        None => status::table(&report, width().filter(|_| terminal)),
    })
}

async fn run_why(session: &mut Session, node: String) -> Result<String, Error> {
    let c = session.cluster().await?;
    let (p, n, l) = snapshot(c).await?;
    let blocking = c.bounded(blocking_pods(c, &p)).await?;
    let now = Timestamp::now();
    // The start `plan` predicts, from the nodes that still need the update.
    let predicted = n
        .iter()
        .find(|x| x.name_any() == node)
        .and_then(|x| why::policies_of(x, &p).first().copied().cloned())
        .and_then(|policy| {
            let pending: Vec<Node> = n
                .iter()
                .filter(|x| {
                    crds::node::NodeMarks::read(x).agent.state != Some(crds::AgentState::Done)
                })
                .cloned()
                .collect();
            let opts = PlanOptions {
                start: now,
                horizon: SignedDuration::from_hours(24 * 30),
                reboot_time: SignedDuration::from_mins(10),
                node_reboot_times: BTreeMap::new(),
                time_zone: TimeZone::UTC,
                operator_node: None,
            };
            plan::simulate(&policy, &pending, &opts).ok()
        })
        .and_then(|report| report.rows.into_iter().find(|r| r.node == node)?.start);
    let seen = why::Observed {
        policies: &p,
        nodes: &n,
        leases: &l,
        blocking: &blocking,
        now,
    };
    why::render(&node, &seen, predicted)
}

async fn run_pause(session: &mut Session, target: Target, paused: bool) -> Result<String, Error> {
    target.check()?;
    let c = session.cluster().await?;
    let word = if paused { "paused" } else { "resumed" };
    let mut out = String::new();
    c.bounded(async {
        if let Some(policy) = &target.policy {
            steer::set_policy_paused(c.client.clone(), policy, paused).await?;
            out.push_str(&format!("updatepolicy/{policy} {word}"));
        }
        for node in &target.nodes {
            steer::set_node_paused(c.client.clone(), node, paused).await?;
            out.push_str(&format!("node/{node} {word}\n"));
        }
        Ok(())
    })
    .await?;
    Ok(format!("{}  {}\n", out.trim_end(), c.acted_on()))
}

async fn run_urgent(
    session: &mut Session,
    policy: &str,
    deadline: Option<Timestamp>,
    override_freezes: bool,
) -> Result<String, Error> {
    let c = session.cluster().await?;
    c.bounded(steer::set_policy_urgency(
        c.client.clone(),
        policy,
        deadline,
        override_freezes,
    ))
    .await?;
    let what = match deadline {
        Some(d) => format!(
            "urgent by {d}{}",
            if override_freezes {
                ", freezes included"
            } else {
                ""
            }
        ),
        None => "no longer urgent".to_string(),
    };
    Ok(format!("updatepolicy/{policy} {what}  {}\n", c.acted_on()))
}

async fn run_retry(session: &mut Session, target: Target) -> Result<String, Error> {
    target.check()?;
    let c = session.cluster().await?;
    let done = c
        .bounded(steer::retry(
            c.client.clone(),
            &c.namespace,
            target.policy.as_deref(),
            &target.nodes,
        ))
        .await?;
    Ok(if done.is_empty() {
        format!("no failed node to retry  {}\n", c.acted_on())
    } else {
        let lines: Vec<String> = done.iter().map(|n| format!("node/{n} retried")).collect();
        format!("{}  {}\n", lines.join("\n"), c.acted_on())
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut session = Session {
        args: cli.cluster,
        cluster: None,
    };
    let result = match cli.command {
        Command::Plan(args) => run_plan(&mut session, args).await,
        Command::Status {
            policy,
            watch,
            output,
        } => run_status(&mut session, policy, watch, output).await,
        Command::Why { node } => run_why(&mut session, node).await,
        Command::Pause(t) => run_pause(&mut session, t, true).await,
        Command::Resume(t) => run_pause(&mut session, t, false).await,
        Command::Retry(t) => run_retry(&mut session, t).await,
        Command::Urgent {
            policy,
            by,
            override_freezes,
            clear,
        } => {
            let deadline = by.filter(|_| !clear);
            run_urgent(&mut session, &policy, deadline, override_freezes).await
        }
    };
    match result.and_then(|out| output::print(&out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            if code != kubectl_baton::error::EXIT_OK {
                eprintln!("kubectl baton: {}", e.line(session.server()));
            }
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn kubectl_flags_are_accepted_before_and_after_the_command() {
        let cli = Cli::try_parse_from([
            "kubectl-baton",
            "--context",
            "prod",
            "pause",
            "night",
            "--kubeconfig",
            "/tmp/k",
            "-n",
            "ops",
        ])
        .unwrap();
        assert_eq!(cli.cluster.context.as_deref(), Some("prod"));
        assert_eq!(cli.cluster.kubeconfig.as_deref(), Some("/tmp/k"));
        assert_eq!(cli.cluster.namespace, "ops");
        let cli = Cli::try_parse_from(["kubectl-baton", "status", "-o", "yaml", "-w"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Status {
                watch: true,
                output: Format::Yaml,
                ..
            }
        ));
        assert_eq!(cli.cluster.namespace, "baton-system");
        let cli = Cli::try_parse_from(["kubectl-baton", "plan", "p", "-o", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Plan(PlanArgs {
                output: Format::Json,
                ..
            })
        ));
        let bad = Cli::try_parse_from(["kubectl-baton", "status", "-o", "xml"]).unwrap_err();
        assert_eq!(bad.exit_code(), 2);
        let bad = Cli::try_parse_from(["kubectl-baton", "--request-timeout", "0s", "status"])
            .unwrap_err();
        assert!(bad.to_string().contains("every wait has a bound"), "{bad}");
    }

    #[test]
    fn help_names_the_command_users_type_and_the_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(
            help.contains("Usage: kubectl baton [OPTIONS] <COMMAND>"),
            "{help}"
        );
        assert!(!help.contains("kubectl-baton"), "{help}");
        assert!(help.contains("Exit codes: 0 done"), "{help}");
        Cli::command().debug_assert();
    }
}
