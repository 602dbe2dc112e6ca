//! The machines: an A/B OS model per node (two slots, the booted one, the one the next
//! boot tries, a boot counter that gives each boot its id) and the real agent running
//! on it. The agent is `agent::daemon::Agent`, the same code the DaemonSet runs, with
//! this module as its [`Host`]: the backend, the node API, the record on disk, the
//! commands and the reboot are modelled, everything the agent decides is real.
//!
//! A reboot stops the agent; after the machine's down time it boots the slot the
//! bootloader picks (the staged one, or the old one again when the new one fails to
//! boot) under a new boot id, and a fresh agent starts with the record kept on disk.

use std::{sync::Arc, time::Duration};

use agent::{
    backend::Desired,
    command::Failure,
    daemon::{Agent, Host, NotReady, Prepared, Turn, Unconfirmed},
    error::AgentError,
    lifecycle::{Memory, Record, Status, Update},
    reboot::Rebooted,
};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use serde_json::Value;

use crds::protocol::{BootId, Slot, Version};

use crate::{
    apiserver::Kind,
    check::Writer,
    runtime::TaskId,
    watch::{self, Scope},
    world::{Either, Signal, Sim, race},
};

/// One machine.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Its position (part of its boot ids).
    pub index: usize,
    /// Boots so far.
    pub boots: u64,
    /// Running (not rebooting, not deleted).
    pub up: bool,
    /// Its Node was deleted: it never comes back.
    pub deleted: bool,
    /// What each slot holds.
    pub slots: [Option<Version>; 2],
    /// The slot booted.
    pub booted: usize,
    /// The slot the next boot tries.
    pub next: usize,
    /// The agent's record on disk.
    pub record: Record,
    /// The next boot of a new slot fails (the bootloader falls back).
    pub fail_next_boot: bool,
    /// Staging fails while set.
    pub fail_staging: bool,
    /// The before-reboot command fails while set.
    pub before_reboot_fails: bool,
    /// The agent's task and its watch's.
    pub tasks: Vec<TaskId>,
    /// How long staging takes.
    pub stage_time: Duration,
    /// How long a reboot keeps it down.
    pub down_time: Duration,
    /// How long the before-reboot command runs.
    pub before_reboot_time: Duration,
}

impl Machine {
    /// A machine running `version` from slot A.
    pub fn new(
        index: usize,
        version: Version,
        stage_time: Duration,
        down_time: Duration,
    ) -> Machine {
        Machine {
            index,
            boots: 1,
            up: false,
            deleted: false,
            slots: [Some(version), None],
            booted: 0,
            next: 0,
            record: Record::default(),
            fail_next_boot: false,
            fail_staging: false,
            before_reboot_fails: false,
            tasks: Vec::new(),
            stage_time,
            down_time,
            before_reboot_time: Duration::from_secs(2),
        }
    }

    /// The id of the boot it runs now.
    pub fn boot_id(&self) -> BootId {
        BootId::new(format!(
            "{:08x}-0000-4000-8000-{:012x}",
            self.index + 1,
            self.boots
        ))
        .unwrap_or_else(|_| unreachable_boot())
    }

    fn slot_name(i: usize) -> Slot {
        Slot::new(if i == 0 { "SIM-A" } else { "SIM-B" }).unwrap_or_else(|_| unreachable_slot())
    }
}

#[allow(clippy::panic)]
fn unreachable_boot() -> BootId {
    panic!("a formatted boot id is valid")
}

#[allow(clippy::panic)]
fn unreachable_slot() -> Slot {
    panic!("a slot name is valid")
}

