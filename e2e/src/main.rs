//! `cargo run -p e2e -- <command>`: the local control plane from the command line.
//!
//! - `binaries`: build (once) and print the control-plane binaries.
//! - `up [--nodes N]`: start a cluster in the background; print its kubeconfig.
//! - `down`: stop it.
//! - `demo`: the local demo (or install instructions for a real cluster).
//! - `footprint --nodes N`: the control plane's memory with N kwok nodes.
//! - `agent-footprint`: idle agents' memory, CPU and API requests, against a baseline.
//! - `image-run`: run the images `.ci/image` built, with podman.
//! - `test [ARGS…]`: install the Debian packages some tests run (Prometheus,
//!   dbus-daemon) when missing, build the binaries with progress shown, then run
//!   `cargo test --workspace ARGS…` against them.

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use harness::{Error, Result, TestCluster, binaries::Binaries, error::io};

#[derive(Debug, Parser)]
#[command(name = "e2e", about = "baton's local Kubernetes control plane")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build (once) and print the control-plane binaries.
    Binaries,
    /// Start a cluster in the background and print the path of its admin kubeconfig.
    Up {
        /// kwok nodes to add.
        #[arg(long, default_value_t = 0)]
        nodes: usize,
        /// Where the cluster keeps its state.
        #[arg(long, env = "BATON_E2E_DIR", default_value_os_t = default_dir())]
        dir: PathBuf,
    },
    /// Stop the background cluster.
    Down {
        /// Where the cluster keeps its state.
        #[arg(long, env = "BATON_E2E_DIR", default_value_os_t = default_dir())]
        dir: PathBuf,
    },
    /// Run a cluster in the foreground until SIGTERM (what `up` starts).
    #[command(hide = true)]
    Serve {
        #[arg(long, default_value_t = 0)]
        nodes: usize,
        #[arg(long)]
        dir: PathBuf,
    },
    /// The demo: a live rollout on a local cluster (the chart, the operator and simulated
    /// agents), or how to install on the cluster a kubeconfig names.
    Demo {
        /// kwok nodes to add.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// A real cluster's kubeconfig: start nothing locally, say how to install.
        #[arg(long, env = "BATON_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Keep the local cluster running until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Measure the control plane's resident memory with N kwok nodes.
    Footprint {
        /// kwok nodes to add.
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// How long to let the cluster settle before measuring.
        #[arg(long, default_value_t = 30)]
        settle_secs: u64,
    },
    /// Measure idle agents (release build) against `kubectl get node --watch`:
    /// memory, CPU and API requests per hour.
    AgentFootprint {
        /// kwok nodes, one agent and one baseline watcher each.
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// The measuring window, in seconds.
        #[arg(long, default_value_t = 600)]
        window_secs: u64,
        /// The agent binary to measure (such as a static build from `.ci/static`);
        /// default: a fresh release build.
        #[arg(long)]
        agent_binary: Option<PathBuf>,
    },
    /// Measure the idle operator (release build) with N kwok nodes against the
    /// kube-scheduler of the same cluster: memory, CPU and API requests.
    OperatorFootprint {
        /// kwok nodes, comma-separated runs.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
        nodes: Vec<usize>,
        /// The measuring window, in seconds.
        #[arg(long, default_value_t = 300)]
        window_secs: u64,
        /// Run the operator with leader election (`false`: a single replica).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        leader_elect: bool,
    },
    /// Rollouts of N nodes with real agents: makespan against ceil(N/k)·T, the
    /// coordination gap, and API requests per node.
    RolloutBench {
        /// kwok nodes (one agent each).
        #[arg(long, default_value_t = 50)]
        nodes: usize,
        /// The budgets to roll with, one rollout each: node counts or percentages
        /// (`10%`), as maxUnavailable takes them.
        #[arg(long, value_delimiter = ',', default_value = "1,5")]
        k: Vec<String>,
        /// How long a simulated machine is down (T), in seconds.
        #[arg(long, default_value_t = 10)]
        reboot_secs: u64,
        /// The kured-like baseline's poll period, in seconds.
        #[arg(long, default_value_t = 60)]
        poll_secs: u64,
    },
    /// Run the images `.ci/image` built, with podman: the operator's `--help`, the
    /// agent's `--version`, and the operator against a local control plane (read-only
    /// root, non-root user): it serves /healthz and takes the leader Lease.
    ImageRun {
        /// The directory of the OCI layouts.
        #[arg(long, default_value_os_t = e2e::image::default_dir())]
        images: PathBuf,
        /// The tag (default: the workspace's version).
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
    },
    /// Build the binaries (with progress), then run `cargo test --workspace`.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn default_dir() -> PathBuf {
    std::env::temp_dir().join("baton-e2e-cluster")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Ctrl-C stops everything the command started and exits 130 (harness::interrupt).
    if let Err(e) = harness::interrupt::install() {
        eprintln!("e2e: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Cmd::Binaries => Binaries::ensure().map(|b| {
            for tool in harness::binaries::TOOLS {
                println!("{:<24} {}", tool.name, b.path(tool.name).display());
            }
        }),
        Cmd::Up { nodes, dir } => up(nodes, &dir),
        Cmd::Down { dir } => down(&dir),
        Cmd::Serve { nodes, dir } => serve(nodes, dir),
        Cmd::Test { args } => test(&args),
        Cmd::Demo {
            nodes,
            kubeconfig,
            keep,
        } => e2e::demo::run(nodes, kubeconfig, keep),
        Cmd::Footprint { nodes, settle_secs } => footprint(nodes, settle_secs),
        Cmd::OperatorFootprint {
            nodes,
            window_secs,
            leader_elect,
        } => operator_footprint(&nodes, window_secs, leader_elect),
        Cmd::RolloutBench {
            nodes,
            k,
            reboot_secs,
            poll_secs,
        } => rollout_bench(nodes, &k, reboot_secs, poll_secs),
        Cmd::ImageRun { images, tag } => image_run(&images, &tag),
        Cmd::AgentFootprint {
            nodes,
            window_secs,
            agent_binary,
        } => agent_footprint(nodes, window_secs, agent_binary),
    };
    // A command interrupted ends in the handler (exit 130), whatever it returned.
    harness::interrupt::finish();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e: {e}");
            ExitCode::FAILURE
        }
    }
}

