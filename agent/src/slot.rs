//! A/B slots: two GPT partitions of Flatcar's /usr type found by label (`USR-A`/`USR-B`
//! by default, as on Flatcar), with the ChromeOS/Flatcar attribute bits that GRUB's
//! gptprio reads: priority (bits 48–51), tries left (52–55) and successful (56).
//! Arming, committing and rolling back change only those bits of the two slot entries
//! (and the table's CRCs), in place (`partition_table`): no entry moves, nothing else
//! in either table changes.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::{gptprio::USR_TYPE, partition_table};

/// Why a slot operation failed.
#[derive(Debug, Error)]
pub enum SlotError {
    /// The partition table could not be read or written.
    #[error("partition table of {path}: {message}")]
    Table {
        /// The device or image.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A label names no partition (or more than one).
    #[error(
        "{path} has {count} partitions labelled {label:?} (partitions: {found}); check --ab-labels"
    )]
    Label {
        /// The device or image.
        path: PathBuf,
        /// The label looked for.
        label: String,
        /// How many partitions carry it.
        count: usize,
        /// The labels the table has.
        found: String,
    },
    /// A slot's partition is not of Flatcar's /usr type, so gptprio would never boot it.
    #[error(
        "{path}: partition {number} ({label}) has type {found}, not Flatcar's /usr type {USR_TYPE}: the bootloader would never boot it"
    )]
    Type {
        /// The device or image.
        path: PathBuf,
        /// The label.
        label: String,
        /// Its entry number.
        number: u32,
        /// Its type GUID.
        found: String,
    },
    /// The slot asked for is the one booted: it is never written.
    #[error("refusing to touch {0}: it is the booted slot")]
    Booted(String),
    /// The booted slot could not be told.
    #[error("cannot tell the booted slot: {0}")]
    Unknown(String),
    /// The manual rollback has nowhere to go.
    #[error("cannot roll back: {0}")]
    NoRollback(String),
}

/// The gptprio attribute bits of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attributes {
    /// 0–15; the bootloader tries the highest first.
    pub priority: u8,
    /// 0–15 boots left before the slot is skipped (unless successful).
    pub tries: u8,
    /// It booted and passed its checks once.
    pub successful: bool,
}

const PRIORITY_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESSFUL_BIT: u64 = 1 << 56;
const NIBBLE: u64 = 0xf;

impl Attributes {
    /// Reads the bits from a GPT entry's attribute field.
    pub fn from_flags(flags: u64) -> Attributes {
        Attributes {
            priority: ((flags >> PRIORITY_SHIFT) & NIBBLE) as u8,
            tries: ((flags >> TRIES_SHIFT) & NIBBLE) as u8,
            successful: flags & SUCCESSFUL_BIT != 0,
        }
    }

    /// Writes the bits into `flags`, keeping every other bit.
    pub fn apply(self, flags: u64) -> u64 {
        let cleared =
            flags & !(NIBBLE << PRIORITY_SHIFT) & !(NIBBLE << TRIES_SHIFT) & !SUCCESSFUL_BIT;
        cleared
            | (u64::from(self.priority.min(15)) << PRIORITY_SHIFT)
            | (u64::from(self.tries.min(15)) << TRIES_SHIFT)
            | if self.successful { SUCCESSFUL_BIT } else { 0 }
    }

    /// Whether a gptprio bootloader would consider the slot at all.
    pub fn bootable(self) -> bool {
        self.priority > 0 && (self.successful || self.tries > 0)
    }
}

/// One slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Its partition label.
    pub label: String,
    /// Its partition number (1-based).
    pub number: u32,
    /// Its partition GUID (what `usr=PARTUUID=` names).
    pub part_guid: String,
    /// Its first byte on the device.
    pub offset: u64,
    /// Its size in bytes.
    pub len: u64,
    /// Its attribute bits.
    pub attributes: Attributes,
}

/// The /usr partition a kernel command line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsrRef {
    /// By partition GUID.
    PartUuid(String),
    /// By partition label.
    PartLabel(String),
}

impl std::fmt::Display for UsrRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UsrRef::PartUuid(u) => write!(f, "PARTUUID={u}"),
            UsrRef::PartLabel(l) => write!(f, "PARTLABEL={l}"),
        }
    }
}

