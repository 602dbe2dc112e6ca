//! A real three-member etcd cluster on loopback (the etcd binary the harness builds),
//! with mutual TLS on its client URLs, for the quorum guard's tests. Each member is
//! named after the node it stands for; a simulated reboot of that node stops the
//! member's process for the machine's down time and starts it again on the same data
//! directory ([`crate::fleet::MachineHooks`]).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    error::{Error, Result, io},
    pki::EtcdPki,
    port::free_port,
    process::Supervised,
};

/// How long a member may take to answer `/health` after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

struct Member {
    client_port: u16,
    args: Vec<String>,
    log: PathBuf,
    proc: Mutex<Option<Supervised>>,
    /// Extra time its process stays down after its machine is back up.
    slow_rejoin: Mutex<Option<Duration>>,
    /// When it was last started (after a reboot).
    started: Mutex<Option<Instant>>,
}

/// A running etcd cluster. Dropping it stops every member and removes its files.
pub struct EtcdCluster {
    members: BTreeMap<String, Member>,
    binary: PathBuf,
    /// Its TLS files: the CA, and the client certificate baton uses.
    pub pki: EtcdPki,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("members", &self.members.keys().collect::<Vec<_>>())
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// One member's answer to the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its member ID.
    pub id: u64,
    /// The leader it knows (0: none).
    pub leader: u64,
    /// Its raft index.
    pub raft_index: u64,
}

impl EtcdCluster {
    /// Starts one member per name and waits until each serves `/health`.
    pub async fn start(names: &[String]) -> Result<Arc<EtcdCluster>> {
        let binaries = tokio::task::spawn_blocking(crate::binaries::Binaries::ensure)
            .await
            .map_err(|e| Error::Other(format!("building binaries panicked: {e}")))??;
        let dir = tempfile::Builder::new()
            .prefix("baton-e2e-etcd-")
            .tempdir()
            .map_err(io("creating etcd's directory"))?;
        crate::interrupt::scratch(dir.path());
        let pki = crate::pki::etcd(&dir.path().join("pki"))?;
        let ports: Vec<(u16, u16)> = names
            .iter()
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let initial_cluster = names
            .iter()
            .zip(&ports)
            .map(|(n, (_, peer))| format!("{n}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = BTreeMap::new();
        for (name, (client_port, peer_port)) in names.iter().zip(ports) {
            let client = format!("https://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", dir.path().join(name).display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={peer}"),
                format!("--initial-advertise-peer-urls={peer}"),
                format!("--initial-cluster={initial_cluster}"),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=baton-e2e".into(),
                "--client-cert-auth=true".into(),
                format!("--trusted-ca-file={}", pki.ca_cert.display()),
                format!("--cert-file={}", pki.serving.0.display()),
                format!("--key-file={}", pki.serving.1.display()),
                "--listen-metrics-urls=".into(),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ];
            members.insert(
                name.clone(),
                Member {
                    client_port,
                    args,
                    log: dir.path().join(format!("{name}.log")),
                    proc: Mutex::new(None),
                    slow_rejoin: Mutex::new(None),
                    started: Mutex::new(None),
                },
            );
        }
        let http = client(&pki)?;
        let cluster = Arc::new(EtcdCluster {
            members,
            binary: binaries.path("etcd"),
            pki,
            http,
            dir,
        });
        for name in names {
            cluster.start_member(name)?;
        }
        let started = Instant::now();
        for name in names {
            while cluster.status(name).await.is_none_or(|s| s.leader == 0) {
                if started.elapsed() > READY_TIMEOUT {
                    return Err(Error::Other(format!(
                        "etcd member {name} not healthy within {READY_TIMEOUT:?}:\n{}",
                        crate::process::log_tail(&cluster.members[name].log, 20)
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(cluster)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .values()
            .map(|m| format!("https://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The members' names.
    pub fn names(&self) -> Vec<String> {
        self.members.keys().cloned().collect()
    }

    /// Starts `name`'s process (again, on its data directory).
    pub fn start_member(&self, name: &str) -> Result<()> {
        let m = self
            .members
            .get(name)
            .ok_or_else(|| Error::Other(format!("no etcd member {name}")))?;
        let mut proc = m
            .proc
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if proc.is_none() {
            *proc = Some(Supervised::spawn(
                &format!("etcd-{name}"),
                &self.binary,
                &m.args,
                m.log.clone(),
            )?);
            *m.started
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        }
        Ok(())
    }

    /// Stops `name`'s process.
    pub fn stop_member(&self, name: &str) {
        if let Some(m) = self.members.get(name) {
            let taken = m
                .proc
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(mut p) = taken {
                p.stop();
            }
        }
    }

    /// From now on, `name`'s process stays down `extra` longer than its machine.
    pub fn slow_rejoin(&self, name: &str, extra: Duration) {
        if let Some(m) = self.members.get(name) {
            *m.slow_rejoin
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(extra);
        }
    }

    /// When `name`'s process was last started.
    pub fn started(&self, name: &str) -> Option<Instant> {
        *self
            .members
            .get(name)?
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `name`'s status, if it answers; `None` when it is down (its process stopped, or
    /// not serving). A member between leaders still answers (with leader 0): a leader
    /// move is not an outage.
    pub async fn status(&self, name: &str) -> Option<MemberStatus> {
        let base = format!("https://127.0.0.1:{}", self.members.get(name)?.client_port);
        let status: serde_json::Value = self
            .http
            .post(format!("{base}/v3/maintenance/status"))
            .json(&serde_json::json!({}))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let number = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse().ok());
        Some(MemberStatus {
            id: number(&status["header"]["member_id"])?,
            leader: number(&status["leader"]).unwrap_or(0),
            raft_index: number(&status["raftIndex"]).unwrap_or(0),
        })
    }

    /// Writes one key through any member that takes it (to keep raft indices moving).
    pub async fn put(&self, key: &str, value: &str) -> bool {
        use base64::Engine;
        let encode = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        for url in self.endpoints() {
            let ok = self
                .http
                .post(format!("{url}/v3/kv/put"))
                .json(&serde_json::json!({"key": encode(key), "value": encode(value)}))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return true;
            }
        }
        false
    }
}

impl crate::fleet::MachineHooks for EtcdCluster {
    fn down(&self, node: &str) {
        self.stop_member(node);
    }

    fn up(&self, node: &str) {
        let Some(m) = self.members.get(node) else {
            return;
        };
        let extra = *m
            .slow_rejoin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(extra) = extra {
            std::thread::sleep(extra);
        }
        if let Err(e) = self.start_member(node) {
            eprintln!("[etcd] {node}: cannot start its member again: {e}");
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for name in self.names() {
            self.stop_member(&name);
        }
    }
}

/// A client trusting etcd's CA and presenting baton's client certificate.
fn client(pki: &EtcdPki) -> Result<reqwest::Client> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(io(format!("reading {}", p.display())));
    let ca = reqwest::Certificate::from_pem(&read(&pki.ca_cert)?)
        .map_err(|e| Error::Other(e.to_string()))?;
    let mut pem = read(&pki.client.0)?;
    pem.extend(read(&pki.client.1)?);
    let identity = reqwest::Identity::from_pem(&pem).map_err(|e| Error::Other(e.to_string()))?;
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .identity(identity)
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| Error::Other(e.to_string()))
}