fn up(nodes: usize, dir: &std::path::Path) -> Result<()> {
    if dir.join("serve.pid").exists() {
        down(dir)?;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    // Build in the foreground so the progress is visible.
    Binaries::ensure()?;
    let log = std::fs::File::create(dir.join("serve.log")).map_err(io("creating serve.log"))?;
    let exe = std::env::current_exe().map_err(io("finding this executable"))?;
    let child = Command::new(exe)
        .args(["serve", "--nodes", &nodes.to_string(), "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io("duplicating a log handle"))?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(io("starting the cluster"))?;
    // Ctrl-C before the cluster is up stops it too; once up, it runs until `down`.
    harness::process::guard_group(child.id());
    std::fs::write(dir.join("serve.pid"), child.id().to_string())
        .map_err(io("writing serve.pid"))?;
    let ready = dir.join("ready");
    let started = Instant::now();
    while !ready.exists() {
        if started.elapsed() > Duration::from_secs(300) {
            return Err(Error::Other(format!(
                "the cluster did not start; see {}",
                dir.join("serve.log").display()
            )));
        }
        if !std::path::Path::new(&format!("/proc/{}", child.id())).exists() {
            let tail = harness::process::log_tail(&dir.join("serve.log"), 20);
            return Err(Error::Other(format!("the cluster exited:\n{tail}")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    harness::process::release_group(child.id());
    println!("{}", dir.join("cluster/kubeconfig").display());
    Ok(())
}

fn down(dir: &std::path::Path) -> Result<()> {
    let pid_file = dir.join("serve.pid");
    let Ok(pid) = std::fs::read_to_string(&pid_file) else {
        eprintln!("e2e: no cluster running in {}", dir.display());
        return Ok(());
    };
    let pid = pid.trim().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let started = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && started.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(&pid_file);
    eprintln!("e2e: stopped the cluster in {}", dir.display());
    Ok(())
}

#[tokio::main]
async fn serve(nodes: usize, dir: PathBuf) -> Result<()> {
    let cluster_dir = dir.join("cluster");
    let cluster = TestCluster::start_in(&cluster_dir).await?;
    cluster.apply_crds().await?;
    if nodes > 0 {
        cluster.add_nodes(nodes).await?;
    }
    std::fs::write(dir.join("ready"), cluster.server()).map_err(io("writing ready"))?;
    // Until SIGTERM (`down`) or Ctrl-C: harness::interrupt stops the components and
    // exits; the state in `dir` stays for the next `up`, which starts afresh.
    let _cluster = cluster;
    std::future::pending::<Result<()>>().await
}

#[tokio::main]
async fn footprint(nodes: usize, settle_secs: u64) -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let started = Instant::now();
    if nodes > 0 {
        cluster.add_nodes(nodes).await?;
    }
    eprintln!(
        "[footprint] {nodes} nodes Ready in {:.1?}; settling {settle_secs}s",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(settle_secs)).await;
    let mut total = 0;
    println!("{:<26} {:>10}", "component", "RSS (MiB)");
    for proc in cluster.components() {
        let kib = proc.rss_kib().unwrap_or(0);
        total += kib;
        println!("{:<26} {:>10.1}", proc.name, kib as f64 / 1024.0);
    }
    println!(
        "{:<26} {:>10.1}",
        format!("total ({nodes} kwok nodes)"),
        total as f64 / 1024.0
    );
    Ok(())
}

#[tokio::main]
async fn agent_footprint(nodes: usize, window_secs: u64, binary: Option<PathBuf>) -> Result<()> {
    let window = Duration::from_secs(window_secs);
    let (agent, base) = e2e::footprint::agents(nodes, window, binary).await?;
    e2e::footprint::print(&agent, &base, window);
    Ok(())
}

#[tokio::main]
async fn operator_footprint(nodes: &[usize], window_secs: u64, leader_elect: bool) -> Result<()> {
    let window = Duration::from_secs(window_secs);
    println!(
        "| kwok nodes | baton-operator RSS | peak RSS | CPU per hour | kube-scheduler RSS (baseline) | CPU per hour | RSS ratio | operator requests per node per hour | reconciles per hour (mean) | Node events per hour: admitted / ignored |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in nodes {
        let (op, base, activity) = e2e::footprint::operator(*n, window, leader_elect).await?;
        let requests: Vec<String> = op
            .requests_per_hour
            .iter()
            .map(|(v, r)| format!("{v} {r:.3}"))
            .collect();
        println!(
            "| {n} | {:.1} MiB | {:.1} MiB | {:.0} ms | {:.1} MiB | {:.0} ms | {:.2} | {} | {:.0} ({:.1} ms) | {:.0} / {:.0} |",
            op.rss_kib / 1024.0,
            op.peak_kib / 1024.0,
            op.cpu_ms_per_hour,
            base.rss_kib / 1024.0,
            base.cpu_ms_per_hour,
            op.rss_kib / base.rss_kib.max(1.0),
            if requests.is_empty() {
                "none".to_string()
            } else {
                requests.join(", ")
            },
            activity.reconciles,
            activity.reconcile_ms,
            activity.events_admitted,
            activity.events_ignored,
        );
    }
    Ok(())
}

#[tokio::main]
async fn rollout_bench(nodes: usize, k: &[String], reboot_secs: u64, poll_secs: u64) -> Result<()> {
    let (reboot, poll) = (
        Duration::from_secs(reboot_secs),
        Duration::from_secs(poll_secs),
    );
    let rollouts = e2e::makespan::run(nodes, k, reboot, poll).await?;
    e2e::makespan::print(nodes, reboot, poll, &rollouts);
    Ok(())
}

#[tokio::main]
async fn image_run(images: &std::path::Path, tag: &str) -> Result<()> {
    let run = e2e::image::run(images, tag).await?;
    println!("operator --help:    {}", run.operator_help);
    println!("agent --version:    {}", run.agent_version);
    println!(
        "operator container: read-only root, UID {}, served /healthz, took the leader Lease as {}",
        run.operator_uid, run.leader
    );
    if run.operator_uid != 65532 {
        return Err(Error::Other(format!(
            "the operator ran as UID {}, not 65532",
            run.operator_uid
        )));
    }
    if !run.agent_version.contains(tag) {
        return Err(Error::Other(format!(
            "the agent's --version ({}) does not name {tag}",
            run.agent_version
        )));
    }
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    harness::packages::ensure()?;
    let binaries = Binaries::ensure()?;
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["test", "--workspace"]).args(args);
    for tool in harness::binaries::TOOLS {
        cmd.env(tool.env, binaries.path(tool.name));
    }
    let status = cmd.status().map_err(io("running cargo test"))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Other(format!("cargo test failed ({status})")))
    }
}
