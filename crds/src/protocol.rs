//! The node protocol: every `baton.dev/*` annotation and label that the agent, the
//! operator and admins exchange, as typed keys with parse and format.
//!
//! A malformed value parses to a [`ProtocolError`], never to a default: the operator
//! reports it and does not trust the node. An absent key is `Ok(None)`.

use std::{collections::BTreeMap, fmt, marker::PhantomData, str::FromStr};

use jiff::Timestamp;
use thiserror::Error;

/// Where a key lives on its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `metadata.annotations`
    Annotation,
    /// `metadata.labels` (values must also be valid label values)
    Label,
}

/// Who may write a key. The agent writes only its own Node's agent keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// `baton-agent`, on its own Node.
    Agent,
    /// `baton-operator`.
    Operator,
    /// A human or a tool acting for one, such as `kubectl baton pause`.
    Admin,
}

/// A protocol key whose value has type `T`.
#[derive(Debug)]
pub struct Key<T> {
    /// The full key, always under `baton.dev/`.
    pub name: &'static str,
    /// Annotation or label.
    pub kind: Kind,
    /// Who writes it.
    pub writer: Writer,
    value: PhantomData<fn() -> T>,
}

/// A value that fails to parse, with the key it was found under.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{key}={value:?} is malformed: {reason}")]
pub struct ProtocolError {
    /// The key.
    pub key: &'static str,
    /// The value found.
    pub value: String,
    /// Why it was refused.
    pub reason: String,
}

/// A type that can be carried as a protocol value.
pub trait Value: Sized {
    /// Parses the text form, or says why it is refused.
    fn parse(text: &str) -> Result<Self, String>;
    /// The text form.
    fn format(&self) -> String;
}

impl<T: Value> Key<T> {
    const fn new(name: &'static str, kind: Kind, writer: Writer) -> Self {
        Key {
            name,
            kind,
            writer,
            value: PhantomData,
        }
    }

    /// Reads this key from an annotation or label map.
    pub fn read(&self, map: Option<&BTreeMap<String, String>>) -> Result<Option<T>, ProtocolError> {
        let Some(text) = map.and_then(|m| m.get(self.name)) else {
            return Ok(None);
        };
        self.parse(text).map(Some)
    }

    /// Parses one value of this key.
    pub fn parse(&self, text: &str) -> Result<T, ProtocolError> {
        T::parse(text).map_err(|reason| ProtocolError {
            key: self.name,
            value: text.to_string(),
            reason,
        })
    }

    /// The text to write for `value`.
    pub fn format(&self, value: &T) -> String {
        value.format()
    }
}

// === Values ===

/// What the agent is doing, published as `baton.dev/state`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum AgentState {
    /// Up to date, or nothing to install.
    Idle,
    /// Writing the new version into the inactive slot; nothing is disrupted yet.
    Staging,
    /// Staged and waiting for a reboot grant.
    RebootRequired,
    /// Granted: running before-reboot steps and rebooting.
    Rebooting,
    /// Booted again: checking the boot id, slot, version and health.
    Verifying,
    /// Booted the new version, healthy, and committed the slot.
    Done,
    /// Booted the old version (the bootloader fell back, or the agent rolled back).
    RolledBack,
    /// Could not stage or verify; `baton.dev/message` says why.
    Failed,
}

impl AgentState {
    /// Every state, in lifecycle order.
    pub const ALL: [AgentState; 8] = [
        AgentState::Idle,
        AgentState::Staging,
        AgentState::RebootRequired,
        AgentState::Rebooting,
        AgentState::Verifying,
        AgentState::Done,
        AgentState::RolledBack,
        AgentState::Failed,
    ];

    /// The text form.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Idle => "Idle",
            AgentState::Staging => "Staging",
            AgentState::RebootRequired => "RebootRequired",
            AgentState::Rebooting => "Rebooting",
            AgentState::Verifying => "Verifying",
            AgentState::Done => "Done",
            AgentState::RolledBack => "RolledBack",
            AgentState::Failed => "Failed",
        }
    }

    /// Whether this state reports a failed update.
    pub fn is_failure(self) -> bool {
        matches!(self, AgentState::RolledBack | AgentState::Failed)
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AgentState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        AgentState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<_> = AgentState::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown state, expected one of {}", known.join(", "))
            })
    }
}

