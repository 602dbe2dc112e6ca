//! `cargo run -p e2e -- agent-footprint`: what idle agents cost, measured against a
//! baseline in the same run. Each of N kwok nodes gets a release-built `baton-agent`
//! (sim backend) and, as the baseline, a `kubectl get node <name> --watch`: the
//! cheapest client that follows one Node. Both run under their own ServiceAccount, so
//! the API server's audit log tells their requests apart. After they settle, the
//! window's CPU time, resident memory and requests are reported per process.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, api::ListParams};

use harness::{
    TestCluster, audit,
    binaries::Binaries,
    error::{Error, Result, io},
    fleet::{Fleet, FleetOptions},
    process::{Supervised, cpu_ns, proc_status_kib},
};

/// Read access to Nodes, and patch for the agent's own reports.
fn node_rules() -> serde_json::Value {
    serde_json::json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"]}])
}

/// One measured process kind.
#[derive(Debug, Default, Clone)]
pub struct Measured {
    /// Processes measured.
    pub processes: usize,
    /// Mean resident memory at the end, KiB.
    pub rss_kib: f64,
    /// Mean peak resident memory, KiB.
    pub peak_kib: f64,
    /// Mean CPU time per hour, milliseconds.
    pub cpu_ms_per_hour: f64,
    /// Requests per process per hour, by verb.
    pub requests_per_hour: BTreeMap<String, f64>,
}

/// What the operator did in a window, from its own metrics, per hour.
#[derive(Debug, Default, Clone)]
pub struct Activity {
    /// Policy reconciles per hour.
    pub reconciles: f64,
    /// Mean reconcile time, milliseconds.
    pub reconcile_ms: f64,
    /// Node watch events that triggered a reconcile, per hour.
    pub events_admitted: f64,
    /// Node watch events ignored (nothing baton reads changed), per hour.
    pub events_ignored: f64,
}

/// The operator's metrics at `addr`, by series (name and labels as exposed).
async fn scrape(addr: std::net::SocketAddr) -> Result<BTreeMap<String, f64>> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| Error::Other(format!("scraping the operator: {e}")))?
        .text()
        .await
        .map_err(|e| Error::Other(format!("scraping the operator: {e}")))?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect())
}

/// Builds `package`'s binary `bin` in release mode and returns its path.
pub fn release_binary(package: &str, bin: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            package,
            "--bin",
            bin,
        ])
        .status()
        .map_err(io("running cargo build"))?;
    if !status.success() {
        return Err(Error::Other(format!("building {bin} failed")));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    Ok(target.join("release").join(bin))
}

/// Builds `baton-agent` in release mode and returns its path.
pub fn release_agent() -> Result<PathBuf> {
    release_binary("agent", "baton-agent")
}

/// What the agent may do: the chart's own rules for it (its ClusterRole on Nodes and
/// its Role on the reboot Leases), rendered by helm.
pub fn agent_rules() -> Result<serde_json::Value> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/baton");
    harness::identity::chart_rules(&chart, "baton-agent", &[])
}

/// What the operator may do: the chart's own rules for it (`harness::identity::chart_rules`),
/// with Force drains allowed (the benchmarks and tests may use `onTimeout: Force`).
pub fn operator_rules() -> Result<serde_json::Value> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/baton");
    harness::identity::chart_rules(&chart, "baton-operator", &["operator.allowForceDrain=true"])
}

