//! `maxUnavailablePerZone`: at most so many nodes disrupted at once in any one zone, on
//! top of the pool's budget. A zone's cap is taken of the pool's nodes in that zone
//! (a percentage rounded down, minimum 1); nodes without the zone label form one zone,
//! shown as [`NO_ZONE`].
//!
//! It must never let a grant take a zone past its cap, counting a zone's disrupted
//! nodes exactly as the pool's budget counts them.

use std::collections::HashMap;

use crds::Budget;

use crate::{plan::Skip, policy::Policy, snapshot::NodeView};

/// How the zone of nodes without the zone label is named.
pub const NO_ZONE: &str = "(no zone)";

/// Each zone's cap and use in one decision.
#[derive(Debug, Default)]
pub struct ZoneCaps<'a> {
    cap: Option<Budget>,
    label: String,
    /// Pool nodes per zone.
    sizes: HashMap<&'a str, usize>,
    /// Disrupted nodes per zone (this policy's lease holders and the pool's unavailable
    /// nodes).
    used: HashMap<&'a str, usize>,
}

impl<'a> ZoneCaps<'a> {
    /// The caps of `policy` over `pool`, with `down` (every node that counts against the
    /// budget) already in use.
    pub fn new(
        policy: &Policy,
        pool: &[&'a NodeView],
        down: impl IntoIterator<Item = &'a NodeView>,
    ) -> ZoneCaps<'a> {
        let label = policy.zone_label.clone();
        let Some(cap) = policy.zone_budget else {
            return ZoneCaps::default();
        };
        let mut sizes = HashMap::new();
        for n in pool {
            *sizes.entry(n.zone(&label)).or_default() += 1;
        }
        let mut used = HashMap::new();
        for n in down {
            *used.entry(n.zone(&label)).or_default() += 1;
        }
        ZoneCaps {
            cap: Some(cap),
            label,
            sizes,
            used,
        }
    }

    /// The cap of `zone` (`None` without `maxUnavailablePerZone`).
    pub fn limit(&self, zone: &str) -> Option<usize> {
        let size = self.sizes.get(zone).copied().unwrap_or(0);
        self.cap.map(|c| c.resolve(size))
    }

    /// Whether `node` fits in its zone's cap.
    pub fn check(&self, node: &NodeView) -> Result<(), Skip> {
        let zone = node.zone(&self.label);
        match self.limit(zone) {
            Some(limit) if self.used.get(zone).copied().unwrap_or(0) >= limit => {
                Err(Skip::ZoneBudget(display(zone).to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Records a grant to `node`.
    pub fn granted(&mut self, node: &'a NodeView) {
        if self.cap.is_some() {
            *self.used.entry(node.zone(&self.label)).or_default() += 1;
        }
    }
}

/// A zone's name as shown: [`NO_ZONE`] for nodes without the label.
pub fn display(zone: &str) -> &str {
    if zone.is_empty() { NO_ZONE } else { zone }
}
