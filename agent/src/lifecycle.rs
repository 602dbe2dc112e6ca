//! The agent's state machine, as a pure function: from the boot it runs under, what its
//! backend reports, what it recorded before the last reboot, the operator's grant, the
//! node's readiness, the health checks and the time, it says what to report on the
//! Node and what to do next. No I/O and no clock: the daemon supplies both.
//!
//! The rule the peers miss: a reboot happened only when the boot id changed. An agent
//! that restarts under the same boot id is *not* rebooted, whatever it did before.

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crds::{
    AgentState,
    protocol::{BootId, Slot, Version},
};

/// What the backend reports about the OS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The version running now, when the backend knows it.
    pub current_version: Option<Version>,
    /// The slot booted now, when the backend has slots.
    pub slot: Option<Slot>,
    /// Where the next update stands.
    pub update: Update,
    /// When the backend last looked for an update.
    pub last_checked: Option<Timestamp>,
    /// Something worth telling a human (a transient backend error, say).
    pub note: Option<String>,
}

/// Where the next update stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Update {
    /// Nothing to install.
    #[default]
    Idle,
    /// A version the agent should stage (A/B and sim backends, from the release).
    Available(Version),
    /// Being written into the inactive slot.
    Staging(Option<Version>),
    /// Staged: a reboot activates it. `version` is `None` when the backend cannot say
    /// (a kured sentinel file); `slot` is the slot the reboot should land in.
    Staged {
        /// The staged version.
        version: Option<Version>,
        /// The slot it was written to.
        slot: Option<Slot>,
    },
    /// The backend cannot stage (bad payload, no space): reported as Failed.
    Broken(String),
}

/// A reboot the agent started, kept on disk across the reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The boot the agent rebooted out of.
    pub from_boot: BootId,
    /// The version the reboot should land on, when known.
    pub version: Option<Version>,
    /// The slot the reboot should land in, when known.
    pub slot: Option<Slot>,
    /// The version and slot it ran before, for the rollback message.
    pub previous_version: Option<Version>,
    /// The slot it ran before.
    pub previous_slot: Option<Slot>,
    /// When the agent first saw the new boot; the verification bound runs from here.
    pub booted_seen: Option<Timestamp>,
}

/// The verdict on one boot, kept on disk so that it is reported for the whole boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The boot it applies to.
    pub boot: BootId,
    /// Done, RolledBack or Failed.
    pub state: AgentState,
    /// Why (empty for Done).
    pub message: String,
}

/// Everything the agent keeps on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The reboot under way, if any.
    pub pending: Option<Pending>,
    /// The verdict on the current (or an earlier) boot.
    pub outcome: Option<Outcome>,
}

/// A reboot requested from a real machine is not requested again for this long: the
/// machine is going down, or the request was lost (then it is asked again).
pub const REBOOT_RETRY: SignedDuration = SignedDuration::from_mins(5);

/// What the agent remembers while it runs, in memory only (a restart forgets it, which
/// is always safe): results that are tried again at the next local re-check.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// The health checks' result in this boot, if they ran.
    pub health: Option<Result<(), crate::command::Failure>>,
    /// A staging of this version failed, and why; it is tried again at the next
    /// re-check (a download cut short resumes).
    pub stage_failure: Option<(Version, String)>,
    /// A grant for this boot that fresh reads found not live, with baton's cordon as
    /// the node showed it then.
    pub refused: Option<(BootId, bool)>,
    /// When a reboot was last requested from a real machine.
    pub reboot_requested: Option<Timestamp>,
}

impl Memory {
    /// A local re-check (`--check-interval`): failing health checks and a failed staging
    /// are tried again, and a refused grant is judged afresh.
    pub fn recheck(&mut self) {
        if matches!(self.health, Some(Err(_))) {
            self.health = None;
        }
        self.stage_failure = None;
        self.refused = None;
    }

