//! The agent's configuration: every flag has an environment-variable equivalent.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Where updates come from and how they are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Flatcar's update_engine over D-Bus.
    Flatcar,
    /// kured-compatible: a reboot-required file or command.
    Sentinel,
    /// baton's native A/B updater on GPT slots.
    Ab,
    /// Simulated, in a state directory: for tests and the demo.
    Sim,
}

/// How the node is rebooted once granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RebootMethod {
    /// `org.freedesktop.login1.Manager.Reboot` over the system D-Bus.
    Logind,
    /// SIGRTMIN+5 to PID 1 (systemd's "reboot"); needs hostPID and CAP_KILL only.
    Signal,
    /// A command, such as `systemctl reboot` through nsenter.
    Command,
}

/// `baton-agent` configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "baton-agent",
    version,
    about = "Stages OS updates, reboots when granted, verifies the new boot"
)]
pub struct Config {
    /// The Node this agent runs on (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// The update backend.
    #[arg(long, env = "BATON_BACKEND", value_enum)]
    pub backend: BackendKind,

    /// Where the sim backend keeps its slots and boot id.
    #[arg(long, env = "BATON_STATE_DIR", required_if_eq("backend", "sim"))]
    pub state_dir: Option<PathBuf>,

    /// The sentinel backend's reboot-required file.
    #[arg(
        long,
        env = "BATON_SENTINEL_FILE",
        default_value = "/var/run/reboot-required"
    )]
    pub sentinel_file: PathBuf,

    /// The sentinel backend's reboot-required command (exit 0 means "reboot needed");
    /// replaces the file check when set.
    #[arg(long, env = "BATON_SENTINEL_COMMAND")]
    pub sentinel_command: Option<String>,

    /// How to reboot.
    #[arg(long, env = "BATON_REBOOT_METHOD", value_enum, default_value_t = RebootMethod::Logind)]
    pub reboot_method: RebootMethod,

    /// The command for `--reboot-method command`.
    #[arg(
        long,
        env = "BATON_REBOOT_COMMAND",
        required_if_eq("reboot_method", "command")
    )]
    pub reboot_command: Option<String>,

    /// Extra health checks run after boot, before the slot is committed (exit 0 = healthy).
    #[arg(
        long = "health-check",
        env = "BATON_HEALTH_CHECKS",
        value_delimiter = ';'
    )]
    pub health_checks: Vec<String>,

    /// Logging.
    #[command(flatten)]
    pub log: telemetry::LogArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_needs_a_state_dir() {
        let err = Config::try_parse_from(["baton-agent", "--node-name", "n1", "--backend", "sim"])
            .unwrap_err();
        assert!(err.to_string().contains("--state-dir"), "{err}");
        let ok = Config::try_parse_from([
            "baton-agent",
            "--node-name",
            "n1",
            "--backend",
            "sim",
            "--state-dir",
            "/tmp/s",
        ])
        .unwrap();
        assert_eq!(ok.backend, BackendKind::Sim);
    }

    #[test]
    fn command_reboot_needs_a_command() {
        let err = Config::try_parse_from([
            "baton-agent",
            "--node-name",
            "n1",
            "--backend",
            "sentinel",
            "--reboot-method",
            "command",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("--reboot-command"), "{err}");
    }

    #[test]
    fn an_unknown_backend_lists_the_known_ones() {
        let err = Config::try_parse_from(["baton-agent", "--node-name", "n1", "--backend", "apt"])
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("flatcar") && text.contains("sentinel") && text.contains("sim"),
            "{text}"
        );
    }

    #[test]
    fn the_node_name_is_required() {
        let err = Config::try_parse_from(["baton-agent", "--backend", "sentinel"]).unwrap_err();
        assert!(err.to_string().contains("--node-name"), "{err}");
    }
}
