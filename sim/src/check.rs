//! The safety properties, checked at the moment each write lands on the model API
//! server (and each reboot happens), from the model's true state. The checker reads
//! the wire format itself, key by key with the protocol's key names, and judges with
//! rules of its own written from docs/rollout.md: it checks the code that decides, so
//! it must not share it.
//!
//! - **S1** budget: when a Lease is granted, the policy's Leases plus the other
//!   unavailable nodes of its pool (cordoned, NotReady, failed, or leased by another
//!   policy) are at most `maxUnavailable` resolved against the pool (rounded down, at
//!   least 1).
//! - **S2** an admin's cordon is never undone by baton.
//! - **S3** a reboot happens only under a live grant (the node's Lease names its boot
//!   and records no failure, `reboot-ok` names the boot, baton's cordon is on); it
//!   counts only with a new boot id (no `Verifying`/`Done` under the boot rebooted out
//!   of, no Lease marked done while the node still runs the granted boot).
//! - **S4** no Lease is granted while every window of its policy is closed, on the
//!   granting replica's clock.
//! - **S5** no pod is deleted around its PodDisruptionBudgets unless the policy says
//!   `onTimeout: Force` (evictions go through the model, which enforces budgets).
//! - **S6** no Lease is granted while the policy's failed nodes reach
//!   `maxFailedNodes`.
//! - **S7** an agent writes only its own Node, and only the agent's keys.
//!
//! The operator decides from caches that lag the API server by at most a bound
//! ([`Checker::staleness`]); a change younger than that (an admin's cordon, a relabel,
//! a policy edit) is judged both ways and only a grant wrong under both counts.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use jiff::{SignedDuration, Timestamp, civil::Time, tz::TimeZone};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::ResourceExt;
use serde_json::Value;

use crds::{UpdatePolicy, grant::MANAGED_BY, protocol};
use rollout::selector::Selector;

use crate::apiserver::ApiServer;

/// A broken property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Virtual time.
    pub at: Duration,
    /// `S1`..`S7`, or `L` (liveness).
    pub property: &'static str,
    /// What happened.
    pub message: String,
}

/// Who wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writer {
    /// An operator replica.
    Operator(String),
    /// The agent on this node.
    Agent(String),
    /// An admin by hand (cordon, label, annotation).
    Admin,
    /// An admin through `kubectl baton retry`.
    Retry,
    /// The cluster itself (kubelet readiness, controllers).
    Cluster,
}

/// The versions of one policy, each from when it was written (`None`: deleted).
type History = Vec<(Duration, Option<Arc<UpdatePolicy>>)>;

/// The checker's memory.
#[derive(Debug, Default)]
pub struct Checker {
    /// How far behind the API server the operator's caches may be.
    pub staleness: Duration,
    admin_cordons: BTreeSet<String>,
    /// Nodes whose agent reported a failure (Failed, RolledBack), and when: they count
    /// as failed until an admin retries them, whatever marks the operator keeps.
    reported_failed: BTreeMap<String, Duration>,
    rebooted_out_of: BTreeSet<(String, String)>,
    node_changed: BTreeMap<String, Duration>,
    policies: BTreeMap<String, History>,
    /// Everything broken so far.
    pub violations: Vec<Violation>,
}

fn ann<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.annotations().get(key).map(String::as_str)
}

fn lease_ann<'a>(lease: &'a Lease, key: &str) -> Option<&'a str> {
    lease.annotations().get(key).map(String::as_str)
}

fn unschedulable(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

fn is_reboot_lease(lease: &Lease) -> bool {
    lease.labels().get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1)
}

/// `maxUnavailable` against a pool of `total`: a percentage rounded down, at least 1.
fn limit(policy: &UpdatePolicy, total: usize) -> usize {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let raw = match &policy.spec.max_unavailable {
        IntOrString::Int(n) => usize::try_from(*n).unwrap_or(0),
        IntOrString::String(s) => {
            let p: usize = s.trim_end_matches('%').parse().unwrap_or(0);
            total * p / 100
        }
    };
    if total == 0 { 0 } else { raw.clamp(1, total) }
}