    /// The node now shows `grant` and (or not) baton's cordon: a refused grant is judged
    /// afresh once either changed.
    pub fn saw(&mut self, grant: Option<&BootId>, cordoned: bool) {
        if self
            .refused
            .as_ref()
            .is_some_and(|(boot, cordon)| grant != Some(boot) || *cordon != cordoned)
        {
            self.refused = None;
        }
    }
}

/// What the daemon observed.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The boot the agent runs under.
    pub boot_id: &'a BootId,
    /// The backend's report.
    pub status: &'a Status,
    /// What the agent recorded.
    pub record: &'a Record,
    /// The operator's grant (`baton.dev/reboot-ok`), naming the boot it applies to.
    pub grant: Option<&'a BootId>,
    /// What the agent remembers in this process: health results, a failed staging, a
    /// refused grant, a reboot already requested.
    pub memory: &'a Memory,
    /// The Node's `Ready` condition.
    pub node_ready: bool,
    /// An admin's `baton.dev/retry` mark, naming the boot whose failed verdict to drop.
    pub retry: Option<&'a BootId>,
    /// How long a new boot may take to pass its health checks.
    pub verify_timeout: SignedDuration,
    /// Now.
    pub now: Timestamp,
}

/// What to publish on the Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `baton.dev/state`.
    pub state: AgentState,
    /// `baton.dev/target-version`: the version staged or being staged.
    pub target_version: Option<Version>,
    /// `baton.dev/reboot-required` (annotation and label).
    pub reboot_required: bool,
    /// `baton.dev/message`.
    pub message: Option<String>,
    /// Remove the admin's `baton.dev/retry` mark: it was acted on (or names another
    /// boot). It goes in the same write as the new state, so that the operator never
    /// sees the mark gone while the old failed state is still reported.
    pub drop_retry: bool,
}

/// What the daemon does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Nothing: wait for the next event.
    Wait,
    /// Stage this version into the inactive slot.
    Stage(Version),
    /// Record this pending reboot, then run the before-reboot commands and reboot.
    Reboot(Pending),
    /// Forget the pending reboot: the grant is gone and the boot did not change.
    Forget,
    /// Record when the new boot was first seen.
    NoteBoot(Timestamp),
    /// Run the health checks and decide again with their result.
    CheckHealth,
    /// Mark the booted slot good through the backend, then record Done.
    Commit,
    /// Record the verdict for this boot and forget the pending reboot.
    Conclude(Outcome),
    /// Drop this boot's failed verdict (the admin fixed the cause) and the retry mark.
    Retry,
}

/// The decision: what to report, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// For the Node.
    pub report: Report,
    /// For the daemon.
    pub effect: Effect,
}

fn report(state: AgentState, target: Option<Version>, message: Option<String>) -> Report {
    Report {
        state,
        target_version: target,
        reboot_required: false,
        message,
        drop_retry: false,
    }
}

/// Decides. See the module documentation.
pub fn decide(i: &Inputs<'_>) -> Decision {
    // A grant that fresh reads refused is no grant, until the node shows another.
    let refused = i.memory.refused.as_ref().map(|(boot, _)| boot);
    let grant = i.grant.filter(|g| Some(*g) != refused);
    // A staging that failed stays failed until the next re-check.
    let mut status = i.status.clone();
    if let (Update::Available(v), Some((failed, why))) = (&status.update, &i.memory.stage_failure)
        && v == failed
    {
        status.update = Update::Broken(why.clone());
    }
    let i = &Inputs {
        grant,
        status: &status,
        ..i.clone()
    };
    let mut d = match &i.record.pending {
        Some(p) => after_reboot_request(i, p),
        None => steady(i),
    };
    // A reboot already requested from this machine is not requested again for a while.
    if let Effect::Reboot(_) = d.effect
        && i.memory
            .reboot_requested
            .is_some_and(|t| i.now.duration_since(t) < REBOOT_RETRY)
    {
        d.effect = Effect::Wait;
    }
    // The retry mark stays only while it waits for this agent to act on it.
    d.report.drop_retry = i.retry.is_some() && d.effect != Effect::Retry && !retry_pending(i);
    d
}

