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

    /// How often the leader renews its Lease; must be shorter than the lease duration.
    #[arg(long, env = "BATON_LEADER_RENEW_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub leader_renew_interval: Duration,

    /// Logging.
    #[command(flatten)]
    pub log: telemetry::LogArgs,
}

impl Config {
    /// Checks what clap cannot: relations between flags.
    pub fn validate(&self) -> Result<(), String> {
        if self.leader_renew_interval >= self.leader_lease_duration {
            return Err(format!(
                "--leader-renew-interval ({:?}) must be shorter than --leader-lease-duration ({:?})",
                self.leader_renew_interval, self.leader_lease_duration
            ));
        }
        if self.namespace.is_empty() {
            return Err("--namespace must not be empty".into());
        }
        Ok(())
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
    fn a_malformed_address_is_refused() {
        assert!(Config::try_parse_from(["baton-operator", "--metrics-addr", "localhost"]).is_err());
    }
}
