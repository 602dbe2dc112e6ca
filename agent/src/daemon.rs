//! The agent's event loop: watches its own Node (one watch, by field selector), wakes
//! on backend signals or a local re-check, and takes a turn of the [`Agent`]: it asks
//! [`lifecycle::decide`] what to do, patches its Node only when what it reports
//! changed, and does the effect through its [`Host`] (the real [`Machine`] here, a
//! model one in the simulation).

use std::{future::Future, time::Duration};

use futures::{StreamExt, stream::BoxStream};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{Instrument, error, info, info_span, warn};

use crds::protocol::BootId;

use serde_json::Value;

use crate::{
    backend::{Backend, Desired},
    command::{self, Command},
    error::AgentError,
    lifecycle::{self, Effect, Inputs, Memory, Outcome, Record},
    node,
    reboot::{Rebooted, Rebooter},
    record::RecordFile,
};

/// How a run of the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A simulated reboot: start the agent again to "boot".
    Rebooted,
}

/// What the daemon needs besides its backend.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Its Node.
    pub node_name: String,
    /// The operator's namespace, where the reboot Leases are.
    pub lease_namespace: String,
    /// The boot it runs under.
    pub boot_id: BootId,
    /// Its record.
    pub record: RecordFile,
    /// How to reboot.
    pub rebooter: Rebooter,
    /// Health checks after a boot.
    pub health_checks: Vec<Command>,
    /// Commands before a reboot.
    pub before_reboot: Vec<Command>,
    /// The bound on each command.
    pub command_timeout: Duration,
    /// Local re-check period.
    pub check_interval: Duration,
    /// The bound on verifying a new boot.
    pub verify_timeout: Duration,
}

/// A command step of the lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The before-reboot commands.
    BeforeReboot,
    /// The health checks after a boot.
    HealthCheck,
}

/// What the agent acts through: its update backend, its Node, its record on disk, its
/// commands and its reboot. The DaemonSet's agent runs on [`Machine`]; the
/// deterministic simulation (`sim`) provides a model machine.
pub trait Host: Send {
    /// Now, on the node's clock.
    fn now(&self) -> Timestamp;
    /// The backend's report, given what the operator published.
    fn status(
        &mut self,
        desired: Option<&Desired>,
    ) -> impl Future<Output = Result<lifecycle::Status, AgentError>> + Send;
    /// Stages `desired` into the inactive slot.
    fn stage(&mut self, desired: &Desired) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// Marks the booted slot good.
    fn commit(&mut self) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// Patches the agent's own Node; returns the Node as the API server wrote it.
    fn report(&mut self, patch: &Value) -> impl Future<Output = Result<Node, AgentError>> + Send;
    /// Saves the record on disk.
    fn save(&mut self, record: &Record) -> Result<(), AgentError>;
    /// Runs the health checks after a boot.
    fn check_health(&mut self) -> impl Future<Output = Result<(), command::Failure>> + Send;
    /// Gets ready to reboot: sends `report` (the node says it reboots) while the
    /// before-reboot commands run, then, once both are over, confirms on fresh reads
    /// that the grant is live ([`crds::grant::check`]): the confirmation is the last
    /// thing before the reboot, however long the report took.
    fn prepare_reboot(&mut self, report: Option<&Value>) -> impl Future<Output = Prepared> + Send;
    /// Reboots.
    fn reboot(&mut self) -> impl Future<Output = Result<Rebooted, AgentError>> + Send;
}

/// What one turn of the agent leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Decide again at once (an effect changed something the decision reads).
    Again,
    /// Wait for the next event.
    Wait,
    /// The machine is rebooting (simulated: start the agent again to "boot").
    Rebooted,
}

/// The agent's state in this process: the boot it runs under, its record (also on
/// disk) and its memory.
#[derive(Debug, Clone)]
pub struct Agent {
    /// The boot it runs under.
    pub boot_id: BootId,
    /// Its record, as last saved.
    pub record: Record,
    /// What it remembers in this process only.
    pub memory: Memory,
    /// The bound on verifying a new boot.
    pub verify_timeout: SignedDuration,
}

