//! The simulated backend, for tests and the demo: two slots, which one is booted and
//! which one is armed, and the boot id, all in a state directory. Staging takes a set
//! time; a simulated reboot gives a new boot id and boots the armed slot, unless a
//! `fail-next-boot` file is present, in which case the "bootloader" falls back to the
//! old one (as gptprio does when the new slot fails to boot). While a `fail-staging`
//! file is present, staging fails as a payload that does not verify would.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crds::protocol::{BootId, Slot, Version};

use crate::{
    backend::{Backend, Desired},
    error::{AgentError, io},
    lifecycle::{Status, Update},
    record::write_atomically,
};

/// The file holding the simulated machine.
const MACHINE: &str = "sim-machine.json";
/// The simulated `/proc/sys/kernel/random/boot_id`.
pub const BOOT_ID: &str = "boot_id";
/// Present: the next simulated boot falls back to the old slot.
pub const FAIL_NEXT_BOOT: &str = "fail-next-boot";
/// Present: staging fails (its text is the reason).
pub const FAIL_STAGING: &str = "fail-staging";

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Half {
    /// `SIM-A`.
    A,
    /// `SIM-B`.
    B,
}

impl Half {
    fn other(self) -> Half {
        match self {
            Half::A => Half::B,
            Half::B => Half::A,
        }
    }

    fn slot(self) -> Option<Slot> {
        Slot::new(match self {
            Half::A => "SIM-A",
            Half::B => "SIM-B",
        })
        .ok()
    }
}

/// The simulated machine's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// What slot A holds.
    pub a: Option<Version>,
    /// What slot B holds.
    pub b: Option<Version>,
    /// The slot booted now.
    pub booted: Half,
    /// The slot the next boot tries, if one is armed.
    pub armed: Option<Half>,
}

impl Machine {
    fn holds(&self, half: Half) -> Option<&Version> {
        match half {
            Half::A => self.a.as_ref(),
            Half::B => self.b.as_ref(),
        }
    }

    fn set(&mut self, half: Half, version: Option<Version>) {
        match half {
            Half::A => self.a = version,
            Half::B => self.b = version,
        }
    }
}

/// The sim backend.
#[derive(Debug)]
pub struct Sim {
    dir: PathBuf,
    stage_time: Duration,
}

impl Sim {
    /// Opens (or creates, running `initial`) the simulated machine in `dir`.
    pub fn open(dir: &Path, initial: &Version, stage_time: Duration) -> Result<Sim, AgentError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        if !dir.join(MACHINE).exists() {
            save(
                dir,
                &Machine {
                    a: Some(initial.clone()),
                    b: None,
                    booted: Half::A,
                    armed: None,
                },
            )?;
        }
        if !dir.join(BOOT_ID).exists() {
            new_boot_id(dir)?;
        }
        Ok(Sim {
            dir: dir.to_path_buf(),
            stage_time,
        })
    }
}

fn load(dir: &Path) -> Result<Machine, AgentError> {
    let path = dir.join(MACHINE);
    let text = std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| AgentError::Backend(format!("{}: {e}", path.display())))
}

fn save(dir: &Path, machine: &Machine) -> Result<(), AgentError> {
    let text = serde_json::to_vec_pretty(machine)?;
    write_atomically(&dir.join(MACHINE), &text)
}

fn new_boot_id(dir: &Path) -> Result<(), AgentError> {
    write_atomically(
        &dir.join(BOOT_ID),
        uuid::Uuid::new_v4().to_string().as_bytes(),
    )
}

/// A simulated reboot: a new boot id, and the armed slot booted unless
/// [`FAIL_NEXT_BOOT`] says this boot fails (then the old slot runs again).
pub fn reboot(dir: &Path) -> Result<(), AgentError> {
    let mut machine = load(dir)?;
    if let Some(armed) = machine.armed.take() {
        let fail = dir.join(FAIL_NEXT_BOOT);
        if fail.exists() {
            std::fs::remove_file(&fail).map_err(io("clearing fail-next-boot"))?;
        } else {
            machine.booted = armed;
        }
    }
    save(dir, &machine)?;
    new_boot_id(dir)
}

