//! The boot id: the kernel's answer to "did this machine reboot?".

use std::path::Path;

use crds::protocol::BootId;

use crate::error::{AgentError, io};

/// The kernel's boot id file.
pub const KERNEL_BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Reads a boot id file (one line).
pub fn read_boot_id(path: &Path) -> Result<BootId, AgentError> {
    let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
    BootId::new(text.trim()).map_err(|e| AgentError::Other(format!("{}: {e}", path.display())))
}
