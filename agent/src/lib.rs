//! `baton-agent`: the node side of baton. It stages OS updates through a backend,
//! publishes its state on its own Node, reboots only when the operator grants it for
//! the boot it runs under, and after the reboot checks that the new version booted and
//! is healthy before committing it, or reports the rollback.
//!
//! - [`lifecycle`]: the state machine, pure.
//! - [`daemon`]: the event loop around it.
//! - [`backend`]: sim, sentinel, flatcar and the native A/B backend ([`slot`],
//!   [`payload`], [`partition_table`], [`gptprio`]).
//! - [`reboot`], [`node`], [`record`], [`command`], [`boot`], [`os_release`], [`dbus`].
#![forbid(unsafe_code)]

pub mod backend;
pub mod boot;
pub mod command;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod error;
pub mod gptprio;
pub mod lifecycle;
pub mod node;
pub mod os_release;
pub mod pace;
pub mod partition_table;
pub mod payload;
pub mod reboot;
pub mod record;
pub mod slot;

use std::path::PathBuf;

use config::{BackendKind, Config, RebootMethod};
use error::AgentError;

/// Runs the agent as configured, until a simulated reboot or a fatal error. Each
/// backend chooses, in one place, its backend, the boot it runs under and how it
/// reboots.
pub async fn run(config: &Config, client: kube::Client) -> Result<daemon::Exit, AgentError> {
    let dir = &config.state_dir;
    std::fs::create_dir_all(dir).map_err(error::io(format!("creating {}", dir.display())))?;
    match config.backend {
        BackendKind::Sim => {
            let sim = backend::sim::Sim::open(dir, &sim_version(config)?, config.sim_stage_time)?;
            let boot = backend::sim::boot_id(dir)?;
            let rebooter = reboot::Rebooter::Sim(dir.clone());
            daemon::run(client, sim, settings(config, boot, rebooter)?).await
        }
        BackendKind::Ab if config.ab_simulate => {
            let device = ab_device(config)?;
            if !dir.join(backend::ab::BOOTED_FILE).exists() {
                // The simulated machine's first power-on.
                backend::ab::simulated_reboot(dir, &device, ab_labels(config)?)?;
            }
            let boot = backend::sim::boot_id(dir)?;
            let rebooter = reboot::Rebooter::SimAb {
                state_dir: dir.clone(),
                device,
                labels: ab_labels(config)?.map(String::from),
            };
            daemon::run(client, ab(config)?, settings(config, boot, rebooter)?).await
        }
        BackendKind::Ab => {
            let (boot, rebooter) = (host_boot(config)?, host_rebooter(config)?);
            daemon::run(client, ab(config)?, settings(config, boot, rebooter)?).await
        }
        BackendKind::Sentinel => {
            let sentinel = backend::sentinel::Sentinel {
                file: config.sentinel_file.clone(),
                command: config
                    .sentinel_command
                    .as_deref()
                    .map(command::Command::parse)
                    .transpose()?,
                os_release: config.os_release.clone(),
            };
            let (boot, rebooter) = (host_boot(config)?, host_rebooter(config)?);
            daemon::run(client, sentinel, settings(config, boot, rebooter)?).await
        }
        BackendKind::Flatcar => {
            let bus = dbus::connect(config.dbus_address.as_deref()).await?;
            let mark_good = config
                .mark_good_command
                .as_deref()
                .map(command::Command::parse)
                .transpose()?;
            let flatcar =
                backend::flatcar::Flatcar::open(&bus, config.os_release.clone(), mark_good).await?;
            let (boot, rebooter) = (host_boot(config)?, host_rebooter(config)?);
            daemon::run(client, flatcar, settings(config, boot, rebooter)?).await
        }
    }
}