impl Value for AgentState {
    fn parse(text: &str) -> Result<Self, String> {
        text.parse()
    }
    fn format(&self) -> String {
        self.as_str().to_string()
    }
}

impl Value for bool {
    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err("expected \"true\" or \"false\"".into()),
        }
    }
    fn format(&self) -> String {
        self.to_string()
    }
}

impl Value for Timestamp {
    fn parse(text: &str) -> Result<Self, String> {
        text.parse::<Timestamp>()
            .map_err(|e| format!("expected an RFC 3339 time such as 2026-01-31T02:00:00Z ({e})"))
    }
    fn format(&self) -> String {
        // Whole seconds, UTC, "Z": what kubectl shows and humans read.
        Timestamp::from_second(self.as_second())
            .map(|t| t.to_string())
            .unwrap_or_else(|_| self.to_string())
    }
}

/// Defines a string newtype with a validity check, as a protocol value.
macro_rules! token {
    ($(#[$doc:meta])* $name:ident, $max:expr, $allowed:expr, $what:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(text: String) -> Result<Self, String> {
                $name::new(text)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl $name {
            /// Checks and wraps a value.
            pub fn new(text: impl Into<String>) -> Result<Self, String> {
                let text = text.into();
                let allowed: fn(char) -> bool = $allowed;
                if text.is_empty() || text.len() > $max || !text.chars().all(allowed) {
                    return Err(format!("expected {}", $what));
                }
                Ok($name(text))
            }

            /// The text form.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Value for $name {
            fn parse(text: &str) -> Result<Self, String> {
                $name::new(text)
            }
            fn format(&self) -> String {
                self.0.clone()
            }
        }
    };
}

token!(
    /// An OS version, such as `4230.2.1`.
    Version, 128,
    |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'),
    "1 to 128 letters, digits, '.', '_', '+' or '-'"
);
token!(
    /// A boot id, as in `/proc/sys/kernel/random/boot_id`.
    BootId, 64,
    |c| c.is_ascii_hexdigit() || c == '-',
    "1 to 64 hex digits and dashes, as in /proc/sys/kernel/random/boot_id"
);
token!(
    /// An A/B slot name, such as `USR-A`.
    Slot, 36,
    |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
    "1 to 36 letters, digits, '.', '_' or '-', such as USR-A"
);

/// Free text for humans, at most 1024 characters on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message(pub String);

impl Message {
    /// `text` as a message: newlines become spaces, and it is cut at 1024 characters.
    pub fn line(text: &str) -> Message {
        Message(text.replace('\n', " ").chars().take(1024).collect())
    }
}

/// Where the A/B backend gets the release's image, as the operator publishes it from
/// the policy's `release` (JSON). The agent trusts none of it until the signature
/// verifies with a key it was configured with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReleaseRef {
    /// The image URL (HTTPS).
    pub url: String,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// The base64 ed25519 signature of the SHA-256 digest.
    pub signature: String,
}

