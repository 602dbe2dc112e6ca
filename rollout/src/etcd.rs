//! The etcd quorum guard's view: each etcd member, the node it runs on, and whether
//! the cluster keeps quorum with one control-plane node down. Pure: the operator
//! observes etcd and fills in an [`Etcd`]; the rules here never reach it themselves.
//!
//! It must never let a control-plane node go down while another member is unhealthy,
//! missing or behind, nor call a member back that has not caught up with its leader.

use std::collections::BTreeMap;

/// The label that makes a node a control-plane node (and its pre-1.24 spelling).
pub const CONTROL_PLANE_LABELS: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

/// How far (in raft entries) a member may trail its leader and count as caught up.
/// Below etcd's `--snapshot-catchup-entries` (5,000): a member this close replicates
/// from the leader's log, it does not wait for a snapshot; and it is a few seconds of
/// writes on a busy cluster, so the skew between two status reads stays inside it.
pub const MAX_LAG: u64 = 1_000;

/// Whether `labels` make a node a control-plane node.
pub fn is_control_plane(labels: &BTreeMap<String, String>) -> bool {
    CONTROL_PLANE_LABELS.iter().any(|l| labels.contains_key(*l))
}

/// What baton knows of etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Etcd {
    /// The operator has no etcd access configured: quorum is not checked (control-plane
    /// nodes still go one at a time).
    #[default]
    NotObserved,
    /// Access is configured, but no member answered the member list.
    Unreachable(String),
    /// The members, as observed.
    Members(Vec<Member>),
    /// Only what the operator last reported (the plugin has no etcd access): the guard
    /// holds control-plane nodes for this reason.
    Reported(String),
}

/// One etcd member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its member ID.
    pub id: u64,
    /// Its name (`--name`; kubeadm names it after the node).
    pub name: String,
    /// The node it runs on, when one matches (by name, or by its peer address).
    pub node: Option<String>,
    /// Its client URL, where it is asked about itself.
    pub client_url: Option<String>,
    /// It answered, knows a leader, raised no alarm and served a quorum read.
    pub healthy: bool,
    /// Why it is not healthy.
    pub problem: Option<String>,
    /// It is the leader.
    pub leader: bool,
    /// Its raft index, when it answered.
    pub raft_index: Option<u64>,
    /// It is a learner (no vote; never counted for quorum).
    pub learner: bool,
}

/// Why the guard holds a control-plane node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// etcd is configured but unreachable.
    Unreachable(String),
    /// Another member is unhealthy.
    Unhealthy {
        /// The member.
        member: String,
        /// Why.
        problem: String,
    },
    /// A member trails its leader.
    Behind {
        /// The member.
        member: String,
        /// By how many entries.
        entries: u64,
    },
    /// No member is the leader.
    NoLeader,
    /// The operator reports the guard holding, for this reason.
    Reported(String),
    /// Taking this member down would leave fewer voters than a quorum.
    NoQuorum {
        /// Voting members.
        voters: usize,
        /// Voters still up with this one down.
        left: usize,
    },
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hold::Unreachable(why) => write!(f, "etcd is unreachable: {why}"),
            Hold::Unhealthy { member, problem } => {
                write!(f, "etcd member {member} is unhealthy: {problem}")
            }
            Hold::Behind { member, entries } => write!(
                f,
                "etcd member {member} is {entries} entries behind its leader (at most {MAX_LAG})"
            ),
            Hold::NoLeader => write!(f, "etcd has no leader"),
            Hold::Reported(why) => write!(f, "{why}"),
            Hold::NoQuorum { voters, left } => write!(
                f,
                "etcd would keep {left} of {voters} voting members, below quorum"
            ),
        }
    }
}

impl Etcd {
    /// The members, when observed.
    pub fn members(&self) -> &[Member] {
        match self {
            Etcd::Members(m) => m,
            _ => &[],
        }
    }

    /// The member running on `node`.
    pub fn member_of(&self, node: &str) -> Option<&Member> {
        self.members()
            .iter()
            .find(|m| m.node.as_deref() == Some(node))
    }

    /// The leader, if one member says it is.
    pub fn leader(&self) -> Option<&Member> {
        self.members().iter().find(|m| m.leader)
    }

    /// Members observed, but none on a node of this cluster: etcd runs elsewhere
    /// (external etcd), and rebooting a control-plane node does not touch its quorum.
    pub fn external(&self) -> bool {
        matches!(self, Etcd::Members(m) if !m.is_empty() && m.iter().all(|m| m.node.is_none()))
    }

    /// In words, for `why` and the plan: what the guard sees.
    pub fn summary(&self) -> String {
        match self {
            Etcd::NotObserved => "etcd not observed: quorum not checked".into(),
            Etcd::Unreachable(why) => format!("etcd unreachable: {why}"),
            Etcd::Reported(why) => why.clone(),
            Etcd::Members(_) if self.external() => {
                "external etcd (no member runs on a node): quorum not at stake".into()
            }
            Etcd::Members(ms) => {
                let healthy = ms.iter().filter(|m| m.healthy).count();
                format!("etcd: {healthy}/{} members healthy", ms.len())
            }
        }
    }

