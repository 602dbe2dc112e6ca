//! Scenarios: a cluster, its policies and workloads, and the faults and admin actions
//! of a run, all drawn from one seed. A scenario is plain data, so that a failing one
//! can be shrunk by dropping events and replayed exactly.

use std::time::Duration;

use jiff::Timestamp;
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64Mcg;

/// An operator replica's name.
pub const REPLICAS: [&str; 2] = ["op-a", "op-b"];

/// One policy of the scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySpec {
    /// Its name.
    pub name: String,
    /// The `pool` label value it selects.
    pub pool: String,
    /// `maxUnavailable`.
    pub max_unavailable: serde_json::Value,
    /// `failurePolicy.maxFailedNodes`.
    pub max_failed: u32,
    /// `drain.timeout`.
    pub drain_timeout: String,
    /// `drain.onTimeout`.
    pub on_timeout: &'static str,
    /// A daily window (start, duration, zone), if any.
    pub window: Option<(String, String, String)>,
}

impl PolicySpec {
    /// The UpdatePolicy spec, releasing `version`.
    pub fn to_spec(&self, version: &str) -> serde_json::Value {
        let mut spec = serde_json::json!({
            "nodeSelector": {"matchLabels": {"pool": self.pool}},
            "maxUnavailable": self.max_unavailable,
            "failurePolicy": {"maxFailedNodes": self.max_failed},
            "drain": {"timeout": self.drain_timeout, "onTimeout": self.on_timeout},
            "health": {"rebootTimeout": "10m", "settleTime": "5s"},
            "ordering": {"oneZoneAtATime": false},
            "release": {
                "version": version, "url": "https://images.invalid/os.img",
                "sha256": "a".repeat(64), "signature": format!("{}==", "A".repeat(86)),
            },
        });
        if let Some((start, duration, zone)) = &self.window {
            spec["maintenanceWindows"] = serde_json::json!([{
                "weekdays": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"],
                "start": start, "duration": duration, "timeZone": zone,
            }]);
        }
        spec
    }
}

/// A fault or an admin action.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An operator replica crashes; it restarts after the delay.
    CrashReplica(usize, Duration),
    /// A replica's requests hang (only its renewals when `true`) for a while.
    Stall(usize, bool, Duration),
    /// Per mille of all requests fail for a while.
    ApiErrors(u32, Duration),
    /// Per mille of watch deliveries drop the watch for a while.
    WatchDrops(u32, Duration),
    /// An agent crashes; it restarts after the delay (same boot).
    KillAgent(usize, Duration),
    /// The next boot of a new slot fails (the bootloader falls back).
    FailNextBoot(usize),
    /// Staging fails for a while.
    FailStaging(usize, Duration),
    /// The before-reboot command fails for a while.
    BeforeRebootFails(usize, Duration),
    /// The node goes NotReady for a while.
    NotReady(usize, Duration),
    /// The node (and its machine) is deleted.
    DeleteNode(usize),
    /// A replica's clock jumps by this many minutes for a while.
    ClockJump(usize, i64, Duration),
    /// An admin cordons the node for a while (if it is schedulable).
    Cordon(usize, Duration),
    /// An admin pauses the policy for a while.
    Pause(usize, Duration),
    /// An admin runs `kubectl baton retry <policy>`.
    RetryPolicy(usize),
    /// An admin runs `kubectl baton retry --node <node>`.
    RetryNode(usize),
    /// An admin moves the node to the other pool.
    Relabel(usize),
    /// An admin edits the policy's budget.
    EditBudget(usize, serde_json::Value),
    /// An admin deletes the policy and creates it again after a while.
    DeletePolicy(usize, Duration),
    /// An admin adds a policy overlapping the first over one zone, for a while.
    Overlap(Duration),
    /// A workload's budget forbids every eviction for a while.
    PdbNever(usize, Duration),
}

/// A whole scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The seed it was drawn from (the world's random source uses it too).
    pub seed: u64,
    /// Nodes.
    pub nodes: usize,
    /// The pool of each node.
    pub pools: Vec<String>,
    /// The policies.
    pub policies: Vec<PolicySpec>,
    /// Workloads: (name, replicas).
    pub apps: Vec<(String, usize)>,
    /// How long staging takes.
    pub stage_time: Duration,
    /// How long a reboot keeps a machine down.
    pub down_time: Duration,
    /// Wall time at the start.
    pub start: Timestamp,
    /// When faults stop and the admin cleans up (liveness from then on).
    pub quiet_at: Duration,
    /// The faults and actions, by time.
    pub events: Vec<(Duration, Event)>,
}

/// Wall times the scenarios start at: near the DST changes of the zones they use.
const STARTS: [&str; 4] = [
    "2026-03-28T23:40:00Z", // Berlin springs forward at 01:00Z on the 29th
    "2026-10-25T00:20:00Z", // Berlin falls back at 01:00Z
    "2026-03-08T06:30:00Z", // New York springs forward at 07:00Z
    "2026-06-15T10:00:00Z", // no change
];

