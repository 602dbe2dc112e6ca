//! `cargo run -p e2e -- image-run`: runs the images `.ci/image` built, with podman,
//! from their OCI layouts (no registry): the operator's `--help`, the agent's
//! `--version`, and the operator against the local control plane under a read-only root
//! filesystem as its image's non-root user, serving `/healthz` and taking the leader
//! Lease.
//!
//! podman runs containers in this sandbox with three settings, each for a reason seen
//! here: `default_ulimits = []` in a containers.conf of its own (podman's default
//! RLIMIT_NOFILE/NPROC raise fails: "setrlimit: Operation not permitted"), runc as the
//! runtime and cgroupfs as the manager (crun refuses the host's hybrid cgroup v1/v2
//! layout: "cgroups in hybrid mode not supported"), and vfs storage in a directory of
//! the run (no overlay mounts).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

use harness::{Error, Result, TestCluster, error::io};

/// What a run of the images showed.
#[derive(Debug)]
pub struct ImageRun {
    /// The operator's `--help`, first line.
    pub operator_help: String,
    /// The agent's `--version`.
    pub agent_version: String,
    /// The user the operator's process ran as (the host's view of its UID).
    pub operator_uid: u32,
    /// The leader Lease's holder.
    pub leader: String,
}

/// podman with the settings above, its state under `dir`.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Result<Podman> {
        let dir = tempfile::Builder::new()
            .prefix("baton-e2e-podman-")
            .tempdir()
            .map_err(io("creating podman's directory"))?;
        harness::interrupt::scratch(dir.path());
        std::fs::write(
            dir.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n",
        )
        .map_err(io("writing containers.conf"))?;
        Ok(Podman { dir })
    }

    fn command(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", d.join("containers.conf"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--runtime",
                "runc",
            ]);
        cmd
    }

    /// Runs `podman args…` to completion (bounded by `timeout`, as every wait is).
    fn run(&self, args: &[&str]) -> Result<Output> {
        let out = self
            .command()
            .args(["run", "--rm", "--network", "host", "--read-only"])
            .args(args)
            .output()
            .map_err(io("running podman (is Debian's podman installed?)"))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(Error::Other(format!(
                "podman run {args:?} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }
}

/// The reference of `component`'s image (`oci:<dir>/baton-<component>:<tag>`).
fn reference(images: &Path, component: &str, tag: &str) -> String {
    format!("oci:{}/baton-{component}:{tag}", images.display())
}

/// Runs the images in `images` (the OCI layouts `.ci/image` wrote) tagged `tag`.
pub async fn run(images: &Path, tag: &str) -> Result<ImageRun> {
    // podman names the image after the layout's path, which must be clean.
    let images = &images
        .canonicalize()
        .map_err(io(format!("{} (run .ci/image first)", images.display())))?;
    let podman = Podman::new()?;
    let operator = reference(images, "operator", tag);
    let agent = reference(images, "agent", tag);
    let help = podman.run(&[&operator, "--help"])?;
    let operator_help = first_line(&help.stdout);
    let version = podman.run(&[&agent, "--version"])?;
    let agent_version = first_line(&version.stdout);

    let cluster = TestCluster::start().await?;
    cluster.apply_crds().await?;
    cluster.create_namespace("baton-system").await?;
    let kubeconfig = harness::identity::kubeconfig_for(
        &cluster,
        "baton-system",
        "baton-operator",
        crate::footprint::operator_rules()?,
    )
    .await?;
    let port = harness::port::free_port()?;
    let name = format!("baton-image-run-{port}");
    // The kubeconfig names the CA by path: both are mounted where they are.
    let mounts =
        [&kubeconfig, &cluster.ca_file().to_path_buf()].map(|p| format!("{0}:{0}:ro", p.display()));
    let mut child = podman
        .command()
        .args(["run", "--rm", "--network", "host", "--read-only", "--name"])
        .arg(&name)
        .args(["-v", &mounts[0], "-v", &mounts[1]])
        .arg("-e")
        .arg(format!("KUBECONFIG={}", kubeconfig.display()))
        .arg(&operator)
        .args(["--namespace", "baton-system", "--identity", "image-run"])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::File::create(cluster.kubeconfig().with_file_name("image-operator.log"))
                .map_err(io("creating the operator's log"))?,
        )
        .spawn()
        .map_err(io("starting podman"))?;
    let result = watch_operator(&cluster, &podman, &name, port).await;
    let _ = podman
        .command()
        .args(["rm", "--force", "--time", "5", &name])
        .output();
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while matches!(child.try_wait(), Ok(None)) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let _ = child.kill();
    let (operator_uid, leader) = result?;
    Ok(ImageRun {
        operator_help,
        agent_version,
        operator_uid,
        leader,
    })
}

/// Waits for the containerised operator to serve `/healthz` and lead; returns its UID
/// and the Lease's holder.
async fn watch_operator(
    cluster: &TestCluster,
    podman: &Podman,
    name: &str,
    port: u16,
) -> Result<(u32, String)> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| Error::Other(e.to_string()))?;
    let url = format!("http://127.0.0.1:{port}/healthz");
    cluster
        .wait_for("the operator's container to serve /healthz", || async {
            http.get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await?;
    let leases: Api<Lease> = Api::namespaced(cluster.client(), "baton-system");
    cluster
        .wait_for(
            "the operator's container to take the leader Lease",
            || async {
                leases
                    .get_opt(operator::leader::LEASE_NAME)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|l| l.spec?.holder_identity)
                    .is_some_and(|h| h == "image-run")
            },
        )
        .await?;
    let pid = podman
        .command()
        .args(["inspect", "--format", "{{.State.Pid}}", name])
        .output()
        .map_err(io("podman inspect"))?;
    let pid = first_line(&pid.stdout);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(io(format!(
        "reading the status of the operator's process {pid}"
    )))?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Other(format!("no Uid in /proc/{pid}/status")))?;
    Ok((uid, "image-run".into()))
}

fn first_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The default directory of the images (`target/image`).
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image")
}
