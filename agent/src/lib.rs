//! `baton-agent`: the node side of baton. It stages updates into the inactive slot,
//! asks for a reboot, reboots only when granted, then verifies the new boot and
//! commits it or reports a rollback. It writes only its own Node's `baton.dev/*` keys.
#![forbid(unsafe_code)]

pub mod config;