/// The operator's footprint with `nodes` kwok nodes, idle (a policy over every node,
/// leader election on or off,
/// no agent asking for a reboot), over `window`: (operator, kube-scheduler baseline,
/// what the operator did).
pub async fn operator(
    nodes: usize,
    window: Duration,
    leader_elect: bool,
) -> Result<(Measured, Measured, Activity)> {
    let operator_binary =
        tokio::task::spawn_blocking(|| release_binary("operator", "baton-operator"))
            .await
            .map_err(|e| Error::Other(e.to_string()))??;
    let mut cluster = TestCluster::start().await?;
    cluster.apply_crds().await?;
    let started = std::time::Instant::now();
    cluster.add_nodes(nodes).await?;
    eprintln!(
        "[footprint] {nodes} kwok nodes Ready in {:.0?}",
        started.elapsed()
    );
    cluster.create_namespace("baton-system").await?;
    let kubeconfig = harness::identity::kubeconfig_for(
        &cluster,
        "baton-system",
        "baton-operator",
        operator_rules()?,
    )
    .await?;
    let spec = serde_json::from_value(serde_json::json!({"maxUnavailable": "10%"}))
        .map_err(|e| Error::Other(e.to_string()))?;
    let policy = crds::UpdatePolicy::new("all", spec);
    let policies: Api<crds::UpdatePolicy> = Api::all(cluster.client());
    policies
        .create(&kube::api::PostParams::default(), &policy)
        .await?;
    let log = cluster.kubeconfig().with_file_name("operator.log");
    let metrics_addr = std::net::SocketAddr::from(([127, 0, 0, 1], harness::port::free_port()?));
    let metrics_arg = metrics_addr.to_string();
    let elect_arg = format!("--leader-elect={leader_elect}");
    let proc = harness::process::spawn_with_kubeconfig(
        "baton-operator",
        &operator_binary,
        &kubeconfig,
        &[
            "--namespace",
            "baton-system",
            "--identity",
            "bench",
            "--metrics-addr",
            &metrics_arg,
            &elect_arg,
        ],
        log,
    )?;
    let expected = u32::try_from(nodes).unwrap_or(u32::MAX);
    cluster
        .wait_for("the operator to count every node", || async {
            policies
                .get("all")
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| s.nodes == expected)
        })
        .await?;
    // Idle means nothing baton reads is changing: a new cluster keeps relabelling and
    // re-annotating its Nodes for a while (kwok's labels; the TTL controller's
    // annotation, rewritten on every Node as the cluster grows), so the window starts
    // once the operator has seen no such change for 30 s.
    let settling = std::time::Instant::now();
    let admitted = "baton_node_events_total{outcome=\"admitted\"}";
    let mut last = (f64::NAN, std::time::Instant::now());
    while last.1.elapsed() < Duration::from_secs(30) {
        if settling.elapsed() > Duration::from_secs(900) {
            return Err(Error::Other(
                "the cluster did not settle in 15 minutes".into(),
            ));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = scrape(metrics_addr)
            .await?
            .get(admitted)
            .copied()
            .unwrap_or(0.0);
        if now != last.0 {
            last = (now, std::time::Instant::now());
        }
    }
    eprintln!(
        "[footprint] Nodes settled (no change baton reads for 30 s) after {:.0?}",
        settling.elapsed()
    );
    let pid = proc
        .component_pid()
        .ok_or_else(|| Error::Other("the operator is not running".into()))?;
    let scheduler = cluster
        .components()
        .iter()
        .find(|p| p.name == "kube-scheduler")
        .and_then(Supervised::component_pid)
        .ok_or_else(|| Error::Other("no kube-scheduler".into()))?;
    let before = (cpu_ns(pid).unwrap_or(0), cpu_ns(scheduler).unwrap_or(0));
    let from = jiff::Timestamp::now();
    let metrics_before = scrape(metrics_addr).await?;
    tokio::time::sleep(window).await;
    let metrics_after = scrape(metrics_addr).await?;
    let to = jiff::Timestamp::now();
    let after = (cpu_ns(pid).unwrap_or(0), cpu_ns(scheduler).unwrap_or(0));
    let hours = window.as_secs_f64() / 3600.0;
    let delta = |series: &str| {
        metrics_after.get(series).copied().unwrap_or(0.0)
            - metrics_before.get(series).copied().unwrap_or(0.0)
    };
    let reconciles = delta("baton_reconcile_duration_seconds_count");
    let activity = Activity {
        reconciles: reconciles / hours,
        reconcile_ms: delta("baton_reconcile_duration_seconds_sum") * 1000.0 / reconciles.max(1.0),
        events_admitted: delta("baton_node_events_total{outcome=\"admitted\"}") / hours,
        events_ignored: delta("baton_node_events_total{outcome=\"ignored\"}") / hours,
    };
    let mut by_verb = BTreeMap::new();
    let user = audit::service_account("baton-system", "baton-operator");
    for r in audit::read(&cluster.audit_log())?.iter().filter(|r| {
        r.user.username == user
            && r.request_received_timestamp >= from
            && r.request_received_timestamp <= to
    }) {
        *by_verb.entry(r.verb.clone()).or_insert(0.0) += 1.0 / nodes as f64 / hours;
    }
    let measured = |pid: u32, cpu: u64, requests| Measured {
        processes: 1,
        rss_kib: proc_status_kib(pid, "VmRSS:").unwrap_or(0) as f64,
        peak_kib: proc_status_kib(pid, "VmHWM:").unwrap_or(0) as f64,
        cpu_ms_per_hour: cpu as f64 / 1e6 / hours,
        requests_per_hour: requests,
    };
    Ok((
        measured(pid, after.0.saturating_sub(before.0), by_verb),
        measured(scheduler, after.1.saturating_sub(before.1), BTreeMap::new()),
        activity,
    ))
}

