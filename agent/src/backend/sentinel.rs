//! The kured-compatible backend: the OS (or a package manager) says a reboot is needed
//! by creating a file, by default `/var/run/reboot-required`, or a command says it by
//! exiting 0. There is nothing to stage; the version is the os-release one, so the
//! reboot is verified by the boot id and the health checks.

use std::path::PathBuf;

use crate::{
    backend::{Backend, Desired},
    error::AgentError,
    lifecycle::{Status, Update},
    os_release,
};

/// The bound on one run of the sentinel command.
const SENTINEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The sentinel backend.
#[derive(Debug, Clone)]
pub struct Sentinel {
    /// The reboot-required file.
    pub file: PathBuf,
    /// A command that exits 0 when a reboot is needed; replaces the file check.
    pub command: Option<crate::command::Command>,
    /// The os-release file the version is read from.
    pub os_release: PathBuf,
}

impl Sentinel {
    async fn reboot_needed(&self) -> Result<bool, AgentError> {
        match &self.command {
            Some(command) => command
                .status("sentinel command", SENTINEL_TIMEOUT)
                .await
                .map_err(|e| AgentError::Backend(e.to_string())),
            None => Ok(tokio::fs::try_exists(&self.file).await.unwrap_or(false)),
        }
    }
}

impl Backend for Sentinel {
    async fn status(&mut self, _desired: Option<&Desired>) -> Result<Status, AgentError> {
        let update = if self.reboot_needed().await? {
            Update::Staged {
                version: None,
                slot: None,
            }
        } else {
            Update::Idle
        };
        Ok(Status {
            current_version: os_release::version(&self.os_release),
            slot: None,
            update,
            last_checked: None,
            note: None,
        })
    }

    async fn stage(&mut self, desired: &Desired) -> Result<(), AgentError> {
        let version = &desired.version;
        Err(AgentError::Backend(format!(
            "the sentinel backend cannot install {version}: the OS installs updates itself"
        )))
    }

    async fn commit(&mut self) -> Result<(), AgentError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_file_or_the_command_says_a_reboot_is_needed() {
        let dir = tempfile::tempdir().unwrap();
        let release = dir.path().join("os-release");
        std::fs::write(&release, "VERSION_ID=12.4\n").unwrap();
        let mut s = Sentinel {
            file: dir.path().join("reboot-required"),
            command: None,
            os_release: release,
        };
        let idle = s.status(None).await.unwrap();
        assert_eq!(
            (
                idle.update,
                idle.current_version.unwrap().as_str().to_string()
            ),
            (Update::Idle, "12.4".to_string())
        );
        std::fs::write(dir.path().join("reboot-required"), "").unwrap();
        assert!(matches!(
            s.status(None).await.unwrap().update,
            Update::Staged { version: None, .. }
        ));
        s.command = crate::command::Command::parse("false").ok();
        assert_eq!(
            s.status(None).await.unwrap().update,
            Update::Idle,
            "the command replaces the file"
        );
    }
}
