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
    /// Patches the agent's own Node.
    fn report(&mut self, patch: &Value) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// Saves the record on disk.
    fn save(&mut self, record: &Record) -> Result<(), AgentError>;
    /// Runs a command step.
    fn run(&mut self, step: Step) -> impl Future<Output = Result<(), command::Failure>> + Send;
    /// Confirms on fresh reads that the grant is live ([`crds::grant::check`]).
    fn confirm_grant(&mut self) -> impl Future<Output = Result<(), Unconfirmed>> + Send;
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
    /// it changed, and does the effect through `host`.
    pub async fn turn<H: Host>(&mut self, host: &mut H, node: &Node) -> Result<Turn, AgentError> {
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
        if let Some(patch) = node::patch(node, &decision.report, &status, &self.boot_id, checked) {
            info!(state = %decision.report.state, "reporting");
            if let Err(e) = host.report(&patch).await {
                warn!(error = %e, "could not update the node; retrying on the next event");
            }
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
                if let Err(why) = host.run(Step::BeforeReboot).await {
                    error!(error = %why, "a before-reboot command failed; not rebooting");
                    self.conclude(host, crds::AgentState::Failed, why.to_string())?;
                    return Ok(Turn::Again);
                }
                // The commands may have taken minutes: the grant must still be live, on
                // fresh reads and not on the watch, right before the reboot.
                if let Err(why) = host.confirm_grant().await {
                    warn!(reason = %why, "the grant is not live: not rebooting");
                    self.memory.refused = Some((self.boot_id.clone(), seen.cordoned));
                    self.record.pending = None;
                    host.save(&self.record)?;
                    return Ok(Turn::Again);
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
                self.memory.health = Some(host.run(Step::HealthCheck).await);
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

    async fn report(&mut self, patch: &Value) -> Result<(), AgentError> {
        Ok(node::apply(&self.api, &self.settings.node_name, patch).await?)
    }

    fn save(&mut self, record: &Record) -> Result<(), AgentError> {
        self.settings.record.save(record)
    }

    async fn run(&mut self, step: Step) -> Result<(), command::Failure> {
        let s = &self.settings;
        match step {
            Step::BeforeReboot => {
                command::run_all("before-reboot command", &s.before_reboot, s.command_timeout).await
            }
            Step::HealthCheck => {
                command::run_all("health check", &s.health_checks, s.command_timeout).await
            }
        }
    }

    async fn confirm_grant(&mut self) -> Result<(), Unconfirmed> {
        confirm_grant(&self.api, &self.leases, &self.settings).await
    }

    async fn reboot(&mut self) -> Result<Rebooted, AgentError> {
        self.settings.rebooter.reboot().await
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
            let Some(n) = current.as_ref() else {
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
