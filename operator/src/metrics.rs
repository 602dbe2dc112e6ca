//! Prometheus metrics, and the small HTTP server for `/metrics`, `/healthz` and
//! `/readyz`.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use rollout::phase::Phase;

/// Labels naming a policy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// The UpdatePolicy.
    pub policy: String,
}

/// Labels naming a policy and a node state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// The UpdatePolicy.
    pub policy: String,
    /// `up_to_date`, `waiting`, `in_progress` or `failed`.
    pub state: String,
}

/// Labels naming an error kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// From `Error::metric_label`.
    pub kind: String,
}

/// Labels naming what became of a Node watch event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `admitted` (it triggered a reconcile) or `ignored` (nothing baton reads changed).
    pub outcome: String,
}

/// Labels naming a policy and why its nodes wait.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The UpdatePolicy.
    pub policy: String,
    /// One of `rollout::why::waiting_labels`.
    pub reason: String,
}

/// Labels naming what became of a notification.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `sent`, `failed` (given up after every attempt, or no URL) or `dropped` (queue full).
    pub result: String,
}

/// Labels of `baton_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The operator's version.
    pub version: String,
}

/// The `state` labels of `baton_nodes`.
const NODE_STATES: [&str; 4] = ["up_to_date", "waiting", "in_progress", "failed"];

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// 1, labelled with the build.
    pub build_info: Family<BuildLabels, Gauge>,
    /// Nodes by state, per policy.
    pub nodes: Family<StateLabels, Gauge>,
    /// Nodes by combined phase (`rollout::phase::Phase`), per policy.
    pub node_state: Family<StateLabels, Gauge>,
    /// Nodes that wait for a reboot they asked for, by the reason `decide` gave.
    pub nodes_waiting: Family<ReasonLabels, Gauge>,
    /// Each waiting node's last reason label, per policy: a node's Event is recorded
    /// when its reason changes, not at every reconcile.
    last_waiting: std::sync::Mutex<BTreeMap<String, BTreeMap<String, &'static str>>>,
    /// Reboot leases held, per policy.
    pub leases: Family<PolicyLabels, Gauge>,
    /// 1 while a policy's maintenance window is open.
    pub window_open: Family<PolicyLabels, Gauge>,
    /// When a policy's next window opens (Unix seconds), while its windows are closed.
    pub next_window: Family<PolicyLabels, Gauge>,
    /// 1 while a policy's pool is halted.
    pub halted: Family<PolicyLabels, Gauge>,
    /// 1 while a health gate holds a policy's grants back.
    pub gate_closed: Family<PolicyLabels, Gauge>,
    /// Drains running now.
    pub drains: Gauge,
    /// How long drains took, in seconds (finished or timed out).
    pub drain_seconds: Histogram,
    /// Evictions refused by a PodDisruptionBudget.
    pub evictions_blocked: Counter,
    /// Reconcile errors by kind.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// 1 while this replica leads.
    pub leader: Gauge,
    /// How long reconciles took, in seconds (the count is the number of reconciles).
    pub reconcile_seconds: Histogram,
    /// Node watch events, admitted or ignored.
    pub node_events: Family<EventLabels, Counter>,
    /// Notifications, by what became of them.
    pub notifications: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("baton");
        let m = Metrics {
            build_info: Family::default(),
            nodes: Family::default(),
            node_state: Family::default(),
            nodes_waiting: Family::default(),
            last_waiting: std::sync::Mutex::default(),
            leases: Family::default(),
            window_open: Family::default(),
            next_window: Family::default(),
            halted: Family::default(),
            gate_closed: Family::default(),
            drains: Gauge::default(),
            drain_seconds: Histogram::new([
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            ]),
            evictions_blocked: Counter::default(),
            reconcile_errors: Family::default(),
            leader: Gauge::default(),
            reconcile_seconds: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
            node_events: Family::default(),
            notifications: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "build_info",
            "1, labelled with the operator's version",
            m.build_info.clone(),
        );
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        // Counters exist at 0 from the start, so that `rate()` and `increase()` see the
        // first error.
        for kind in crate::error::Error::METRIC_LABELS {
            let _ = m
                .reconcile_errors
                .get_or_create(&ErrorLabels { kind: kind.into() });
        }
        for result in ["sent", "failed", "dropped"] {
            let _ = m.notifications.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        for outcome in ["admitted", "ignored"] {
            let _ = m.node_events.get_or_create(&EventLabels {
                outcome: outcome.into(),
            });
        }
        registry.register("nodes", "Nodes by rollout state", m.nodes.clone());
        registry.register(
            "notifications",
            "Rollout notifications to webhooks, by result (sent, failed, dropped)",
            m.notifications.clone(),
        );
        registry.register(
            "nodes_waiting",
            "Nodes that wait for a reboot they asked for, by the reason the decision core gave (kubectl baton why)",
            m.nodes_waiting.clone(),
        );
        registry.register(
            "node_state",
            "Nodes by combined phase (operator and agent), as kubectl baton status shows them",
            m.node_state.clone(),
        );
        registry.register("leases_held", "Reboot leases held", m.leases.clone());
        registry.register(
            "window_open",
            "1 while the maintenance window is open",
            m.window_open.clone(),
        );
        registry.register(
            "next_window_timestamp_seconds",
            "When the next maintenance window opens (Unix time), while the windows are closed",
            m.next_window.clone(),
        );
        registry.register(
            "pool_halted",
            "1 while the pool is halted",
            m.halted.clone(),
        );
        registry.register(
            "gate_closed",
            "1 while a health gate holds new grants back",
            m.gate_closed.clone(),
        );
        registry.register("drains_in_progress", "Drains running now", m.drains.clone());
        registry.register(
            "drain_duration_seconds",
            "Drain durations",
            m.drain_seconds.clone(),
        );
        registry.register(
            "evictions_blocked",
            "Evictions refused by a PodDisruptionBudget",
            m.evictions_blocked.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile errors by kind",
            m.reconcile_errors.clone(),
        );
        registry.register("is_leader", "1 while this replica leads", m.leader.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile durations (one per policy reconcile)",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "node_events",
            "Node watch events, by whether they triggered a reconcile",
            m.node_events.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Records a policy's plan.
    pub fn observe(&self, plan: &rollout::Plan) {
        let c = plan.counts;
        for (state, value) in
            NODE_STATES
                .into_iter()
                .zip([c.up_to_date, c.waiting, c.in_progress, c.failed])
        {
            self.nodes
                .get_or_create(&StateLabels {
                    policy: plan.policy.clone(),
                    state: state.into(),
                })
                .set(value.into());
        }
        let policy = PolicyLabels {
            policy: plan.policy.clone(),
        };
        self.leases
            .get_or_create(&policy)
            .set(plan.holders.len() as i64);
        self.window_open
            .get_or_create(&policy)
            .set(plan.window.is_open().into());
        // Only while closed with a known opening: an open (or always-open) pool has no
        // next window to wait for, and a stale value would mislead.
        match plan.window {
            rollout::window::WindowState::Closed { opens: Some(at) } => {
                self.next_window.get_or_create(&policy).set(at.as_second());
            }
            _ => {
                self.next_window.remove(&policy);
            }
        }
        self.halted
            .get_or_create(&policy)
            .set(plan.halted.is_some().into());
        self.gate_closed
            .get_or_create(&policy)
            .set(plan.gate.is_some().into());
    }

    /// Records how many of a policy's nodes are in each phase (every phase, 0 included,
    /// so that a phase emptied is seen as 0 and not as a stale count).
    pub fn observe_phases(
        &self,
        policy: &str,
        nodes: &[std::sync::Arc<rollout::NodeView>],
        holders: &[String],
    ) {
        let mut counts = std::collections::BTreeMap::new();
        for node in nodes {
            let phase = Phase::of(node, holders.contains(&node.name));
            *counts.entry(phase).or_insert(0i64) += 1;
        }
        for phase in Phase::ALL {
            self.node_state
                .get_or_create(&StateLabels {
                    policy: policy.into(),
                    state: phase.as_str().into(),
                })
                .set(counts.get(&phase).copied().unwrap_or(0));
        }
    }

    /// Records why `plan`'s nodes wait (every reason, 0 included) and returns at most
    /// `max` nodes whose reason changed since it was last returned (a node that starts
    /// waiting included), with the new reason's label. The others are returned by later
    /// calls: a window opening on 1,000 waiting nodes must not make one reconcile write
    /// 1,000 Events before it grants anything.
    pub fn observe_waiting(&self, plan: &rollout::Plan, max: usize) -> Vec<(String, &'static str)> {
        let now = rollout::why::waiting(plan);
        for reason in rollout::why::waiting_labels() {
            let count = now.values().filter(|l| **l == reason).count();
            self.nodes_waiting
                .get_or_create(&ReasonLabels {
                    policy: plan.policy.clone(),
                    reason: reason.into(),
                })
                .set(count as i64);
        }
        let mut last = self
            .last_waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let told = last.entry(plan.policy.clone()).or_default();
        // Nodes no longer waiting are forgotten; a changed reason is told once.
        told.retain(|node, _| now.contains_key(node));
        let changed: Vec<(String, &'static str)> = now
            .into_iter()
            .filter(|(node, label)| told.get(node) != Some(label))
            .take(max)
            .collect();
        for (node, label) in &changed {
            told.insert(node.clone(), label);
        }
        changed
    }

    /// Removes every series of `policy` (it is deleted): an alert on a deleted
    /// policy's last value would otherwise fire forever.
    pub fn forget(&self, policy: &str) {
        for state in NODE_STATES {
            self.nodes.remove(&StateLabels {
                policy: policy.into(),
                state: state.into(),
            });
        }
        for phase in Phase::ALL {
            self.node_state.remove(&StateLabels {
                policy: policy.into(),
                state: phase.as_str().into(),
            });
        }
        for reason in rollout::why::waiting_labels() {
            self.nodes_waiting.remove(&ReasonLabels {
                policy: policy.into(),
                reason: reason.into(),
            });
        }
        self.last_waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(policy);
        let labels = PolicyLabels {
            policy: policy.into(),
        };
        for family in [
            &self.leases,
            &self.window_open,
            &self.next_window,
            &self.halted,
            &self.gate_closed,
        ] {
            family.remove(&labels);
        }
    }

    /// Counts a notification's result.
    pub fn notified(&self, result: &str) {
        self.notifications
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// Counts a Node watch event.
    pub fn node_event(&self, admitted: bool) {
        let outcome = if admitted { "admitted" } else { "ignored" };
        self.node_events
            .get_or_create(&EventLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(metrics)).await
}

/// The HTTP routes.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }),
        )
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .route("/readyz", get(|| async { (StatusCode::OK, "ok") }))
        .with_state(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body
    }

    /// Records the plan of policy `name` (default spec) over 3 nodes, one granted.
    fn observe_default(metrics: &Metrics, name: &str) {
        let world = rollout::simulate::World::requesting(3, 1, "1", "2");
        let policy = rollout::Policy::from_spec(
            name,
            &serde_json::from_value(serde_json::json!({})).unwrap(),
        )
        .unwrap();
        let snapshot = world.snapshot();
        let plan = rollout::decide(&snapshot, &policy, "2026-11-28T03:00:00Z".parse().unwrap());
        metrics.observe(&plan);
        metrics.observe_phases(name, &snapshot.nodes, &plan.holders);
    }

    #[tokio::test]
    async fn serves_metrics_and_health_on_loopback() {
        let metrics = Arc::new(Metrics::default());
        observe_default(&metrics, "pool");
        metrics.evictions_blocked.inc();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(metrics)).await });
        let text = get(addr, "/metrics").await;
        for needle in [
            "baton_nodes{policy=\"pool\",state=\"waiting\"} 2",
            "baton_node_state{policy=\"pool\",state=\"Waiting\"} 2",
            "baton_node_state{policy=\"pool\",state=\"Failed\"} 0",
            "baton_leases_held{policy=\"pool\"} 1",
            "baton_window_open{policy=\"pool\"} 1",
            "baton_pool_halted{policy=\"pool\"} 0",
            "baton_gate_closed{policy=\"pool\"} 0",
            "baton_evictions_blocked_total 1",
            "baton_drain_duration_seconds_bucket",
            "baton_is_leader 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn counters_start_at_zero_and_the_build_is_labelled() {
        let text = Metrics::default().encode();
        for needle in [
            "baton_reconcile_errors_total{kind=\"kube\"} 0",
            "baton_reconcile_errors_total{kind=\"conflict\"} 0",
            "baton_reconcile_errors_total{kind=\"encode\"} 0",
            "baton_node_events_total{outcome=\"admitted\"} 0",
            "baton_node_events_total{outcome=\"ignored\"} 0",
            concat!(
                "baton_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\"} 1"
            ),
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    #[test]
    fn waiting_nodes_are_counted_by_reason_and_a_changed_reason_is_reported_once() {
        let metrics = Metrics::default();
        let world = rollout::simulate::World::requesting(3, 1, "1", "2");
        let policy = rollout::Policy::from_spec(
            "pool",
            &serde_json::from_value(serde_json::json!({})).unwrap(),
        )
        .unwrap();
        let plan = rollout::decide(
            &world.snapshot(),
            &policy,
            "2026-11-28T03:00:00Z".parse().unwrap(),
        );
        // node-01 is granted; the other two wait for the budget. At most one is told
        // per call; the other comes next time.
        assert_eq!(
            metrics.observe_waiting(&plan, 1),
            [("node-02".to_string(), "budget")]
        );
        assert_eq!(
            metrics.observe_waiting(&plan, 1),
            [("node-03".to_string(), "budget")]
        );
        assert!(
            metrics.observe_waiting(&plan, 10).is_empty(),
            "the same reasons again: no Event"
        );
        let text = metrics.encode();
        assert!(
            text.contains("baton_nodes_waiting{policy=\"pool\",reason=\"budget\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("baton_nodes_waiting{policy=\"pool\",reason=\"outside_window\"} 0"),
            "{text}"
        );
        metrics.forget("pool");
        assert!(!metrics.encode().contains("baton_nodes_waiting{"));
        assert_eq!(
            metrics.observe_waiting(&plan, 10).len(),
            2,
            "forgotten: told again"
        );
    }

    #[test]
    fn the_next_window_is_exported_while_closed_and_dropped_once_open() {
        let metrics = Metrics::default();
        let world = rollout::simulate::World::requesting(2, 1, "1", "2");
        let policy = rollout::Policy::from_spec(
            "night",
            &serde_json::from_value(serde_json::json!({"maintenanceWindows": [
                {"schedule": "0 2 * * *", "duration": "1h", "timeZone": "Europe/Berlin"}]}))
            .unwrap(),
        )
        .unwrap();
        let at = |s: &str| -> jiff::Timestamp { s.parse().unwrap() };
        // 12:00 UTC: closed; opens at 02:00 Berlin (01:00 UTC) the next day.
        metrics.observe(&rollout::decide(
            &world.snapshot(),
            &policy,
            at("2026-11-28T12:00:00Z"),
        ));
        let opens = at("2026-11-29T01:00:00Z").as_second();
        assert!(
            metrics.encode().contains(&format!(
                "baton_next_window_timestamp_seconds{{policy=\"night\"}} {opens}"
            )),
            "{}",
            metrics.encode()
        );
        metrics.observe(&rollout::decide(
            &world.snapshot(),
            &policy,
            at("2026-11-29T01:30:00Z"),
        ));
        assert!(
            !metrics
                .encode()
                .contains("baton_next_window_timestamp_seconds{"),
            "{}",
            metrics.encode()
        );
    }

    #[test]
    fn a_deleted_policys_series_are_removed_and_others_stay() {
        let metrics = Metrics::default();
        for name in ["night", "day"] {
            observe_default(&metrics, name);
        }
        metrics.forget("night");
        let text = metrics.encode();
        assert!(!text.contains("policy=\"night\""), "{text}");
        for family in [
            "baton_nodes{policy=\"day\"",
            "baton_leases_held{policy=\"day\"}",
            "baton_window_open{policy=\"day\"}",
            "baton_pool_halted{policy=\"day\"}",
            "baton_gate_closed{policy=\"day\"}",
        ] {
            assert!(text.contains(family), "{family} missing from:\n{text}");
        }
    }
}
