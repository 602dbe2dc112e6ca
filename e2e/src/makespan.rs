//! `cargo run -p e2e -- rollout-bench`: how fast a rollout goes and what it costs the
//! API server. N kwok nodes, each with a release-built `baton-agent` (sim backend,
//! machine down for a fixed T), the release-built operator under its own
//! ServiceAccount, one rollout per budget k. From the reboot Leases' watch events:
//! the makespan (first grant to last release) against the ideal ceil(N/k)·T, and the
//! coordination gap (a release to the next grant). From the audit log: the operator's
//! and the agents' requests per node.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};

use crate::footprint::{agent_rules, operator_rules, release_binary};
use harness::{
    TestCluster, audit,
    error::{Error, Result},
    fleet::{Fleet, FleetOptions},
    identity,
};

/// One rollout's figures.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// The budget as the policy says it (`5`, `10%`).
    pub budget: String,
    /// The budget in nodes.
    pub k: usize,
    /// First grant to last release.
    pub makespan: SignedDuration,
    /// ceil(N/k)·T.
    pub ideal: SignedDuration,
    /// Release-to-next-grant gaps, sorted.
    pub gaps: Vec<SignedDuration>,
    /// The same gaps for nodes polling every `poll` (kured's model), modelled from the
    /// measured release times.
    pub polled_gaps: Vec<SignedDuration>,
    /// Operator requests per node, by verb, during the rollout.
    pub operator_requests: BTreeMap<String, f64>,
    /// Agent requests per node, by verb, during the rollout.
    pub agent_requests: BTreeMap<String, f64>,
    /// Each node's hold of its grant (grant to release), sorted.
    pub holds: Vec<SignedDuration>,
    /// First grant to the k-th: how long the budget took to fill at the start.
    pub ramp: SignedDuration,
    /// The operator's CPU time during the rollout (scheduler accounting).
    pub operator_cpu: Duration,
    /// The operator's peak RSS during the rollout, in KiB.
    pub operator_peak_kib: u64,
    /// Each hold split into its steps (from the audit log), one sorted list per step.
    pub steps: Steps,
}

/// A hold's steps, each measured on the API server's clock from the audit log.
#[derive(Debug, Clone, Default)]
pub struct Steps {
    /// The grant to the operator's first write to the node (its cordon).
    pub to_cordon: Vec<SignedDuration>,
    /// The cordon to the agent's last request before its reboot (drain, the agent
    /// seeing the grant, its fresh reads).
    pub to_reboot: Vec<SignedDuration>,
    /// The agent's silence across the reboot, less T (its exit, the new process's
    /// start up to its first request).
    pub restart: Vec<SignedDuration>,
    /// The new agent's first request to its last (its watch, verification, commit,
    /// report).
    pub boot: Vec<SignedDuration>,
    /// The agent's last report to the release (the operator seeing it, the uncordon,
    /// the Lease's deletion).
    pub to_release: Vec<SignedDuration>,
}

/// A request about a node, as the steps are told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum About {
    /// The operator creates its reboot Lease: the grant.
    Grant,
    /// The operator writes the Node (cordon, uncordon, marks).
    Write,
    /// The node's agent, any request.
    Agent,
    /// The operator deletes the Lease: the release.
    Release,
}

impl Steps {
    /// Splits each of a node's holds by the requests about it (`requests`, sorted).
    fn split(&mut self, requests: &[(Timestamp, About)], t: SignedDuration) {
        let mut rest = requests;
        while let Some(start) = rest.iter().position(|r| r.1 == About::Grant) {
            let Some(len) = rest[start..].iter().position(|r| r.1 == About::Release) else {
                return;
            };
            let hold = &rest[start..=start + len];
            rest = &rest[start + len + 1..];
            let (grant, release) = (hold[0].0, hold[hold.len() - 1].0);
            let agent: Vec<Timestamp> = hold
                .iter()
                .filter(|r| r.1 == About::Agent)
                .map(|r| r.0)
                .collect();
            let Some(cordon) = hold.iter().find(|r| r.1 == About::Write).map(|r| r.0) else {
                continue;
            };
            // The reboot is the agent's longest silence within the hold.
            let Some((down, up)) = agent
                .windows(2)
                .map(|w| (w[0], w[1]))
                .max_by_key(|(a, b)| b.duration_since(*a))
            else {
                continue;
            };
            let Some(last) = agent.last().copied() else {
                continue;
            };
            self.to_cordon.push(cordon.duration_since(grant));
            self.to_reboot.push(down.duration_since(cordon));
            self.restart.push(up.duration_since(down) - t);
            self.boot.push(last.duration_since(up));
            self.to_release.push(release.duration_since(last));
        }
    }

