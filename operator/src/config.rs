//! The operator's configuration: every flag has an environment-variable equivalent.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;

/// `baton-operator` configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "baton-operator",
    version,
    about = "Grants reboot leases, drains nodes and enforces maintenance windows"
)]
pub struct Config {
    /// The namespace holding the operator's reboot Leases and its leader-election Lease.
    #[arg(long, env = "BATON_NAMESPACE", default_value = "baton-system")]
    pub namespace: String,

    /// This replica's identity for leader election (the pod name in the chart).
    #[arg(long, env = "POD_NAME", default_value = "baton-operator")]
    pub identity: String,

    /// The node this replica runs on; that node is updated last.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "BATON_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Elect a leader among replicas through a Lease. `false` is for a single replica
    /// (the chart then uses the Recreate strategy): no Lease renewals at all, but no
    /// standby to take over while that replica is down.
    #[arg(long, env = "BATON_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// How long a leader-election Lease stays valid without renewal.
    #[arg(long, env = "BATON_LEADER_LEASE_DURATION", default_value = "30s", value_parser = parse_duration)]
    pub leader_lease_duration: Duration,

    /// How often the leader renews its Lease; must be shorter than the renew deadline.
    #[arg(long, env = "BATON_LEADER_RENEW_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub leader_renew_interval: Duration,

    /// The leader stops every write once its last successful renewal was sent this long
    /// ago, even while a renewal still hangs. Shorter than the lease duration, so that a
    /// deposed leader has stopped before a follower may take over (default: two thirds
    /// of the lease duration, a margin of a third for clock rates and requests in flight).
    #[arg(long, env = "BATON_LEADER_RENEW_DEADLINE", value_parser = parse_duration)]
    pub leader_renew_deadline: Option<Duration>,

    /// The bound on every API request other than a watch (a write is also bounded by
    /// the renew deadline).
    #[arg(long, env = "BATON_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Let policies use `drain.onTimeout: Force`, which deletes the pods a drain left
    /// (bypassing their PodDisruptionBudgets). Off by default: the operator then needs
    /// no `pods delete` permission (the chart grants it only with
    /// `operator.allowForceDrain=true`), and a policy asking for Force is InvalidSpec.
    #[arg(long, env = "BATON_ALLOW_FORCE_DRAIN", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_force_drain: bool,

    /// etcd access, for the quorum guard on control-plane nodes.
    #[command(flatten)]
    pub etcd: crate::etcd::EtcdAccess,

    /// Logging.
    #[command(flatten)]
    pub log: telemetry::LogArgs,
}

impl Config {
    /// The renew deadline: as set, or two thirds of the lease duration.
    pub fn renew_deadline(&self) -> Duration {
        self.leader_renew_deadline
            .unwrap_or(self.leader_lease_duration * 2 / 3)
    }

    /// Checks what clap cannot: relations between flags.
    pub fn validate(&self) -> Result<(), String> {
        let deadline = self.renew_deadline();
        if self.leader_renew_interval >= deadline {
            return Err(format!(
                "--leader-renew-interval ({:?}) must be shorter than the renew deadline ({deadline:?})",
                self.leader_renew_interval
            ));
        }
        if deadline >= self.leader_lease_duration {
            return Err(format!(
                "--leader-renew-deadline ({deadline:?}) must be shorter than --leader-lease-duration ({:?}): a deposed leader must stop before another may lead",
                self.leader_lease_duration
            ));
        }
        if self.request_timeout.is_zero() {
            return Err("--request-timeout must be longer than 0s".into());
        }
        if self.namespace.is_empty() {
            return Err("--namespace must not be empty".into());
        }
        Ok(())
    }
}

impl Config {
    /// What this operator's configuration forbids a valid policy to ask for.
    pub fn refuses(&self, policy: &rollout::Policy) -> Vec<rollout::policy::SpecError> {
        let mut errors = Vec::new();
        if policy.on_timeout == crds::OnTimeout::Force && !self.allow_force_drain {
            errors.push(rollout::policy::SpecError {
                field: "spec.drain.onTimeout".into(),
                message: "Force deletes pods, which this operator may not do: set onTimeout to Abort or Proceed, or run the operator with --allow-force-drain (chart: operator.allowForceDrain=true, which grants it pods delete)".into(),
            });
        }
        errors
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    crds::duration::parse(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = Config::try_parse_from(["baton-operator"]).unwrap();
        assert_eq!(config.namespace, "baton-system");
        assert_eq!(config.leader_lease_duration, Duration::from_secs(30));
        config.validate().unwrap();
    }

    #[test]
    fn a_malformed_duration_is_refused_with_the_flag_named() {
        let err = Config::try_parse_from(["baton-operator", "--leader-lease-duration", "15"])
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("--leader-lease-duration") && text.contains("is not a duration"),
            "{text}"
        );
    }

    #[test]
    fn renew_must_be_shorter_than_the_lease() {
        let config =
            Config::try_parse_from(["baton-operator", "--leader-renew-interval", "40s"]).unwrap();
        assert!(config.validate().unwrap_err().contains("must be shorter"));
        let config =
            Config::try_parse_from(["baton-operator", "--leader-renew-deadline", "30s"]).unwrap();
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("a deposed leader must stop before another may lead")
        );
        let config = Config::try_parse_from([
            "baton-operator",
            "--leader-lease-duration",
            "3s",
            "--leader-renew-interval",
            "1s",
        ])
        .unwrap();
        assert_eq!(config.renew_deadline(), Duration::from_secs(2));
        config.validate().unwrap();
    }

    #[test]
    fn leader_election_can_be_turned_off_for_a_single_replica() {
        assert!(
            Config::try_parse_from(["baton-operator"])
                .unwrap()
                .leader_elect
        );
        let single = Config::try_parse_from(["baton-operator", "--leader-elect=false"]).unwrap();
        assert!(!single.leader_elect);
    }

    #[test]
    fn a_policy_asking_for_force_is_refused_unless_force_drains_are_allowed() {
        let spec =
            serde_json::from_value(serde_json::json!({"drain": {"onTimeout": "Force"}})).unwrap();
        let policy = rollout::Policy::from_spec("p", &spec).unwrap();
        let config = Config::try_parse_from(["baton-operator"]).unwrap();
        let refused = config.refuses(&policy);
        assert_eq!(refused[0].field, "spec.drain.onTimeout");
        assert!(refused[0].message.contains("--allow-force-drain"));
        let allowed =
            Config::try_parse_from(["baton-operator", "--allow-force-drain=true"]).unwrap();
        assert!(allowed.refuses(&policy).is_empty());
    }

    #[test]
    fn a_malformed_address_is_refused() {
        assert!(Config::try_parse_from(["baton-operator", "--metrics-addr", "localhost"]).is_err());
    }
}
