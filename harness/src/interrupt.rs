//! What Ctrl-C (and SIGTERM) does to a command that runs the harness: say so on one
//! line, stop every process the command started within seconds, remove its scratch
//! directories, and exit 130 (143 for SIGTERM), the status of a command a signal
//! interrupted. A second Ctrl-C kills what is left at once.
//!
//! The supervised components lead their own process groups (see `crate::process`), so
//! only the command itself and the tools it runs in the foreground (cargo, go, helm)
//! receive a terminal's Ctrl-C; the components are stopped here, all together, rather
//! than each dying on its own schedule.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};

use crate::{
    error::{Result, io},
    process,
};

/// How long the components get to exit on SIGTERM before they are killed. Short: the
/// cluster is thrown away, and an API server and etcd stopping together wait on each
/// other's connections for far longer than the 10 s.
const GRACE: Duration = Duration::from_secs(3);

/// Scratch directories removed when the command is interrupted (their owners remove
/// them when dropped; an interrupted command never drops them).
static SCRATCH: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Set by the signal handler itself, the moment a signal arrives.
static INTERRUPTED: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Removes `dir` if the command is interrupted.
pub fn scratch(dir: &Path) {
    SCRATCH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(dir.to_path_buf());
}

/// Whether SIGINT or SIGTERM has arrived. A command that sees its work fail should
/// check this first: the failure is likely the interruption (a tool it ran got the same
/// Ctrl-C), and [`finish`] lets the handler end the command.
pub fn interrupted() -> bool {
    INTERRUPTED
        .get()
        .is_some_and(|flag| flag.load(Ordering::SeqCst))
}

/// Once interrupted, waits for the handler to stop everything and exit the process
/// (it never returns then); otherwise returns at once.
pub fn finish() {
    while interrupted() {
        std::thread::park_timeout(Duration::from_secs(1));
    }
}

/// Installs the handlers for SIGINT and SIGTERM, on a thread of their own (so they work
/// in every phase, whatever the command's threads are doing).
pub fn install() -> Result<()> {
    let flag = Arc::clone(INTERRUPTED.get_or_init(Arc::default));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&flag))
            .map_err(io("installing the signal flag"))?;
    }
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(io("installing the SIGINT and SIGTERM handlers"))?;
    std::thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || {
            let mut arrived = signals.forever();
            let code = match arrived.next() {
                Some(SIGTERM) => 143,
                _ => 130,
            };
            eprintln!(
                "\ne2e: interrupted; stopping everything this command started (Ctrl-C again to kill at once)"
            );
            std::thread::spawn(move || {
                process::stop_all(GRACE);
                remove_scratch();
                std::process::exit(code);
            });
            if arrived.next().is_some() {
                process::kill_all();
                eprintln!("e2e: killed");
                std::process::exit(code);
            }
        })
        .map_err(io("starting the signal thread"))?;
    Ok(())
}

fn remove_scratch() {
    if std::env::var_os("BATON_E2E_KEEP").is_some() {
        return;
    }
    let dirs = SCRATCH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}
