//! The native A/B backend: stages the policy's release into the inactive GPT slot and
//! arms it for one boot; the bootloader (gptprio) falls back to the old slot unless the
//! new one is committed after its health checks.
//!
//! - The booted slot comes from `/proc/cmdline` (the forms Flatcar's GRUB config
//!   writes, `slot::UsrRef`), a flag, or (for the simulated machine) a file.
//! - Which version each slot holds is kept in the state directory: a slot's bytes do
//!   not say.
//! - Staging disarms the inactive slot first, so a half-written slot is never bootable;
//!   the booted slot's data is never touched, and table writes change only the two
//!   slots' attribute bits (`partition_table`).

use std::{collections::BTreeMap, path::PathBuf};

use ed25519_dalek::VerifyingKey;

use crds::protocol::{Slot as SlotName, Version};

use crate::{
    backend::{Backend, Desired},
    error::AgentError,
    lifecycle::{Status, Update},
    payload::{self, Stager},
    record::write_atomically,
    slot::{SlotError, Slots},
};

/// Where the booted slot is read from.
#[derive(Debug, Clone)]
pub enum BootedFrom {
    /// A kernel command line file, such as `/proc/cmdline`.
    Cmdline(PathBuf),
    /// A file holding the label (written by the simulated bootloader).
    File(PathBuf),
    /// Given by flag.
    Label(String),
}

/// The A/B backend.
#[derive(Debug)]
pub struct Ab {
    /// The block device or image file holding both slots.
    pub device: PathBuf,
    /// The two slot labels.
    pub labels: [String; 2],
    /// Where the booted slot is read from.
    pub booted: BootedFrom,
    /// Keys a release signature must verify with.
    pub keys: Vec<VerifyingKey>,
    /// Downloads and writes payloads.
    pub stager: Stager,
    /// Which version each slot holds.
    pub versions_file: PathBuf,
    /// The os-release file, for the version of a slot baton never wrote.
    pub os_release: PathBuf,
}

fn slot_err(e: SlotError) -> AgentError {
    AgentError::Backend(e.to_string())
}

impl Ab {
    fn slots(&self) -> Result<Slots, AgentError> {
        Slots::open(
            &self.device,
            [self.labels[0].as_str(), self.labels[1].as_str()],
        )
        .map_err(slot_err)
    }

