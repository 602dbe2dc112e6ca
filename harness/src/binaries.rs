//! The control-plane binaries: found, or built once from pinned Go modules and cached
//! outside the repository.
//!
//! Lookup order for each binary: its own environment variable (`BATON_E2E_ETCD`,
//! `BATON_E2E_KUBE_APISERVER`, …), then `$KUBEBUILDER_ASSETS/<name>`, then the cache
//! `$XDG_CACHE_HOME/baton-e2e/<versions>/` (default `~/.cache`), else `go build` into
//! that cache. Builds are serialised across processes with a file lock.

use std::{
    fs,
    io::{BufRead, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use crate::error::{Error, Result, io};

/// One binary the harness needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// The executable's name.
    pub name: &'static str,
    /// Its environment-variable override.
    pub env: &'static str,
    /// The Go module directory under `harness/tools/`.
    pub module: &'static str,
    /// The package to build (`.` for the module's own main).
    pub package: &'static str,
}

/// Every binary, in build order.
pub const TOOLS: [Tool; 7] = [
    Tool {
        name: "etcd",
        env: "BATON_E2E_ETCD",
        module: "etcd",
        package: ".",
    },
    Tool {
        name: "kube-apiserver",
        env: "BATON_E2E_KUBE_APISERVER",
        module: "kubernetes",
        package: "k8s.io/kubernetes/cmd/kube-apiserver",
    },
    Tool {
        name: "kube-controller-manager",
        env: "BATON_E2E_KUBE_CONTROLLER_MANAGER",
        module: "kubernetes",
        package: "k8s.io/kubernetes/cmd/kube-controller-manager",
    },
    Tool {
        name: "kube-scheduler",
        env: "BATON_E2E_KUBE_SCHEDULER",
        module: "kubernetes",
        package: "k8s.io/kubernetes/cmd/kube-scheduler",
    },
    Tool {
        name: "kubectl",
        env: "BATON_E2E_KUBECTL",
        module: "kubernetes",
        package: "k8s.io/kubernetes/cmd/kubectl",
    },
    Tool {
        name: "kwok",
        env: "BATON_E2E_KWOK",
        module: "kwok",
        package: "sigs.k8s.io/kwok/cmd/kwok",
    },
    Tool {
        name: "helm",
        env: "BATON_E2E_HELM",
        module: "helm",
        package: "helm.sh/helm/v4/cmd/helm",
    },
];

/// Bumped whenever the way binaries are built changes, so caches are rebuilt.
const RECIPE: &str = "r1";

/// Paths to every binary.
#[derive(Debug, Clone)]
pub struct Binaries {
    paths: Vec<(&'static str, PathBuf)>,
    stages: Vec<PathBuf>,
}

impl Binaries {
    /// The path of a binary by name.
    pub fn path(&self, name: &str) -> PathBuf {
        self.paths
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// Finds every binary, building what is missing. Progress goes to stderr.
    pub fn ensure() -> Result<Binaries> {
        let cache = cache_dir()?;
        let mut paths = Vec::new();
        let mut missing = Vec::new();
        for tool in TOOLS {
            match provided(&tool) {
                Some(path) => paths.push((tool.name, path)),
                None => {
                    let path = cache.join(tool.name);
                    if !path.is_file() {
                        missing.push(tool);
                    }
                    paths.push((tool.name, path));
                }
            }
        }
        if !missing.is_empty() {
            fs::create_dir_all(&cache).map_err(io(format!("creating {}", cache.display())))?;
            let lock =
                fs::File::create(cache.join(".lock")).map_err(io("creating the build lock"))?;
            lock.lock().map_err(io("taking the build lock"))?;
            let started = Instant::now();
            let total = missing.len();
            for (i, tool) in missing.iter().enumerate() {
                let out = cache.join(tool.name);
                if out.is_file() {
                    continue; // another process built it while we waited
                }
                eprintln!(
                    "[baton-e2e] building {} ({}/{total}) into {} ...",
                    tool.name,
                    i + 1,
                    cache.display()
                );
                let t = Instant::now();
                build(tool, &out)?;
                eprintln!("[baton-e2e] built {} in {:.0?}", tool.name, t.elapsed());
            }
            eprintln!(
                "[baton-e2e] control-plane binaries ready in {:.0?}",
                started.elapsed()
            );
        }
        let stages = kwok_stages(&cache)?;
        Ok(Binaries { paths, stages })
    }

    /// kwok's Stage files: node initialisation, node heartbeats with leases, and the
    /// pod lifecycle (ready, complete, graceful delete).
    pub fn kwok_stages(&self) -> &[PathBuf] {
        &self.stages
    }
}

/// The kwok Stages the harness uses, from kwok's own module at the pinned version.
const KWOK_STAGES: [&str; 5] = [
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
];

/// Copies kwok's Stage files next to the cached binaries (once), or takes them from
/// `$BATON_E2E_KWOK_STAGES`.
fn kwok_stages(cache: &Path) -> Result<Vec<PathBuf>> {
    let dir = std::env::var_os("BATON_E2E_KWOK_STAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("kwok-stages"));
    let files: Vec<PathBuf> = KWOK_STAGES
        .iter()
        .map(|s| dir.join(Path::new(s).file_name().unwrap_or_default()))
        .collect();
    if files.iter().all(|f| f.is_file()) {
        return Ok(files);
    }
    let version = module_version("kwok", "sigs.k8s.io/kwok")?;
    let out = Command::new("go")
        .args([
            "mod",
            "download",
            "-json",
            &format!("sigs.k8s.io/kwok@{version}"),
        ])
        .current_dir(tools_dir().join("kwok"))
        .output()
        .map_err(io("running `go mod download` for kwok's stages"))?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Other(format!("`go mod download` printed no module info: {e}")))?;
    let module = info["Dir"]
        .as_str()
        .ok_or_else(|| Error::Other(format!("no module directory for kwok: {info}")))?;
    fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    for (stage, file) in KWOK_STAGES.iter().zip(&files) {
        fs::copy(Path::new(module).join(stage), file)
            .map_err(io(format!("copying kwok stage {stage}")))?;
    }
    Ok(files)
}

/// `harness/tools`, where the Go modules pinning each binary live.
pub fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools")
}

/// The cache directory for the pinned versions, such as
/// `~/.cache/baton-e2e/kubernetes-v1.37.2_etcd-v3.7.3_kwok-v0.8.0_helm-v4.3.1`.
pub fn cache_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| Error::Other("neither XDG_CACHE_HOME nor HOME is set".into()))?;
    let mut parts = Vec::new();
    for (module, pinned) in [
        ("kubernetes", "k8s.io/kubernetes"),
        ("etcd", "go.etcd.io/etcd/server/v3"),
        ("kwok", "sigs.k8s.io/kwok"),
        ("helm", "helm.sh/helm/v4"),
    ] {
        parts.push(format!("{module}-{}", module_version(module, pinned)?));
    }
    parts.push(RECIPE.to_string());
    Ok(base.join("baton-e2e").join(parts.join("_")))
}

