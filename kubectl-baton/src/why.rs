//! `kubectl baton why <node>`: the node's whole decision, from the real decision core
//! (`decide` over the objects the operator reads): its policy, its combined phase, what
//! the operator will do or why it waits, every gate in the order `decide` checks them
//! with what each saw, what would let it go, and the start `plan` predicts. Pure: the
//! caller fetches.

use std::{collections::BTreeMap, fmt::Write};

use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::ResourceExt;

use crds::UpdatePolicy;
use rollout::{Action, NodeView, Policy, Snapshot, phase::Phase, selector::Selector, why};

use crate::Error;

/// The policies whose nodeSelector selects `node`.
pub fn policies_of<'a>(node: &Node, policies: &'a [UpdatePolicy]) -> Vec<&'a UpdatePolicy> {
    policies
        .iter()
        .filter(|p| {
            Selector::compile(&p.spec.node_selector).is_ok_and(|s| s.matches(node.labels()))
        })
        .collect()
}

/// Everything the plugin read, and when.
pub struct Observed<'a> {
    /// Every UpdatePolicy.
    pub policies: &'a [UpdatePolicy],
    /// Every Node.
    pub nodes: &'a [Node],
    /// baton's reboot Leases.
    pub leases: &'a [Lease],
    /// Node to the pod that blocks its reboot.
    pub blocking: &'a BTreeMap<String, String>,
    /// Now.
    pub now: Timestamp,
}

/// The explanation for `node`; `predicted` is the start `plan` predicts, if any.
pub fn render(node: &str, seen: &Observed, predicted: Option<Timestamp>) -> Result<String, Error> {
    let n = seen
        .nodes
        .iter()
        .find(|n| n.name_any() == node)
        .ok_or(Error::NotFound {
            kind: "node",
            name: node.to_string(),
        })?;
    let mut out = String::new();
    let policy = match policies_of(n, seen.policies).as_slice() {
        [] => {
            let _ = writeln!(
                out,
                "node/{node}: no UpdatePolicy selects it, so baton leaves it alone"
            );
            return Ok(out);
        }
        [one] => *one,
        many => {
            let names: Vec<String> = many.iter().map(|p| p.name_any()).collect();
            let _ = writeln!(
                out,
                "node/{node}: selected by {} policies ({}); baton leaves a node claimed twice alone until the nodeSelectors are disjoint",
                names.len(),
                names.join(", ")
            );
            return Ok(out);
        }
    };
    let rules = Policy::from_spec(&policy.name_any(), &policy.spec).map_err(|errors| {
        Error::InvalidPolicy {
            name: policy.name_any(),
            errors: errors.iter().map(ToString::to_string).collect(),
        }
    })?;
    let (mut snapshot, _) =
        Snapshot::from_objects(seen.nodes, seen.leases, seen.policies, &rules.name, None);
    crate::status::reported(policy, &mut snapshot);
    snapshot.mark_blocked(seen.blocking);
    let plan = rollout::decide(&snapshot, &rules, seen.now);
    let view = snapshot
        .nodes
        .iter()
        .find(|v| v.name == node)
        .cloned()
        .unwrap_or_else(|| NodeView::from_node(n).into());
    let held = plan.holders.iter().any(|h| h == node);
    let phase = Phase::of(&view, held);
    let agent = &view.agent;
    let shown =
        |v: &Option<crds::protocol::Version>| v.as_ref().map_or("-".to_string(), |v| v.to_string());
    let _ = writeln!(out, "node/{node}  UpdatePolicy {}", rules.name);
    let _ = writeln!(
        out,
        "  phase     {phase} (agent: {}, {} -> {})",
        agent
            .state
            .map_or("no report".to_string(), |s| s.to_string()),
        shown(&agent.current_version),
        shown(
            &agent
                .target_version
                .clone()
                .or(view.desired_version.clone())
        ),
    );
    let action = plan
        .nodes
        .iter()
        .find(|p| p.node == node)
        .map(|p| &p.action);
    let decision = why::action(node, &plan, &rules, seen.now).unwrap_or_default();
    let _ = writeln!(out, "  decision  {decision}");
    let Some(Action::Skip(skip)) = action else {
        return Ok(out);
    };
    if !why::is_waiting(skip) {
        let _ = writeln!(out, "  goes when {}", why::remedy(skip));
        return Ok(out);
    }
    let _ = writeln!(out, "Gates, in the order the operator checks them:");
    let gates = why::gates(&view, &snapshot, &plan, &rules, seen.now);
    let deciding = gates.iter().position(|g| !g.passes);
    for (i, g) in gates.iter().enumerate() {
        let mark = if g.passes { "ok  " } else { "STOP" };
        let note = if Some(i) == deciding {
            "   <- the reason"
        } else {
            ""
        };
        let _ = writeln!(out, "  {mark} {:<14} {}{note}", g.name, g.saw);
    }
    let _ = writeln!(out, "Goes when: {}", why::remedy(skip));
    if let Some(at) = predicted {
        let _ = writeln!(
            out,
            "Predicted start: {} (in {}; kubectl baton plan {}, from the nodes as they are, reboot time 10m)",
            at.strftime("%Y-%m-%d %H:%M UTC"),
            why::until(seen.now, at),
            rules.name
        );
    }
    Ok(out)
}