/// Whether the retry mark names this boot and its failed verdict is still recorded.
fn retry_pending(i: &Inputs<'_>) -> bool {
    i.retry == Some(i.boot_id)
        && i.record.pending.is_none()
        && i.record
            .outcome
            .as_ref()
            .is_some_and(|o| &o.boot == i.boot_id && o.state.is_failure())
}

/// A reboot was started (before this boot or in it).
fn after_reboot_request(i: &Inputs<'_>, p: &Pending) -> Decision {
    if &p.from_boot == i.boot_id {
        // Same boot: the reboot has not happened (the agent restarted, or the machine is
        // going down). Carry on only while the grant still names this boot.
        return if i.grant == Some(i.boot_id) {
            Decision {
                report: report(AgentState::Rebooting, p.version.clone(), None),
                effect: Effect::Reboot(p.clone()),
            }
        } else {
            Decision {
                report: report(AgentState::Rebooting, p.version.clone(), None),
                effect: Effect::Forget,
            }
        };
    }
    // A new boot. Which one did the bootloader pick?
    let slot_wrong = matches!((&p.slot, &i.status.slot), (Some(want), Some(got)) if want != got);
    let version_wrong =
        matches!((&p.version, &i.status.current_version), (Some(want), Some(got)) if want != got);
    if slot_wrong || version_wrong {
        let message = format!(
            "booted {} instead of {}: the new version did not boot (the bootloader fell back)",
            describe(i.status.current_version.as_ref(), i.status.slot.as_ref()),
            describe(p.version.as_ref(), p.slot.as_ref()),
        );
        return conclude(i, p, AgentState::RolledBack, message);
    }
    let Some(seen) = p.booted_seen else {
        return Decision {
            report: report(AgentState::Verifying, p.version.clone(), None),
            effect: Effect::NoteBoot(i.now),
        };
    };
    let overdue = i.now >= seen.checked_add(i.verify_timeout).unwrap_or(seen);
    if !i.node_ready {
        if overdue {
            return conclude(
                i,
                p,
                AgentState::Failed,
                "the kubelet did not report Ready after the reboot".into(),
            );
        }
        return Decision {
            report: report(
                AgentState::Verifying,
                p.version.clone(),
                Some("waiting for the kubelet to report Ready".into()),
            ),
            effect: Effect::Wait,
        };
    }
    match i.memory.health.as_ref() {
        None => Decision {
            report: report(AgentState::Verifying, p.version.clone(), None),
            effect: Effect::CheckHealth,
        },
        Some(Ok(())) => Decision {
            report: report(AgentState::Verifying, p.version.clone(), None),
            effect: Effect::Commit,
        },
        Some(Err(why)) if overdue => conclude(
            i,
            p,
            AgentState::Failed,
            format!("health checks failed: {why}"),
        ),
        Some(Err(why)) => Decision {
            report: report(
                AgentState::Verifying,
                p.version.clone(),
                Some(format!("health checks failing (will retry): {why}")),
            ),
            effect: Effect::Wait,
        },
    }
}

fn conclude(i: &Inputs<'_>, p: &Pending, state: AgentState, message: String) -> Decision {
    Decision {
        report: report(state, p.version.clone(), Some(message.clone())),
        effect: Effect::Conclude(Outcome {
            boot: i.boot_id.clone(),
            state,
            message,
        }),
    }
}

fn describe(version: Option<&Version>, slot: Option<&Slot>) -> String {
    match (version, slot) {
        (Some(v), Some(s)) => format!("{v} (slot {s})"),
        (Some(v), None) => v.to_string(),
        (None, Some(s)) => format!("slot {s}"),
        (None, None) => "an unknown version".into(),
    }
}