/// The daemon's settings for a machine running `boot`, rebooting with `rebooter`.
fn settings(
    config: &Config,
    boot_id: crds::protocol::BootId,
    rebooter: reboot::Rebooter,
) -> Result<daemon::Settings, AgentError> {
    Ok(daemon::Settings {
        node_name: config.node_name.clone(),
        lease_namespace: config.lease_namespace.clone(),
        boot_id,
        record: record::RecordFile::new(&config.state_dir),
        rebooter,
        health_checks: command::Command::parse_all(&config.health_checks)?,
        before_reboot: command::Command::parse_all(&config.before_reboot)?,
        command_timeout: config.command_timeout,
        check_interval: config.check_interval,
        verify_timeout: config.verify_timeout,
    })
}

/// A real machine's boot id: the kernel's, or `--boot-id-file`'s.
fn host_boot(config: &Config) -> Result<crds::protocol::BootId, AgentError> {
    boot::read_or_create(&config.boot_id_file)
}

/// How a real machine reboots: `--reboot-method`.
fn host_rebooter(config: &Config) -> Result<reboot::Rebooter, AgentError> {
    Ok(match config.reboot_method {
        RebootMethod::Logind => reboot::Rebooter::Logind(config.dbus_address.clone()),
        RebootMethod::Signal => reboot::Rebooter::Signal,
        RebootMethod::Command => reboot::Rebooter::Command(command::Command::parse(
            config.reboot_command.as_deref().unwrap_or_default(),
        )?),
    })
}

/// The manual rollback (`--rollback`): the other slot boots next. Returns its label.
pub fn rollback(config: &Config) -> Result<String, AgentError> {
    if config.backend != BackendKind::Ab {
        return Err(AgentError::Config {
            flag: "--rollback",
            reason: "needs --backend ab".into(),
        });
    }
    ab(config)?.rollback()
}

fn ab_device(config: &Config) -> Result<PathBuf, AgentError> {
    config.ab_device.clone().ok_or(AgentError::Config {
        flag: "--ab-device",
        reason: "is required with --backend ab".into(),
    })
}

fn ab_labels(config: &Config) -> Result<[&str; 2], AgentError> {
    match config.ab_labels.as_slice() {
        [a, b] if a != b => Ok([a.as_str(), b.as_str()]),
        labels => Err(AgentError::Config {
            flag: "--ab-labels",
            reason: format!("needs two different partition labels, not {labels:?}"),
        }),
    }
}

fn ab(config: &Config) -> Result<backend::ab::Ab, AgentError> {
    let keys = payload::parse_keys(&config.release_public_keys)?;
    if keys.is_empty() {
        return Err(AgentError::Config {
            flag: "--release-public-key",
            reason: "--backend ab needs at least one: no payload is written unverified".into(),
        });
    }
    let booted = if config.ab_simulate {
        backend::ab::BootedFrom::File(config.state_dir.join(backend::ab::BOOTED_FILE))
    } else if let Some(label) = &config.ab_booted_slot {
        backend::ab::BootedFrom::Label(label.clone())
    } else {
        backend::ab::BootedFrom::Cmdline(config.cmdline.clone())
    };
    Ok(backend::ab::Ab {
        device: ab_device(config)?,
        labels: ab_labels(config)?.map(String::from),
        booted,
        keys,
        stager: payload::Stager {
            pace: pace::Pace {
                io: config.stage_io_class,
                nice: config.stage_nice,
                rate: (config.stage_rate_limit > 0).then_some(config.stage_rate_limit << 20),
                piece: (config.stage_request_kib > 0).then_some(config.stage_request_kib << 10),
            },
            ..payload::Stager::new(&config.state_dir, config.release_ca_file.as_deref())?
        },
        versions_file: config.state_dir.join("ab-versions.json"),
        os_release: config.os_release.clone(),
    })
}

fn sim_version(config: &Config) -> Result<crds::protocol::Version, AgentError> {
    crds::protocol::Version::new(config.sim_version.clone()).map_err(|reason| AgentError::Config {
        flag: "--sim-version",
        reason,
    })
}