/// Whether any of the policy's windows is open at `t` (no window: always open).
pub fn window_open(policy: &UpdatePolicy, t: Timestamp) -> bool {
    let windows = &policy.spec.maintenance_windows;
    windows.is_empty()
        || windows.iter().any(|w| {
            let (Some(days), Some(start)) = (&w.weekdays, &w.start) else {
                return true; // the scenarios write no cron windows
            };
            let Ok(zone) = TimeZone::get(&w.time_zone) else {
                return false;
            };
            let Ok(at) = start.parse::<Time>() else {
                return false;
            };
            let Ok(length) = crds::duration::parse(&w.duration) else {
                return false;
            };
            let local = t.to_zoned(zone.clone()).date();
            (0..=(length.as_secs() / 86_400) as i64 + 2).any(|back| {
                let Ok(day) = local.checked_sub(jiff::Span::new().days(back)) else {
                    return false;
                };
                let weekday = day.weekday().to_monday_zero_offset() as usize;
                let named = days.iter().any(|d| {
                    serde_json::to_value(d)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        == Some(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][weekday].into())
                });
                let Ok(start) = zone.to_ambiguous_zoned(day.to_datetime(at)).compatible() else {
                    return false;
                };
                let start = start.timestamp();
                named
                    && start <= t
                    && start
                        .checked_add(
                            SignedDuration::try_from(length).unwrap_or(SignedDuration::MAX),
                        )
                        .is_ok_and(|end| t < end)
            })
        })
}

impl Checker {
    /// A checker for caches that lag by at most `staleness`.
    pub fn new(staleness: Duration) -> Checker {
        Checker {
            staleness,
            ..Checker::default()
        }
    }

    fn violate(&mut self, at: Duration, property: &'static str, message: String) {
        self.violations.push(Violation {
            at,
            property,
            message,
        });
    }

    /// The policy `name` changed (or went, with `None`).
    pub fn policy_changed(&mut self, at: Duration, name: &str, policy: Option<Arc<UpdatePolicy>>) {
        self.policies
            .entry(name.to_string())
            .or_default()
            .push((at, policy));
    }

