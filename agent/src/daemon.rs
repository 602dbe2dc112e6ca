//! The agent's event loop: watches its own Node (one watch, by field selector), wakes
//! on backend signals or a local re-check, asks [`lifecycle::decide`] what to do, does
//! it, and patches its Node only when what it reports changed.

use std::time::Duration;

use futures::{StreamExt, stream::BoxStream};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{Instrument, error, info, info_span, warn};

use crds::protocol::BootId;

use crate::{
    backend::Backend,
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
        let mut record = s.record.load()?;
        let mut current: Option<Node> = None;
        let mut memory = Memory::default();
        let mut again = false;
        info!(pending = record.pending.is_some(), "agent started");
        loop {
            if !again {
                tokio::select! {
                    event = nodes.next() => match event {
                        Some(Ok(n)) => current = Some(n),
                        Some(Err(e)) => warn!(error = %e, "watching the node failed; retrying"),
                        None => return Err(AgentError::WatchEnded),
                    },
                    Some(()) = changes.next() => {}
                    () = tokio::time::sleep(s.check_interval) => memory.recheck(),
                }
            }
            again = false;
            let Some(n) = current.as_ref() else { continue };
            let seen = node::seen(n);
            memory.saw(seen.grant.as_ref(), seen.cordoned);
            let mut status = match backend.status(seen.desired.as_ref()).await {
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
            let now = Timestamp::now();
            let decision = lifecycle::decide(&Inputs {
                boot_id: &s.boot_id,
                status: &status,
                record: &record,
                grant: seen.grant.as_ref(),
                memory: &memory,
                node_ready: seen.ready,
                retry: seen.retry.as_ref(),
                verify_timeout: SignedDuration::try_from(s.verify_timeout)
                    .unwrap_or(SignedDuration::MAX),
                now,
            });
            let checked = status.last_checked.unwrap_or(now);
            if let Some(patch) = node::patch(n, &decision.report, &status, &s.boot_id, checked) {
                info!(state = %decision.report.state, "reporting");
                if let Err(e) = node::apply(&api, &s.node_name, &patch).await {
                    warn!(error = %e, "could not update the node; retrying on the next event");
                }
            }
            match decision.effect {
                Effect::Wait => {}
                Effect::Stage(version) => {
                    info!(%version, "staging");
                    let wanted = seen
                        .desired
                        .clone()
                        .filter(|d| d.version == version)
                        .unwrap_or(crate::backend::Desired {
                            version: version.clone(),
                            release: None,
                        });
                    match backend.stage(&wanted).await {
                        Ok(()) => memory.stage_failure = None,
                        Err(e) => {
                            error!(%version, error = %e, "staging failed");
                            memory.stage_failure = Some((version, format!("staging failed: {e}")));
                        }
                    }
                    again = true;
                }
                Effect::Reboot(pending) => {
                    record.pending = Some(pending);
                    s.record.save(&record)?;
                    if let Err(why) = command::run_all(
                        "before-reboot command",
                        &s.before_reboot,
                        s.command_timeout,
                    )
                    .await
                    {
                        error!(error = %why, "a before-reboot command failed; not rebooting");
                        conclude(&mut record, &s, crds::AgentState::Failed, why.to_string())?;
                        again = true;
                        continue;
                    }
                    // The commands may have taken minutes: the grant must still be live,
                    // on fresh reads and not on the watch, right before the reboot.
                    if let Err(why) = confirm_grant(&api, &leases, &s).await {
                        warn!(reason = %why, "the grant is not live: not rebooting");
                        memory.refused = Some((s.boot_id.clone(), seen.cordoned));
                        record.pending = None;
                        s.record.save(&record)?;
                        again = true;
                        continue;
                    }
                    info!("rebooting");
                    match s.rebooter.reboot().await {
                        Ok(Rebooted::Simulated) => return Ok(Exit::Rebooted),
                        Ok(Rebooted::Requested) => memory.reboot_requested = Some(Timestamp::now()),
                        Err(e) => {
                            error!(error = %e, "the reboot failed");
                            conclude(&mut record, &s, crds::AgentState::Failed, e.to_string())?;
                            again = true;
                        }
                    }
                }
                Effect::Forget => {
                    info!("the grant is gone and the boot did not change: asking again");
                    record.pending = None;
                    s.record.save(&record)?;
                    again = true;
                }
                Effect::NoteBoot(at) => {
                    info!("booted again: verifying");
                    if let Some(p) = record.pending.as_mut() {
                        p.booted_seen = Some(at);
                    }
                    s.record.save(&record)?;
                    again = true;
                }
                Effect::CheckHealth => {
                    memory.health = Some(
                        command::run_all("health check", &s.health_checks, s.command_timeout).await,
                    );
                    again = true;
                }
                Effect::Commit => match backend.commit().await {
                    Ok(()) => {
                        info!("healthy on the new boot: committed");
                        conclude(&mut record, &s, crds::AgentState::Done, String::new())?;
                        again = true;
                    }
                    Err(e) => warn!(error = %e, "marking the boot good failed; retrying"),
                },
                Effect::Retry => {
                    // The mark is removed with the next report (`Report::drop_retry`).
                    info!("an admin asked for a retry: dropping this boot's verdict");
                    record.outcome = None;
                    s.record.save(&record)?;
                    again = true;
                }
                Effect::Conclude(outcome) => {
                    warn!(state = %outcome.state, message = %outcome.message, "update concluded");
                    record.outcome = Some(outcome);
                    record.pending = None;
                    s.record.save(&record)?;
                    again = true;
                }
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
    #[error("cannot read the {what}: {source}")]
    Read {
        /// The node or its Lease.
        what: &'static str,
        /// Why.
        source: kube::Error,
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
    let reads = async {
        let node = api.get(&s.node_name).await;
        let lease = leases.get_opt(&crds::grant::lease_name(&s.node_name)).await;
        (node, lease)
    };
    let read = |what| move |source| Unconfirmed::Read { what, source };
    let (node, lease) = tokio::time::timeout(CONFIRM_TIMEOUT, reads)
        .await
        .map_err(|_| Unconfirmed::TimedOut(CONFIRM_TIMEOUT))?;
    let node = node.map_err(read("node"))?;
    let lease = lease.map_err(read("reboot Lease"))?;
    Ok(crds::grant::check(&node, lease.as_ref(), &s.boot_id)?)
}

fn conclude(
    record: &mut Record,
    s: &Settings,
    state: crds::AgentState,
    message: String,
) -> Result<(), AgentError> {
    record.outcome = Some(Outcome {
        boot: s.boot_id.clone(),
        state,
        message,
    });
    record.pending = None;
    s.record.save(record)
}
