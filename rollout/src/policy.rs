//! A policy as the decision core uses it: every field parsed and checked once, so the
//! rules never see a string. A spec that cannot be parsed becomes a list of
//! [`SpecError`]s for the `InvalidSpec` condition, never a panic.

use jiff::SignedDuration;
use thiserror::Error;

use crds::{Budget, OnTimeout, UpdatePolicySpec, WindowMode, protocol::Version};

use crate::{alert::AlertGate, selector::Selector, window::Windows};

/// A validated `UpdatePolicy`.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The policy's name.
    pub name: String,
    /// Which nodes it governs.
    pub selector: Selector,
    /// `maxUnavailable`.
    pub budget: Budget,
    /// `spec.promotion`, if set.
    pub promotion: Option<crate::promotion::PromotionRule>,
    /// `spec.urgency`, if set.
    pub urgency: Option<UrgencyRule>,
    /// `maxUnavailablePerZone`, if set.
    pub zone_budget: Option<Budget>,
    /// Maintenance windows.
    pub windows: Windows,
    /// Whether the reboot must fit in the window.
    pub window_mode: WindowMode,
    /// From the reboot grant to back-and-healthy.
    pub reboot_timeout: SignedDuration,
    /// The pause after a node is done before its slot is released.
    pub settle_time: SignedDuration,
    /// The drain's bound.
    pub drain_timeout: SignedDuration,
    /// What happens when the drain's bound passes.
    pub on_timeout: OnTimeout,
    /// The before-reboot hook, if any.
    pub before_reboot: Option<HookRule>,
    /// The after-reboot hook, if any.
    pub after_reboot: Option<HookRule>,
    /// Failures that halt the pool.
    pub max_failed: u32,
    /// No new grants while set.
    pub paused: bool,
    /// Take one zone at a time.
    pub one_zone_at_a_time: bool,
    /// The label naming a node's zone.
    pub zone_label: String,
    /// Where control-plane nodes go.
    pub control_plane: crds::ControlPlaneOrder,
    /// The release version nodes converge on, when the policy names one.
    pub target_version: Option<Version>,
    /// The release image nodes converge on, when the policy names one.
    pub release: Option<crds::protocol::ReleaseRef>,
    /// The Prometheus alert gate, if configured.
    pub alert_gate: Option<AlertGate>,
    /// Pods the drain leaves alone (`drain.podSelector`).
    pub drain_pod_selector: Option<Selector>,
    /// Evict pods with emptyDir volumes too (`drain.deleteEmptyDirData`).
    pub delete_empty_dir_data: bool,
    /// Override of the pods' grace period (`drain.gracePeriodSeconds`).
    pub grace_period_seconds: Option<i64>,
    /// Evictions in flight at once (`drain.maxParallelEvictions`).
    pub max_parallel_evictions: u32,
    /// Label cordoned nodes out of cloud load balancers
    /// (`drain.excludeFromLoadBalancers`).
    pub exclude_from_load_balancers: bool,
    /// Pods whose presence on a node holds its grant back
    /// (`health.blockingPodSelectors`).
    pub blocking_pod_selectors: Vec<Selector>,
    /// Alertmanager silences for disrupted nodes.
    pub silence: Option<crate::silence::SilenceRules>,
    /// Set when the policy is being wound down: nothing new starts, and its grants end.
    pub ending: Option<Ending>,
}

/// Why a policy winds its grants down instead of rolling out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The spec cannot be used: grants not yet rebooting end, a reboot under way
    /// finishes, and failures stay recorded until the spec is fixed and retried.
    InvalidSpec,
    /// The policy is being deleted: every grant ends (a reboot under way finishes
    /// first), then the policy goes.
    Deleted,
}

/// An urgent release's deadline, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrgencyRule {
    /// Past it, windows stop gating nodes not yet updated.
    pub deadline: jiff::Timestamp,
    /// Past it, freezes stop gating too.
    pub override_freezes: bool,
}

/// A hook: the annotations to wait for, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRule {
    /// Node annotations that must all be `"true"`.
    pub annotations: Vec<String>,
    /// The bound on the wait.
    pub timeout: SignedDuration,
}

