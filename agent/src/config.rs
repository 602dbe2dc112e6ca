//! The agent's configuration: every flag has an environment-variable equivalent.

use std::{path::PathBuf, time::Duration};

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

    /// The operator's namespace, where its reboot Leases are: right before rebooting,
    /// the agent reads its Lease there to confirm the grant is still live.
    #[arg(long, env = "BATON_LEASE_NAMESPACE", default_value = "baton-system")]
    pub lease_namespace: String,

    /// The update backend.
    #[arg(long, env = "BATON_BACKEND", value_enum)]
    pub backend: BackendKind,

    /// Where the agent keeps its record across reboots (a hostPath), and where the sim
    /// backend keeps its slots and boot id.
    #[arg(long, env = "BATON_STATE_DIR", default_value = "/var/lib/baton-agent")]
    pub state_dir: PathBuf,

    /// The boot id file: the kernel's by default. A path outside /proc that does not
    /// exist is created with a fresh id (put it on a tmpfs such as /run for machines
    /// whose kernel boot id survives a reboot). The sim backend uses its own.
    #[arg(long, env = "BATON_BOOT_ID_FILE", default_value = crate::boot::KERNEL_BOOT_ID)]
    pub boot_id_file: PathBuf,

    /// The os-release file the running version is read from (flatcar and sentinel).
    #[arg(long, env = "BATON_OS_RELEASE", default_value = "/etc/os-release")]
    pub os_release: PathBuf,

    /// How often local state (a sentinel file, a failing health check) is looked at
    /// again. Local only: it never causes an API request by itself.
    #[arg(long, env = "BATON_CHECK_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub check_interval: Duration,

    /// How long a new boot may take to be Ready and pass its health checks.
    #[arg(long, env = "BATON_VERIFY_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub verify_timeout: Duration,

    /// The bound on each health check, before-reboot and mark-good command.
    #[arg(long, env = "BATON_COMMAND_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub command_timeout: Duration,

    /// Commands run once the reboot is granted, before rebooting (exit 0 to go on).
    #[arg(
        long = "before-reboot",
        env = "BATON_BEFORE_REBOOT",
        value_delimiter = ';'
    )]
    pub before_reboot: Vec<String>,

    /// The D-Bus address of the system bus (update_engine and logind). Unset: the
    /// system bus at its standard path.
    #[arg(long, env = "BATON_DBUS_ADDRESS")]
    pub dbus_address: Option<String>,

    /// flatcar: the command that marks the booted USR partition good once healthy (as
    /// Flatcar's `flatcar-setgoodroot` does). Unset: Flatcar's own unit does it.
    #[arg(long, env = "BATON_MARK_GOOD_COMMAND")]
    pub mark_good_command: Option<String>,

    /// ab: the block device or image file holding both slots.
    #[arg(long, env = "BATON_AB_DEVICE", required_if_eq("backend", "ab"))]
    pub ab_device: Option<PathBuf>,

    /// ab: the two slots' partition labels, comma-separated (exactly two).
    #[arg(
        long,
        env = "BATON_AB_LABELS",
        value_delimiter = ',',
        default_value = "USR-A,USR-B"
    )]
    pub ab_labels: Vec<String>,

    /// ab: the I/O class of the staging threads (idle: the disk serves them only while
    /// no other I/O waits).
    #[arg(long, env = "BATON_STAGE_IO_CLASS", value_enum, default_value = "idle")]
    pub stage_io_class: crate::pace::IoClass,

    /// ab: the nice value of the staging threads (0 keeps the agent's).
    #[arg(long, env = "BATON_STAGE_NICE", default_value_t = 19, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub stage_nice: u8,

    /// ab: the largest single read or write of staging, in KiB (a workload's read
    /// waits behind at most one; 0: whole 2 MiB buffers).
    #[arg(long, env = "BATON_STAGE_REQUEST_KIB", default_value_t = 64)]
    pub stage_request_kib: usize,

    /// ab: the most MiB per second staging reads and writes on the device, writes and
    /// read-back together (0: no limit).
    #[arg(long, env = "BATON_STAGE_RATE_LIMIT", default_value_t = 0)]
    pub stage_rate_limit: u64,

    /// ab: the booted slot's label; default: from the kernel command line.
    #[arg(long, env = "BATON_AB_BOOTED_SLOT")]
    pub ab_booted_slot: Option<String>,

    /// ab: the kernel command line naming the booted slot (`usr=PARTUUID=…`).
    #[arg(long, env = "BATON_CMDLINE", default_value = "/proc/cmdline")]
    pub cmdline: PathBuf,

    /// ab: simulate the machine: reboots pick a slot with the gptprio model on
    /// --ab-device and exit (for tests and demos on image files).
    #[arg(long, env = "BATON_AB_SIMULATE")]
    pub ab_simulate: bool,

    /// ab: base64 ed25519 public keys; a release's signature must verify with one.
    #[arg(
        long = "release-public-key",
        env = "BATON_RELEASE_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    pub release_public_keys: Vec<String>,

    /// ab: an extra CA (PEM) for the release download, besides the Mozilla roots built
    /// into the binary (webpki-roots).
    #[arg(long, env = "BATON_RELEASE_CA_FILE")]
    pub release_ca_file: Option<PathBuf>,

    /// Make the state directory the agent's (UID/GID 65532, mode 0700) and exit: the
    /// chart's init step, run as root with only CAP_CHOWN.
    #[arg(long)]
    pub prepare_state_dir: bool,

    /// ab: the manual rollback. Makes the other slot (which booted successfully before)
    /// boot next, prints it, and exits; reboot the node afterwards.
    #[arg(long)]
    pub rollback: bool,

    /// sim: the version a new simulated machine runs.
    #[arg(long, env = "BATON_SIM_VERSION", default_value = "1.0.0")]
    pub sim_version: String,

    /// sim: how long staging takes.
    #[arg(long, env = "BATON_SIM_STAGE_TIME", default_value = "2s", value_parser = parse_duration)]
    pub sim_stage_time: Duration,

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

/// Parses a Go-style duration such as `90s` or `10m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    crds::duration::parse(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_go_style_and_the_state_dir_has_a_default() {
        let ok = Config::try_parse_from([
            "baton-agent",
            "--node-name",
            "n1",
            "--backend",
            "sim",
            "--check-interval",
            "90s",
        ])
        .unwrap();
        assert_eq!(ok.backend, BackendKind::Sim);
        assert_eq!(ok.check_interval, Duration::from_secs(90));
        assert_eq!(ok.state_dir, PathBuf::from("/var/lib/baton-agent"));
        let err = Config::try_parse_from([
            "baton-agent",
            "--node-name",
            "n1",
            "--backend",
            "sim",
            "--verify-timeout",
            "soon",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("--verify-timeout"), "{err}");
    }

    #[test]
    fn ab_labels_take_the_charts_spelling() {
        // The chart renders `--ab-labels=A,B`: one argument, two labels.
        let ok = Config::try_parse_from([
            "baton-agent",
            "--node-name=n1",
            "--backend=ab",
            "--ab-device=/dev/sda",
            "--ab-labels=ROOT-A,ROOT-B",
        ])
        .unwrap();
        assert_eq!(ok.ab_labels, ["ROOT-A", "ROOT-B"]);
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