impl UsrRef {
    /// Finds the /usr partition on a kernel command line. Flatcar's `grub.cfg`
    /// (flatcar/scripts `build_library/grub.cfg`, `@@MOUNTUSR@@` filled in by
    /// `build_library/grub_install.sh`) writes, for the gptprio entry,
    /// `mount.usr=/dev/mapper/usr verity.usr=PARTUUID=<uuid>` on verity (production)
    /// images and `mount.usr=PARTUUID=<uuid>` without verity, and `PARTLABEL=USR-A`
    /// (or `-B`) in the same places for its manual entries; early CoreOS configs and
    /// the legacy syslinux/pvgrub ones wrote `usr=PARTUUID=` and `usr=PARTLABEL=`.
    /// The `/dev/disk/by-partuuid/` and `/dev/disk/by-partlabel/` spellings of the
    /// same are accepted too. `verity.usr` names the partition under a
    /// `mount.usr=/dev/mapper/…` device; any other /usr source is an error.
    pub fn from_cmdline(cmdline: &str) -> Result<UsrRef, SlotError> {
        let arg = |key: &str| {
            cmdline
                .split_whitespace()
                .filter_map(|a| a.split_once('='))
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v)
                .next_back()
        };
        let unknown = |why: String| SlotError::Unknown(format!("{why}: {}", cmdline.trim()));
        let (key, value) = match (arg("verity.usr"), arg("mount.usr"), arg("usr")) {
            (Some(v), _, _) => ("verity.usr", v),
            (None, Some(m), _) if m.starts_with("/dev/mapper/") => {
                return Err(unknown(format!(
                    "mount.usr={m} is a device-mapper device but no verity.usr= names its partition"
                )));
            }
            (None, Some(m), _) => ("mount.usr", m),
            (None, None, Some(u)) => ("usr", u),
            (None, None, None) => {
                return Err(unknown(
                    "the kernel command line names no /usr partition (no verity.usr=, mount.usr= or usr=)".into(),
                ));
            }
        };
        let by = |prefixes: [&str; 2]| prefixes.iter().find_map(|p| value.strip_prefix(p));
        if let Some(uuid) = by(["PARTUUID=", "/dev/disk/by-partuuid/"]) {
            return Ok(UsrRef::PartUuid(uuid.to_ascii_lowercase()));
        }
        if let Some(label) = by(["PARTLABEL=", "/dev/disk/by-partlabel/"]) {
            return Ok(UsrRef::PartLabel(label.to_string()));
        }
        Err(unknown(format!(
            "{key}={value} names /usr in a form baton does not know (PARTUUID=, PARTLABEL=, /dev/disk/by-partuuid/ or /dev/disk/by-partlabel/)"
        )))
    }
}

/// The two slots of a device or image file.
#[derive(Debug, Clone)]
pub struct Slots {
    /// The device or image file.
    pub path: PathBuf,
    /// Slot A and slot B, in label order.
    pub slots: [Slot; 2],
}

fn table_error(path: &Path) -> impl Fn(String) -> SlotError + '_ {
    move |message| SlotError::Table {
        path: path.to_path_buf(),
        message,
    }
}

