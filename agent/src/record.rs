//! The agent's [`Record`] on disk: the reboot under way and the verdict on a boot. It is
//! what lets a new boot be told from an agent restart. Written atomically (temporary
//! file, fsync, rename), so a crash leaves the old record or the new one, never half.

use std::path::{Path, PathBuf};

use crate::{
    error::{AgentError, io},
    lifecycle::Record,
};

/// The record's file in the state directory.
const FILE: &str = "agent-record.json";

/// Where the record lives.
#[derive(Debug, Clone)]
pub struct RecordFile {
    path: PathBuf,
}

/// The fixed UID and GID the agent runs as in the chart (user `baton-agent`), which the
/// host's polkit rule and D-Bus policy name.
pub const AGENT_ID: u32 = 65532;

/// Makes `state_dir` the agent's: creates it, gives it to [`AGENT_ID`] and mode 0700.
/// The chart's one-shot init step, run as root with only `CAP_CHOWN`, so that the agent
/// itself never runs as root to write its hostPath.
pub fn prepare_state_dir(state_dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let what = || format!("preparing {}", state_dir.display());
    std::fs::create_dir_all(state_dir).map_err(io(what()))?;
    let id = Some(rustix::fs::Uid::from_raw(AGENT_ID));
    let gid = Some(rustix::fs::Gid::from_raw(AGENT_ID));
    rustix::fs::chown(state_dir, id, gid).map_err(|e| io(what())(e.into()))?;
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(what()))?;
    for entry in std::fs::read_dir(state_dir).map_err(io(what()))? {
        let path = entry.map_err(io(what()))?.path();
        rustix::fs::chown(&path, id, gid).map_err(|e| io(what())(e.into()))?;
    }
    Ok(())
}

impl RecordFile {
    /// The record in `state_dir`.
    pub fn new(state_dir: &Path) -> RecordFile {
        RecordFile {
            path: state_dir.join(FILE),
        }
    }

    /// Loads the record; none yet is an empty record. A file that does not parse is
    /// set aside (`.corrupt`) and reported, never trusted: the agent starts afresh,
    /// and the backend still knows what is staged or committed.
    pub fn load(&self) -> Result<Record, AgentError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Record::default()),
            Err(e) => return Err(io(format!("reading {}", self.path.display()))(e)),
        };
        match serde_json::from_str(&text) {
            Ok(record) => Ok(record),
            Err(e) => {
                let aside = self.path.with_extension("json.corrupt");
                tracing::error!(path = %self.path.display(), error = %e, aside = %aside.display(), "the agent's record is corrupt; setting it aside");
                std::fs::rename(&self.path, &aside)
                    .map_err(io(format!("moving {} aside", self.path.display())))?;
                Ok(Record::default())
            }
        }
    }

    /// Saves the record durably.
    pub fn save(&self, record: &Record) -> Result<(), AgentError> {
        let text = serde_json::to_vec_pretty(record)?;
        write_atomically(&self.path, &text)
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename, then syncs the
/// directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let what = || format!("writing {}", path.display());
    let mut file = std::fs::File::create(&tmp).map_err(io(what()))?;
    file.write_all(bytes).map_err(io(what()))?;
    file.sync_all().map_err(io(what()))?;
    std::fs::rename(&tmp, path).map_err(io(what()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(what()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{Outcome, Record};
    use crds::{AgentState, protocol::BootId};

    #[test]
    fn a_record_survives_a_round_trip_and_a_corrupt_one_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let file = RecordFile::new(dir.path());
        assert_eq!(file.load().unwrap(), Record::default());
        let record = Record {
            pending: None,
            outcome: Some(Outcome {
                boot: BootId::new("ab-12").unwrap(),
                state: AgentState::Done,
                message: String::new(),
            }),
        };
        file.save(&record).unwrap();
        assert_eq!(file.load().unwrap(), record);
        std::fs::write(dir.path().join(FILE), "{\"pending\": 7").unwrap();
        assert_eq!(file.load().unwrap(), Record::default());
        assert!(dir.path().join("agent-record.json.corrupt").exists());
    }
}
