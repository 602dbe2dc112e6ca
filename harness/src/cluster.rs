//! A real Kubernetes control plane as local processes: etcd, kube-apiserver (TLS,
//! RBAC, TokenRequest, the default admission plugins including
//! ValidatingAdmissionPolicy), kube-controller-manager, kube-scheduler, and kwok for
//! nodes and pod lifecycles. Everything listens on 127.0.0.1 on free ports.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{Namespace, Node, ServiceAccount},
        rbac::v1::ClusterRole,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ListParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::{
    binaries::Binaries,
    error::{Error, Result, io},
    pki::Pki,
    port::free_port,
    process::Supervised,
};

/// The namespace whose ServiceAccounts' requests the API server audits.
pub const AUDITED_NAMESPACE: &str = "baton-system";

/// Logs each request of a `baton-system` ServiceAccount once, when it completes (a watch
/// when it ends), and nothing else.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts:baton-system"]
  - level: None
"#;

/// How long components get to become ready on a slow machine.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running local cluster. Dropping it stops every process and removes its files.
pub struct TestCluster {
    procs: Vec<Supervised>,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    server: String,
    pki: Pki,
    client: Client,
    binaries: Binaries,
    next_node: AtomicUsize,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("server", &self.server)
            .field("dir", &self.dir)
            .finish()
    }
}

impl TestCluster {
    /// Starts a cluster in a fresh temporary directory.
    ///
    /// A component that loses its port to another process between the probe and its
    /// bind ("address already in use") is retried on fresh ports, twice at most.
    pub async fn start() -> Result<TestCluster> {
        let mut attempts = 0;
        let (tmp, mut cluster) = loop {
            let tmp = tempfile::Builder::new()
                .prefix("baton-e2e-")
                .tempdir()
                .map_err(io("creating a temp dir"))?;
            crate::interrupt::scratch(tmp.path());
            match Self::start_in(tmp.path()).await {
                Ok(cluster) => break (tmp, cluster),
                Err(Error::NotReady { ref tail, .. })
                    if attempts < 2 && tail.contains("address already in use") =>
                {
                    attempts += 1;
                    eprintln!("[baton-e2e] a port was taken while starting; retrying");
                }
                Err(e) => return Err(e),
            }
        };
        // BATON_E2E_KEEP=1 keeps the logs and data for a post-mortem.
        if std::env::var_os("BATON_E2E_KEEP").is_some() {
            eprintln!("[baton-e2e] keeping {}", tmp.keep().display());
        } else {
            cluster._tmp = Some(tmp);
        }
        Ok(cluster)
    }

    /// Starts a cluster ready for baton without its chart: the CRDs applied, the
    /// `baton-system` namespace created and `nodes` kwok nodes added (their names are
    /// returned too).
    pub async fn start_with_nodes(nodes: usize) -> Result<(TestCluster, Vec<String>)> {
        let cluster = Self::start().await?;
        cluster.apply_crds().await?;
        cluster.create_namespace("baton-system").await?;
        let names = cluster.add_nodes(nodes).await?;
        Ok((cluster, names))
    }