impl Agent {
    /// One turn: reads its Node, asks [`lifecycle::decide`] what to do, reports it when
    /// it changed, and does the effect through `host`. A report that is written
    /// replaces `node` with the Node the API server returned, so the turns that follow
    /// at once (before the watch shows the write) do not send the same report again.
    pub async fn turn<H: Host>(
        &mut self,
        host: &mut H,
        node: &mut Node,
    ) -> Result<Turn, AgentError> {
        let seen = node::seen(node);
        self.memory.saw(seen.grant.as_ref(), seen.cordoned);
        let mut status = match host.status(seen.desired.as_ref()).await {
            Ok(status) => status,
            Err(e) => {
                warn!(error = %e, "reading the backend failed");
                lifecycle::Status {
                    note: Some(format!("cannot read the update backend: {e}")),
                    ..Default::default()
                }
            }
        };
        if status.note.is_none() {
            status.note.clone_from(&seen.note);
        }
        let now = host.now();
        let decision = lifecycle::decide(&Inputs {
            boot_id: &self.boot_id,
            status: &status,
            record: &self.record,
            grant: seen.grant.as_ref(),
            memory: &self.memory,
            node_ready: seen.ready,
            retry: seen.retry.as_ref(),
            verify_timeout: self.verify_timeout,
            now,
        });
        let checked = status.last_checked.unwrap_or(now);
        let mut patch = node::patch(node, &decision.report, &status, &self.boot_id, checked);
        if patch.is_some() {
            info!(state = %decision.report.state, "reporting");
        }
        // Before a reboot the report goes out with the reboot's preparation.
        if !matches!(decision.effect, Effect::Reboot(_))
            && let Some(patch) = patch.take()
        {
            let written = host.report(&patch).await;
            took(written, node);
        }
        match decision.effect {
            Effect::Wait => Ok(Turn::Wait),
            Effect::Stage(version) => {
                info!(%version, "staging");
                let wanted = seen
                    .desired
                    .clone()
                    .filter(|d| d.version == version)
                    .unwrap_or(Desired {
                        version: version.clone(),
                        release: None,
                    });
                match host.stage(&wanted).await {
                    Ok(()) => self.memory.stage_failure = None,
                    Err(e) => {
                        error!(%version, error = %e, "staging failed");
                        self.memory.stage_failure = Some((version, format!("staging failed: {e}")));
                    }
                }
                Ok(Turn::Again)
            }
            Effect::Reboot(pending) => {
                self.record.pending = Some(pending);
                host.save(&self.record)?;
                // The commands may take minutes: the grant must still be live, on fresh
                // reads and not on the watch, right before the reboot.
                let prepared = host.prepare_reboot(patch.as_ref()).await;
                if let Some(written) = prepared.report {
                    took(written, node);
                }
                match prepared.ready {
                    Ok(()) => {}
                    Err(NotReady::Command(why)) => {
                        error!(error = %why, "a before-reboot command failed; not rebooting");
                        self.conclude(host, crds::AgentState::Failed, why.to_string())?;
                        return Ok(Turn::Again);
                    }
                    Err(NotReady::Unconfirmed(why)) => {
                        warn!(reason = %why, "the grant is not live: not rebooting");
                        self.memory.refused = Some((self.boot_id.clone(), seen.cordoned));
                        self.record.pending = None;
                        host.save(&self.record)?;
                        return Ok(Turn::Again);
                    }
                }
                info!("rebooting");
                match host.reboot().await {
                    Ok(Rebooted::Simulated) => Ok(Turn::Rebooted),
                    Ok(Rebooted::Requested) => {
                        self.memory.reboot_requested = Some(host.now());
                        Ok(Turn::Wait)
                    }
                    Err(e) => {
                        error!(error = %e, "the reboot failed");
                        self.conclude(host, crds::AgentState::Failed, e.to_string())?;
                        Ok(Turn::Again)
                    }
                }
            }
            Effect::Forget => {
                info!("the grant is gone and the boot did not change: asking again");
                self.record.pending = None;
                host.save(&self.record)?;
                Ok(Turn::Again)
            }
            Effect::NoteBoot(at) => {
                info!("booted again: verifying");
                if let Some(p) = self.record.pending.as_mut() {
                    p.booted_seen = Some(at);
                }
                host.save(&self.record)?;
                Ok(Turn::Again)
            }
            Effect::CheckHealth => {
                self.memory.health = Some(host.check_health().await);
                Ok(Turn::Again)
            }
            Effect::Commit => match host.commit().await {
                Ok(()) => {
                    info!("healthy on the new boot: committed");
                    self.conclude(host, crds::AgentState::Done, String::new())?;
                    Ok(Turn::Again)
                }
                Err(e) => {
                    warn!(error = %e, "marking the boot good failed; retrying");
                    Ok(Turn::Wait)
                }
            },
            Effect::Retry => {
                // The mark is removed with the next report (`Report::drop_retry`).
                info!("an admin asked for a retry: dropping this boot's verdict");
                self.record.outcome = None;
                host.save(&self.record)?;
                Ok(Turn::Again)
            }
            Effect::Conclude(outcome) => {
                warn!(state = %outcome.state, message = %outcome.message, "update concluded");
                self.record.outcome = Some(outcome);
                self.record.pending = None;
                host.save(&self.record)?;
                Ok(Turn::Again)
            }
        }
    }