    /// The label of the booted slot.
    pub fn booted_label(&self, slots: &Slots) -> Result<String, AgentError> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(crate::error::io(format!("reading {}", p.display())))
        };
        let label = match &self.booted {
            BootedFrom::Label(l) => l.clone(),
            BootedFrom::File(p) => read(p)?.trim().to_string(),
            BootedFrom::Cmdline(p) => slots
                .booted_from_cmdline(&read(p)?)
                .map_err(slot_err)?
                .label
                .clone(),
        };
        if slots.get(&label).is_none() {
            return Err(slot_err(SlotError::Unknown(format!(
                "{label} is not one of {}",
                self.labels.join(", ")
            ))));
        }
        Ok(label)
    }

    fn versions(&self) -> BTreeMap<String, Version> {
        std::fs::read_to_string(&self.versions_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn save_versions(&self, v: &BTreeMap<String, Version>) -> Result<(), AgentError> {
        let text = serde_json::to_vec_pretty(v)?;
        write_atomically(&self.versions_file, &text)
    }

    /// The manual rollback: the other slot (which booted successfully before) boots
    /// next. Returns its label; the caller reboots.
    pub fn rollback(&self) -> Result<String, AgentError> {
        let mut slots = self.slots()?;
        let booted = self.booted_label(&slots)?;
        slots.rollback(&booted).map_err(slot_err)
    }
}

impl Backend for Ab {
    async fn status(&mut self, desired: Option<&Desired>) -> Result<Status, AgentError> {
        let slots = self.slots()?;
        let booted = self.booted_label(&slots)?;
        let versions = self.versions();
        let current = versions
            .get(&booted)
            .cloned()
            .or_else(|| crate::os_release::version(&self.os_release));
        let (Some(me), Some(other)) = (slots.get(&booted), slots.other(&booted)) else {
            return Err(AgentError::Backend("the slots vanished".into()));
        };
        let armed = other.attributes.priority > me.attributes.priority
            && other.attributes.tries > 0
            && !other.attributes.successful;
        let staged = armed.then(|| versions.get(&other.label).cloned()).flatten();
        let update = match (staged, desired) {
            (Some(v), d) if d.is_none_or(|d| d.version == v) => Update::Staged {
                version: Some(v),
                slot: SlotName::new(other.label.clone()).ok(),
            },
            (_, Some(d)) if current.as_ref() != Some(&d.version) => match &d.release {
                Some(_) => Update::Available(d.version.clone()),
                None => Update::Broken(format!(
                    "version {} is wanted but no release image ({}) was published",
                    d.version,
                    crds::protocol::DESIRED_RELEASE.name
                )),
            },
            _ => Update::Idle,
        };
        Ok(Status {
            current_version: current,
            slot: SlotName::new(booted).ok(),
            update,
            last_checked: None,
            note: None,
        })
    }

    async fn stage(&mut self, desired: &Desired) -> Result<(), AgentError> {
        let release = desired
            .release
            .as_ref()
            .ok_or_else(|| AgentError::Backend("no release image to stage".into()))?;
        // Verified before a byte is written.
        payload::verify(release, &self.keys).map_err(|e| AgentError::Backend(e.to_string()))?;
        let mut slots = self.slots()?;
        let booted = self.booted_label(&slots)?;
        let target = slots
            .other(&booted)
            .ok_or_else(|| AgentError::Backend("no inactive slot".into()))?
            .clone();
        let mut versions = self.versions();
        if !self.stager.resumable(release, &target.label) {
            self.stager.forget();
        }
        versions.remove(&target.label);
        self.save_versions(&versions)?;
        slots.disarm(&target.label, &booted).map_err(slot_err)?;
        self.stager
            .stage(release, &self.device, &target)
            .await
            .map_err(|e| AgentError::Backend(format!("staging into {}: {e}", target.label)))?;
        versions.insert(target.label.clone(), desired.version.clone());
        self.save_versions(&versions)?;
        slots.arm(&target.label, &booted).map_err(slot_err)?;
        self.stager.forget();
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), AgentError> {
        let mut slots = self.slots()?;
        let booted = self.booted_label(&slots)?;
        slots.commit(&booted).map_err(slot_err)
    }
}

/// The simulated machine's reboot for the A/B backend: the gptprio model picks the slot
/// (using up a try of an unproven one); when `fail-next-boot` is present in
/// `state_dir`, an unproven slot's boot fails and the bootloader picks again (falling
/// back). Writes the booted label and a new boot id.
pub fn simulated_reboot(
    state_dir: &std::path::Path,
    device: &std::path::Path,
    labels: [&str; 2],
) -> Result<(), AgentError> {
    let mut slots = Slots::open(device, labels).map_err(slot_err)?;
    let fail = state_dir.join(crate::backend::sim::FAIL_NEXT_BOOT);
    let mut chosen = None;
    for _ in 0..16 {
        chosen = crate::slot::gptprio_boot(&mut slots).map_err(slot_err)?;
        let proven = chosen
            .as_ref()
            .and_then(|c| slots.get(c))
            .is_some_and(|s| s.attributes.successful);
        if proven || !fail.exists() {
            break;
        }
        // This boot of the unproven slot fails; the machine resets and tries again.
        std::fs::remove_file(&fail).map_err(crate::error::io("clearing fail-next-boot"))?;
    }
    let chosen = chosen
        .ok_or_else(|| AgentError::Backend("no bootable slot: the machine is bricked".into()))?;
    write_atomically(&state_dir.join(BOOTED_FILE), chosen.as_bytes())?;
    write_atomically(
        &state_dir.join(crate::backend::sim::BOOT_ID),
        uuid::Uuid::new_v4().to_string().as_bytes(),
    )
}

/// The simulated machine's booted-slot file in the state directory.
pub const BOOTED_FILE: &str = "booted-slot";