/// Measures `nodes` idle agents (`binary`, or a fresh release build) and their
/// baselines over `window`.
pub async fn agents(
    nodes: usize,
    window: Duration,
    binary: Option<PathBuf>,
) -> Result<(Measured, Measured)> {
    let agent_binary = match binary {
        Some(b) => b,
        None => tokio::task::spawn_blocking(release_agent)
            .await
            .map_err(|e| Error::Other(e.to_string()))??,
    };
    let binaries = tokio::task::spawn_blocking(Binaries::ensure)
        .await
        .map_err(|e| Error::Other(e.to_string()))??;
    let cluster = TestCluster::start().await?;
    let names = cluster.add_nodes(nodes).await?;
    cluster.create_namespace("baton-system").await?;
    let agent_kc =
        harness::identity::kubeconfig_for(&cluster, "baton-system", "baton-agent", agent_rules()?)
            .await?;
    let base_kc =
        harness::identity::kubeconfig_for(&cluster, "baton-system", "baseline-watch", node_rules())
            .await?;
    let fleet = Fleet::start(
        &names,
        &FleetOptions::new(
            agent_binary,
            agent_kc,
            Duration::from_secs(1),
            Vec::<String>::new(),
        ),
    )?;
    let dir = cluster.kubeconfig().with_file_name("baseline");
    std::fs::create_dir_all(&dir).map_err(io("creating the baseline's directory"))?;
    let mut baseline = Vec::new();
    for name in &names {
        baseline.push(Supervised::spawn(
            "kubectl-watch",
            &binaries.path("kubectl"),
            &[
                format!("--kubeconfig={}", base_kc.display()),
                "get".into(),
                "node".into(),
                name.clone(),
                "--watch".into(),
                "-o".into(),
                "name".into(),
            ],
            dir.join(format!("{name}.log")),
        )?);
    }
    let api: Api<Node> = Api::all(cluster.client());
    cluster
        .wait_for("every agent to report Idle", || async {
            api.list(&ListParams::default())
                .await
                .map(|l| {
                    l.items.iter().all(|n| {
                        crds::node::NodeMarks::read(n).agent.state
                            == Some(crds::protocol::AgentState::Idle)
                    })
                })
                .unwrap_or(false)
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(10)).await;

    let agent_pids: Vec<u32> = names.iter().filter_map(|n| fleet.pid(n)).collect();
    let base_pids: Vec<u32> = baseline
        .iter()
        .filter_map(Supervised::component_pid)
        .collect();
    let before: Vec<Option<u64>> = agent_pids
        .iter()
        .chain(&base_pids)
        .map(|p| cpu_ns(*p))
        .collect();
    let from = jiff::Timestamp::now();
    eprintln!(
        "[footprint] {} agents and {} baseline watchers idle; measuring for {}s",
        agent_pids.len(),
        base_pids.len(),
        window.as_secs()
    );
    tokio::time::sleep(window).await;
    let to = jiff::Timestamp::now();
    let after: Vec<Option<u64>> = agent_pids
        .iter()
        .chain(&base_pids)
        .map(|p| cpu_ns(*p))
        .collect();
    let ticks: Vec<u64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.unwrap_or(0).saturating_sub(b.unwrap_or(0)))
        .collect();
    let rss: Vec<(u32, Option<u64>, Option<u64>)> = agent_pids
        .iter()
        .chain(&base_pids)
        .map(|p| {
            (
                *p,
                proc_status_kib(*p, "VmRSS:"),
                proc_status_kib(*p, "VmHWM:"),
            )
        })
        .collect();
    // Stopping the processes ends their watches, which the audit log records only when
    // they end: every watch opened in the window is then counted.
    drop(fleet);
    drop(baseline);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = audit::read(&cluster.audit_log())?;
    let memory = |pid: &u32, peak: bool| {
        rss.iter()
            .find(|(p, _, _)| p == pid)
            .and_then(|(_, now, max)| if peak { *max } else { *now })
    };
    let hours = window.as_secs_f64() / 3600.0;
    let measure = |pids: &[u32], ticks: &[u64], user: &str| {
        let n = pids.len().max(1) as f64;
        let mut by_verb = BTreeMap::new();
        for r in requests.iter().filter(|r| {
            r.user.username == user
                && r.request_received_timestamp >= from
                && r.request_received_timestamp <= to
        }) {
            *by_verb.entry(r.verb.clone()).or_insert(0.0) += 1.0 / n / hours;
        }
        Measured {
            processes: pids.len(),
            rss_kib: pids.iter().filter_map(|p| memory(p, false)).sum::<u64>() as f64 / n,
            peak_kib: pids.iter().filter_map(|p| memory(p, true)).sum::<u64>() as f64 / n,
            cpu_ms_per_hour: ticks.iter().sum::<u64>() as f64 / 1e6 / n / hours,
            requests_per_hour: by_verb,
        }
    };
    let agent = measure(
        &agent_pids,
        &ticks[..agent_pids.len()],
        &audit::service_account("baton-system", "baton-agent"),
    );
    let base = measure(
        &base_pids,
        &ticks[agent_pids.len()..],
        &audit::service_account("baton-system", "baseline-watch"),
    );
    Ok((agent, base))
}