/// One thing wrong with a spec, with the field it is in.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The field path, such as `spec.maintenanceWindows[1]`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Policy {
    /// Parses a spec, collecting every problem rather than stopping at the first.
    pub fn from_spec(name: &str, spec: &UpdatePolicySpec) -> Result<Policy, Vec<SpecError>> {
        let (policy, errors) = Policy::parse(name, spec);
        if errors.is_empty() {
            Ok(policy)
        } else {
            Err(errors)
        }
    }

    /// The policy that winds a spec's grants down (`ending`), whether or not the spec is
    /// valid: what cannot be parsed takes the CRD's default, and no rule of it grants.
    pub fn wind_down(name: &str, spec: &UpdatePolicySpec, ending: Ending) -> Policy {
        let (mut policy, _) = Policy::parse(name, spec);
        policy.ending = Some(ending);
        policy
    }

    /// When a drain that started at `started` runs out of time.
    pub fn drain_deadline(&self, started: jiff::Timestamp) -> Option<jiff::Timestamp> {
        started.checked_add(self.drain_timeout).ok()
    }

    /// The longest a node can stay disrupted once granted, when every bound is used:
    /// the before-reboot hooks, the drain, the reboot and the after-reboot hooks.
    /// Settle time is not part of it: the node is back in service by then.
    pub fn longest_disruption(&self) -> SignedDuration {
        let hook = |h: &Option<HookRule>| h.as_ref().map_or(SignedDuration::ZERO, |h| h.timeout);
        hook(&self.before_reboot)
            .saturating_add(self.drain_timeout)
            .saturating_add(self.reboot_timeout)
            .saturating_add(hook(&self.after_reboot))
    }

    /// Parses every field; a field that does not parse takes its default and adds an
    /// error.
    fn parse(name: &str, spec: &UpdatePolicySpec) -> (Policy, Vec<SpecError>) {
        let mut errors = Vec::new();
        let mut err = |field: &str, message: String| {
            errors.push(SpecError {
                field: field.to_string(),
                message,
            })
        };
        let mut duration = |field: &str, text: &str| -> SignedDuration {
            match crds::duration::parse(text).map(SignedDuration::try_from) {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => {
                    err(field, e.to_string());
                    SignedDuration::ZERO
                }
                Err(e) => {
                    err(field, e.to_string());
                    SignedDuration::ZERO
                }
            }
        };
        let reboot_timeout = duration("spec.health.rebootTimeout", &spec.health.reboot_timeout);
        let settle_time = duration("spec.health.settleTime", &spec.health.settle_time);
        let drain_timeout = duration("spec.drain.timeout", &spec.drain.timeout);
        let silence_extra = spec
            .health
            .alertmanager
            .as_ref()
            .map(|a| duration("spec.health.alertmanager.extra", &a.extra))
            .unwrap_or_default();
        let mut hook = |field: &str, h: &Option<crds::Hook>| {
            h.as_ref().map(|h| HookRule {
                annotations: h.annotations.clone(),
                timeout: duration(field, &h.timeout),
            })
        };
        let before_reboot = hook("spec.hooks.beforeReboot.timeout", &spec.hooks.before_reboot);
        let after_reboot = hook("spec.hooks.afterReboot.timeout", &spec.hooks.after_reboot);

        let selector = Selector::compile(&spec.node_selector)
            .map_err(|e| err("spec.nodeSelector", e.to_string()))
            .unwrap_or_default();
        let budget = Budget::parse(&spec.max_unavailable)
            .map_err(|e| err("spec.maxUnavailable", e.to_string()))
            .unwrap_or_default();
        let promotion = spec.promotion.as_ref().and_then(|p| {
            crds::duration::parse(&p.soak)
                .ok()
                .and_then(|d| SignedDuration::try_from(d).ok())
                .map(|soak| crate::promotion::PromotionRule {
                    after: p.after.clone(),
                    soak,
                })
                .or_else(|| {
                    err(
                        "spec.promotion.soak",
                        format!("{:?} is not a duration such as 24h", p.soak),
                    );
                    None
                })
        });
        let urgency = spec.urgency.as_ref().and_then(|u| {
            u.deadline
                .parse::<jiff::Timestamp>()
                .map(|deadline| UrgencyRule {
                    deadline,
                    override_freezes: u.override_freezes,
                })
                .map_err(|e| {
                    err(
                        "spec.urgency.deadline",
                        format!("{:?} is not an RFC 3339 time: {e}", u.deadline),
                    )
                })
                .ok()
        });
        let mut freezes = Vec::new();
        for (i, f) in spec.freezes.iter().enumerate() {
            match crate::freeze::Freeze::compile(f) {
                Ok(f) => freezes.push(f),
                Err(e) => err(&format!("spec.freezes[{i}].{}", e.field()), e.to_string()),
            }
        }
        let zone_budget = spec.max_unavailable_per_zone.as_ref().and_then(|v| {
            Budget::parse(v)
                .map_err(|e| {
                    err(
                        "spec.maxUnavailablePerZone",
                        format!(
                            "{} is invalid: use a count of at least 1 or a percentage from 1% to 100%",
                            e.value
                        ),
                    )
                })
                .ok()
        });
        let windows = Windows::compile(&spec.maintenance_windows)
            .map_err(|list| {
                for (i, e) in list {
                    err(
                        &format!("spec.maintenanceWindows[{i}].{}", e.field()),
                        e.to_string(),
                    );
                }
            })
            .unwrap_or_default()
            .with_freezes(freezes);
        let drain_pod_selector = spec.drain.pod_selector.as_ref().and_then(|s| {
            Selector::compile(s)
                .map_err(|e| err("spec.drain.podSelector", e.to_string()))
                .ok()
        });
        let blocking_pod_selectors = spec
            .health
            .blocking_pod_selectors
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                Selector::compile(s)
                    .map_err(|e| {
                        err(
                            &format!("spec.health.blockingPodSelectors[{i}]"),
                            e.to_string(),
                        )
                    })
                    .ok()
            })
            .collect();
        let target_version = spec.release.as_ref().and_then(|r| {
            Version::new(r.version.clone())
                .map_err(|e| err("spec.release.version", e))
                .ok()
        });
        let alert_gate = spec.health.prometheus.as_ref().and_then(|g| {
            AlertGate::compile(g)
                .map_err(|e| err("spec.health.prometheus.alertFilter", e))
                .ok()
        });
        let silence = spec.health.alertmanager.as_ref().map(|a| {
            let matchers = a
                .matchers
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    crate::silence::Matcher::parse(m)
                        .map_err(|e| err(&format!("spec.health.alertmanager.matchers[{i}]"), e))
                        .ok()
                })
                .collect();
            crate::silence::SilenceRules {
                url: a.url.clone(),
                matchers,
                extra: silence_extra,
            }
        });
        if spec.failure_policy.max_failed_nodes == 0 {
            err(
                "spec.failurePolicy.maxFailedNodes",
                "must be at least 1".into(),
            );
        }
        let policy = Policy {
            name: name.to_string(),
            selector,
            budget,
            zone_budget,
            promotion,
            urgency,
            windows,
            window_mode: spec.window_mode,
            reboot_timeout,
            settle_time,
            drain_timeout,
            on_timeout: spec.drain.on_timeout,
            before_reboot,
            after_reboot,
            max_failed: spec.failure_policy.max_failed_nodes,
            paused: spec.paused,
            one_zone_at_a_time: spec.ordering.one_zone_at_a_time,
            zone_label: spec.ordering.zone_label.clone(),
            control_plane: spec.ordering.control_plane,
            target_version,
            release: spec.release.as_ref().map(|r| crds::protocol::ReleaseRef {
                url: r.url.clone(),
                sha256: r.sha256.clone(),
                signature: r.signature.clone(),
            }),
            alert_gate,
            drain_pod_selector,
            delete_empty_dir_data: spec.drain.delete_empty_dir_data,
            grace_period_seconds: spec.drain.grace_period_seconds,
            max_parallel_evictions: spec.drain.max_parallel_evictions,
            exclude_from_load_balancers: spec.drain.exclude_from_load_balancers,
            blocking_pod_selectors,
            silence,
            ending: None,
        };
        (policy, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spec_is_a_valid_policy() {
        let p = Policy::from_spec("p", &serde_json::from_str("{}").unwrap()).unwrap();
        assert_eq!(p.budget, Budget::Count(1));
        assert_eq!(p.reboot_timeout, SignedDuration::from_mins(30));
        assert_eq!(p.drain_timeout, SignedDuration::from_mins(10));
        assert_eq!(p.max_failed, 1);
    }

    #[test]
    fn every_problem_in_a_spec_is_reported_with_its_field() {
        let spec: UpdatePolicySpec = serde_json::from_value(serde_json::json!({
            "maxUnavailable": "0%",
            "maintenanceWindows": [{"schedule": "0 2 * * 6", "duration": "1h", "timeZone": "Mars/Olympus"}],
            "health": {"rebootTimeout": "soon"},
        }))
        .unwrap();
        let errors = Policy::from_spec("p", &spec).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.health.rebootTimeout",
                "spec.maxUnavailable",
                "spec.maintenanceWindows[0].timeZone"
            ]
        );
        assert!(errors[2].message.contains("Mars/Olympus"));
    }

    #[test]
    fn invalid_drain_and_blocking_selectors_are_invalid_specs_not_open_doors() {
        let spec: UpdatePolicySpec = serde_json::from_value(serde_json::json!({
            "drain": {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Like", "values": ["x"]}]}},
            "health": {"blockingPodSelectors": [{"matchLabels": {"app": "db"}}, {"matchLabels": {"bad key": "x"}}]},
        }))
        .unwrap();
        let errors = Policy::from_spec("p", &spec).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.drain.podSelector",
                "spec.health.blockingPodSelectors[1]"
            ]
        );
        // Winding down still works from such a spec, and grants nothing.
        let p = Policy::wind_down("p", &spec, Ending::InvalidSpec);
        assert_eq!(p.ending, Some(Ending::InvalidSpec));
        assert_eq!(p.drain_timeout, SignedDuration::from_mins(10));
    }

    #[test]
    fn a_window_that_never_opens_is_reported_on_its_schedule_field() {
        let spec: UpdatePolicySpec = serde_json::from_value(serde_json::json!({
            "maintenanceWindows": [{"schedule": "0 2 30 2 *", "duration": "1h", "timeZone": "UTC"}],
        }))
        .unwrap();
        let errors = Policy::from_spec("p", &spec).unwrap_err();
        assert_eq!(errors[0].field, "spec.maintenanceWindows[0].schedule");
        assert!(errors[0].message.contains("never opens"), "{}", errors[0]);
    }
}
