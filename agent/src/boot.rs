//! The boot id: the kernel's answer to "did this machine reboot?".

use std::path::Path;

use crds::protocol::BootId;

use crate::error::{AgentError, io};

/// The kernel's boot id file.
pub const KERNEL_BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Reads a boot id file (one line).
pub fn read_boot_id(path: &Path) -> Result<BootId, AgentError> {
    let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
    BootId::new(text.trim()).map_err(|reason| AgentError::BootId {
        path: path.to_path_buf(),
        reason,
    })
}

/// Reads the boot id at `path`. Outside `/proc`, a missing file is created with a fresh
/// id: pointed at a tmpfs (such as `/run/baton/boot_id`), that gives a per-boot
/// identity on machines whose kernel boot id survives a "reboot" (kind's node
/// containers share their host's kernel).
pub fn read_or_create(path: &Path) -> Result<BootId, AgentError> {
    if !path.starts_with("/proc") && !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        crate::record::write_atomically(path, uuid::Uuid::new_v4().to_string().as_bytes())?;
    }
    read_boot_id(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_boot_id_file_outside_proc_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/baton/boot_id");
        let first = read_or_create(&path).unwrap();
        assert_eq!(
            read_or_create(&path).unwrap(),
            first,
            "stable within a boot"
        );
        std::fs::remove_file(&path).unwrap(); // the tmpfs is cleared by a reboot
        assert_ne!(read_or_create(&path).unwrap(), first);
        assert!(
            read_or_create(Path::new("/proc/nonexistent/boot_id")).is_err(),
            "never created under /proc"
        );
    }
}
