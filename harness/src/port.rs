//! Loopback ports for the processes the harness starts.
//!
//! A port handed out by binding `127.0.0.1:0` comes from the kernel's ephemeral range,
//! the same range every outgoing connection draws its source port from. Between the
//! harness closing its probe socket and etcd binding the port, a client connection of a
//! concurrent test can take it ("address already in use"). Ports are therefore chosen
//! below the ephemeral range, where the kernel never hands out source ports, and are
//! probed before they are given out; each process starts at its own offset so that
//! concurrent harness processes rarely probe the same ports.

use std::{
    net::TcpListener,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::error::{Error, Result};

/// The ports handed out: below Linux's default ephemeral range (32768–60999) and above
/// the well-known and commonly registered ones.
const RANGE: std::ops::Range<u32> = 20_000..32_000;

/// The next port to probe, as an offset into [`RANGE`]; seeded from the process id.
static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// A loopback port nothing listens on, outside the ephemeral range.
pub fn free_port() -> Result<u16> {
    let span = RANGE.end - RANGE.start;
    // Seed once from the pid (a racing seed is harmless: both are valid offsets).
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let seed = std::process::id().wrapping_mul(7_919) % span;
        let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let Ok(port) = u16::try_from(RANGE.start + offset) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(Error::Other(format!(
        "no free loopback port in {}..{}",
        RANGE.start, RANGE.end
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_distinct() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        assert!(
            ports
                .iter()
                .all(|p| (20_000..32_000).contains(&u32::from(*p)))
        );
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
    }
}
