//! A watcher of etcd's quorum during a rollout: whether every member is up (answers
//! its status) and the leader each reports, polled every 100 ms, beside the reboot Leases baton grants, so a test
//! can check what was down when, and who led just before.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use harness::etcd::EtcdCluster;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

/// One poll of every member.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When.
    pub at: Instant,
    /// Members that did not answer their status (stopped, or not serving).
    pub down: Vec<String>,
    /// The leader's member ID, as the healthy members report it (0: none known).
    pub leader: u64,
    /// Nodes holding a reboot Lease.
    pub leased: Vec<String>,
}

/// The running watcher; [`QuorumWatcher::stop`] returns what it saw.
#[derive(Debug)]
pub struct QuorumWatcher {
    samples: Arc<Mutex<Vec<Sample>>>,
    ids: Arc<Mutex<BTreeMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

/// What the watcher saw.
#[derive(Debug, Clone)]
pub struct Quorum {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// Each member's ID, by name.
    pub ids: BTreeMap<String, u64>,
}

impl QuorumWatcher {
    /// Starts polling `etcd` and the reboot Leases in `namespace`, and writing a key
    /// every 50 ms (so that raft indices move, as on a live cluster).
    pub fn start(etcd: Arc<EtcdCluster>, client: Client, namespace: &str) -> QuorumWatcher {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let ids = Arc::new(Mutex::new(BTreeMap::new()));
        let leases: Api<Lease> = Api::namespaced(client, namespace);
        let task = {
            let (etcd, samples, ids) = (Arc::clone(&etcd), Arc::clone(&samples), Arc::clone(&ids));
            tokio::spawn(async move {
                loop {
                    let statuses = futures::future::join_all(etcd.names().into_iter().map(|n| {
                        let etcd = Arc::clone(&etcd);
                        async move { (n.clone(), etcd.status(&n).await) }
                    }))
                    .await;
                    let leased = crate::scenario::lease_holders(&leases).await;
                    let mut down = Vec::new();
                    let mut leader = 0;
                    for (name, status) in statuses {
                        match status {
                            Some(s) => {
                                lock(&ids).insert(name, s.id);
                                leader = leader.max(s.leader);
                            }
                            None => down.push(name),
                        }
                    }
                    lock(&samples).push(Sample {
                        at: Instant::now(),
                        down,
                        leader,
                        leased,
                    });
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let writer = tokio::spawn(async move {
            for i in 0u64.. {
                etcd.put("baton-e2e/load", &i.to_string()).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        QuorumWatcher {
            samples,
            ids,
            task,
            writer,
        }
    }

    /// Stops it and returns what it saw.
    pub fn stop(self) -> Quorum {
        self.task.abort();
        self.writer.abort();
        Quorum {
            samples: lock(&self.samples).clone(),
            ids: lock(&self.ids).clone(),
        }
    }
}

impl Quorum {
    /// The most members down in one sample.
    pub fn max_down(&self) -> usize {
        self.samples.iter().map(|s| s.down.len()).max().unwrap_or(0)
    }

    /// Each stretch a member was down: (member, the leader in the last sample before it
    /// went down, when it went down, when it answered healthy again).
    pub fn outages(&self) -> Vec<(String, u64, Instant, Option<Instant>)> {
        let mut out = Vec::new();
        for name in self.ids.keys() {
            let mut leader_before = 0;
            let mut start = None;
            for s in &self.samples {
                let is_down = s.down.contains(name);
                match (is_down, start) {
                    (true, None) => start = Some(s.at),
                    (false, Some(t)) => {
                        out.push((name.clone(), leader_before, t, Some(s.at)));
                        start = None;
                    }
                    (false, None) => leader_before = s.leader,
                    (true, Some(_)) => {}
                }
            }
            if let Some(t) = start {
                out.push((name.clone(), leader_before, t, None));
            }
        }
        out.sort_by_key(|o| o.2);
        out
    }

    /// When `node` first held a reboot Lease.
    pub fn first_leased(&self, node: &str) -> Option<Instant> {
        self.samples
            .iter()
            .find(|s| s.leased.iter().any(|l| l == node))
            .map(|s| s.at)
    }

    /// The leaders seen, in order, without repeats, by member name.
    pub fn leaders(&self) -> Vec<String> {
        let names: BTreeMap<u64, &String> = self.ids.iter().map(|(n, id)| (*id, n)).collect();
        let mut out: Vec<String> = Vec::new();
        for s in &self.samples {
            if let Some(name) = names.get(&s.leader)
                && out.last() != Some(*name)
            {
                out.push((*name).clone());
            }
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
