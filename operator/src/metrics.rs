//! Prometheus metrics, and the small HTTP server for `/metrics`, `/healthz` and
//! `/readyz`.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

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

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Nodes by state, per policy.
    pub nodes: Family<StateLabels, Gauge>,
    /// Reboot leases held, per policy.
    pub leases: Family<PolicyLabels, Gauge>,
    /// 1 while a policy's maintenance window is open.
    pub window_open: Family<PolicyLabels, Gauge>,
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
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("baton");
        let m = Metrics {
            nodes: Family::default(),
            leases: Family::default(),
            window_open: Family::default(),
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
            registry: Registry::default(),
        };
        registry.register("nodes", "Nodes by rollout state", m.nodes.clone());
        registry.register("leases_held", "Reboot leases held", m.leases.clone());
        registry.register(
            "window_open",
            "1 while the maintenance window is open",
            m.window_open.clone(),
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
        for (state, value) in [
            ("up_to_date", c.up_to_date),
            ("waiting", c.waiting),
            ("in_progress", c.in_progress),
            ("failed", c.failed),
        ] {
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
        self.halted
            .get_or_create(&policy)
            .set(plan.halted.is_some().into());
        self.gate_closed
            .get_or_create(&policy)
            .set(plan.gate.is_some().into());
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

    #[tokio::test]
    async fn serves_metrics_and_health_on_loopback() {
        let metrics = Arc::new(Metrics::default());
        let world = rollout::simulate::World::requesting(3, 1, "1", "2");
        let policy = rollout::Policy::from_spec(
            "pool",
            &serde_json::from_value(serde_json::json!({})).unwrap(),
        )
        .unwrap();
        metrics.observe(&rollout::decide(
            &world.snapshot(),
            &policy,
            "2026-11-28T03:00:00Z".parse().unwrap(),
        ));
        metrics.evictions_blocked.inc();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(metrics)).await });
        let text = get(addr, "/metrics").await;
        for needle in [
            "baton_nodes{policy=\"pool\",state=\"waiting\"} 2",
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
}