    /// Starts a cluster whose files live in `dir` (kept after it stops).
    pub async fn start_in(dir: &Path) -> Result<TestCluster> {
        let binaries = tokio::task::spawn_blocking(Binaries::ensure)
            .await
            .map_err(|e| Error::Other(format!("building binaries panicked: {e}")))??;
        let started = Instant::now();
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(io(format!("creating {}", logs.display())))?;
        let pki = Pki::generate(&dir.join("pki"))?;
        let mut procs = Vec::new();

        // etcd
        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args = vec![
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--listen-metrics-urls=".into(),
            "--unsafe-no-fsync=true".into(),
            // As kubeadm sets it: without frequent progress notifications the API
            // server's watch cache lags, and controllers that wait to read their own
            // writes (ReplicaSet, Deployment) stall for minutes.
            "--watch-progress-notify-interval=5s".into(),
            "--log-level=warn".into(),
        ];
        procs.push(Supervised::spawn(
            "etcd",
            &binaries.path("etcd"),
            &etcd_args,
            logs.join("etcd.log"),
        )?);
        wait_tcp(&mut procs[0], etcd_port).await?;

        // kube-apiserver, auditing only baton's ServiceAccounts (so that their API traffic
        // can be counted; everything else is not logged).
        let audit_policy = dir.join("audit-policy.yaml");
        std::fs::write(&audit_policy, AUDIT_POLICY).map_err(io("writing the audit policy"))?;
        let api_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");
        let p = |path: &Path| path.display().to_string();
        let api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", p(&pki.serving.0)),
            format!("--tls-private-key-file={}", p(&pki.serving.1)),
            format!("--client-ca-file={}", p(&pki.ca_cert)),
            format!("--service-account-key-file={}", p(&pki.sa_pub)),
            format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--api-audiences=https://kubernetes.default.svc.cluster.local".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
            format!("--cert-dir={}", p(&dir.join("apiserver-certs"))),
            format!("--audit-policy-file={}", p(&audit_policy)),
            format!("--audit-log-path={}", p(&dir.join("audit.log"))),
            "--audit-log-mode=blocking".into(),
        ];
        procs.push(Supervised::spawn(
            "kube-apiserver",
            &binaries.path("kube-apiserver"),
            &api_args,
            logs.join("kube-apiserver.log"),
        )?);
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, admin_kubeconfig(&server, &pki))
            .map_err(io("writing the kubeconfig"))?;
        let client = client_from(&kubeconfig).await?;
        wait_api(&mut procs[1], &client).await?;

        // Controllers, scheduler and kwok, all as admin.
        let kc = format!("--kubeconfig={}", p(&kubeconfig));
        let kcm_args = vec![
            kc.clone(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()?),
            "--controllers=*,-bootstrapsigner,-tokencleaner".into(),
            format!("--root-ca-file={}", p(&pki.ca_cert)),
            format!("--service-account-private-key-file={}", p(&pki.sa_key)),
            "--kube-api-qps=200".into(),
            "--kube-api-burst=400".into(),
            "--concurrent-deployment-syncs=10".into(),
            "--concurrent-replicaset-syncs=10".into(),
        ];
        procs.push(Supervised::spawn(
            "kube-controller-manager",
            &binaries.path("kube-controller-manager"),
            &kcm_args,
            logs.join("kube-controller-manager.log"),
        )?);
        let sched_args = vec![
            kc.clone(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()?),
            "--kube-api-qps=200".into(),
            "--kube-api-burst=400".into(),
        ];
        procs.push(Supervised::spawn(
            "kube-scheduler",
            &binaries.path("kube-scheduler"),
            &sched_args,
            logs.join("kube-scheduler.log"),
        )?);
        let mut kwok_args = vec![
            kc,
            "--manage-all-nodes=false".into(),
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
            "--node-lease-duration-seconds=40".into(),
            "--cidr=10.244.0.0/16".into(),
            "--node-ip=127.0.0.1".into(),
            format!("--server-address=127.0.0.1:{}", free_port()?),
        ];
        kwok_args.extend(
            binaries
                .kwok_stages()
                .iter()
                .map(|s| format!("--config={}", p(s))),
        );
        procs.push(Supervised::spawn(
            "kwok",
            &binaries.path("kwok"),
            &kwok_args,
            logs.join("kwok.log"),
        )?);

        let cluster = TestCluster {
            procs,
            dir: dir.to_path_buf(),
            _tmp: None,
            server,
            pki,
            client,
            binaries,
            next_node: AtomicUsize::new(0),
        };
        // The ServiceAccount controller creating `default` proves the controllers run.
        cluster
            .wait_for("the default ServiceAccount", || async {
                Api::<ServiceAccount>::namespaced(cluster.client.clone(), "default")
                    .get_opt("default")
                    .await
                    .ok()
                    .flatten()
                    .is_some()
            })
            .await?;
        eprintln!(
            "[baton-e2e] control plane ready in {:.1?} at {}",
            started.elapsed(),
            cluster.server
        );
        Ok(cluster)
    }

    /// An admin client (group `system:masters`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The admin kubeconfig's path.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The cluster's working directory (logs, certificates, etcd data).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The binaries it runs.
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// The running components, for measurements.
    pub fn components(&mut self) -> &mut [Supervised] {
        &mut self.procs
    }

    /// A client that authenticates as `namespace/service_account` with a token from the
    /// TokenRequest API, so RBAC applies exactly as to a pod using it.
    pub async fn client_as(&self, namespace: &str, service_account: &str) -> Result<Client> {
        let token = self.token_for(namespace, service_account, None).await?;
        self.client_with_token(&token).await
    }

    /// A ServiceAccount token, optionally bound to a Pod (which adds the pod's node name
    /// to the token, as the kubelet's projected tokens have).
    pub async fn token_for(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<(&str, &str)>,
    ) -> Result<String> {
        let api = Api::<ServiceAccount>::namespaced(self.client.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec!["https://kubernetes.default.svc.cluster.local".into()],
                expiration_seconds: Some(3600),
                bound_object_ref: pod.map(|(name, uid)| {
                    k8s_openapi::api::authentication::v1::BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: Some(name.into()),
                        uid: Some(uid.into()),
                    }
                }),
            },
            ..Default::default()
        };
        let issued: TokenRequest = api
            .create_subresource("token", service_account, &PostParams::default(), &request)
            .await?;
        issued.status.map(|s| s.token).ok_or_else(|| {
            Error::Other(format!("no token issued for {namespace}/{service_account}"))
        })
    }

    /// A kubeconfig (YAML) that presents `token`.
    pub fn kubeconfig_with_token(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            self.server,
            self.pki.ca_cert.display()
        )
    }

    /// The cluster CA's certificate (PEM), which clients trust.
    pub fn ca_file(&self) -> &Path {
        &self.pki.ca_cert
    }

    /// The audit log: one JSON event per completed request of a `baton-system`
    /// ServiceAccount.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// A client that presents `token`.
    pub async fn client_with_token(&self, token: &str) -> Result<Client> {
        let yaml = self.kubeconfig_with_token(token);
        let kubeconfig =
            Kubeconfig::from_yaml(&yaml).map_err(|e| Error::Kubeconfig(e.to_string()))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))?;
        raw_client(config)
    }

    /// Adds `n` kwok nodes, spread over zones `zone-a`…`zone-c`, and waits until all are
    /// Ready. Returns their names.
    pub async fn add_nodes(&self, n: usize) -> Result<Vec<String>> {
        let api = Api::<Node>::all(self.client.clone());
        let mut names = Vec::with_capacity(n);
        let creates = (0..n).map(|_| {
            let i = self.next_node.fetch_add(1, Ordering::SeqCst);
            let name = format!("kwok-node-{i:04}");
            names.push(name.clone());
            let node = kwok_node(&name, ["zone-a", "zone-b", "zone-c"][i % 3]);
            let api = api.clone();
            async move { api.create(&PostParams::default(), &node).await }
        });
        use futures::StreamExt;
        let results: Vec<_> = futures::stream::iter(creates)
            .buffer_unordered(32)
            .collect()
            .await;
        for r in results {
            r?;
        }
        let wanted: std::collections::HashSet<String> = names.iter().cloned().collect();
        // kwok marks nodes Ready at its own pace: allow 60 ms a node beyond the usual
        // bound, and list less often when the list is long.
        let bound = READY_TIMEOUT.max(Duration::from_millis(60) * n as u32);
        let every = Duration::from_millis(200).max(Duration::from_millis(n as u64 / 5));
        self.wait_for_within(&format!("{n} kwok nodes to be Ready"), bound, every, || {
            let api = api.clone();
            let wanted = wanted.clone();
            async move {
                let Ok(list) = api.list(&ListParams::default()).await else {
                    return false;
                };
                let ready = list
                    .items
                    .iter()
                    .filter(|node| wanted.contains(&node.name_any()))
                    .filter(|node| {
                        node.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|cs| {
                                cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .count();
                ready == wanted.len()
            }
        })
        .await?;
        Ok(names)
    }

    /// Creates a namespace and waits until pods can be created in it (its `default`
    /// ServiceAccount exists).
    pub async fn create_namespace(&self, name: &str) -> Result<()> {
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
            .map_err(|e| Error::Other(e.to_string()))?;
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        let accounts = Api::<ServiceAccount>::namespaced(self.client.clone(), name);
        self.wait_for(
            &format!("namespace {name}'s default ServiceAccount"),
            || async { accounts.get_opt("default").await.ok().flatten().is_some() },
        )
        .await
    }

    /// Applies baton's CRDs (from `crds/yaml`) and waits until they are established.
    pub async fn apply_crds(&self) -> Result<()> {
        let api = Api::<CustomResourceDefinition>::all(self.client.clone());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/yaml");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(format!("reading {}", dir.display())))? {
            let path = entry.map_err(io("listing CRDs"))?.path();
            let text = std::fs::read_to_string(&path)
                .map_err(io(format!("reading {}", path.display())))?;
            let crd: CustomResourceDefinition =
                serde_yaml_ng::from_str(&text).map_err(|source| Error::Yaml {
                    path: path.clone(),
                    source,
                })?;
            names.push(crd.name_any());
            let params = kube::api::PatchParams::apply("baton-e2e").force();
            api.patch(&crd.name_any(), &params, &kube::api::Patch::Apply(&crd))
                .await?;
        }
        self.wait_for("baton's CRDs to be established", || {
            let api = api.clone();
            let names = names.clone();
            async move {
                for name in &names {
                    let Ok(crd) = api.get(name).await else {
                        return false;
                    };
                    let established = crd.status.and_then(|s| s.conditions).is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                    if !established {
                        return false;
                    }
                }
                true
            }
        })
        .await
    }

    /// Polls `check` every 200 ms until it holds, for at most two minutes.
    pub async fn wait_for<F, Fut>(&self, what: &str, check: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        self.wait_for_within(what, READY_TIMEOUT, Duration::from_millis(200), check)
            .await
    }

    /// [`TestCluster::wait_for`] with its own bound, checking every `every`.
    pub async fn wait_for_within<F, Fut>(
        &self,
        what: &str,
        bound: Duration,
        every: Duration,
        mut check: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if check().await {
                return Ok(());
            }
            tokio::time::sleep(every).await;
        }
        Err(Error::Other(format!(
            "timed out after {}s waiting for {what}",
            bound.as_secs()
        )))
    }

    /// Stops every component, in reverse start order.
    pub fn stop(&mut self) {
        while let Some(mut proc) = self.procs.pop() {
            proc.stop();
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn admin_kubeconfig(server: &str, pki: &Pki) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: baton-e2e\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: baton-e2e\n  context: {{cluster: baton-e2e, user: admin}}\ncurrent-context: baton-e2e\n",
        pki.ca_cert.display(),
        pki.admin.0.display(),
        pki.admin.1.display(),
    )
}

/// A client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    raw_client(config)
}