/// The version of `pinned` that `harness/tools/<module>/go.mod` requires.
pub fn module_version(module: &str, pinned: &str) -> Result<String> {
    let path = tools_dir().join(module).join("go.mod");
    let text = fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
    text.lines()
        .map(|l| {
            l.trim()
                .trim_start_matches("require ")
                .split_whitespace()
                .collect::<Vec<_>>()
        })
        .find(|words| words.first() == Some(&pinned))
        .and_then(|words| words.get(1).map(|v| v.to_string()))
        .ok_or_else(|| Error::Other(format!("{} does not require {pinned}", path.display())))
}

fn provided(tool: &Tool) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(tool.env).map(PathBuf::from) {
        return Some(path);
    }
    let assets = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from)?;
    let path = assets.join(tool.name);
    path.is_file().then_some(path)
}

/// Linker flags: strip symbols, and stamp Kubernetes binaries with their release so
/// `/version` (which helm and clients check) reports it instead of `v0.0.0-master`.
fn ldflags(tool: &Tool) -> Result<String> {
    let mut flags = "-s -w".to_string();
    if tool.module == "kubernetes" {
        let version = module_version("kubernetes", "k8s.io/kubernetes")?;
        let mut parts = version.trim_start_matches('v').split('.');
        let (major, minor) = (parts.next().unwrap_or("1"), parts.next().unwrap_or("0"));
        for (key, value) in [
            ("gitVersion", version.as_str()),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        ] {
            flags.push_str(&format!(" -X k8s.io/component-base/version.{key}={value}"));
        }
    }
    Ok(flags)
}

fn build(tool: &Tool, out: &Path) -> Result<()> {
    let log_path = out.with_extension("build.log");
    let log =
        fs::File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
    let tmp = out.with_extension("partial");
    let mut child = Command::new("go")
        .args(["build", "-v", "-trimpath"])
        .arg(format!("-ldflags={}", ldflags(tool)?))
        .arg("-o")
        .arg(&tmp)
        .arg(tool.package)
        .current_dir(tools_dir().join(tool.module))
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=readonly")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("running `go build` (is Go installed?)"))?;
    // `go build -v` names each package as it compiles it: count them as progress.
    let mut log = std::io::BufWriter::new(log);
    let mut packages = 0usize;
    if let Some(stderr) = child.stderr.take() {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = writeln!(log, "{line}");
            packages += 1;
            if packages.is_multiple_of(250) {
                eprintln!("[baton-e2e]   {}: {packages} packages compiled", tool.name);
            }
        }
    }
    let _ = log.flush();
    let status = child.wait().map_err(io("waiting for `go build`"))?;
    if !status.success() {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        return Err(Error::Build {
            binary: tool.name.into(),
            log: log_path,
            tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    fs::rename(&tmp, out).map_err(io(format!("moving {} into place", out.display())))
}

/// A `helm` command whose cache, config and data live in the harness's own temporary
/// directories, so that tests never read or change the user's helm setup.
pub fn helm_command(helm: &Path) -> Command {
    let mut cmd = Command::new(helm);
    for (var, dir) in [
        ("HELM_CACHE_HOME", "baton-e2e-helm-cache"),
        ("HELM_CONFIG_HOME", "baton-e2e-helm-config"),
        ("HELM_DATA_HOME", "baton-e2e-helm-data"),
    ] {
        cmd.env(var, std::env::temp_dir().join(dir));
    }
    cmd
}

/// A binary of the workspace's own build (`baton-agent`, say): `$BATON_<NAME>_BINARY`
/// when set (`baton-agent` reads `BATON_AGENT_BINARY`), else the one beside the running
/// test's own directory (`target/<profile>/<name>`, which `cargo test --workspace`
/// builds), else an error that says how to build it.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let var = format!(
        "BATON_{}_BINARY",
        name.trim_start_matches("baton-")
            .to_ascii_uppercase()
            .replace('-', "_")
    );
    if let Some(path) = std::env::var_os(&var) {
        return Ok(PathBuf::from(path));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|profile| profile.join(name)))
        .filter(|p| p.is_file());
    beside.ok_or_else(|| {
        Error::Other(format!(
            "{name} is not built: `cargo run -p e2e -- test` builds it, or `cargo build --bin {name}` (or set {var})"
        ))
    })
}