    fn sort(&mut self) {
        for step in self.all_mut() {
            step.sort();
        }
    }

    fn all_mut(&mut self) -> [&mut Vec<SignedDuration>; 5] {
        [
            &mut self.to_cordon,
            &mut self.to_reboot,
            &mut self.restart,
            &mut self.boot,
            &mut self.to_release,
        ]
    }

    /// The steps with their names, in order.
    pub fn named(&self) -> [(&'static str, &[SignedDuration]); 5] {
        [
            (
                "grant → the operator's first write to the node (cordon)",
                &self.to_cordon,
            ),
            (
                "cordon → the agent's last request before its reboot (drain, the agent sees the grant, its fresh reads)",
                &self.to_reboot,
            ),
            (
                "the agent's silence across the reboot − T (exit, the new process starts, its first request)",
                &self.restart,
            ),
            (
                "the new agent's first request → its last (watch, verification, commit, report)",
                &self.boot,
            ),
            (
                "the agent's last report → the release (the operator sees it, uncordons, deletes the Lease)",
                &self.to_release,
            ),
        ]
    }
}

fn percentile(sorted: &[SignedDuration], p: f64) -> SignedDuration {
    if sorted.is_empty() {
        return SignedDuration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Waits (at most ten minutes) until every one of `nodes` Nodes carries its agent's
/// report.
async fn every_agent_reported(nodes_api: &Api<Node>, nodes: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let reported = nodes_api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|n| crds::node::NodeMarks::read(n).agent.state.is_some())
            .count();
        if reported == nodes {
            eprintln!("[rollout-bench] all {nodes} agents reported");
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::Other(format!(
                "{reported} of {nodes} agents reported within ten minutes"
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The lease events seen: (time, holder, granted or released).
type Events = Arc<Mutex<Vec<(Timestamp, String, bool)>>>;

/// Runs one rollout per budget in `ks` (`5`, `10%`) on `nodes` nodes, machines down
/// for `reboot`.
pub async fn run(
    nodes: usize,
    ks: &[String],
    reboot: Duration,
    poll: Duration,
) -> Result<Vec<Rollout>> {
    let agent = tokio::task::spawn_blocking(|| release_binary("agent", "baton-agent"))
        .await
        .map_err(|e| Error::Other(e.to_string()))??;
    let operator = tokio::task::spawn_blocking(|| release_binary("operator", "baton-operator"))
        .await
        .map_err(|e| Error::Other(e.to_string()))??;
    let cluster = TestCluster::start().await?;
    cluster.apply_crds().await?;
    let names = cluster.add_nodes(nodes).await?;
    cluster.create_namespace("baton-system").await?;
    let operator_kc = identity::kubeconfig_for(
        &cluster,
        "baton-system",
        "baton-operator",
        operator_rules()?,
    )
    .await?;
    let agent_kc =
        identity::kubeconfig_for(&cluster, "baton-system", "baton-agent", agent_rules()?).await?;
    let _fleet = Fleet::start(
        &names,
        &FleetOptions::new(agent, agent_kc, reboot, ["--sim-stage-time", "1s"]),
    )?;
    let _operator = harness::process::spawn_with_kubeconfig(
        "baton-operator",
        &operator,
        &operator_kc,
        &[
            "--namespace",
            "baton-system",
            "--identity",
            "bench",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        cluster.kubeconfig().with_file_name("operator.log"),
    )?;
    let events: Events = Arc::new(Mutex::new(Vec::new()));
    let recorder = {
        let events = Arc::clone(&events);
        let api: Api<Lease> = Api::namespaced(cluster.client(), "baton-system");
        tokio::spawn(async move {
            let config = watcher::Config::default().labels("app.kubernetes.io/managed-by=baton");
            // A watch that fails is resumed (with backoff), not ended: the end of the
            // rollout is seen from these events. A re-list ends the holds it no longer
            // shows (their deletion was missed), as of when it ends.
            let mut stream = watcher(api, config).default_backoff().boxed();
            let mut held = std::collections::BTreeSet::new();
            let mut listed = std::collections::BTreeSet::new();
            while let Some(event) = stream.next().await {
                let now = Timestamp::now();
                let (lease, granted) = match event {
                    Ok(watcher::Event::Apply(l)) => (l, true),
                    Ok(watcher::Event::InitApply(l)) => {
                        listed.extend(l.spec.as_ref().and_then(|s| s.holder_identity.clone()));
                        (l, true)
                    }
                    Ok(watcher::Event::Delete(l)) => (l, false),
                    Ok(watcher::Event::Init) => {
                        listed.clear();
                        continue;
                    }
                    Ok(watcher::Event::InitDone) => {
                        let gone: Vec<String> = held.difference(&listed).cloned().collect();
                        let mut seen = events
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        for holder in gone {
                            held.remove(&holder);
                            seen.push((now, holder, false));
                        }
                        continue;
                    }
                    Err(_) => continue,
                };
                let Some(holder) = lease.spec.and_then(|s| s.holder_identity) else {
                    continue;
                };
                let changed = if granted {
                    held.insert(holder.clone())
                } else {
                    held.remove(&holder)
                };
                if changed {
                    events
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((now, holder, granted));
                }
            }
        })
    };
    let nodes_api: Api<Node> = Api::all(cluster.client());
    let policies: Api<crds::UpdatePolicy> = Api::all(cluster.client());
    // A real fleet's agents run long before a release comes: the rollout starts once
    // every agent has started and reported, not while 1,000 processes start at once.
    every_agent_reported(&nodes_api, nodes).await?;
    let mut out = Vec::new();
    for (round, budget) in ks.iter().enumerate() {
        let value = match budget.parse::<i32>() {
            Ok(n) => k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n),
            Err(_) => {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(budget.clone())
            }
        };
        let k = &crds::budget::Budget::parse(&value)
            .map_err(|e| Error::Other(format!("--k {budget}: {e}")))?
            .resolve(nodes);
        let version = format!("{}.0.0", round + 2);
        // One zone at a time (the default) leaves budget unused when a zone has fewer
        // nodes left than k; the benchmark measures coordination, so it is off.
        let spec = serde_json::json!({"maxUnavailable": value, "ordering": {"oneZoneAtATime": false}, "health": {"rebootTimeout": "10m"}, "release": {
            "version": version, "url": "https://images.invalid/os.img",
            "sha256": "d".repeat(64), "signature": format!("{}==", "A".repeat(86)),
        }});
        if round == 0 {
            let spec = serde_json::from_value(spec).map_err(|e| Error::Other(e.to_string()))?;
            let policy = crds::UpdatePolicy::new("bench", spec);
            policies.create(&PostParams::default(), &policy).await?;
        } else {
            policies
                .patch(
                    "bench",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"spec": spec})),
                )
                .await?;
        }
        eprintln!(
            "[rollout-bench] {nodes} nodes, maxUnavailable {k}, machines down {reboot:?}: rolling to {version}"
        );
        let from = Timestamp::now();
        // The operator's CPU from here, and its peak RSS from here (clear_refs 5 resets
        // VmHWM to the current RSS).
        let operator_pid = _operator
            .component_pid()
            .ok_or_else(|| Error::Other("the operator is not running".into()))?;
        let cpu_before = harness::process::cpu_ns(operator_pid).unwrap_or(0);
        let _ = std::fs::write(format!("/proc/{operator_pid}/clear_refs"), "5");
        let deadline = std::time::Instant::now() + Duration::from_secs(3600);
        loop {
            let held = events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .filter(|(t, _, _)| *t >= from)
                .fold(0i64, |acc, (_, _, g)| acc + if *g { 1 } else { -1 });
            // The Nodes are listed only while no Lease is held: parsing 1,000 Nodes in
            // this debug build every few seconds takes CPU from what it measures.
            if held == 0
                && nodes_api
                    .list(&ListParams::default())
                    .await?
                    .items
                    .iter()
                    .all(|n| {
                        let marks = crds::node::NodeMarks::read(n);
                        marks.agent.current_version.as_ref().map(|v| v.as_str())
                            == Some(version.as_str())
                            && marks.agent.state == Some(crds::protocol::AgentState::Done)
                    })
            {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Other(
                    "the rollout did not finish within an hour".into(),
                ));
            }
            // The makespan is taken from the Lease events, so how soon the end is seen
            // does not change it; listing 1,000 Nodes more often only loads the machine
            // being measured.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let to = Timestamp::now();
        let operator_cpu = Duration::from_nanos(
            harness::process::cpu_ns(operator_pid)
                .unwrap_or(0)
                .saturating_sub(cpu_before),
        );
        let operator_peak_kib =
            harness::process::proc_status_kib(operator_pid, "VmHWM:").unwrap_or(0);
        let seen: Vec<(Timestamp, String, bool)> = events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(t, _, _)| *t >= from)
            .cloned()
            .collect();
        let mut rollout = figures(&cluster, nodes, *k, reboot, poll, &seen, from, to)?;
        rollout.budget = budget.clone();
        rollout.operator_cpu = operator_cpu;
        rollout.operator_peak_kib = operator_peak_kib;
        out.push(rollout);
    }
    recorder.abort();
    // The operator's log outlives the cluster, to see what a slow step waited on.
    let log = cluster.kubeconfig().with_file_name("operator.log");
    let kept = std::env::temp_dir().join("baton-rollout-bench-operator.log");
    if std::fs::copy(&log, &kept).is_ok() {
        eprintln!("[rollout-bench] the operator's log: {}", kept.display());
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn figures(
    cluster: &TestCluster,
    nodes: usize,
    k: usize,
    reboot: Duration,
    poll: Duration,
    seen: &[(Timestamp, String, bool)],
    from: Timestamp,
    to: Timestamp,
) -> Result<Rollout> {
    let first = seen.iter().find(|e| e.2).map(|e| e.0).unwrap_or(from);
    let last = seen.iter().rev().find(|e| !e.2).map(|e| e.0).unwrap_or(to);
    let t = SignedDuration::try_from(reboot).unwrap_or(SignedDuration::ZERO);
    let ideal = t * i32::try_from(nodes.div_ceil(k)).unwrap_or(i32::MAX);
    // Each release is followed by the next grant (while nodes wait).
    let mut gaps = Vec::new();
    let mut polled = Vec::new();
    let poll_ns = i128::try_from(poll.as_nanos()).unwrap_or(i128::MAX).max(1);
    let mut phase: u64 = 0x2545_f491_4f6c_dd1d;
    for (i, e) in seen.iter().enumerate() {
        if e.2 {
            continue;
        }
        if let Some(next) = seen[i + 1..].iter().find(|n| n.2) {
            gaps.push(next.0.duration_since(e.0));
            // kured's model: each waiting node looks at the lock every `poll`, at its
            // own phase; the gap is the wait for the first look after the release.
            let waiting = seen[i + 1..].iter().filter(|n| n.2).count().max(1);
            let mut best = poll_ns;
            for _ in 0..waiting {
                phase ^= phase << 13;
                phase ^= phase >> 7;
                phase ^= phase << 17;
                best = best.min(i128::from(phase % poll_ns as u64));
            }
            polled.push(SignedDuration::from_nanos(
                i64::try_from(best).unwrap_or(i64::MAX),
            ));
        }
    }
    gaps.sort();
    polled.sort();
    // Each node's hold: its grant to its release. Minus T, the node's own protocol
    // (grant, cordon, drain, reboot request, boot, verification, uncordon, release).
    let mut granted_at = BTreeMap::new();
    let mut holds = Vec::new();
    for (t, holder, granted) in seen {
        if *granted {
            granted_at.insert(holder.clone(), *t);
        } else if let Some(at) = granted_at.remove(holder) {
            holds.push(t.duration_since(at));
        }
    }
    holds.sort();
    let ramp = seen
        .iter()
        .filter(|e| e.2)
        .nth(k.saturating_sub(1))
        .map_or(SignedDuration::ZERO, |e| e.0.duration_since(first));
    let hours_nodes = nodes as f64;
    let mut operator_requests = BTreeMap::new();
    let mut agent_requests = BTreeMap::new();
    let (op, ag) = (
        audit::service_account("baton-system", "baton-operator"),
        audit::service_account("baton-system", "baton-agent"),
    );
    // Requests about each node: the operator's Lease creations and deletions and its
    // writes to the Node, and every agent request about its Node or Lease.
    let mut about: BTreeMap<String, Vec<(Timestamp, About)>> = BTreeMap::new();
    for r in audit::read(&cluster.audit_log())?
        .iter()
        .filter(|r| r.request_received_timestamp >= from && r.request_received_timestamp <= to)
    {
        let by_operator = r.user.username == op;
        let map = if by_operator {
            &mut operator_requests
        } else if r.user.username == ag {
            &mut agent_requests
        } else {
            continue;
        };
        *map.entry(r.verb.clone()).or_insert(0.0) += 1.0 / hours_nodes;
        let lease = r
            .names("leases")
            .and_then(|l| l.strip_prefix(crds::grant::LEASE_PREFIX));
        let step = match (by_operator, r.verb.as_str(), r.names("nodes"), lease) {
            (true, "create", _, Some(node)) => Some((node, About::Grant)),
            (true, "delete", _, Some(node)) => Some((node, About::Release)),
            (true, "patch", Some(node), _) => Some((node, About::Write)),
            (false, _, Some(node), _) | (false, _, _, Some(node)) => Some((node, About::Agent)),
            _ => None,
        };
        if let Some((node, step)) = step {
            about
                .entry(node.to_string())
                .or_default()
                .push((r.request_received_timestamp, step));
        }
    }
    let mut steps = Steps::default();
    for requests in about.values_mut() {
        requests.sort();
        steps.split(requests, t);
    }
    steps.sort();
    Ok(Rollout {
        budget: k.to_string(),
        k,
        holds,
        ramp,
        operator_cpu: Duration::ZERO,
        operator_peak_kib: 0,
        steps,
        makespan: last.duration_since(first),
        ideal,
        gaps,
        polled_gaps: polled,
        operator_requests,
        agent_requests,
    })
}

/// Prints the figures as Markdown.
pub fn print(nodes: usize, reboot: Duration, poll: Duration, rollouts: &[Rollout]) {
    let secs = |d: SignedDuration| d.as_secs_f64();
    println!(
        "{nodes} nodes, machines down T = {:.0} s:\n",
        reboot.as_secs_f64()
    );
    println!(
        "| maxUnavailable (k) | makespan | ideal ceil(N/k)·T | ratio (target ≤ 1.05) | operator CPU | operator peak RSS |"
    );
    println!("|---|---|---|---|---|---|");
    for r in rollouts {
        println!(
            "| {} ({}) | {:.1} s | {:.1} s | {:.3} | {:.1} s | {:.1} MiB |",
            r.budget,
            r.k,
            secs(r.makespan),
            secs(r.ideal),
            secs(r.makespan) / secs(r.ideal).max(f64::MIN_POSITIVE),
            r.operator_cpu.as_secs_f64(),
            r.operator_peak_kib as f64 / 1024.0
        );
    }
    println!(
        "\nWhere the time goes: each node's hold (its grant to its release) against T, and how long the budget took to fill:\n"
    );
    println!(
        "| k | holds | hold p50 | hold p99 | mean hold − T (a node's own protocol) | slots busy (Σ holds / k·makespan) | budget filled after |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rollouts {
        let sum: f64 = r.holds.iter().map(|h| secs(*h)).sum();
        let mean = sum / r.holds.len().max(1) as f64;
        println!(
            "| {} | {} | {:.1} s | {:.1} s | {:.1} s | {:.3} | {:.1} s |",
            r.k,
            r.holds.len(),
            secs(percentile(&r.holds, 0.5)),
            secs(percentile(&r.holds, 0.99)),
            mean - reboot.as_secs_f64(),
            sum / (r.k as f64 * secs(r.makespan)).max(f64::MIN_POSITIVE),
            secs(r.ramp)
        );
    }
    println!(
        "\nEach hold step by step (the audit log's times; the mean of the steps is the mean hold − T):\n"
    );
    println!("| k | step | p50 | p99 | mean |");
    println!("|---|---|---|---|---|");
    for r in rollouts {
        for (name, step) in r.steps.named() {
            let mean = step.iter().map(|d| secs(*d)).sum::<f64>() / step.len().max(1) as f64;
            println!(
                "| {} | {name} | {:.2} s | {:.2} s | {mean:.2} s |",
                r.k,
                secs(percentile(step, 0.5)),
                secs(percentile(step, 0.99)),
            );
        }
    }
    println!("\nCoordination gap (a release to the next grant):\n");
    println!(
        "| k | gaps | baton p50 | baton p99 | baton max | kured model ({:.0} s poll) p50 | p99 | ratio of p99s |",
        poll.as_secs_f64()
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rollouts {
        let (p50, p99, max) = (
            percentile(&r.gaps, 0.5),
            percentile(&r.gaps, 0.99),
            r.gaps.last().copied().unwrap_or_default(),
        );
        let (b50, b99) = (
            percentile(&r.polled_gaps, 0.5),
            percentile(&r.polled_gaps, 0.99),
        );
        println!(
            "| {} | {} | {:.3} s | {:.3} s | {:.3} s | {:.1} s | {:.1} s | {:.4} |",
            r.k,
            r.gaps.len(),
            secs(p50),
            secs(p99),
            secs(max),
            secs(b50),
            secs(b99),
            secs(p99) / secs(b99).max(f64::MIN_POSITIVE)
        );
    }
    println!("\nAPI requests per node during each rollout (audit log):\n");
    for r in rollouts {
        let fmt = |m: &BTreeMap<String, f64>| {
            m.iter()
                .map(|(v, n)| format!("{v} {n:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let total = |m: &BTreeMap<String, f64>| m.values().sum::<f64>();
        println!(
            "- k = {}: operator {:.1} ({}); agents {:.1} ({})",
            r.k,
            total(&r.operator_requests),
            fmt(&r.operator_requests),
            total(&r.agent_requests),
            fmt(&r.agent_requests)
        );
    }
}