    fn conclude<H: Host>(
        &mut self,
        host: &mut H,
        state: crds::AgentState,
        message: String,
    ) -> Result<(), AgentError> {
        self.record.outcome = Some(Outcome {
            boot: self.boot_id.clone(),
            state,
            message,
        });
        self.record.pending = None;
        host.save(&self.record)
    }
}

/// A report's outcome: the Node as written replaces the turn's Node; a failure is
/// logged and the report is sent again on the next event.
fn took(written: Result<Node, AgentError>, node: &mut Node) {
    match written {
        Ok(written) => *node = written,
        Err(e) => warn!(error = %e, "could not update the node; retrying on the next event"),
    }
}

/// What getting ready to reboot gave ([`Host::prepare_reboot`]).
#[derive(Debug)]
pub struct Prepared {
    /// The report's outcome, when there was one to send.
    pub report: Option<Result<Node, AgentError>>,
    /// Whether the node may reboot now.
    pub ready: Result<(), NotReady>,
}

/// Why a node that was to reboot does not.
#[derive(Debug)]
pub enum NotReady {
    /// A before-reboot command failed.
    Command(command::Failure),
    /// The grant is not confirmed.
    Unconfirmed(Unconfirmed),
}

/// The real machine: the backend, the API server, the record file, the commands and
/// the rebooter.
pub struct Machine<B> {
    backend: B,
    api: Api<Node>,
    leases: Api<Lease>,
    settings: Settings,
}

impl<B: Backend> Host for Machine<B> {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    async fn status(&mut self, desired: Option<&Desired>) -> Result<lifecycle::Status, AgentError> {
        self.backend.status(desired).await
    }

    async fn stage(&mut self, desired: &Desired) -> Result<(), AgentError> {
        self.backend.stage(desired).await
    }

    async fn commit(&mut self) -> Result<(), AgentError> {
        self.backend.commit().await
    }

    async fn report(&mut self, patch: &Value) -> Result<Node, AgentError> {
        Ok(node::apply(&self.api, &self.settings.node_name, patch).await?)
    }

    async fn prepare_reboot(&mut self, report: Option<&Value>) -> Prepared {
        let s = &self.settings;
        let send = async {
            match report {
                Some(patch) => Some(
                    node::apply(&self.api, &s.node_name, patch)
                        .await
                        .map_err(AgentError::from),
                ),
                None => None,
            }
        };
        let commands = run_step(s, Step::BeforeReboot);
        let (report, commands) = futures::future::join(send, commands).await;
        let ready = match commands {
            Ok(()) => confirm_grant(&self.api, &self.leases, s)
                .await
                .map_err(NotReady::Unconfirmed),
            Err(why) => Err(NotReady::Command(why)),
        };
        Prepared { report, ready }
    }