    /// The versions of a policy the operator may be acting on at `at`: the current one
    /// and those replaced within the staleness bound.
    fn recent(&self, at: Duration, name: &str) -> Vec<Arc<UpdatePolicy>> {
        let Some(history) = self.policies.get(name) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, (_, p)) in history.iter().enumerate().rev() {
            if let Some(p) = p {
                out.push(Arc::clone(p));
            }
            let since = history[i].0;
            if since + self.staleness <= at || i == 0 {
                break;
            }
        }
        out
    }

    /// Whether the node changed within the staleness bound.
    fn fresh(&self, at: Duration, node: &str) -> bool {
        self.node_changed
            .get(node)
            .is_some_and(|t| *t + self.staleness > at)
    }

    /// An admin cordoned `node` (it was schedulable).
    pub fn admin_cordoned(&mut self, node: &str) {
        self.admin_cordons.insert(node.to_string());
    }

    /// An admin uncordoned `node`.
    pub fn admin_uncordoned(&mut self, node: &str) {
        self.admin_cordons.remove(node);
    }

    /// Whether `node` carries an admin's cordon.
    pub fn admin_cordon(&self, node: &str) -> bool {
        self.admin_cordons.contains(node)
    }

    /// An admin deleted `node`.
    pub fn node_deleted(&mut self, at: Duration, node: &str) {
        self.node_changed.insert(node.to_string(), at);
        // A Lease's failure mark, if any, keeps counting (`halted`).
        self.reported_failed.remove(node);
    }

    /// A Node write landed: `patch` by `writer`, from `before` to `after`.
    pub fn node_written(
        &mut self,
        at: Duration,
        writer: &Writer,
        node: &str,
        patch: &Value,
        before: Option<&Node>,
        after: Option<&Node>,
    ) {
        self.node_changed.insert(node.to_string(), at);
        let uncordoned = before.is_some_and(unschedulable) && !after.is_some_and(unschedulable);
        if uncordoned && self.admin_cordons.contains(node) && *writer != Writer::Admin {
            self.violate(
                at,
                "S2",
                format!("{writer:?} uncordoned {node}, which an admin had cordoned"),
            );
        }
        if *writer == Writer::Retry {
            self.reported_failed.remove(node);
        }
        if let Writer::Agent(own) = writer {
            if own != node {
                self.violate(at, "S7", format!("the agent of {own} wrote Node {node}"));
            }
            let allowed: BTreeSet<&str> =
                protocol::written_by(protocol::Writer::Agent, protocol::Kind::Annotation)
                    .chain(protocol::written_by(
                        protocol::Writer::Agent,
                        protocol::Kind::Label,
                    ))
                    .chain(protocol::AGENT_REMOVES.iter().copied())
                    .collect();
            let meta = patch.get("metadata");
            for section in ["annotations", "labels"] {
                for key in meta
                    .and_then(|m| m.get(section))
                    .and_then(Value::as_object)
                    .into_iter()
                    .flat_map(|m| m.keys())
                {
                    if !allowed.contains(key.as_str()) {
                        self.violate(
                            at,
                            "S7",
                            format!("the agent of {own} wrote {section} key {key}"),
                        );
                    }
                }
            }
            if patch.get("spec").is_some() {
                self.violate(
                    at,
                    "S7",
                    format!("the agent of {own} wrote its Node's spec"),
                );
            }
            if let Some(after) = after {
                let boot = ann(after, protocol::BOOT_ID.name).unwrap_or_default();
                let state = ann(after, protocol::STATE.name).unwrap_or_default();
                // A failure counts from the report that leaves it on the Node, except a
                // report that only repeats the failure an admin's retry (naming this
                // boot) stands on: an agent's report can land just after the retry mark,
                // written from a read before it. Until the agent removes the mark, that
                // is the failure already retried; a new one (another state or boot
                // before, or a failure without the mark) counts.
                let repeated = ann(after, protocol::RETRY.name) == Some(boot)
                    && before.is_some_and(|b| {
                        ann(b, protocol::STATE.name) == Some(state)
                            && ann(b, protocol::BOOT_ID.name) == Some(boot)
                    });
                if matches!(state, "Failed" | "RolledBack") && !repeated {
                    self.reported_failed.entry(node.to_string()).or_insert(at);
                }
                if matches!(state, "Verifying" | "Done")
                    && self
                        .rebooted_out_of
                        .contains(&(node.to_string(), boot.to_string()))
                {
                    self.violate(
                        at,
                        "S3",
                        format!(
                            "{node} reported {state} under boot {boot}, the boot it rebooted out of"
                        ),
                    );
                }
            }
        }
    }

    /// A machine is about to reboot out of `boot`: the grant must be live now.
    pub fn rebooting(&mut self, at: Duration, api: &ApiServer, node: &str, boot: &str) {
        let why = live_grant(api, node, boot).err();
        if let Some(why) = why {
            self.violate(
                at,
                "S3",
                format!("{node} rebooted out of boot {boot} without a live grant: {why}"),
            );
        }
        self.rebooted_out_of
            .insert((node.to_string(), boot.to_string()));
    }

    /// An operator replica wrote a reboot Lease (created or annotated); `created` when
    /// it is a new grant. `clock` is the replica's wall clock.
    pub fn lease_written(
        &mut self,
        at: Duration,
        api: &ApiServer,
        lease: &Lease,
        created: bool,
        clock: Timestamp,
    ) {
        if !is_reboot_lease(lease) {
            return;
        }
        let Some(node) = holder(lease).map(str::to_string) else {
            return;
        };
        if lease_ann(lease, protocol::lease::DONE_AT.name).is_some() {
            let granted = lease_ann(lease, protocol::lease::GRANTED_BOOT_ID.name);
            let now = api
                .nodes
                .get(&node)
                .and_then(|n| ann(n, protocol::BOOT_ID.name));
            if granted.is_some() && granted == now {
                self.violate(
                    at,
                    "S3",
                    format!("{node} counted as updated while it still runs the granted boot"),
                );
            }
        }
        if !created {
            return;
        }
        let Some(name) = lease_ann(lease, protocol::lease::POLICY.name).map(str::to_string) else {
            return;
        };
        let versions = self.recent(at, &name);
        if versions.is_empty() {
            return;
        }
        // S4: closed under every version the operator may have seen.
        if versions.iter().all(|p| !window_open(p, clock)) {
            self.violate(
                at,
                "S4",
                format!("{node} granted by {name} at {clock} with every window closed"),
            );
        }
        // S1 and S6, judged on the true state, sparing changes younger than the bound.
        let s1 = versions
            .iter()
            .all(|p| self.over_budget(at, api, p, &name).is_some());
        if s1 && let Some(why) = self.over_budget(at, api, &versions[0], &name) {
            self.violate(at, "S1", format!("{node} granted by {name}: {why}"));
        }
        let s6 = versions
            .iter()
            .all(|p| self.halted(at, api, p, &name).is_some());
        if s6 && let Some(why) = self.halted(at, api, &versions[0], &name) {
            self.violate(
                at,
                "S6",
                format!("{node} granted by {name} while halted: {why}"),
            );
        }
    }

    fn pool<'a>(&self, api: &'a ApiServer, policy: &UpdatePolicy) -> Vec<&'a Arc<Node>> {
        let Ok(selector) = Selector::compile(&policy.spec.node_selector) else {
            return Vec::new();
        };
        api.nodes
            .values()
            .filter(|n| selector.matches(n.labels()))
            .collect()
    }

    fn over_budget(
        &self,
        at: Duration,
        api: &ApiServer,
        policy: &UpdatePolicy,
        name: &str,
    ) -> Option<String> {
        let pool = self.pool(api, policy);
        let leases: Vec<&Arc<Lease>> = api.leases.values().filter(|l| is_reboot_lease(l)).collect();
        // A Lease of a deleted Node holds nothing down: its agent can no longer
        // confirm a grant, and the operator releases it.
        let own: BTreeSet<&str> = leases
            .iter()
            .filter(|l| lease_ann(l, protocol::lease::POLICY.name) == Some(name))
            .filter_map(|l| holder(l))
            .filter(|n| api.nodes.contains_key(*n))
            .collect();
        let others: BTreeSet<&str> = leases
            .iter()
            .filter(|l| lease_ann(l, protocol::lease::POLICY.name) != Some(name))
            .filter_map(|l| holder(l))
            .collect();
        let unavailable: Vec<String> = pool
            .iter()
            .filter(|n| !own.contains(n.name_any().as_str()))
            .filter(|n| !self.fresh(at, &n.name_any()))
            .filter(|n| {
                unschedulable(n)
                    || !ready(n)
                    || ann(n, protocol::FAILURE.name).is_some()
                    || others.contains(n.name_any().as_str())
            })
            .map(|n| n.name_any())
            .collect();
        // A node relabelled out of the pool within the staleness bound may still be in
        // the pool the operator saw: the budget is resolved both ways.
        let left_lately = self
            .node_changed
            .keys()
            .filter(|n| self.fresh(at, n))
            .filter(|n| !pool.iter().any(|p| p.name_any() == **n))
            .count();
        let budget = limit(policy, pool.len()).max(limit(policy, pool.len() + left_lately));
        let used = own.len() + unavailable.len();
        (used > budget).then(|| {
            format!(
                "{} lease(s) of its own + unavailable {unavailable:?} = {used} > maxUnavailable {budget} of {}",
                own.len(),
                pool.len()
            )
        })
    }

    /// When the policy's current incarnation was created (a deleted policy's wind-down
    /// ends its failures; one created again starts afresh).
    fn born(&self, name: &str) -> Duration {
        let Some(history) = self.policies.get(name) else {
            return Duration::ZERO;
        };
        let mut born = Duration::ZERO;
        let mut before_was_gone = true;
        for (t, p) in history {
            if p.is_some() && before_was_gone {
                born = *t;
            }
            before_was_gone = p.is_none();
        }
        born
    }

    fn halted(
        &self,
        at: Duration,
        api: &ApiServer,
        policy: &UpdatePolicy,
        name: &str,
    ) -> Option<String> {
        let pool = self.pool(api, policy);
        let mut failed: BTreeSet<String> = pool
            .iter()
            .filter(|n| ann(n, protocol::FAILURE.name).is_some())
            .map(|n| n.name_any())
            .collect();
        // What the agents reported (seen by the operator by now), until a retry.
        let born = self.born(name);
        failed.extend(pool.iter().map(|n| n.name_any()).filter(|n| {
            self.reported_failed
                .get(n)
                .is_some_and(|t| *t >= born && *t + self.staleness <= at)
        }));
        failed.extend(
            api.leases
                .values()
                .filter(|l| is_reboot_lease(l))
                .filter(|l| lease_ann(l, protocol::lease::POLICY.name) == Some(name))
                .filter(|l| lease_ann(l, protocol::lease::FAILURE.name).is_some())
                .filter_map(|l| holder(l).map(str::to_string)),
        );
        let max = policy.spec.failure_policy.max_failed_nodes as usize;
        (failed.len() >= max).then(|| format!("failed {failed:?} reach maxFailedNodes {max}"))
    }

    /// An operator replica deleted a pod outright (not through an eviction).
    pub fn pod_deleted(&mut self, at: Duration, node: &str, pod: &str, policy: Option<&str>) {
        let forced = policy.is_some_and(|name| {
            self.recent(at, name)
                .iter()
                .any(|p| p.spec.drain.on_timeout == crds::OnTimeout::Force)
        });
        if !forced {
            self.violate(
                at,
                "S5",
                format!("pod {pod} on {node} deleted around its PodDisruptionBudgets without onTimeout: Force"),
            );
        }
    }

    /// Records a liveness failure.
    pub fn not_live(&mut self, at: Duration, message: String) {
        self.violate(at, "L", message);
    }
}