impl Scenario {
    /// The scenario of `seed`.
    pub fn generate(seed: u64) -> Scenario {
        let mut r = Pcg64Mcg::seed_from_u64(seed ^ 0x5EED_5CE4_A210);
        let nodes = r.random_range(3..=7);
        let two = r.random_bool(0.3);
        let pools: Vec<String> = (0..nodes)
            .map(|i| if two && i % 3 == 2 { "b" } else { "a" }.to_string())
            .collect();
        let mut policies = vec![policy(&mut r, "p1", "a")];
        if two {
            policies.push(policy(&mut r, "p2", "b"));
        }
        let apps = (0..r.random_range(1..=2))
            .map(|i| (format!("app{i}"), r.random_range(2..=nodes.min(4))))
            .collect();
        let quiet_at = Duration::from_secs(r.random_range(300..=1200));
        let mut events = Vec::new();
        for _ in 0..r.random_range(2..=10) {
            let at = Duration::from_secs(r.random_range(5..quiet_at.as_secs()));
            events.push((at, event(&mut r, nodes, policies.len())));
        }
        events.sort_by_key(|(at, _)| *at);
        // Three nodes stay: with fewer, a budget of 2 cordons every node, the pods
        // under a PodDisruptionBudget have nowhere to go, and no drain can end (for
        // any operator).
        let mut deleted = std::collections::BTreeSet::new();
        for (_, e) in &mut events {
            if let Event::DeleteNode(n) = *e
                && deleted.insert(n)
                && deleted.len() > nodes.saturating_sub(3)
            {
                deleted.remove(&n);
                *e = Event::NotReady(n, Duration::from_secs(60));
            }
        }
        Scenario {
            seed,
            nodes,
            pools,
            policies,
            apps,
            stage_time: Duration::from_secs(r.random_range(5..=30)),
            down_time: Duration::from_secs(r.random_range(10..=60)),
            start: STARTS[r.random_range(0..STARTS.len())]
                .parse()
                .unwrap_or(Timestamp::UNIX_EPOCH),
            quiet_at,
            events,
        }
    }
}

fn secs(r: &mut Pcg64Mcg, lo: u64, hi: u64) -> Duration {
    Duration::from_secs(r.random_range(lo..=hi))
}

fn policy(r: &mut Pcg64Mcg, name: &str, pool: &str) -> PolicySpec {
    let budgets = [
        serde_json::json!(1),
        serde_json::json!(1),
        serde_json::json!(2),
        serde_json::json!("50%"),
        serde_json::json!("34%"),
    ];
    let zones = ["Europe/Berlin", "America/New_York"];
    let window = r.random_bool(0.5).then(|| {
        // Daily, across the DST change of the night: 01:30 for 2h, or 02:30 for 1h.
        let (start, duration) = if r.random_bool(0.5) {
            ("01:30", "2h")
        } else {
            ("02:30", "1h")
        };
        (
            start.to_string(),
            duration.to_string(),
            zones[r.random_range(0..2)].to_string(),
        )
    });
    PolicySpec {
        name: name.to_string(),
        pool: pool.to_string(),
        max_unavailable: budgets[r.random_range(0..budgets.len())].clone(),
        max_failed: r.random_range(1..=2),
        drain_timeout: format!("{}s", r.random_range(20..=90)),
        on_timeout: ["Abort", "Force", "Proceed"][r.random_range(0..3)],
        window,
    }
}

fn event(r: &mut Pcg64Mcg, nodes: usize, policies: usize) -> Event {
    let n = r.random_range(0..nodes);
    let p = r.random_range(0..policies);
    let replica = r.random_range(0..REPLICAS.len());
    match r.random_range(0..20) {
        0 => Event::CrashReplica(replica, secs(r, 1, 20)),
        1 => Event::Stall(replica, r.random_bool(0.5), secs(r, 5, 60)),
        2 => Event::ApiErrors(r.random_range(50..=300), secs(r, 10, 120)),
        3 => Event::WatchDrops(r.random_range(50..=300), secs(r, 10, 120)),
        4 => Event::KillAgent(n, secs(r, 1, 30)),
        5 => Event::FailNextBoot(n),
        6 => Event::FailStaging(n, secs(r, 10, 200)),
        7 => Event::BeforeRebootFails(n, secs(r, 10, 200)),
        8 => Event::NotReady(n, secs(r, 5, 120)),
        9 => Event::DeleteNode(n),
        10 => Event::ClockJump(
            replica,
            [-180, -60, 60, 180][r.random_range(0..4)],
            secs(r, 30, 300),
        ),
        11 => Event::Cordon(n, secs(r, 10, 300)),
        12 => Event::Pause(p, secs(r, 10, 300)),
        13 => Event::RetryPolicy(p),
        14 => Event::RetryNode(n),
        15 => Event::Relabel(n),
        16 => Event::EditBudget(
            p,
            [
                serde_json::json!(1),
                serde_json::json!(2),
                serde_json::json!("50%"),
            ][r.random_range(0..3)]
            .clone(),
        ),
        17 => Event::DeletePolicy(p, secs(r, 5, 120)),
        18 => Event::Overlap(secs(r, 10, 300)),
        _ => Event::PdbNever(r.random_range(0..2), secs(r, 10, 300)),
    }
}