    fn save(&mut self, record: &Record) -> Result<(), AgentError> {
        self.settings.record.save(record)
    }

    async fn check_health(&mut self) -> Result<(), command::Failure> {
        run_step(&self.settings, Step::HealthCheck).await
    }

    async fn reboot(&mut self) -> Result<Rebooted, AgentError> {
        self.settings.rebooter.reboot().await
    }
}

/// Runs a command step's commands, each within the bound.
async fn run_step(s: &Settings, step: Step) -> Result<(), command::Failure> {
    match step {
        Step::BeforeReboot => {
            command::run_all("before-reboot command", &s.before_reboot, s.command_timeout).await
        }
        Step::HealthCheck => {
            command::run_all("health check", &s.health_checks, s.command_timeout).await
        }
    }
}

/// Runs the agent until a simulated reboot (or a fatal error).
pub async fn run<B: Backend>(
    client: Client,
    mut backend: B,
    s: Settings,
) -> Result<Exit, AgentError> {
    let span = info_span!("node", node = %s.node_name, boot = %s.boot_id);
    async move {
        let api: Api<Node> = Api::all(client.clone());
        let leases: Api<Lease> = Api::namespaced(client, &s.lease_namespace);
        let mut nodes = watcher(
            api.clone(),
            watcher::Config::default().fields(&format!("metadata.name={}", s.node_name)),
        )
        .default_backoff()
        .applied_objects()
        .boxed();
        let mut changes: BoxStream<'static, ()> = backend
            .changes()
            .unwrap_or_else(|| futures::stream::pending().boxed());
        let record = s.record.load()?;
        let check_interval = s.check_interval;
        let mut agent = Agent {
            boot_id: s.boot_id.clone(),
            record,
            memory: Memory::default(),
            verify_timeout: SignedDuration::try_from(s.verify_timeout)
                .unwrap_or(SignedDuration::MAX),
        };
        info!(pending = agent.record.pending.is_some(), "agent started");
        let mut machine = Machine {
            backend,
            api,
            leases,
            settings: s,
        };
        let mut current: Option<Node> = None;
        let mut again = false;
        // Re-checks keep their own clock: Node events (kubelet's, the operator's, an
        // admin's) more often than the interval must not put them off for good.
        let mut recheck =
            tokio::time::interval_at(tokio::time::Instant::now() + check_interval, check_interval);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !again {
                tokio::select! {
                    event = nodes.next() => match event {
                        Some(Ok(n)) => current = Some(n),
                        Some(Err(e)) => warn!(error = %e, "watching the node failed; retrying"),
                        None => return Err(AgentError::WatchEnded),
                    },
                    Some(()) = changes.next() => {}
                    _ = recheck.tick() => agent.memory.recheck(),
                }
            }
            let Some(n) = current.as_mut() else {
                again = false;
                continue;
            };
            match agent.turn(&mut machine, n).await? {
                Turn::Again => again = true,
                Turn::Wait => again = false,
                Turn::Rebooted => return Ok(Exit::Rebooted),
            }
        }
    }
    .instrument(span)
    .await
}

