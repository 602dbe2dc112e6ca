//! Canary promotion between pools (`spec.promotion: {after, soak}`): a pool reboots
//! into a release version only once every node of the `after` pool has run it, done,
//! for `soak`. What the upstream pool reached is read from its status (`completed`),
//! which its own reconcile writes; a chain (dev → stage → prod) follows from each link.
//!
//! It must never let a downstream node reboot into a version its upstream pool has not
//! finished and soaked, and never fail open: a missing, halted or invalid upstream is a
//! wait with its reason.

use jiff::{SignedDuration, Timestamp};

use crds::{UpdatePolicy, policy::condition, protocol::Version};

/// The upstream pool, as the downstream one sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// No policy of that name.
    Missing(String),
    /// The policy.
    Found {
        /// Its name.
        name: String,
        /// The version its pool completed, and since when.
        completed: Option<(Version, Timestamp)>,
        /// Why it is halted (or its spec invalid), if it is.
        blocked: Option<String>,
    },
}

/// The promotion rule of a policy, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromotionRule {
    /// The upstream policy.
    pub after: String,
    /// How long the upstream must have been done.
    pub soak: SignedDuration,
}

/// The upstream pool of the policy named `own`, from every policy.
pub fn upstream<'a>(
    own: &str,
    policies: impl IntoIterator<Item = &'a UpdatePolicy>,
) -> Option<Upstream> {
    let policies: Vec<&UpdatePolicy> = policies.into_iter().collect();
    let after = policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(own))?
        .spec
        .promotion
        .as_ref()?
        .after
        .clone();
    let Some(up) = policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(after.as_str()))
    else {
        return Some(Upstream::Missing(after));
    };
    let status = up.status.as_ref();
    let completed = status
        .and_then(|s| s.completed.as_ref())
        .and_then(|c| Some((Version::new(&c.version).ok()?, c.since.0)));
    let blocked = status
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| {
                    c.status == "True"
                        && (c.type_ == condition::HALTED || c.type_ == condition::INVALID_SPEC)
                })
                .map(|c| format!("{}: {}", c.type_, c.message))
        })
        .or_else(|| {
            // Completion is recorded against a release version: without one it never is.
            up.spec.release.is_none().then(|| {
                "it has no spec.release, and promotion compares release versions".to_string()
            })
        });
    Some(Upstream::Found {
        name: after,
        completed,
        blocked,
    })
}

/// The promotion chain through `own`, if its `after` links lead back to it: `a → b → a`.
pub fn cycle<'a>(
    own: &str,
    policies: impl IntoIterator<Item = &'a UpdatePolicy>,
) -> Option<String> {
    let policies: Vec<&UpdatePolicy> = policies.into_iter().collect();
    let after = |name: &str| {
        policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .and_then(|p| p.spec.promotion.as_ref())
            .map(|p| p.after.clone())
    };
    let mut chain = vec![own.to_string()];
    let mut at = own.to_string();
    while let Some(next) = after(&at) {
        chain.push(next.clone());
        if next == own {
            return Some(chain.join(" → "));
        }
        if chain.len() > policies.len() + 1 {
            // A cycle further up that does not pass through `own`: its own members
            // report it.
            return None;
        }
        at = next;
    }
    None
}

/// Whether a node of the downstream pool may reboot into `version` at `now`, or why not
/// (and, while soaking, when that ends).
pub fn check(
    rule: &PromotionRule,
    upstream: Option<&Upstream>,
    version: Option<&Version>,
    now: Timestamp,
) -> Result<(), (String, Option<Timestamp>)> {
    let found = match upstream {
        None | Some(Upstream::Missing(_)) => {
            return Err((
                format!(
                    "promotion: UpdatePolicy {} does not exist (create it, or remove spec.promotion)",
                    rule.after
                ),
                None,
            ));
        }
        Some(found) => found,
    };
    let Upstream::Found {
        name,
        completed,
        blocked,
    } = found
    else {
        return Ok(());
    };
    if let Some(why) = blocked {
        return Err((
            format!("promotion: upstream pool {name} is blocked ({why})"),
            None,
        ));
    }
    let Some(version) = version else {
        return Err((
            "promotion: the version to reboot into is not known yet".into(),
            None,
        ));
    };
    match completed {
        Some((done, since)) if done == version => {
            let until = since.checked_add(rule.soak).unwrap_or(*since);
            if now >= until {
                Ok(())
            } else {
                Err((
                    format!(
                        "promotion: {name} completed {version} at {since}; soaking until {until}"
                    ),
                    Some(until),
                ))
            }
        }
        Some((done, _)) => Err((
            format!("promotion: {name} completed {done}, not {version}"),
            None,
        )),
        None => Err((
            format!("promotion: {name} has not completed {version}"),
            None,
        )),
    }
}
