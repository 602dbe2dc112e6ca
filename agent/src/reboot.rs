//! Rebooting the node once granted: logind over D-Bus, SIGRTMIN+5 to PID 1 (systemd's
//! "reboot"), a command, or, for the sim backend, a simulated reboot that ends the
//! process with a new boot id.

use std::path::PathBuf;

use crate::error::AgentError;

/// The zbus proxy (its generated items carry no docs of their own).
#[allow(missing_docs)]
mod logind_proxy {

    /// logind's manager interface, as far as baton uses it.
    #[zbus::proxy(
        interface = "org.freedesktop.login1.Manager",
        default_service = "org.freedesktop.login1",
        default_path = "/org/freedesktop/login1"
    )]
    pub trait Logind {
        /// Reboots; `interactive` = false: no polkit prompt.
        fn reboot(&self, interactive: bool) -> zbus::Result<()>;
    }
}
pub use logind_proxy::LogindProxy;

/// How to reboot.
#[derive(Debug, Clone)]
pub enum Rebooter {
    /// `org.freedesktop.login1.Manager.Reboot(false)` on the system bus (or the bus at
    /// this address).
    Logind(Option<String>),
    /// SIGRTMIN+5 to PID 1.
    Signal,
    /// A command (run without a shell).
    Command(crate::command::Command),
    /// The sim backend's reboot, in its state directory.
    Sim(PathBuf),
    /// A simulated machine with real GPT slots: the gptprio model picks the slot.
    SimAb {
        /// The state directory (boot id, booted slot, fail-next-boot).
        state_dir: PathBuf,
        /// The image file with the slots.
        device: PathBuf,
        /// The slot labels.
        labels: [String; 2],
    },
}

/// What a reboot request led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebooted {
    /// The machine is going down; the process will be stopped.
    Requested,
    /// Simulated: the process should exit, to be started again "after boot".
    Simulated,
}

impl Rebooter {
    /// Asks for the reboot.
    pub async fn reboot(&self) -> Result<Rebooted, AgentError> {
        match self {
            Rebooter::Logind(address) => {
                let bus = crate::dbus::connect(address.as_deref()).await?;
                LogindProxy::new(&bus).await?.reboot(false).await?;
                Ok(Rebooted::Requested)
            }
            Rebooter::Signal => {
                use rustix_libc_wrappers::process::SignalExt;
                let signal = rustix::process::Signal::rt(5)
                    .ok_or_else(|| AgentError::Reboot("SIGRTMIN+5 does not exist here".into()))?;
                rustix::process::kill_process(rustix::process::Pid::INIT, signal).map_err(|e| {
                    AgentError::Reboot(format!(
                        "signalling PID 1: {e} (needs hostPID and CAP_KILL)"
                    ))
                })?;
                Ok(Rebooted::Requested)
            }
            Rebooter::Command(command) => {
                command
                    .run("reboot command", std::time::Duration::from_secs(60))
                    .await
                    .map_err(|e| AgentError::Reboot(e.to_string()))?;
                Ok(Rebooted::Requested)
            }
            Rebooter::Sim(dir) => {
                crate::backend::sim::reboot(dir)?;
                Ok(Rebooted::Simulated)
            }
            Rebooter::SimAb {
                state_dir,
                device,
                labels,
            } => {
                crate::backend::ab::simulated_reboot(
                    state_dir,
                    device,
                    [labels[0].as_str(), labels[1].as_str()],
                )?;
                Ok(Rebooted::Simulated)
            }
        }
    }
}