/// The bound on the fresh reads that confirm a grant; a read that takes longer is no
/// confirmation.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a grant was not confirmed right before a reboot.
#[derive(Debug, thiserror::Error)]
pub enum Unconfirmed {
    /// The fresh reads show no live grant.
    #[error(transparent)]
    NotLive(#[from] crds::grant::NotLive),
    /// A read failed.
    #[error("cannot read the {what}: {message}")]
    Read {
        /// The node or its Lease.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// The reads took too long.
    #[error("reading the node and its Lease took over {0:?}")]
    TimedOut(Duration),
}

/// Confirms on fresh reads of the Node and its reboot Lease that the grant is live
/// ([`crds::grant::check`]). Any read that fails or times out is a refusal.
async fn confirm_grant(
    api: &Api<Node>,
    leases: &Api<Lease>,
    s: &Settings,
) -> Result<(), Unconfirmed> {
    // Both at once: one round trip before the reboot, not two, inside the grant's hold.
    let lease_name = crds::grant::lease_name(&s.node_name);
    let reads = futures::future::join(api.get(&s.node_name), leases.get_opt(&lease_name));
    let read = |what| {
        move |e: kube::Error| Unconfirmed::Read {
            what,
            message: e.to_string(),
        }
    };
    let (node, lease) = tokio::time::timeout(CONFIRM_TIMEOUT, reads)
        .await
        .map_err(|_| Unconfirmed::TimedOut(CONFIRM_TIMEOUT))?;
    let node = node.map_err(read("node"))?;
    let lease = lease.map_err(read("reboot Lease"))?;
    Ok(crds::grant::check(&node, lease.as_ref(), &s.boot_id)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{Pending, Status, Update};
    use crds::protocol::{Slot, Version};

    /// A host whose API server holds one Node in memory and applies merge patches.
    struct Fake {
        node: Node,
        reports: Vec<Value>,
        status: Status,
    }

    impl Host for Fake {
        fn now(&self) -> Timestamp {
            "2026-12-02T06:00:00Z".parse().unwrap()
        }
        async fn status(&mut self, _: Option<&Desired>) -> Result<lifecycle::Status, AgentError> {
            Ok(self.status.clone())
        }
        async fn stage(&mut self, _: &Desired) -> Result<(), AgentError> {
            Ok(())
        }
        async fn commit(&mut self) -> Result<(), AgentError> {
            Ok(())
        }
        async fn report(&mut self, patch: &Value) -> Result<Node, AgentError> {
            self.reports.push(patch.clone());
            let mut json = serde_json::to_value(&self.node).unwrap();
            json_patch::merge(&mut json, patch);
            self.node = serde_json::from_value(json).unwrap();
            Ok(self.node.clone())
        }
        fn save(&mut self, _: &Record) -> Result<(), AgentError> {
            Ok(())
        }
        async fn check_health(&mut self) -> Result<(), command::Failure> {
            Ok(())
        }
        async fn prepare_reboot(&mut self, _: Option<&Value>) -> Prepared {
            unreachable!("no reboot in this test")
        }
        async fn reboot(&mut self) -> Result<Rebooted, AgentError> {
            unreachable!("no reboot in this test")
        }
    }

    #[tokio::test]
    async fn turns_that_follow_each_other_compare_with_the_node_their_report_wrote() {
        let v2 = Version::new("2.0.0").unwrap();
        let b = Slot::new("B").unwrap();
        let ready: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        let mut host = Fake {
            node: ready.clone(),
            reports: Vec::new(),
            status: Status {
                current_version: Some(v2.clone()),
                slot: Some(b.clone()),
                update: Update::Idle,
                ..Status::default()
            },
        };
        let mut agent = Agent {
            boot_id: BootId::new("b2").unwrap(),
            record: Record {
                pending: Some(Pending {
                    from_boot: BootId::new("b1").unwrap(),
                    version: Some(v2),
                    slot: Some(b),
                    previous_version: None,
                    previous_slot: None,
                    booted_seen: None,
                }),
                outcome: None,
            },
            memory: lifecycle::Memory::default(),
            verify_timeout: SignedDuration::from_mins(10),
        };
        // The watch shows nothing new between the turns: the boot is noted, the health
        // checks pass, the slot is committed, and Done is reported.
        let mut node = ready;
        let mut turns = 0;
        while agent.turn(&mut host, &mut node).await.unwrap() == Turn::Again {
            turns += 1;
            assert!(turns < 10, "the turns end");
        }
        let states: Vec<&str> = host
            .reports
            .iter()
            .filter_map(|p| p["metadata"]["annotations"][crds::protocol::STATE.name].as_str())
            .collect();
        assert_eq!(states, ["Verifying", "Done"], "{:#?}", host.reports);
        assert_eq!(host.reports.len(), 2, "no report is sent twice");
    }
}