impl Slots {
    /// Reads the two slots labelled `labels` on `path`.
    pub fn open(path: &Path, labels: [&str; 2]) -> Result<Slots, SlotError> {
        let err = table_error(path);
        let disk = ::gpt::GptConfig::new()
            .writable(false)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        let block = u64::from(*disk.logical_block_size());
        let all: Vec<(u32, &::gpt::partition::Partition)> = disk
            .partitions()
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(n, p)| (*n, p))
            .collect();
        let find = |label: &str| -> Result<Slot, SlotError> {
            let matching: Vec<_> = all.iter().filter(|(_, p)| p.name == label).collect();
            let [(number, p)] = matching.as_slice() else {
                return Err(SlotError::Label {
                    path: path.to_path_buf(),
                    label: label.to_string(),
                    count: matching.len(),
                    found: all
                        .iter()
                        .map(|(_, p)| p.name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            let type_guid = p.part_type_guid.guid.to_string().to_ascii_lowercase();
            if type_guid != USR_TYPE {
                return Err(SlotError::Type {
                    path: path.to_path_buf(),
                    label: label.to_string(),
                    number: *number,
                    found: type_guid,
                });
            }
            Ok(Slot {
                label: label.to_string(),
                number: *number,
                part_guid: p.part_guid.to_string(),
                offset: p.first_lba * block,
                len: (p.last_lba + 1 - p.first_lba) * block,
                attributes: Attributes::from_flags(p.flags),
            })
        };
        Ok(Slots {
            path: path.to_path_buf(),
            slots: [find(labels[0])?, find(labels[1])?],
        })
    }

    /// The slot labelled `label`.
    pub fn get(&self, label: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.label == label)
    }

    /// The slot that is not `label`.
    pub fn other(&self, label: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.label != label)
    }

    /// The slot a kernel command line booted, in every form Flatcar's GRUB config
    /// writes ([`UsrRef::from_cmdline`]). A command line that names no slot in a form
    /// known here is an error that quotes it, never a guess.
    pub fn booted_from_cmdline(&self, cmdline: &str) -> Result<&Slot, SlotError> {
        let usr = UsrRef::from_cmdline(cmdline)?;
        self.slots
            .iter()
            .find(|s| match &usr {
                UsrRef::PartUuid(u) => s.part_guid.eq_ignore_ascii_case(u),
                UsrRef::PartLabel(l) => s.label == *l,
            })
            .ok_or_else(|| {
                SlotError::Unknown(format!(
                    "the command line's /usr ({usr}) is neither {} ({})",
                    self.labels(),
                    cmdline.trim()
                ))
            })
    }

    fn labels(&self) -> String {
        format!("{} and {}", self.slots[0].label, self.slots[1].label)
    }

    /// Sets the attribute bits of the slots named in `changes`, in place, and syncs the
    /// device: every other bit and byte of the table stays as it was.
    pub fn set(&mut self, changes: &[(&str, Attributes)]) -> Result<(), SlotError> {
        let err = table_error(&self.path);
        let mut writes: Vec<(u32, Attributes)> = Vec::new();
        for (label, attributes) in changes {
            let slot = self
                .get(label)
                .ok_or_else(|| err(format!("no slot {label}")))?;
            writes.push((slot.number, *attributes));
        }
        let numbers: Vec<u32> = writes.iter().map(|(n, _)| *n).collect();
        partition_table::set_attributes(&self.path, &numbers, |number, flags| {
            writes
                .iter()
                .find(|(n, _)| *n == number)
                .map_or(flags, |(_, a)| a.apply(flags))
        })
        .map_err(|e| err(e.to_string()))?;
        for (label, attributes) in changes {
            if let Some(s) = self.slots.iter_mut().find(|s| s.label == *label) {
                s.attributes = *attributes;
            }
        }
        Ok(())
    }

    /// Arms `target` for one try at the highest priority. The booted slot stays
    /// successful (so the bootloader falls back to it); its priority is lowered by one
    /// only when it already has the highest (15), to make room above it.
    pub fn arm(&mut self, target: &str, booted: &str) -> Result<(), SlotError> {
        if target == booted {
            return Err(SlotError::Booted(target.to_string()));
        }
        let current = self.get(booted).map(|s| s.attributes).unwrap_or_default();
        let priority = current.priority.saturating_add(1).clamp(2, 15);
        let mut changes = vec![(
            target,
            Attributes {
                priority,
                tries: 1,
                successful: false,
            },
        )];
        if current.priority >= priority {
            changes.push((
                booted,
                Attributes {
                    priority: priority - 1,
                    ..current
                },
            ));
        }
        self.set(&changes)
    }

    /// Disarms `target` (priority 0): staging over it may begin.
    pub fn disarm(&mut self, target: &str, booted: &str) -> Result<(), SlotError> {
        if target == booted {
            return Err(SlotError::Booted(target.to_string()));
        }
        self.set(&[(target, Attributes::default())])
    }

    /// Marks the booted slot good: successful, no tries needed.
    pub fn commit(&mut self, booted: &str) -> Result<(), SlotError> {
        let current = self.get(booted).map(|s| s.attributes).unwrap_or_default();
        self.set(&[(
            booted,
            Attributes {
                priority: current.priority.max(1),
                tries: 0,
                successful: true,
            },
        )])
    }

    /// The manual rollback: the other slot, which must have booted successfully
    /// before, becomes the highest priority; the booted one drops below it.
    pub fn rollback(&mut self, booted: &str) -> Result<String, SlotError> {
        let other = self
            .other(booted)
            .ok_or_else(|| SlotError::NoRollback("there is no other slot".into()))?
            .clone();
        if !other.attributes.successful {
            return Err(SlotError::NoRollback(format!(
                "{} has never booted successfully (it is not marked successful), so there is nothing to roll back to",
                other.label
            )));
        }
        let current = self.get(booted).map(|s| s.attributes).unwrap_or_default();
        self.set(&[
            (
                other.label.as_str(),
                Attributes {
                    priority: 2,
                    ..other.attributes
                },
            ),
            (
                booted,
                Attributes {
                    priority: 1,
                    ..current
                },
            ),
        ])?;
        Ok(other.label)
    }
}

/// Creates an image file with a protective MBR and a GPT holding two `slot_len`-byte
/// slots labelled `labels`, slot A booted and proven (priority 1, successful), slot B
/// empty: a disk for tests, demos and benchmarks. The file is sparse.
pub fn create_image(path: &Path, labels: [&str; 2], slot_len: u64) -> Result<Slots, SlotError> {
    let err = table_error(path);
    let block = 512u64;
    let total = 2 * slot_len + (4 << 20);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    file.set_len(total).map_err(|e| err(e.to_string()))?;
    let sectors = u32::try_from(total / block - 1).unwrap_or(u32::MAX);
    ::gpt::mbr::ProtectiveMBR::with_lb_size(sectors)
        .overwrite_lba0(&mut file)
        .map_err(|e| err(e.to_string()))?;
    let mut disk = ::gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(::gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(file, None)
        .map_err(|e| err(e.to_string()))?;
    let slot_a = Attributes {
        priority: 1,
        tries: 0,
        successful: true,
    };
    for (label, attributes) in [(labels[0], slot_a), (labels[1], Attributes::default())] {
        disk.add_partition(
            label,
            slot_len,
            ::gpt::partition_types::COREOS_USR,
            attributes.apply(0),
            Some(2048),
        )
        .map_err(|e| err(e.to_string()))?;
    }
    let file = disk.write().map_err(|e| err(e.to_string()))?;
    file.sync_all().map_err(|e| err(e.to_string()))?;
    Slots::open(path, labels)
}

/// A simulated boot of the disk `slots` lives on, as GRUB's gptprio picks it
/// ([`crate::gptprio`]): the label booted, or `None` when nothing can boot. The slots'
/// bits are read again afterwards.
pub fn gptprio_boot(slots: &mut Slots) -> Result<Option<String>, SlotError> {
    let path = slots.path.clone();
    let chosen = crate::gptprio::boot(&path).map_err(|e| table_error(&path)(e.to_string()))?;
    let labels = [slots.slots[0].label.clone(), slots.slots[1].label.clone()];
    *slots = Slots::open(&path, [labels[0].as_str(), labels[1].as_str()])?;
    Ok(chosen.map(|e| e.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arming_commit_and_rollback_touch_only_the_bits_they_should() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let mut slots = create_image(&image, ["USR-A", "USR-B"], 4 << 20).unwrap();
        assert!(
            matches!(slots.arm("USR-A", "USR-A"), Err(SlotError::Booted(_))),
            "never the booted slot"
        );
        slots.arm("USR-B", "USR-A").unwrap();
        let reread = Slots::open(&image, ["USR-A", "USR-B"]).unwrap();
        assert_eq!(
            reread.slots[0].attributes,
            Attributes {
                priority: 1,
                tries: 0,
                successful: true
            }
        );
        assert_eq!(
            reread.slots[1].attributes,
            Attributes {
                priority: 2,
                tries: 1,
                successful: false
            }
        );
        // gptprio boots B once (using its try), then, unproven, falls back to A.
        let mut s = reread;
        assert_eq!(gptprio_boot(&mut s).unwrap().as_deref(), Some("USR-B"));
        assert_eq!(gptprio_boot(&mut s).unwrap().as_deref(), Some("USR-A"));
        // Armed again and committed: B is proven and keeps booting.
        s.arm("USR-B", "USR-A").unwrap();
        assert_eq!(gptprio_boot(&mut s).unwrap().as_deref(), Some("USR-B"));
        s.commit("USR-B").unwrap();
        assert_eq!(gptprio_boot(&mut s).unwrap().as_deref(), Some("USR-B"));
        assert_eq!(gptprio_boot(&mut s).unwrap().as_deref(), Some("USR-B"));
        // The manual rollback: A (proven) boots next.
        assert_eq!(s.rollback("USR-B").unwrap(), "USR-A");
        assert_eq!(gptprio_boot(&mut s).unwrap().as_deref(), Some("USR-A"));
        // The command line names the booted slot by PARTUUID.
        let uuid = s.slots[1].part_guid.to_uppercase();
        let booted = s
            .booted_from_cmdline(&format!(
                "BOOT_IMAGE=/vmlinuz mount.usr=/dev/mapper/usr verity.usr=PARTUUID={uuid} rw"
            ))
            .unwrap();
        assert_eq!(booted.label, "USR-B");
    }

    /// Every form Flatcar's GRUB config puts on `/proc/cmdline` (flatcar/scripts
    /// `build_library/grub.cfg` at stable-4593.2.5, 9fd32ab8279a, with `@@MOUNTUSR@@`
    /// from `build_library/grub_install.sh`), and the older ones.
    #[test]
    fn every_command_line_flatcar_writes_names_its_usr_partition() {
        let a = "7130c94a-213a-4e5a-8e26-6cce9662f132";
        let tail = "rootflags=rw mount.usrflags=ro consoleblank=0 root=LABEL=ROOT console=ttyS0,115200n8 flatcar.first_boot=detected flatcar.oem.id=qemu";
        let hash =
            "verity.usrhash=4c6fda32d2a55d5d3d9ff8d9b1d4b0a1a4fbd0c9a2b8f8f0a3c2e6d4f1b0c9e8";
        let rows = [
            // The gptprio entry of a production (verity) image.
            (
                format!(
                    "BOOT_IMAGE=/flatcar/vmlinuz-a mount.usr=/dev/mapper/usr verity.usr=PARTUUID={a} {tail} {hash}"
                ),
                UsrRef::PartUuid(a.into()),
            ),
            // The manual "Flatcar USR-B" entry of a production image.
            (
                format!(
                    "BOOT_IMAGE=/flatcar/vmlinuz-b mount.usr=/dev/mapper/usr verity.usr=PARTLABEL=USR-B {tail} {hash}"
                ),
                UsrRef::PartLabel("USR-B".into()),
            ),
            // A non-verity image: the gptprio entry, then the manual one.
            (
                format!("BOOT_IMAGE=/flatcar/vmlinuz-a mount.usr=PARTUUID={a} {tail}"),
                UsrRef::PartUuid(a.into()),
            ),
            (
                format!("BOOT_IMAGE=/flatcar/vmlinuz-a mount.usr=PARTLABEL=USR-A {tail}"),
                UsrRef::PartLabel("USR-A".into()),
            ),
            // The first CoreOS GRUB config (2014), and the legacy syslinux/pvgrub ones.
            (
                format!(
                    "BOOT_IMAGE=/coreos/vmlinuz-a usr=PARTUUID={} {tail}",
                    a.to_uppercase()
                ),
                UsrRef::PartUuid(a.into()),
            ),
            (
                format!("cros_legacy usr=PARTLABEL=USR-B {tail}"),
                UsrRef::PartLabel("USR-B".into()),
            ),
            // The by-partuuid spelling.
            (
                format!("mount.usr=/dev/disk/by-partuuid/{a} {tail}"),
                UsrRef::PartUuid(a.into()),
            ),
        ];
        for (cmdline, want) in rows {
            assert_eq!(UsrRef::from_cmdline(&cmdline).unwrap(), want, "{cmdline}");
        }
        for (cmdline, why) in [
            (
                format!("BOOT_IMAGE=/flatcar/vmlinuz-a {tail}"),
                "names no /usr partition",
            ),
            (
                format!("mount.usr=/dev/mapper/usr {tail}"),
                "no verity.usr= names its partition",
            ),
            (
                format!("mount.usr=/dev/sda3 {tail}"),
                "mount.usr=/dev/sda3 names /usr in a form baton does not know",
            ),
        ] {
            let err = UsrRef::from_cmdline(&cmdline).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(tail), "{err}");
        }
    }

    #[test]
    fn wrong_labels_say_what_the_table_has() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        create_image(&image, ["ROOT-A", "ROOT-B"], 1 << 20).unwrap();
        let e = Slots::open(&image, ["USR-A", "USR-B"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0 partitions labelled \"USR-A\" (partitions: ROOT-A, ROOT-B)"),
            "{e}"
        );
    }

    #[test]
    fn attribute_bits_sit_where_chromeos_and_flatcar_put_them() {
        let a = Attributes {
            priority: 2,
            tries: 1,
            successful: false,
        };
        assert_eq!(a.apply(0), 0x0012_0000_0000_0000);
        let good = Attributes {
            priority: 1,
            tries: 0,
            successful: true,
        };
        assert_eq!(good.apply(0), 0x0101_0000_0000_0000);
        // Other bits (such as the UEFI "required" bit 0) survive.
        assert_eq!(Attributes::from_flags(good.apply(1)), good);
        assert_eq!(good.apply(1) & 1, 1);
        assert_eq!(
            Attributes::from_flags(0x00ff_0000_0000_0000),
            Attributes {
                priority: 15,
                tries: 15,
                successful: false
            }
        );
    }
}
