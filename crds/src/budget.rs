//! `maxUnavailable`: how many nodes of a pool may be disrupted at once.
//!
//! Written as a count (`2`) or a percentage (`"20%"`). A percentage is taken of the
//! nodes the policy selects and rounded *down*, with a minimum of 1, as OpenShift's
//! MachineConfigPool does: 10% of 5 nodes is 1 node, 40% of 10 nodes is 4 nodes.

use std::fmt;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use thiserror::Error;

/// CEL rule on `maxUnavailable` (an int-or-string field).
pub const RULE: &str = "type(self) == int ? self >= 1 : self.matches('^(100|[1-9][0-9]?)%$')";
/// The message shown when [`RULE`] rejects a `maxUnavailablePerZone`.
pub const PER_ZONE_MESSAGE: &str = "maxUnavailablePerZone must be a node count of at least 1 (such as 1) or a percentage from 1% to 100% of each zone's nodes (such as \"50%\")";
/// The message shown when [`RULE`] rejects a value.
pub const RULE_MESSAGE: &str = "maxUnavailable must be a node count of at least 1 (such as 2) or a percentage from 1% to 100% (such as \"25%\"); to stop updates set paused: true";

/// A parsed `maxUnavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// At most this many nodes at once.
    Count(u32),
    /// At most this percentage (1 to 100) of the selected nodes, rounded down, minimum 1.
    Percent(u8),
}

/// A `maxUnavailable` that is neither a positive count nor a percentage from 1% to 100%.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "maxUnavailable {value} is invalid: use a count of at least 1 or a percentage from 1% to 100%"
)]
pub struct BudgetError {
    /// The rejected value as written.
    pub value: String,
}

impl Budget {
    /// The default: one node at a time.
    pub const ONE: Budget = Budget::Count(1);

    /// Parses the int-or-string form users write.
    pub fn parse(value: &IntOrString) -> Result<Self, BudgetError> {
        let err = |value: String| BudgetError { value };
        match value {
            IntOrString::Int(n) if *n >= 1 => Ok(Budget::Count(*n as u32)),
            IntOrString::Int(n) => Err(err(n.to_string())),
            IntOrString::String(s) => {
                let digits = s.strip_suffix('%').ok_or_else(|| err(format!("{s:?}")))?;
                if digits.is_empty()
                    || digits.starts_with('0')
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(err(format!("{s:?}")));
                }
                match digits.parse::<u8>() {
                    Ok(p @ 1..=100) => Ok(Budget::Percent(p)),
                    _ => Err(err(format!("{s:?}"))),
                }
            }
        }
    }

    /// How many of `total` nodes may be disrupted at once: never more than `total`, and
    /// at least 1 when there is at least one node.
    pub fn resolve(self, total: usize) -> usize {
        let raw = match self {
            Budget::Count(n) => n as usize,
            Budget::Percent(p) => total * p as usize / 100,
        };
        if total == 0 { 0 } else { raw.clamp(1, total) }
    }

    /// The int-or-string form of this budget.
    pub fn to_int_or_string(self) -> IntOrString {
        match self {
            Budget::Count(n) => IntOrString::Int(n as i32),
            Budget::Percent(p) => IntOrString::String(format!("{p}%")),
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::ONE
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Count(n) => write!(f, "{n}"),
            Budget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(v: &str) -> IntOrString {
        IntOrString::String(v.into())
    }

    #[test]
    fn parses_counts_and_percentages() {
        assert_eq!(Budget::parse(&IntOrString::Int(3)), Ok(Budget::Count(3)));
        assert_eq!(Budget::parse(&s("40%")), Ok(Budget::Percent(40)));
        assert_eq!(Budget::parse(&s("100%")), Ok(Budget::Percent(100)));
        assert_eq!(Budget::parse(&s("1%")), Ok(Budget::Percent(1)));
    }

    #[test]
    fn rejects_zero_negative_and_malformed_values() {
        for bad in [IntOrString::Int(0), IntOrString::Int(-1)] {
            assert!(Budget::parse(&bad).is_err(), "{bad:?}");
        }
        for bad in [
            "0%", "101%", "40", "%", "4 0%", "-5%", "05%", "1.5%", "", "abc",
        ] {
            assert!(Budget::parse(&s(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn percentages_round_down_with_a_minimum_of_one() {
        assert_eq!(Budget::Percent(40).resolve(10), 4);
        assert_eq!(Budget::Percent(10).resolve(5), 1);
        assert_eq!(Budget::Percent(33).resolve(10), 3);
        assert_eq!(Budget::Percent(100).resolve(7), 7);
        assert_eq!(Budget::Percent(1).resolve(1), 1);
    }

    #[test]
    fn counts_never_exceed_the_pool() {
        assert_eq!(Budget::Count(5).resolve(3), 3);
        assert_eq!(Budget::Count(1).resolve(0), 0);
    }

    #[test]
    fn the_default_is_one_node_at_a_time() {
        assert_eq!(Budget::default(), Budget::Count(1));
    }

    proptest! {
        #[test]
        fn resolved_budget_is_within_one_and_the_pool(p in 1u8..=100, total in 1usize..10_000) {
            let n = Budget::Percent(p).resolve(total);
            prop_assert!(n >= 1 && n <= total);
            prop_assert!(n <= (total * p as usize / 100).max(1));
        }

        #[test]
        fn budget_round_trips_through_int_or_string(b in prop_oneof![
            (1u32..1000).prop_map(Budget::Count),
            (1u8..=100).prop_map(Budget::Percent),
        ]) {
            prop_assert_eq!(Budget::parse(&b.to_int_or_string()), Ok(b));
        }
    }
}