impl Value for ReleaseRef {
    fn parse(text: &str) -> Result<Self, String> {
        if text.len() > 4096 {
            return Err("expected at most 4096 characters".into());
        }
        serde_json::from_str(text)
            .map_err(|e| format!("expected JSON {{url, sha256, signature}} ({e})"))
    }
    fn format(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Value for Message {
    fn parse(text: &str) -> Result<Self, String> {
        if text.chars().count() > 1024 || text.contains('\n') {
            return Err("expected one line of at most 1024 characters".into());
        }
        Ok(Message(text.to_string()))
    }
    fn format(&self) -> String {
        self.0.clone()
    }
}

// === Keys on the Node ===

use Kind::{Annotation, Label};
use Writer::{Admin, Agent, Operator};

/// The agent's state.
pub const STATE: Key<AgentState> = Key::new("baton.dev/state", Annotation, Agent);
/// The version the node runs now.
pub const CURRENT_VERSION: Key<Version> = Key::new("baton.dev/current-version", Annotation, Agent);
/// The version the agent has staged or is staging.
pub const TARGET_VERSION: Key<Version> = Key::new("baton.dev/target-version", Annotation, Agent);
/// The boot id the agent runs under.
pub const BOOT_ID: Key<BootId> = Key::new("baton.dev/boot-id", Annotation, Agent);
/// The A/B slot the node booted from.
pub const SLOT: Key<Slot> = Key::new("baton.dev/slot", Annotation, Agent);
/// A human-readable word on the agent's state, such as why it rolled back.
pub const MESSAGE: Key<Message> = Key::new("baton.dev/message", Annotation, Agent);
/// When the agent last checked for an update.
pub const LAST_CHECKED: Key<Timestamp> = Key::new("baton.dev/last-checked", Annotation, Agent);
/// The agent asks for a reboot (annotation; mirrored by [`REBOOT_REQUIRED_LABEL`]).
pub const REBOOT_REQUIRED: Key<bool> = Key::new("baton.dev/reboot-required", Annotation, Agent);
/// The same request as a label, so that `kubectl get nodes -l` can select it.
pub const REBOOT_REQUIRED_LABEL: Key<bool> = Key::new("baton.dev/reboot-required", Label, Agent);

/// The operator's grant: the agent may reboot, but only out of the boot it names, so a
/// grant that outlives its reboot can never cause a second one.
pub const REBOOT_OK: Key<BootId> = Key::new("baton.dev/reboot-ok", Annotation, Operator);
/// Baton cordoned this node; only then does baton uncordon it.
pub const CORDONED: Key<bool> = Key::new("baton.dev/cordoned", Annotation, Operator);
/// Baton added `node.kubernetes.io/exclude-from-external-load-balancers`.
pub const LB_EXCLUDED: Key<bool> = Key::new("baton.dev/lb-excluded", Annotation, Operator);
/// The version the policy's release wants on this node (A/B and sim backends).
pub const DESIRED_VERSION: Key<Version> =
    Key::new("baton.dev/desired-version", Annotation, Operator);
/// The image of the release the operator published (A/B backend).
pub const DESIRED_RELEASE: Key<ReleaseRef> =
    Key::new("baton.dev/desired-release", Annotation, Operator);
/// The operator marked this node failed; the value is the reason.
pub const FAILURE: Key<Message> = Key::new("baton.dev/failure", Annotation, Operator);
/// Set while before-reboot hooks should run.
pub const BEFORE_REBOOT: Key<bool> = Key::new("baton.dev/before-reboot", Label, Operator);
/// Set while after-reboot hooks should run.
pub const AFTER_REBOOT: Key<bool> = Key::new("baton.dev/after-reboot", Label, Operator);

/// An admin asks the agent to drop its failed verdict for this boot (the value) and
/// report afresh, after fixing the cause (`kubectl baton retry`). The agent removes it.
pub const RETRY: Key<BootId> = Key::new("baton.dev/retry", Annotation, Admin);
/// An admin paused this node: no new disruption starts on it.
pub const PAUSED: Key<bool> = Key::new("baton.dev/paused", Annotation, Admin);

/// Keys on the operator's reboot `Lease` objects.
pub mod lease {
    use super::*;

    /// The policy that granted the lease.
    pub const POLICY: Key<Message> = Key::new("baton.dev/policy", Annotation, Operator);
    /// The node's boot id when the lease was granted.
    pub const GRANTED_BOOT_ID: Key<BootId> =
        Key::new("baton.dev/granted-boot-id", Annotation, Operator);
    /// The version the node had staged at the grant; the reboot must land on it.
    pub const TARGET_VERSION: Key<Version> =
        Key::new("baton.dev/target-version", Annotation, Operator);
    /// When the drain started; its timeout runs from here, across leader changes.
    pub const DRAIN_STARTED_AT: Key<Timestamp> =
        Key::new("baton.dev/drain-started-at", Annotation, Operator);
    /// When the drain finished (or was given up under `onTimeout`).
    pub const DRAINED_AT: Key<Timestamp> = Key::new("baton.dev/drained-at", Annotation, Operator);
    /// When the node was verified back on the new version; settle time runs from here.
    pub const DONE_AT: Key<Timestamp> = Key::new("baton.dev/done-at", Annotation, Operator);
    /// The node failed while holding this lease; the value is the reason.
    pub const FAILURE: Key<Message> = Key::new("baton.dev/failure", Annotation, Operator);
}

/// Keys the agent may remove although it never writes them: it drops an admin's
/// `baton.dev/retry` once it has acted on it (or when it names another boot).
pub const AGENT_REMOVES: &[&str] = &[RETRY.name];

/// The names of the node keys of `kind` that `writer` writes.
pub fn written_by(writer: Writer, kind: Kind) -> impl Iterator<Item = &'static str> {
    NODE_KEYS
        .iter()
        .filter(move |(_, k, w)| *w == writer && *k == kind)
        .map(|(name, _, _)| *name)
}

/// Every node key's name, kind and writer, for documentation and RBAC checks.
pub const NODE_KEYS: &[(&str, Kind, Writer)] = &[
    (STATE.name, STATE.kind, STATE.writer),
    (
        CURRENT_VERSION.name,
        CURRENT_VERSION.kind,
        CURRENT_VERSION.writer,
    ),
    (
        TARGET_VERSION.name,
        TARGET_VERSION.kind,
        TARGET_VERSION.writer,
    ),
    (BOOT_ID.name, BOOT_ID.kind, BOOT_ID.writer),
    (SLOT.name, SLOT.kind, SLOT.writer),
    (MESSAGE.name, MESSAGE.kind, MESSAGE.writer),
    (LAST_CHECKED.name, LAST_CHECKED.kind, LAST_CHECKED.writer),
    (
        REBOOT_REQUIRED.name,
        REBOOT_REQUIRED.kind,
        REBOOT_REQUIRED.writer,
    ),
    (
        REBOOT_REQUIRED_LABEL.name,
        REBOOT_REQUIRED_LABEL.kind,
        REBOOT_REQUIRED_LABEL.writer,
    ),
    (REBOOT_OK.name, REBOOT_OK.kind, REBOOT_OK.writer),
    (CORDONED.name, CORDONED.kind, CORDONED.writer),
    (LB_EXCLUDED.name, LB_EXCLUDED.kind, LB_EXCLUDED.writer),
    (
        DESIRED_VERSION.name,
        DESIRED_VERSION.kind,
        DESIRED_VERSION.writer,
    ),
    (
        DESIRED_RELEASE.name,
        DESIRED_RELEASE.kind,
        DESIRED_RELEASE.writer,
    ),
    (FAILURE.name, FAILURE.kind, FAILURE.writer),
    (RETRY.name, RETRY.kind, RETRY.writer),
    (BEFORE_REBOOT.name, BEFORE_REBOOT.kind, BEFORE_REBOOT.writer),
    (AFTER_REBOOT.name, AFTER_REBOOT.kind, AFTER_REBOOT.writer),
    (PAUSED.name, PAUSED.kind, PAUSED.writer),
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(k: &str, v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(k.to_string(), v.to_string())])
    }

    fn round_trip<T: Value + PartialEq + fmt::Debug>(key: &Key<T>, value: T) {
        let text = key.format(&value);
        assert_eq!(
            key.read(Some(&map(key.name, &text))).unwrap(),
            Some(value),
            "{}",
            key.name
        );
    }

    fn rejects<T: Value + fmt::Debug>(key: &Key<T>, text: &str) {
        let err = key.read(Some(&map(key.name, text))).unwrap_err();
        assert_eq!(err.key, key.name);
        assert_eq!(err.value, text);
        assert!(err.to_string().contains(key.name), "{err}");
    }

    #[test]
    fn the_uninstall_steps_remove_every_node_key() {
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
        )
        .unwrap();
        let section = docs
            .split("## Uninstalling")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/operations.md has an Uninstalling section");
        let command = |verb: &str| {
            section
                .split(&format!("kubectl {verb} nodes --all"))
                .nth(1)
                .map(|rest| rest.split("\n```").next().unwrap_or_default().to_string())
                .unwrap_or_default()
        };
        let (annotate, label) = (command("annotate"), command("label"));
        for (name, kind, _) in NODE_KEYS {
            let removes = match kind {
                Kind::Annotation => &annotate,
                Kind::Label => &label,
            };
            let removes = removes.split("kubectl ").next().unwrap_or_default();
            assert!(
                removes.contains(&format!("{name}-")),
                "the uninstall steps leave {name} ({kind:?}) on the Nodes"
            );
        }
    }

    #[test]
    fn every_key_is_under_the_baton_prefix_and_unique_per_kind() {
        let mut seen = std::collections::HashSet::new();
        for (name, kind, _) in NODE_KEYS {
            assert!(name.starts_with("baton.dev/"), "{name}");
            assert!(seen.insert((name, *kind as u8)), "{name} twice");
        }
    }

    #[test]
    fn absent_keys_read_as_none() {
        assert_eq!(STATE.read(None), Ok(None));
        assert_eq!(STATE.read(Some(&BTreeMap::new())), Ok(None));
    }

    #[test]
    fn every_state_round_trips() {
        for state in AgentState::ALL {
            round_trip(&STATE, state);
        }
    }

    #[test]
    fn malformed_states_are_errors_not_defaults() {
        for bad in ["", "idle", "IDLE", "Done ", "Unknown", "0"] {
            rejects(&STATE, bad);
        }
    }

    #[test]
    fn flags_round_trip_and_reject_anything_but_true_and_false() {
        for key in [
            &REBOOT_REQUIRED,
            &REBOOT_REQUIRED_LABEL,
            &CORDONED,
            &LB_EXCLUDED,
            &BEFORE_REBOOT,
            &AFTER_REBOOT,
            &PAUSED,
        ] {
            round_trip(key, true);
            round_trip(key, false);
            for bad in ["", "yes", "True", "1", " true"] {
                rejects(key, bad);
            }
        }
    }

    #[test]
    fn a_release_ref_round_trips_as_json_and_garbage_is_refused() {
        round_trip(
            &DESIRED_RELEASE,
            ReleaseRef {
                url: "https://images.example/os-2.img".into(),
                sha256: "ab".repeat(32),
                signature: "c2ln".into(),
            },
        );
        for bad in ["", "{}", "[1]", "{\"url\": 3}"] {
            rejects(&DESIRED_RELEASE, bad);
        }
    }

    #[test]
    fn versions_boot_ids_and_slots_round_trip() {
        for key in [
            &CURRENT_VERSION,
            &TARGET_VERSION,
            &DESIRED_VERSION,
            &lease::TARGET_VERSION,
        ] {
            round_trip(key, Version::new("4230.2.1+build-7").unwrap());
            for bad in ["", "4230 2", "v1/2", &"9".repeat(129)] {
                rejects(key, bad);
            }
        }
        for key in [&BOOT_ID, &REBOOT_OK, &RETRY, &lease::GRANTED_BOOT_ID] {
            round_trip(
                key,
                BootId::new("3f1c2b8e-5d6a-4e2f-9b1a-0c7d8e9f0a1b").unwrap(),
            );
            for bad in ["", "not-a-boot-id", "zz", &"a".repeat(65)] {
                rejects(key, bad);
            }
        }
        round_trip(&SLOT, Slot::new("USR-B").unwrap());
        rejects(&SLOT, "USR B");
    }

    #[test]
    fn timestamps_round_trip_in_whole_seconds() {
        for key in [
            &LAST_CHECKED,
            &lease::DRAIN_STARTED_AT,
            &lease::DRAINED_AT,
            &lease::DONE_AT,
        ] {
            round_trip(key, "2026-03-29T01:30:00Z".parse::<Timestamp>().unwrap());
            for bad in ["", "yesterday", "2026-13-01T00:00:00Z", "1700000000"] {
                rejects(key, bad);
            }
        }
    }

    #[test]
    fn messages_are_one_bounded_line() {
        for key in [&MESSAGE, &FAILURE, &lease::FAILURE, &lease::POLICY] {
            round_trip(key, Message("booted USR-A, expected USR-B".into()));
            rejects(key, "two\nlines");
            rejects(key, &"x".repeat(1025));
        }
    }

    proptest! {
        #[test]
        fn any_valid_version_round_trips(v in "[A-Za-z0-9][A-Za-z0-9._+-]{0,127}") {
            let version = CURRENT_VERSION.parse(&v).unwrap();
            prop_assert_eq!(CURRENT_VERSION.format(&version), v);
        }

        #[test]
        fn arbitrary_text_never_panics_and_never_defaults(s in "\\PC{0,40}") {
            if let Ok(state) = STATE.parse(&s) {
                prop_assert_eq!(state.as_str(), s.as_str());
            }
            if let Ok(flag) = CORDONED.parse(&s) {
                prop_assert_eq!(flag.to_string(), s);
            }
        }
    }
}
