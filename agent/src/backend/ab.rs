//! The native A/B backend: GPT slots with ChromeOS/Flatcar attribute bits, verified
//! payloads, boot-once and automatic rollback. Its slot code is the subject of its own
//! work item; until it lands, selecting it is a clear start-up error.

use crate::error::AgentError;

/// Why `--backend ab` cannot start yet.
pub fn unavailable() -> AgentError {
    AgentError::Other(
        "the native A/B backend (--backend ab) is not available in this build; use flatcar, sentinel or sim".into(),
    )
}
