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
    lifecycle::{self, Effect, Inputs, Outcome, Record, Update},
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

/// A reboot requested from a real machine is not requested again for this long.
const REBOOT_RETRY: Duration = Duration::from_secs(300);

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
        let mut health: Option<Result<(), command::Failure>> = None;
        let mut stage_failure: Option<(crds::protocol::Version, String)> = None;
        let mut desired_now: Option<crate::backend::Desired> = None;
        let mut reboot_requested: Option<std::time::Instant> = None;
        let mut refused: Option<(BootId, bool)> = None;
        let mut again = false;
        info!(pending = record.pending.is_some(), "agent started");
        loop {
            if !again {
                tokio::select! {
                    event = nodes.next() => match event {
                        Some(Ok(n)) => current = Some(n),
                        Some(Err(e)) => warn!(error = %e, "watching the node failed; retrying"),
                        None => return Err(AgentError::Other("the node watch ended".into())),
                    },
                    Some(()) = changes.next() => {}
                    () = tokio::time::sleep(s.check_interval) => {
                        // A failing health check, or a failed staging (a download cut
                        // short resumes), is tried again on the next look.
                        if matches!(health, Some(Err(_))) {
                            health = None;
                        }
                        stage_failure = None;
                        refused = None;
                    }
                }
            }
            again = false;
            let Some(n) = current.as_ref() else { continue };
            let (desired, desired_note) = node::desired(n);
            desired_now.clone_from(&desired);
            let (grant, grant_note) = node::grant(n);
            // A refused grant is judged afresh once the node shows another grant (or
            // none), or baton's cordon changed, or at the next local re-check.
            if refused.as_ref().is_some_and(|(boot, cordon)| {
                grant.as_ref() != Some(boot) || *cordon != node::cordoned(n)
            }) {
                refused = None;
            }
            let retry = node::retry(n);
            let mut status = match backend.status(desired.as_ref()).await {
                Ok(status) => status,
                Err(e) => {
                    warn!(error = %e, "reading the backend failed");
                    lifecycle::Status {
                        note: Some(format!("cannot read the update backend: {e}")),
                        ..Default::default()
                    }
                }
            };
            if let (Update::Available(v), Some((failed, why))) = (&status.update, &stage_failure)
                && v == failed
            {
                status.update = Update::Broken(why.clone());
            }
            if status.note.is_none() {
                status.note = grant_note.or(desired_note);
            }
            let now = Timestamp::now();
            let decision = lifecycle::decide(&Inputs {
                boot_id: &s.boot_id,
                status: &status,
                record: &record,
                grant: grant.as_ref(),
                refused: refused.as_ref().map(|(boot, _)| boot),
                node_ready: node::ready(n),
                health: health.as_ref(),
                retry: retry.as_ref(),
                verify_timeout: SignedDuration::try_from(s.verify_timeout)
                    .unwrap_or(SignedDuration::MAX),
                now,
            });
            let wanted = node::wanted(&decision.report, &status, &s.boot_id);
            if let Some(patch) = node::patch(n, &wanted, status.last_checked.unwrap_or(now)) {
                info!(state = %decision.report.state, "reporting");
                if let Err(e) = node::apply(&api, &s.node_name, &patch).await {
                    warn!(error = %e, "could not update the node; retrying on the next event");
                }
            }
            match decision.effect {
                Effect::Wait => {}
                Effect::Stage(version) => {
                    info!(%version, "staging");
                    let wanted = desired_now
                        .clone()
                        .filter(|d| d.version == version)
                        .unwrap_or(crate::backend::Desired {
                            version: version.clone(),
                            release: None,
                        });
                    match backend.stage(&wanted).await {
                        Ok(()) => stage_failure = None,
                        Err(e) => {
                            error!(%version, error = %e, "staging failed");
                            stage_failure = Some((version, format!("staging failed: {e}")));
                        }
                    }
                    again = true;
                }
                Effect::Reboot(pending) => {
                    if reboot_requested.is_some_and(|t| t.elapsed() < REBOOT_RETRY) {
                        continue;
                    }
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
                        refused = Some((s.boot_id.clone(), node::cordoned(n)));
                        record.pending = None;
                        s.record.save(&record)?;
                        again = true;
                        continue;
                    }
                    info!("rebooting");
                    match s.rebooter.reboot().await {
                        Ok(Rebooted::Simulated) => return Ok(Exit::Rebooted),
                        Ok(Rebooted::Requested) => {
                            reboot_requested = Some(std::time::Instant::now())
                        }
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
                    health = Some(
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

/// Confirms on fresh reads of the Node and its reboot Lease that the grant is live
/// ([`crds::grant::check`]). Any read that fails or times out is a refusal.
async fn confirm_grant(api: &Api<Node>, leases: &Api<Lease>, s: &Settings) -> Result<(), String> {
    let reads = async {
        let node = api.get(&s.node_name).await;
        let lease = leases.get_opt(&crds::grant::lease_name(&s.node_name)).await;
        (node, lease)
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, reads).await {
        Err(_) => Err(format!(
            "reading the node and its Lease took over {CONFIRM_TIMEOUT:?}"
        )),
        Ok((Err(e), _)) => Err(format!("cannot read the node: {e}")),
        Ok((_, Err(e))) => Err(format!("cannot read the reboot Lease: {e}")),
        Ok((Ok(node), Ok(lease))) => {
            crds::grant::check(&node, lease.as_ref(), &s.boot_id).map_err(|e| e.to_string())
        }
    }
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