impl Backend for Sim {
    async fn status(&mut self, desired: Option<&Desired>) -> Result<Status, AgentError> {
        let desired = desired.map(|d| &d.version);
        let machine = load(&self.dir)?;
        let current = machine.holds(machine.booted).cloned();
        let inactive = machine.booted.other();
        let staged = machine
            .armed
            .filter(|h| *h == inactive)
            .and_then(|h| machine.holds(h).cloned());
        let update = match (staged, desired) {
            (Some(s), d) if d.is_none_or(|d| *d == s) => Update::Staged {
                version: Some(s),
                slot: inactive.slot(),
            },
            (_, Some(d)) if current.as_ref() != Some(d) => Update::Available(d.clone()),
            _ => Update::Idle,
        };
        Ok(Status {
            current_version: current,
            slot: machine.booted.slot(),
            update,
            last_checked: None,
            note: None,
        })
    }

    async fn stage(&mut self, desired: &Desired) -> Result<(), AgentError> {
        let version = &desired.version;
        if let Ok(reason) = std::fs::read_to_string(self.dir.join(FAIL_STAGING)) {
            return Err(AgentError::Backend(format!(
                "simulated staging failure: {}",
                reason.trim()
            )));
        }
        let mut machine = load(&self.dir)?;
        let inactive = machine.booted.other();
        // Staging overwrites the inactive slot: it holds nothing usable until done.
        machine.set(inactive, None);
        machine.armed = None;
        save(&self.dir, &machine)?;
        tokio::time::sleep(self.stage_time).await;
        machine.set(inactive, Some(version.clone()));
        machine.armed = Some(inactive);
        save(&self.dir, &machine)
    }

    async fn commit(&mut self) -> Result<(), AgentError> {
        // The booted slot is already the default once booted: nothing to mark.
        Ok(())
    }
}

/// The boot id in `dir`.
pub fn boot_id(dir: &Path) -> Result<BootId, AgentError> {
    crate::boot::read_boot_id(&dir.join(BOOT_ID))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::new(s).unwrap()
    }

    fn d(s: &str) -> Desired {
        Desired {
            version: v(s),
            release: None,
        }
    }

    #[tokio::test]
    async fn stage_reboot_and_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let mut sim = Sim::open(dir.path(), &v("1.0.0"), Duration::ZERO).unwrap();
        let first = boot_id(dir.path()).unwrap();
        let s = sim.status(Some(&d("2.0.0"))).await.unwrap();
        assert_eq!(s.update, Update::Available(v("2.0.0")));
        sim.stage(&d("2.0.0")).await.unwrap();
        let s = sim.status(Some(&d("2.0.0"))).await.unwrap();
        assert_eq!(
            s.update,
            Update::Staged {
                version: Some(v("2.0.0")),
                slot: Slot::new("SIM-B").ok()
            }
        );
        reboot(dir.path()).unwrap();
        assert_ne!(boot_id(dir.path()).unwrap(), first);
        let s = sim.status(Some(&d("2.0.0"))).await.unwrap();
        assert_eq!(
            (s.current_version, s.slot, s.update),
            (Some(v("2.0.0")), Slot::new("SIM-B").ok(), Update::Idle)
        );

        // A failing boot falls back to the old slot.
        sim.stage(&d("3.0.0")).await.unwrap();
        std::fs::write(dir.path().join(FAIL_NEXT_BOOT), "").unwrap();
        reboot(dir.path()).unwrap();
        let s = sim.status(None).await.unwrap();
        assert_eq!(
            (s.current_version, s.slot),
            (Some(v("2.0.0")), Slot::new("SIM-B").ok())
        );
    }
}