/// No reboot under way: report what the backend says, stage, or take a grant.
fn steady(i: &Inputs<'_>) -> Decision {
    let verdict = i.record.outcome.as_ref().filter(|o| &o.boot == i.boot_id);
    // A failed update stays reported for the whole boot: only an admin (or a new boot)
    // moves the node on.
    if let Some(o) = verdict.filter(|o| o.state.is_failure()) {
        return Decision {
            report: report(o.state, None, Some(o.message.clone())),
            effect: if i.retry == Some(i.boot_id) {
                Effect::Retry
            } else {
                Effect::Wait
            },
        };
    }
    let done = verdict.is_some_and(|o| o.state == AgentState::Done);
    let note = i.status.note.clone();
    match &i.status.update {
        Update::Idle => Decision {
            report: report(
                if done {
                    AgentState::Done
                } else {
                    AgentState::Idle
                },
                None,
                note,
            ),
            effect: Effect::Wait,
        },
        Update::Available(v) => Decision {
            report: report(AgentState::Staging, Some(v.clone()), note),
            effect: Effect::Stage(v.clone()),
        },
        Update::Staging(v) => Decision {
            report: report(AgentState::Staging, v.clone(), note),
            effect: Effect::Wait,
        },
        Update::Broken(why) => Decision {
            report: report(AgentState::Failed, None, Some(why.clone())),
            effect: Effect::Wait,
        },
        Update::Staged { version, slot } => {
            if i.grant == Some(i.boot_id) {
                return Decision {
                    report: report(AgentState::Rebooting, version.clone(), None),
                    effect: Effect::Reboot(Pending {
                        from_boot: i.boot_id.clone(),
                        version: version.clone(),
                        slot: slot.clone(),
                        previous_version: i.status.current_version.clone(),
                        previous_slot: i.status.slot.clone(),
                        booted_seen: None,
                    }),
                };
            }
            Decision {
                report: Report {
                    reboot_required: true,
                    ..report(AgentState::RebootRequired, version.clone(), note)
                },
                effect: Effect::Wait,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(s: &str) -> BootId {
        BootId::new(s).unwrap()
    }
    fn v(s: &str) -> Version {
        Version::new(s).unwrap()
    }
    fn slot(s: &str) -> Slot {
        Slot::new(s).unwrap()
    }
    const NOW: &str = "2026-11-26T10:00:00Z";
    /// Nothing remembered.
    static NO_MEMORY: std::sync::LazyLock<Memory> = std::sync::LazyLock::new(Memory::default);

    /// `settle` passes its own record; this stands in for it in `inputs`.
    const EMPTY: &Record = &Record {
        pending: None,
        outcome: None,
    };

    /// A fake OS: a staged 2.0.0 in slot B while 1.0.0 runs from slot A.
    fn staged() -> Status {
        Status {
            current_version: Some(v("1.0.0")),
            slot: Some(slot("A")),
            update: Update::Staged {
                version: Some(v("2.0.0")),
                slot: Some(slot("B")),
            },
            ..Status::default()
        }
    }

    fn running(version: &str, s: &str) -> Status {
        Status {
            current_version: Some(v(version)),
            slot: Some(slot(s)),
            ..Status::default()
        }
    }

    fn inputs<'a>(
        b: &'a BootId,
        status: &'a Status,
        record: &'a Record,
        grant: Option<&'a BootId>,
    ) -> Inputs<'a> {
        Inputs {
            boot_id: b,
            status,
            record,
            grant,
            memory: &NO_MEMORY,
            node_ready: true,
            retry: None,
            verify_timeout: SignedDuration::from_mins(10),
            now: NOW.parse().unwrap(),
        }
    }

    /// Runs `decide` as the daemon would, applying record effects, until it waits or
    /// needs the outside world. Returns the last decision.
    fn settle(i: &mut Inputs<'_>, record: &mut Record) -> Decision {
        loop {
            let d = decide(&Inputs {
                record,
                ..i.clone()
            });
            match &d.effect {
                Effect::Forget => record.pending = None,
                Effect::NoteBoot(t) => {
                    if let Some(p) = record.pending.as_mut() {
                        p.booted_seen = Some(*t);
                    }
                }
                Effect::Conclude(o) => {
                    record.outcome = Some(o.clone());
                    record.pending = None;
                }
                _ => return d,
            }
        }
    }

    #[test]
    fn a_staged_update_asks_for_a_reboot_and_waits_for_its_grant() {
        let (b, s, r) = (boot("aa"), staged(), Record::default());
        let d = decide(&inputs(&b, &s, &r, None));
        assert_eq!(d.report.state, AgentState::RebootRequired);
        assert!(d.report.reboot_required);
        assert_eq!(d.report.target_version, Some(v("2.0.0")));
        assert_eq!(d.effect, Effect::Wait);
    }

    #[test]
    fn a_grant_for_another_boot_is_not_a_grant() {
        let (b, s, r, old) = (boot("aa"), staged(), Record::default(), boot("99"));
        let d = decide(&inputs(&b, &s, &r, Some(&old)));
        assert_eq!(
            d.effect,
            Effect::Wait,
            "a stale grant never causes a reboot"
        );
    }

    #[test]
    fn the_grant_starts_a_reboot_that_records_where_it_should_land() {
        let (b, s, r) = (boot("aa"), staged(), Record::default());
        let d = decide(&inputs(&b, &s, &r, Some(&b)));
        assert_eq!(d.report.state, AgentState::Rebooting);
        let Effect::Reboot(p) = d.effect else {
            panic!("{d:?}")
        };
        assert_eq!(
            (p.from_boot, p.version, p.slot),
            (b, Some(v("2.0.0")), Some(slot("B")))
        );
    }

    #[test]
    fn an_agent_restart_without_a_reboot_is_not_a_reboot() {
        let b = boot("aa");
        let s = staged();
        let mut record = Record::default();
        let Effect::Reboot(p) = decide(&inputs(&b, &s, &record, Some(&b))).effect else {
            panic!()
        };
        record.pending = Some(p.clone());
        // The process restarts under the same boot, grant still there: reboot again,
        // never Verifying or Done.
        let d = decide(&inputs(&b, &s, &record, Some(&b)));
        assert_eq!(
            (d.report.state, d.effect),
            (AgentState::Rebooting, Effect::Reboot(p))
        );
        // The grant went away (the operator failed the node, say): forget, ask again.
        let mut i = inputs(&b, &s, EMPTY, None);
        let d = settle(&mut i, &mut record);
        assert_eq!(d.report.state, AgentState::RebootRequired);
        assert!(record.pending.is_none());
    }

    fn rebooted(into: Status) -> (BootId, Status, Record) {
        let record = Record {
            pending: Some(Pending {
                from_boot: boot("aa"),
                version: Some(v("2.0.0")),
                slot: Some(slot("B")),
                previous_version: Some(v("1.0.0")),
                previous_slot: Some(slot("A")),
                booted_seen: None,
            }),
            outcome: None,
        };
        (boot("bb"), into, record)
    }

    #[test]
    fn the_new_boot_is_verified_then_committed_then_done() {
        let (b, s, mut record) = rebooted(running("2.0.0", "B"));
        let mut i = inputs(&b, &s, EMPTY, None);
        let d = settle(&mut i, &mut record);
        assert_eq!(
            (d.report.state, &d.effect),
            (AgentState::Verifying, &Effect::CheckHealth)
        );
        let healthy = Memory {
            health: Some(Ok(())),
            ..Memory::default()
        };
        i.memory = &healthy;
        let d = settle(&mut i, &mut record);
        assert_eq!(d.effect, Effect::Commit);
        // The daemon commits through the backend, then records Done for this boot.
        record.pending = None;
        record.outcome = Some(Outcome {
            boot: b.clone(),
            state: AgentState::Done,
            message: String::new(),
        });
        let d = decide(&inputs(&b, &s, &record, None));
        assert_eq!((d.report.state, d.effect), (AgentState::Done, Effect::Wait));
    }

    #[test]
    fn booting_the_old_slot_is_a_rollback_with_its_reason() {
        let (b, s, mut record) = rebooted(running("1.0.0", "A"));
        let mut i = inputs(&b, &s, EMPTY, None);
        let d = settle(&mut i, &mut record);
        assert_eq!(d.report.state, AgentState::RolledBack);
        let message = d.report.message.unwrap();
        assert!(
            message.contains("booted 1.0.0 (slot A) instead of 2.0.0 (slot B)"),
            "{message}"
        );
        // Reported for the rest of this boot, even with a new update staged.
        let again = staged();
        let d = decide(&inputs(&b, &again, &record, Some(&b)));
        assert_eq!(
            (d.report.state, d.effect),
            (AgentState::RolledBack, Effect::Wait)
        );
    }

    #[test]
    fn failing_health_checks_retry_until_the_bound_then_fail() {
        let (b, s, mut record) = rebooted(running("2.0.0", "B"));
        let mut i = inputs(&b, &s, EMPTY, None);
        settle(&mut i, &mut record);
        let sick = Memory {
            health: Some(Err(crate::command::Failure::Failed {
                what: "health check".into(),
                command: "etcd-probe".into(),
                status: "exit status: 1".into(),
                stderr: String::new(),
            })),
            ..Memory::default()
        };
        i.memory = &sick;
        let d = settle(&mut i, &mut record);
        assert_eq!(
            (d.report.state, &d.effect),
            (AgentState::Verifying, &Effect::Wait)
        );
        i.now = i.now.checked_add(SignedDuration::from_mins(10)).unwrap();
        let d = settle(&mut i, &mut record);
        assert_eq!(d.report.state, AgentState::Failed);
        assert_eq!(
            d.report.message.as_deref(),
            Some("health checks failed: health check \"etcd-probe\" failed (exit status: 1)")
        );
        assert_eq!(
            record.outcome.as_ref().map(|o| o.state),
            Some(AgentState::Failed)
        );
    }

    #[test]
    fn a_node_that_never_gets_ready_fails_after_the_bound() {
        let (b, s, mut record) = rebooted(running("2.0.0", "B"));
        let mut i = inputs(&b, &s, EMPTY, None);
        i.node_ready = false;
        let d = settle(&mut i, &mut record);
        assert_eq!(
            (d.report.state, &d.effect),
            (AgentState::Verifying, &Effect::Wait)
        );
        i.now = i.now.checked_add(SignedDuration::from_mins(11)).unwrap();
        assert_eq!(settle(&mut i, &mut record).report.state, AgentState::Failed);
    }

    #[test]
    fn a_grant_refused_on_fresh_reads_is_no_grant_until_the_node_shows_none() {
        let (b, s, r) = (boot("aa"), staged(), Record::default());
        let mut i = inputs(&b, &s, &r, Some(&b));
        let mut memory = Memory {
            refused: Some((b.clone(), true)),
            ..Memory::default()
        };
        i.memory = &memory;
        let d = decide(&i);
        assert_eq!(
            (d.report.state, d.effect),
            (AgentState::RebootRequired, Effect::Wait)
        );
        // The node shows the same grant and cordon: still refused. Its cordon changed
        // (the operator granted anew): judged afresh.
        memory.saw(Some(&b), true);
        assert!(memory.refused.is_some());
        memory.saw(Some(&b), false);
        assert!(memory.refused.is_none());
    }

    #[test]
    fn a_failed_staging_is_reported_until_the_next_recheck_then_tried_again() {
        let (b, r) = (boot("aa"), Record::default());
        let available = Status {
            update: Update::Available(v("3.0.0")),
            ..Status::default()
        };
        let mut memory = Memory {
            stage_failure: Some((v("3.0.0"), "staging failed: cut short".into())),
            ..Memory::default()
        };
        let mut i = inputs(&b, &available, &r, None);
        i.memory = &memory;
        let d = decide(&i);
        assert_eq!(
            (d.report.state, d.report.message.as_deref(), d.effect),
            (
                AgentState::Failed,
                Some("staging failed: cut short"),
                Effect::Wait
            )
        );
        memory.recheck();
        let i = Inputs {
            memory: &memory,
            ..inputs(&b, &available, &r, None)
        };
        assert_eq!(decide(&i).effect, Effect::Stage(v("3.0.0")));
    }

    #[test]
    fn a_reboot_already_requested_is_not_requested_again_for_a_while() {
        let (b, s, r) = (boot("aa"), staged(), Record::default());
        let mut i = inputs(&b, &s, &r, Some(&b));
        let memory = Memory {
            reboot_requested: Some(i.now),
            ..Memory::default()
        };
        i.memory = &memory;
        assert_eq!(decide(&i).effect, Effect::Wait);
        i.now = i.now.checked_add(REBOOT_RETRY).unwrap();
        assert!(matches!(decide(&i).effect, Effect::Reboot(_)));
    }

    #[test]
    fn a_retry_drops_the_failed_verdict_and_the_mark_goes_with_the_new_report() {
        let (b, s) = (boot("aa"), staged());
        let mut record = Record {
            pending: None,
            outcome: Some(Outcome {
                boot: b.clone(),
                state: AgentState::Failed,
                message: "before-reboot command failed".into(),
            }),
        };
        let mut i = inputs(&b, &s, EMPTY, None);
        i.retry = Some(&b);
        let d = decide(&Inputs {
            record: &record,
            ..i.clone()
        });
        assert_eq!(
            (d.report.state, &d.effect),
            (AgentState::Failed, &Effect::Retry)
        );
        assert!(
            !d.report.drop_retry,
            "the mark stays until the new state goes out"
        );
        record.outcome = None;
        let d = decide(&Inputs {
            record: &record,
            ..i.clone()
        });
        assert_eq!(d.report.state, AgentState::RebootRequired);
        assert!(
            d.report.drop_retry,
            "dropped in the same write as the new state"
        );
        // A mark naming another boot is dropped at once.
        let other = boot("bb");
        i.retry = Some(&other);
        assert!(
            decide(&Inputs {
                record: &record,
                ..i
            })
            .report
            .drop_retry
        );
    }

    #[test]
    fn staging_and_broken_payloads_are_reported() {
        let (b, r) = (boot("aa"), Record::default());
        let available = Status {
            update: Update::Available(v("3.0.0")),
            ..Status::default()
        };
        let d = decide(&inputs(&b, &available, &r, None));
        assert_eq!(
            (d.report.state, d.effect),
            (AgentState::Staging, Effect::Stage(v("3.0.0")))
        );
        let broken = Status {
            update: Update::Broken("sha256 mismatch".into()),
            ..Status::default()
        };
        let d = decide(&inputs(&b, &broken, &r, None));
        assert_eq!(
            (d.report.state, d.report.message.as_deref()),
            (AgentState::Failed, Some("sha256 mismatch"))
        );
    }

    #[test]
    fn a_sentinel_reboot_without_versions_is_verified_by_the_boot_id_alone() {
        let record = Record {
            pending: Some(Pending {
                from_boot: boot("aa"),
                version: None,
                slot: None,
                previous_version: None,
                previous_slot: None,
                booted_seen: None,
            }),
            outcome: None,
        };
        let (b, s) = (boot("bb"), Status::default());
        let mut record = record;
        let healthy = Memory {
            health: Some(Ok(())),
            ..Memory::default()
        };
        let mut i = inputs(&b, &s, EMPTY, None);
        i.memory = &healthy;
        assert_eq!(settle(&mut i, &mut record).effect, Effect::Commit);
    }
}