/// Tests must see what the API server answers: kube-rs would otherwise retry 429s
/// (such as an eviction a PodDisruptionBudget refuses) behind their back.
fn raw_client(mut config: Config) -> Result<Client> {
    config.default_retry = false;
    Client::try_from(config).map_err(Error::Kube)
}

async fn wait_tcp(proc: &mut Supervised, port: u16) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < READY_TIMEOUT {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if proc.exited() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(not_ready(proc, started))
}

async fn wait_api(proc: &mut Supervised, client: &Client) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < READY_TIMEOUT {
        // `default` exists and RBAC's bootstrap roles are in: the API is serving.
        let ns = Api::<Namespace>::all(client.clone())
            .get_opt("default")
            .await;
        let role = Api::<ClusterRole>::all(client.clone())
            .get_opt("cluster-admin")
            .await;
        if matches!((ns, role), (Ok(Some(_)), Ok(Some(_)))) {
            return Ok(());
        }
        if proc.exited() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(not_ready(proc, started))
}

fn not_ready(proc: &Supervised, started: Instant) -> Error {
    Error::NotReady {
        component: proc.name.clone(),
        seconds: started.elapsed().as_secs(),
        log: proc.log.clone(),
        tail: proc.log_tail(20),
    }
}

/// A Node object kwok manages (annotation `kwok.x-k8s.io/node=fake`).
pub fn kwok_node(name: &str, zone: &str) -> Node {
    let value = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "topology.kubernetes.io/zone": zone,
            },
        },
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "fake", "kubeProxyVersion": "fake"},
        },
    });
    serde_json::from_value(value).unwrap_or_default()
}