    /// How far `member` trails the leader, when both reported an index.
    pub fn lag(&self, member: &Member) -> Option<u64> {
        let leader = self.leader()?.raft_index?;
        Some(leader.saturating_sub(member.raft_index?))
    }

    /// Whether the member on `node` may go down now: every member healthy (its own too:
    /// a member already unhealthy is for an admin to look at first), every other one
    /// caught up, a leader known, and quorum kept without it. A single-member etcd
    /// cannot keep quorum through any reboot: its node goes alone and last
    /// ([`crate::control_plane`]), and passes here. Nodes without a member, external
    /// etcd and etcd not observed pass.
    pub fn may_go_down(&self, node: &str) -> Result<(), Hold> {
        let members = match self {
            Etcd::NotObserved => return Ok(()),
            Etcd::Unreachable(why) => return Err(Hold::Unreachable(why.clone())),
            Etcd::Reported(why) => return Err(Hold::Reported(why.clone())),
            Etcd::Members(_) if self.external() => return Ok(()),
            Etcd::Members(m) => m,
        };
        let Some(own) = self.member_of(node) else {
            return Ok(());
        };
        for other in members {
            if !other.healthy {
                return Err(Hold::Unhealthy {
                    member: other.label(),
                    problem: other.problem.clone().unwrap_or_else(|| "no answer".into()),
                });
            }
        }
        if self.leader().is_none() {
            return Err(Hold::NoLeader);
        }
        for other in members.iter().filter(|m| m.id != own.id) {
            self.caught_up(other)?;
        }
        let voters = members.iter().filter(|m| !m.learner).count();
        let left = members
            .iter()
            .filter(|m| !m.learner && m.id != own.id && m.healthy)
            .count();
        if !own.learner && voters > 1 && left < voters / 2 + 1 {
            return Err(Hold::NoQuorum { voters, left });
        }
        Ok(())
    }

    /// Whether the member on `node` is back: healthy and caught up with its leader.
    /// Nodes without a member (and etcd not observed, or external) pass.
    pub fn rejoined(&self, node: &str) -> Result<(), Hold> {
        match self {
            Etcd::NotObserved => return Ok(()),
            Etcd::Unreachable(why) => return Err(Hold::Unreachable(why.clone())),
            Etcd::Reported(why) => return Err(Hold::Reported(why.clone())),
            Etcd::Members(_) => {}
        }
        let Some(own) = self.member_of(node) else {
            return Ok(());
        };
        if !own.healthy {
            return Err(Hold::Unhealthy {
                member: own.label(),
                problem: own.problem.clone().unwrap_or_else(|| "no answer".into()),
            });
        }
        if self.leader().is_none() {
            return Err(Hold::NoLeader);
        }
        self.caught_up(own)
    }

    /// The member leadership should move to before the leader on `node` goes down: the
    /// healthy, caught-up voter furthest ahead (then by name). `None` when the member on
    /// `node` is not the leader, or is the only voter (there is no one to hand over to).
    pub fn successor(&self, node: &str) -> Option<Result<&Member, Hold>> {
        let own = self.member_of(node).filter(|m| m.leader)?;
        if !self.members().iter().any(|m| m.id != own.id && !m.learner) {
            return None;
        }
        let best = self
            .members()
            .iter()
            .filter(|m| m.id != own.id && m.healthy && !m.learner)
            .filter(|m| self.caught_up(m).is_ok())
            .max_by(|a, b| {
                a.raft_index
                    .cmp(&b.raft_index)
                    .then_with(|| b.name.cmp(&a.name))
            });
        Some(best.ok_or_else(|| Hold::Unhealthy {
            member: "every other member".into(),
            problem: "none is healthy and caught up to take over leadership".into(),
        }))
    }

    fn caught_up(&self, member: &Member) -> Result<(), Hold> {
        match self.lag(member) {
            Some(entries) if entries > MAX_LAG => Err(Hold::Behind {
                member: member.label(),
                entries,
            }),
            Some(_) => Ok(()),
            None => Err(Hold::Unhealthy {
                member: member.label(),
                problem: "reported no raft index".into(),
            }),
        }
    }
}

impl Member {
    /// Its name, with its node when that differs.
    pub fn label(&self) -> String {
        match &self.node {
            Some(node) if *node != self.name => format!("{} (node {node})", self.name),
            _ => self.name.clone(),
        }
    }
}

/// The node an etcd member runs on: the node of the same name, else the node one of
/// whose addresses is the host of a peer URL. `nodes` pairs each node's name with its
/// addresses.
pub fn node_of<'a>(
    name: &str,
    peer_urls: &[String],
    nodes: impl IntoIterator<Item = (&'a str, Vec<&'a str>)>,
) -> Option<String> {
    let hosts: Vec<&str> = peer_urls.iter().filter_map(|u| url_host(u)).collect();
    let mut by_address = None;
    for (node, addresses) in nodes {
        if node == name {
            return Some(node.to_string());
        }
        if by_address.is_none() && addresses.iter().any(|a| hosts.contains(a)) {
            by_address = Some(node.to_string());
        }
    }
    by_address
}

/// The host of `scheme://host:port/...` (an IPv6 host without its brackets).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next();
    }
    authority.split(':').next()
}