/// Boots the machine of `node` and starts its agent.
pub fn boot(sim: &Sim, node: &str) {
    let (boot_id, record, ready_patch) = {
        let mut w = sim.lock();
        let now = sim.rt.now();
        let Some(m) = w.machines.get_mut(node) else {
            return;
        };
        if m.deleted {
            return;
        }
        m.up = true;
        let tried = m.next;
        if tried != m.booted && m.fail_next_boot {
            // The new slot does not come up: the bootloader falls back.
            m.fail_next_boot = false;
            m.next = m.booted;
        } else {
            m.booted = tried;
        }
        let boot = m.boot_id();
        let record = m.record.clone();
        let slot = Machine::slot_name(m.booted);
        w.trace
            .record(now, node, format!("boots {boot} from {slot}"));
        (boot, record, ready(true))
    };
    set_status(sim, node, &ready_patch);
    start_agent(sim, node, boot_id, record);
}

/// The Node status patch for Ready (or not).
pub fn ready(ready: bool) -> Value {
    serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

/// The cluster (the kubelet, the node lifecycle controller) sets a Node's status.
pub fn set_status(sim: &Sim, node: &str, patch: &Value) {
    let mut w = sim.lock();
    let at = sim.rt.now();
    let before = w.api.nodes.get(node).cloned();
    if before.is_none() {
        return;
    }
    let len = w.api.log.len();
    if let Ok(after) = w.api.patch_node(node, patch) {
        w.checker.node_written(
            at,
            &Writer::Cluster,
            node,
            patch,
            before.as_deref(),
            Some(&after),
        );
    }
    if w.api.log.len() != len {
        w.changed();
    }
}

fn start_agent(sim: &Sim, node: &str, boot: BootId, record: Record) {
    let cache = Arc::new(std::sync::Mutex::new(watch::Cache::default()));
    let woken = Arc::new(Signal::default());
    let watch_task = watch::start(
        sim,
        Arc::clone(&cache),
        Scope {
            kind: Kind::Node,
            only_node: Some(node.to_string()),
        },
        Arc::clone(&woken),
    );
    let (s, name) = (sim.clone(), node.to_string());
    let agent_task = sim.rt.spawn(async move {
        let verify_timeout = Duration::from_secs(600);
        let mut agent = Agent {
            boot_id: boot.clone(),
            record,
            memory: Memory::default(),
            verify_timeout: jiff::SignedDuration::try_from(verify_timeout).unwrap_or_default(),
        };
        let mut host = SimHost {
            sim: s.clone(),
            node: name.clone(),
            boot,
        };
        // As the daemon: re-checks on their own clock, whatever Node events come.
        let check_interval = Duration::from_secs(60);
        let mut next_check = s.rt.now() + check_interval;
        let mut again = false;
        let mut held: Option<Node> = None;
        let mut watched: Option<Option<String>> = None;
        loop {
            if !again {
                let due = s.rt.now() >= next_check
                    || matches!(
                        race(woken.wait(), s.rt.sleep_until(next_check)).await,
                        Either::Right(())
                    );
                if due {
                    agent.memory.recheck();
                    next_check = s.rt.now() + check_interval;
                }
            }
            // As the daemon: the agent keeps the Node as its own last report left it
            // until the watch delivers a change.
            let cached = watch::lock(&cache).nodes.get(&name).cloned();
            let delivered = cached.as_ref().map(|n| n.resource_version());
            let current = match held.take() {
                Some(n) if again || delivered == watched => Some(n),
                _ => cached.map(|n| (*n).clone()),
            };
            watched = delivered;
            let Some(mut node) = current else {
                again = false;
                continue;
            };
            let turn = agent.turn(&mut host, &mut node).await;
            held = Some(node);
            match turn {
                Ok(Turn::Again) => again = true,
                Ok(Turn::Wait) => again = false,
                Ok(Turn::Rebooted) => return,
                Err(e) => {
                    let at = s.rt.now();
                    s.lock()
                        .trace
                        .record(at, &name, format!("agent error: {e}"));
                    again = false;
                }
            }
        }
    });
    if let Some(m) = sim.lock().machines.get_mut(node) {
        m.tasks = vec![watch_task, agent_task];
    }
}

/// Stops the agent of `node` (a crash, a reboot, a deleted machine).
pub fn stop_agent(sim: &Sim, node: &str) {
    let tasks = sim
        .lock()
        .machines
        .get_mut(node)
        .map(|m| std::mem::take(&mut m.tasks))
        .unwrap_or_default();
    for t in tasks {
        sim.rt.kill(t);
    }
}

/// The agent's view of its machine and of the API server.
struct SimHost {
    sim: Sim,
    node: String,
    boot: BootId,
}

impl SimHost {
    fn trace(&self, action: String) {
        let at = self.sim.rt.now();
        self.sim.lock().trace.record(at, &self.node, action);
    }

    /// Patches the Node through the model API server, as the agent's report.
    async fn send_report(&self, patch: &Value) -> Result<Node, AgentError> {
        let node = self.node.clone();
        let at = self.sim.rt.now();
        let result = self
            .sim
            .request(&node, false, |w| {
                let before = w.api.nodes.get(&node).cloned();
                let after = w.api.patch_node(&node, patch)?;
                w.checker.node_written(
                    at,
                    &Writer::Agent(node.clone()),
                    &node,
                    patch,
                    before.as_deref(),
                    Some(&after),
                );
                let state = after
                    .annotations()
                    .get(crds::protocol::STATE.name)
                    .cloned()
                    .unwrap_or_default();
                w.trace.record(
                    at,
                    &node,
                    format!(
                        "reports {state} (rv {})",
                        after.resource_version().unwrap_or_default()
                    ),
                );
                Ok((*after).clone())
            })
            .await;
        result.map_err(|e| AgentError::Api(e.to_string()))
    }

    /// The model's before-reboot command: its time, and a failure when injected.
    async fn before_reboot(&self) -> Result<(), Failure> {
        let (time, fails) = self
            .sim
            .lock()
            .machines
            .get(&self.node)
            .map(|m| (m.before_reboot_time, m.before_reboot_fails))
            .unwrap_or_default();
        self.sim.rt.sleep(time).await;
        if fails {
            return Err(Failure::Failed {
                what: "before-reboot command".into(),
                command: "drain-local-cache".into(),
                status: "exit status: 1".into(),
                stderr: "injected failure".into(),
            });
        }
        Ok(())
    }

    /// The fresh reads that confirm the grant, from the model API server.
    async fn confirm_grant(&self) -> Result<(), Unconfirmed> {
        let node = self.node.clone();
        let lease_name = crds::grant::lease_name(&node);
        let read = self
            .sim
            .request(&node, false, |w| {
                let n = w.api.nodes.get(&node).cloned();
                let l = w.api.leases.get(&lease_name).cloned();
                Ok((n, l))
            })
            .await
            .map_err(|e| Unconfirmed::Read {
                what: "node",
                message: e.to_string(),
            })?;
        let (Some(n), lease) = read else {
            return Err(Unconfirmed::Read {
                what: "node",
                message: "404 NotFound".into(),
            });
        };
        Ok(crds::grant::check(&n, lease.as_deref(), &self.boot)?)
    }
}

impl Host for SimHost {
    fn now(&self) -> Timestamp {
        self.sim.wall()
    }

    async fn status(&mut self, desired: Option<&Desired>) -> Result<Status, AgentError> {
        let w = self.sim.lock();
        let m = w
            .machines
            .get(&self.node)
            .ok_or_else(|| AgentError::Backend("no machine".into()))?;
        let current = m.slots[m.booted].clone();
        let other = 1 - m.booted;
        let update = match desired {
            Some(d) if Some(&d.version) == current.as_ref() => Update::Idle,
            Some(d) if m.next == other && m.slots[other].as_ref() == Some(&d.version) => {
                Update::Staged {
                    version: Some(d.version.clone()),
                    slot: Some(Machine::slot_name(other)),
                }
            }
            Some(d) => Update::Available(d.version.clone()),
            None => Update::Idle,
        };
        Ok(Status {
            current_version: current,
            slot: Some(Machine::slot_name(m.booted)),
            update,
            last_checked: None,
            note: None,
        })
    }

    async fn stage(&mut self, desired: &Desired) -> Result<(), AgentError> {
        let time = self
            .sim
            .lock()
            .machines
            .get(&self.node)
            .map(|m| m.stage_time)
            .unwrap_or_default();
        self.sim.rt.sleep(time).await;
        let mut w = self.sim.lock();
        let m = w
            .machines
            .get_mut(&self.node)
            .ok_or_else(|| AgentError::Backend("no machine".into()))?;
        if m.fail_staging {
            return Err(AgentError::Backend(
                "the payload does not verify (injected)".into(),
            ));
        }
        let other = 1 - m.booted;
        m.slots[other] = Some(desired.version.clone());
        m.next = other;
        drop(w);
        self.trace(format!("staged {} into the inactive slot", desired.version));
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), AgentError> {
        let mut w = self.sim.lock();
        if let Some(m) = w.machines.get_mut(&self.node) {
            m.next = m.booted;
        }
        Ok(())
    }

    async fn report(&mut self, patch: &Value) -> Result<Node, AgentError> {
        self.send_report(patch).await
    }

    fn save(&mut self, record: &Record) -> Result<(), AgentError> {
        if let Some(m) = self.sim.lock().machines.get_mut(&self.node) {
            m.record = record.clone();
        }
        Ok(())
    }

    async fn check_health(&mut self) -> Result<(), Failure> {
        Ok(())
    }

    async fn prepare_reboot(&mut self, report: Option<&Value>) -> Prepared {
        let send = async {
            match report {
                Some(patch) => Some(self.send_report(patch).await),
                None => None,
            }
        };
        let (report, commands) = futures::future::join(send, self.before_reboot()).await;
        let ready = match commands {
            Ok(()) => self.confirm_grant().await.map_err(NotReady::Unconfirmed),
            Err(why) => Err(NotReady::Command(why)),
        };
        Prepared { report, ready }
    }

    async fn reboot(&mut self) -> Result<Rebooted, AgentError> {
        let at = self.sim.rt.now();
        let down = {
            let mut w = self.sim.lock();
            let w = &mut *w;
            w.checker
                .rebooting(at, &w.api, &self.node, self.boot.as_str());
            w.trace
                .record(at, &self.node, format!("reboots out of {}", self.boot));
            let Some(m) = w.machines.get_mut(&self.node) else {
                return Ok(Rebooted::Simulated);
            };
            m.up = false;
            m.boots += 1;
            m.down_time
        };
        // The kubelet stops reporting: the node goes NotReady, then comes back.
        let (s, node) = (self.sim.clone(), self.node.clone());
        self.sim.rt.spawn(async move {
            s.rt.sleep(Duration::from_secs(1).min(down)).await;
            set_status(&s, &node, &ready(false));
            s.rt.sleep(down.saturating_sub(Duration::from_secs(1)))
                .await;
            let gone = s.lock().machines.get(&node).is_none_or(|m| m.deleted);
            if !gone {
                boot(&s, &node);
            }
        });
        // The agent's own task ends with the turn that returns Rebooted; its watch goes.
        let watch = self
            .sim
            .lock()
            .machines
            .get_mut(&self.node)
            .map(|m| std::mem::take(&mut m.tasks))
            .and_then(|t| t.first().copied());
        if let Some(t) = watch {
            self.sim.rt.kill(t);
        }
        Ok(Rebooted::Simulated)
    }
}

/// The Node object a machine starts with.
pub fn node_object(name: &str, zone: &str, pool: &str) -> Node {
    let mut node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {
            "topology.kubernetes.io/zone": zone, "pool": pool, "kubernetes.io/hostname": name}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .unwrap_or_default();
    node.metadata.name = Some(name.to_string());
    node
}

/// Starts the agent of `node` again under the same boot (a crashed agent's pod
/// restarting): it reads its record from disk and remembers nothing else.
pub fn restart_agent(sim: &Sim, node: &str) {
    let found = {
        let w = sim.lock();
        w.machines
            .get(node)
            .filter(|m| m.up && !m.deleted && m.tasks.is_empty())
            .map(|m| (m.boot_id(), m.record.clone()))
    };
    if let Some((boot, record)) = found {
        start_agent(sim, node, boot, record);
    }
}