/// Whether `node` holds a live grant for `boot` in the model's true state.
pub fn live_grant(api: &ApiServer, node: &str, boot: &str) -> Result<(), String> {
    let n = api.nodes.get(node).ok_or("the node is gone")?;
    let lease = api
        .leases
        .values()
        .filter(|l| is_reboot_lease(l))
        .find(|l| holder(l) == Some(node))
        .ok_or("no Lease")?;
    if lease_ann(lease, protocol::lease::GRANTED_BOOT_ID.name) != Some(boot) {
        return Err(format!(
            "the Lease names boot {:?}",
            lease_ann(lease, protocol::lease::GRANTED_BOOT_ID.name)
        ));
    }
    if lease_ann(lease, protocol::lease::FAILURE.name).is_some() {
        return Err("the Lease records a failure".into());
    }
    if ann(n, protocol::REBOOT_OK.name) != Some(boot) {
        return Err(format!(
            "reboot-ok is {:?}",
            ann(n, protocol::REBOOT_OK.name)
        ));
    }
    if !(unschedulable(n) && ann(n, protocol::CORDONED.name) == Some("true")) {
        return Err("baton's cordon is not on the node".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: Value) -> UpdatePolicy {
        UpdatePolicy::new("p", serde_json::from_value(json).unwrap())
    }

    #[test]
    fn a_weekly_window_is_open_from_its_start_for_its_duration_in_its_zone() {
        let p = policy(serde_json::json!({"maintenanceWindows": [
            {"weekdays": ["Sun"], "start": "02:30", "duration": "1h", "timeZone": "Europe/Berlin"}]}));
        // 2026-03-29: Berlin skips 02:00-03:00; 02:30 moves to 03:30 CEST (01:30 UTC).
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        assert!(!window_open(&p, t("2026-03-29T01:29:00Z")));
        assert!(window_open(&p, t("2026-03-29T01:30:00Z")));
        assert!(window_open(&p, t("2026-03-29T02:29:59Z")));
        assert!(!window_open(&p, t("2026-03-29T02:30:00Z")));
        // A week before, CET: 02:30 local is 01:30 UTC too.
        assert!(window_open(&p, t("2026-03-22T01:45:00Z")));
        assert!(!window_open(&p, t("2026-03-23T01:45:00Z")));
    }

    fn node(state: &str, retry: Option<&str>) -> Node {
        let mut annotations = serde_json::Map::new();
        annotations.insert(protocol::STATE.name.into(), state.into());
        annotations.insert(protocol::BOOT_ID.name.into(), "b1".into());
        if let Some(r) = retry {
            annotations.insert(protocol::RETRY.name.into(), r.into());
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "annotations": annotations}}))
        .unwrap()
    }

    /// Whether a fresh checker counts `node` as failed after its agent wrote `after`
    /// over `before`.
    fn counts_after(before: Option<&Node>, after: &Node) -> bool {
        let mut c = Checker::new(Duration::ZERO);
        let agent = Writer::Agent("n".into());
        c.node_written(
            Duration::ZERO,
            &agent,
            "n",
            &json_patch(),
            before,
            Some(after),
        );
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        c.reported_failed.contains_key("n")
    }

    #[test]
    fn a_failure_counts_until_a_retry_and_a_late_repeat_of_it_does_not_undo_the_retry() {
        let mut c = Checker::new(Duration::ZERO);
        let at = Duration::from_secs(1);
        let retried = node("RolledBack", Some("b1"));
        let agent = Writer::Agent("n".into());
        let verifying = node("Verifying", None);
        let rolled_back = node("RolledBack", None);
        c.node_written(
            at,
            &agent,
            "n",
            &json_patch(),
            Some(&verifying),
            Some(&rolled_back),
        );
        assert!(c.reported_failed.contains_key("n"));
        c.node_written(at, &Writer::Retry, "n", &json_patch(), None, Some(&retried));
        assert!(!c.reported_failed.contains_key("n"));
        // The agent's report from a read before the retry lands after it: the same failure.
        c.node_written(
            at,
            &agent,
            "n",
            &json_patch(),
            Some(&retried),
            Some(&retried),
        );
        assert!(!c.reported_failed.contains_key("n"));
        assert!(!counts_after(Some(&retried), &retried));
        // A failure that is new while the mark still stands counts.
        assert!(counts_after(
            Some(&node("Staging", Some("b1"))),
            &node("Failed", Some("b1"))
        ));
        // So does another failure state on top of the retried one, or one without a
        // Node read before it.
        assert!(counts_after(Some(&retried), &node("Failed", Some("b1"))));
        assert!(counts_after(None, &retried));
        // So does the old one once the agent removes the mark without acting on it.
        assert!(counts_after(Some(&retried), &rolled_back));
        // The mark naming another boot does not cover this one's failure.
        assert!(counts_after(
            Some(&retried),
            &node("RolledBack", Some("b0"))
        ));
    }

    fn json_patch() -> Value {
        serde_json::json!({"metadata": {"annotations": {protocol::STATE.name: "RolledBack"}}})
    }

    #[test]
    fn budgets_round_down_with_a_minimum_of_one() {
        let p = policy(serde_json::json!({"maxUnavailable": "30%"}));
        assert_eq!(limit(&p, 10), 3);
        assert_eq!(limit(&p, 3), 1);
        assert_eq!(limit(&p, 0), 0);
    }
}
