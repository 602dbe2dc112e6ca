//! Canary promotion between pools, one test per behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use rollout::{Action, Policy, Skip, decide, promotion, simulate::World};

use crds::{UpdatePolicy, UpdatePolicyStatus};

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn object(name: &str, spec: serde_json::Value) -> UpdatePolicy {
    let mut spec = spec;
    spec["release"] = serde_json::json!({"version": "2.0.0", "url": "https://images.example/2.img",
        "sha256": "c".repeat(64), "signature": format!("{}==", "A".repeat(86))});
    UpdatePolicy::new(name, serde_json::from_value(spec).unwrap())
}

fn completed(mut p: UpdatePolicy, version: &str, since: &str) -> UpdatePolicy {
    p.status = Some(UpdatePolicyStatus {
        completed: Some(crds::Completion {
            version: version.into(),
            since: Time(at(since)),
        }),
        ..Default::default()
    });
    p
}

/// The prod pool's decision at `now`, with `canary` as its upstream.
fn prod_plan(canary: Option<UpdatePolicy>, now: &str) -> rollout::Plan {
    let prod = object(
        "prod",
        serde_json::json!({"promotion": {"after": "canary", "soak": "24h"}}),
    );
    let rules = Policy::from_spec("prod", &prod.spec).unwrap();
    let mut all = vec![prod];
    all.extend(canary);
    let mut snapshot = World::requesting(2, 1, "1.0.0", "2.0.0").snapshot();
    snapshot.upstream = promotion::upstream("prod", &all);
    decide(&snapshot, &rules, at(now))
}

fn skip(plan: &rollout::Plan) -> String {
    match plan.node("node-01") {
        Some(Action::Skip(s @ Skip::Promotion(_))) => s.to_string(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_missing_upstream_policy_is_a_reported_wait() {
    let plan = prod_plan(None, "2026-12-01T00:00:00Z");
    assert_eq!(
        skip(&plan),
        "promotion: UpdatePolicy canary does not exist (create it, or remove spec.promotion)"
    );
}

#[test]
fn the_pool_waits_until_its_upstream_completed_the_same_version() {
    let canary = object("canary", serde_json::json!({}));
    let plan = prod_plan(Some(canary.clone()), "2026-12-01T00:00:00Z");
    assert_eq!(skip(&plan), "promotion: canary has not completed 2.0.0");
    let plan = prod_plan(
        Some(completed(canary, "1.9.0", "2026-11-01T00:00:00Z")),
        "2026-12-01T00:00:00Z",
    );
    assert_eq!(skip(&plan), "promotion: canary completed 1.9.0, not 2.0.0");
}

#[test]
fn it_soaks_then_goes_and_looks_again_when_the_soak_ends() {
    let canary = completed(
        object("canary", serde_json::json!({})),
        "2.0.0",
        "2026-12-01T00:00:00Z",
    );
    let plan = prod_plan(Some(canary.clone()), "2026-12-01T12:00:00Z");
    assert_eq!(
        skip(&plan),
        "promotion: canary completed 2.0.0 at 2026-12-01T00:00:00Z; soaking until 2026-12-02T00:00:00Z"
    );
    assert_eq!(plan.next_change, Some(at("2026-12-02T00:00:00Z")));
    let plan = prod_plan(Some(canary), "2026-12-02T00:00:00Z");
    assert_eq!(plan.grants().collect::<Vec<_>>(), ["node-01"]);
}

#[test]
fn a_halted_upstream_blocks_with_its_reason() {
    let mut canary = completed(
        object("canary", serde_json::json!({})),
        "2.0.0",
        "2026-11-01T00:00:00Z",
    );
    canary.status.as_mut().unwrap().conditions.push(Condition {
        type_: "Halted".into(),
        status: "True".into(),
        reason: "FailuresReachedLimit".into(),
        message: "1 failed node(s) reached maxFailedNodes=1: c-1".into(),
        last_transition_time: Time(at("2026-11-30T00:00:00Z")),
        observed_generation: None,
    });
    let plan = prod_plan(Some(canary), "2026-12-01T00:00:00Z");
    assert_eq!(
        skip(&plan),
        "promotion: upstream pool canary is blocked (Halted: 1 failed node(s) reached maxFailedNodes=1: c-1)"
    );
}

#[test]
fn an_upstream_without_a_release_is_said_to_never_complete() {
    let mut canary = object("canary", serde_json::json!({}));
    canary.spec.release = None;
    let plan = prod_plan(Some(canary), "2026-12-01T00:00:00Z");
    assert_eq!(
        skip(&plan),
        "promotion: upstream pool canary is blocked (it has no spec.release, and promotion compares release versions)"
    );
}

#[test]
fn cycles_are_found_and_chains_are_not_cycles() {
    let p = |name: &str, after: Option<&str>| {
        object(
            name,
            match after {
                Some(a) => serde_json::json!({"promotion": {"after": a}}),
                None => serde_json::json!({}),
            },
        )
    };
    let chain = [
        p("dev", None),
        p("stage", Some("dev")),
        p("prod", Some("stage")),
    ];
    assert_eq!(promotion::cycle("prod", &chain), None);
    let cycle = [p("a", Some("b")), p("b", Some("a"))];
    assert_eq!(promotion::cycle("a", &cycle).as_deref(), Some("a → b → a"));
    assert_eq!(promotion::cycle("b", &cycle).as_deref(), Some("b → a → b"));
    let own = [p("x", Some("x"))];
    assert_eq!(promotion::cycle("x", &own).as_deref(), Some("x → x"));
    // A pool after a cycle it is not part of is not itself a cycle.
    let tail = [p("a", Some("b")), p("b", Some("a")), p("c", Some("a"))];
    assert_eq!(promotion::cycle("c", &tail), None);
}