/// Prints the comparison as a Markdown table.
pub fn print(agent: &Measured, base: &Measured, window: Duration) {
    let verbs: Vec<&String> = agent
        .requests_per_hour
        .keys()
        .chain(base.requests_per_hour.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "n/a".into()
        }
    };
    println!(
        "Idle over {}s, {} agents, {} baseline watchers (means per process):\n",
        window.as_secs(),
        agent.processes,
        base.processes
    );
    println!("| measure | baton-agent | kubectl get node --watch | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| RSS (MiB) | {:.1} | {:.1} | {} |",
        agent.rss_kib / 1024.0,
        base.rss_kib / 1024.0,
        ratio(agent.rss_kib, base.rss_kib)
    );
    println!(
        "| peak RSS (MiB) | {:.1} | {:.1} | {} |",
        agent.peak_kib / 1024.0,
        base.peak_kib / 1024.0,
        ratio(agent.peak_kib, base.peak_kib)
    );
    println!(
        "| CPU (ms per hour) | {:.1} | {:.1} | {} |",
        agent.cpu_ms_per_hour,
        base.cpu_ms_per_hour,
        ratio(agent.cpu_ms_per_hour, base.cpu_ms_per_hour)
    );
    for verb in verbs {
        let a = agent.requests_per_hour.get(verb).copied().unwrap_or(0.0);
        let b = base.requests_per_hour.get(verb).copied().unwrap_or(0.0);
        println!(
            "| `{verb}` requests per hour | {a:.1} | {b:.1} | {} |",
            ratio(a, b)
        );
    }
    let writes: f64 = agent
        .requests_per_hour
        .iter()
        .filter(|(v, _)| v.as_str() != "watch")
        .map(|(_, n)| n)
        .sum::<f64>()
        .abs();
    println!("\nbaton-agent requests other than watches while idle: {writes:.1} per hour");
}
