//! The boot choice of Flatcar's GRUB (`gptprio.next`, the CoreOS patch to GRUB's
//! `grub-core/commands/gptprio.c`), as a model for simulated boots and for predicting
//! the next boot:
//!
//! - it considers every entry of the table with Flatcar's /usr type GUID, in table
//!   order, and ignores entries of other types whatever their label;
//! - an entry can boot when it has tries left or is marked successful, and its
//!   priority is above the best found so far, which starts at 0 (so priority 0 never
//!   boots, and on equal priorities the lowest entry number wins);
//! - the chosen entry's tries are decremented whenever they are above 0, even when it
//!   is marked successful; the bootloader never changes a priority.

use std::path::Path;

use crate::{
    partition_table::{self, TableError},
    slot::Attributes,
};

/// Flatcar's /usr partition type (`coreos-usr`).
pub const USR_TYPE: &str = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";

/// One entry of the table, as the bootloader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its entry number (1-based).
    pub number: u32,
    /// Its type GUID, lowercase.
    pub type_guid: String,
    /// Its label.
    pub name: String,
    /// Its attribute field.
    pub flags: u64,
}

/// The entry gptprio boots next among `entries` (in table order), if any can boot.
pub fn next(entries: &[Entry]) -> Option<&Entry> {
    let mut best: Option<&Entry> = None;
    let mut best_priority = 0u8;
    for entry in entries.iter().filter(|e| e.type_guid == USR_TYPE) {
        let a = Attributes::from_flags(entry.flags);
        if (a.tries > 0 || a.successful) && a.priority > best_priority {
            best_priority = a.priority;
            best = Some(entry);
        }
    }
    best
}

/// The attribute field of `entry` once gptprio has booted it: tries down by one when
/// above 0; everything else as it was.
pub fn after_boot(flags: u64) -> u64 {
    let a = Attributes::from_flags(flags);
    if a.tries == 0 {
        return flags;
    }
    Attributes {
        tries: a.tries - 1,
        ..a
    }
    .apply(flags)
}

/// Every used entry of the table on `path`, in table order.
pub fn entries(path: &Path) -> Result<Vec<Entry>, TableError> {
    let disk = gpt::GptConfig::new()
        .writable(false)
        .open(path)
        .map_err(|e| TableError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(disk
        .partitions()
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(n, p)| Entry {
            number: *n,
            type_guid: p.part_type_guid.guid.to_string().to_ascii_lowercase(),
            name: p.name.clone(),
            flags: p.flags,
        })
        .collect())
}

/// A simulated boot of the disk on `path`: picks the entry as GRUB would and uses up
/// one of its tries on the disk. Returns it, or `None` when nothing can boot.
pub fn boot(path: &Path) -> Result<Option<Entry>, TableError> {
    let all = entries(path)?;
    let Some(chosen) = next(&all).cloned() else {
        return Ok(None);
    };
    if Attributes::from_flags(chosen.flags).tries > 0 {
        partition_table::set_attributes(path, &[chosen.number], |_, flags| after_boot(flags))?;
    }
    Ok(Some(chosen))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(number: u32, type_guid: &str, a: Attributes) -> Entry {
        Entry {
            number,
            type_guid: type_guid.into(),
            name: format!("P{number}"),
            flags: a.apply(0),
        }
    }

    fn attrs(priority: u8, tries: u8, successful: bool) -> Attributes {
        Attributes {
            priority,
            tries,
            successful,
        }
    }

    #[test]
    fn the_highest_bootable_priority_wins_and_ties_go_to_the_lowest_entry() {
        let t = [
            entry(3, USR_TYPE, attrs(1, 0, true)),
            entry(4, USR_TYPE, attrs(2, 1, false)),
        ];
        assert_eq!(next(&t).map(|e| e.number), Some(4));
        let tie = [
            entry(3, USR_TYPE, attrs(2, 0, true)),
            entry(4, USR_TYPE, attrs(2, 1, false)),
        ];
        assert_eq!(next(&tie).map(|e| e.number), Some(3));
        let out_of_tries = [
            entry(3, USR_TYPE, attrs(1, 0, true)),
            entry(4, USR_TYPE, attrs(2, 0, false)),
        ];
        assert_eq!(next(&out_of_tries).map(|e| e.number), Some(3));
        let priority_zero = [entry(3, USR_TYPE, attrs(0, 5, true))];
        assert_eq!(next(&priority_zero), None);
    }

    #[test]
    fn entries_of_other_types_never_boot_whatever_their_label() {
        let t = [
            entry(3, USR_TYPE, attrs(1, 0, true)),
            Entry {
                name: "USR-B".into(),
                ..entry(
                    4,
                    "0fc63daf-8483-4772-8e79-3d69d8477de4",
                    attrs(9, 1, false),
                )
            },
        ];
        assert_eq!(next(&t).map(|e| e.number), Some(3));
    }

    #[test]
    fn a_boot_uses_a_try_even_of_a_successful_entry_and_never_changes_priority() {
        let flags = attrs(2, 3, true).apply(1);
        let after = Attributes::from_flags(after_boot(flags));
        assert_eq!(after, attrs(2, 2, true));
        assert_eq!(after_boot(flags) & 1, 1, "other bits stay");
        assert_eq!(
            after_boot(attrs(1, 0, true).apply(0)),
            attrs(1, 0, true).apply(0)
        );
    }

    /// GRUB's rules, written out plainly: among /usr-typed entries in table order, keep
    /// the first one with the highest priority among those that have tries left or are
    /// successful; priority 0 never boots.
    fn reference(entries: &[Entry]) -> Option<u32> {
        let bootable: Vec<(u32, u8)> = entries
            .iter()
            .filter(|e| e.type_guid == USR_TYPE)
            .map(|e| (e.number, Attributes::from_flags(e.flags)))
            .filter(|(_, a)| a.tries > 0 || a.successful)
            .map(|(n, a)| (n, a.priority))
            .filter(|(_, p)| *p > 0)
            .collect();
        let top = bootable.iter().map(|(_, p)| *p).max()?;
        bootable
            .iter()
            .filter(|(_, p)| *p == top)
            .map(|(n, _)| *n)
            .min()
    }

    fn any_entry() -> impl Strategy<Value = (bool, u8, u8, bool, u64)> {
        (any::<bool>(), 0u8..16, 0u8..16, any::<bool>(), any::<u64>())
    }

    proptest! {
        /// Random attribute states on a table with gaps (any subset of entries 1..=12)
        /// and extra /usr-typed entries, with random other bits.
        #[test]
        fn the_model_matches_grubs_rules(
            rows in proptest::collection::btree_map(1u32..=12, any_entry(), 0..8)
        ) {
            let entries: Vec<Entry> = rows
                .iter()
                .map(|(n, (usr, p, t, s, other))| Entry {
                    number: *n,
                    type_guid: if *usr { USR_TYPE.into() } else { "0fc63daf-8483-4772-8e79-3d69d8477de4".into() },
                    name: format!("P{n}"),
                    flags: attrs(*p, *t, *s).apply(*other),
                })
                .collect();
            prop_assert_eq!(next(&entries).map(|e| e.number), reference(&entries));
            if let Some(e) = next(&entries) {
                let before = Attributes::from_flags(e.flags);
                let after = Attributes::from_flags(after_boot(e.flags));
                prop_assert_eq!(after.priority, before.priority);
                prop_assert_eq!(after.successful, before.successful);
                prop_assert_eq!(after.tries, before.tries.saturating_sub(1));
                prop_assert_eq!(after_boot(e.flags) & !(0x1ff << 48), e.flags & !(0x1ff << 48));
            }
        }
    }
}
