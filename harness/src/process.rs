//! Supervised child processes that cannot outlive the harness.
//!
//! Each component runs under `sh` with a watchdog reading the harness's end of a pipe:
//! when the harness exits for any reason (a panic, a kill), the pipe closes and the
//! watchdog stops the component. Dropping a [`Supervised`] stops it at once.
//!
//! Each supervisor leads a process group of its own, so that a terminal's Ctrl-C
//! (SIGINT to the foreground group) reaches only the command that started it, never
//! the components behind its back: a component that dies of it first (etcd does) would
//! leave the rest hanging on a dead control plane. The command stops them itself,
//! all at once, with [`stop_all`] (see `crate::interrupt`).

use std::{
    collections::BTreeSet,
    fs::File,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process_group};

use crate::error::{Error, Result, io};

/// The process groups of the supervisors still running (each leads its own).
static GROUPS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// Set by [`stop_all`]: from then on nothing new starts (a fleet would otherwise
/// restart the agents it sees die).
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Process groups of commands this program started that stop their own components
/// ([`guard_group`]).
static GUARDED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn groups() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    GROUPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn guarded() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    GUARDED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The watchdog: run the component, and TERM then KILL it when stdin closes.
/// (Background jobs get /dev/null as stdin, so the pipe is kept on fd 3.)
const WATCHDOG: &str = r#"
exec 3<&0
"$@" </dev/null 3<&- &
pid=$!
(
  cat <&3 >/dev/null
  kill -TERM "$pid" 2>/dev/null
  i=0
  while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL "$pid" 2>/dev/null
) </dev/null 3<&3 &
watchdog=$!
wait "$pid"
status=$?
kill "$watchdog" 2>/dev/null
wait "$watchdog" 2>/dev/null
exit $status
"#;

/// A running component.
#[derive(Debug)]
pub struct Supervised {
    /// Its name, for logs and errors.
    pub name: String,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
    child: Child,
    lifeline: Option<ChildStdin>,
}

impl Supervised {
    /// Starts `program args…`, logging to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> Result<Supervised> {
        if STOPPING.load(Ordering::SeqCst) {
            return Err(Error::Other(format!(
                "not starting {name}: everything is being stopped"
            )));
        }
        let out = File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(io("duplicating a log handle"))?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(io(format!("starting {}", program.display())))?;
        groups().insert(child.id());
        let lifeline = child.stdin.take();
        Ok(Supervised {
            name: name.to_string(),
            log,
            child,
            lifeline,
        })
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// A descriptor that polls readable once it has exited (a pidfd), so a supervisor
    /// can sleep until then instead of looking every so often. `None` when no pidfd can
    /// be opened (an old kernel, a seccomp filter, no descriptors left).
    pub fn exit_fd(&self) -> Option<std::os::fd::OwnedFd> {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
    }

    /// Its exit code once it has exited (`None` while running or when killed by a
    /// signal the supervisor did not turn into a code).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }

    /// The OS process id of the `sh` supervisor.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The component's own process id (not its supervisor's), while it runs.
    pub fn component_pid(&self) -> Option<u32> {
        let sh = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).ok()?;
        children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .find(|pid: &u32| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .ok()
                    .and_then(|c| {
                        c.split(|b| *b == 0)
                            .next()
                            .map(|p| String::from_utf8_lossy(p).into_owned())
                    })
                    .is_some_and(|program| !program.ends_with("sh"))
            })
    }

    /// The resident memory of the component itself (not its supervisor), in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.component_pid()
            .and_then(|pid| proc_status_kib(pid, "VmRSS:"))
    }
    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// Stops it and waits (up to 10 s) for it to exit.
    pub fn stop(&mut self) {
        self.lifeline.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.exited() {
                groups().remove(&self.child.id());
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        signal_group(self.child.id(), Signal::KILL);
        let _ = self.child.wait();
        groups().remove(&self.child.id());
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops every supervised process of this program at once: SIGTERM to each
/// supervisor's group (the supervisor, its component and its watchdog), then SIGKILL to
/// the groups still alive after `grace`. A guarded group (a command that stops its own
/// components the same way) gets twice that and a second, to finish its own
/// [`stop_all`]. Returns how many groups had to be killed.
pub fn stop_all(grace: Duration) -> usize {
    STOPPING.store(true, Ordering::SeqCst);
    let running: BTreeSet<u32> = groups().clone();
    let guarded: BTreeSet<u32> = guarded().clone();
    let all: BTreeSet<u32> = running.union(&guarded).copied().collect();
    for group in &all {
        signal_group(*group, Signal::TERM);
    }
    let started = Instant::now();
    let mut killed = BTreeSet::new();
    loop {
        let alive: Vec<u32> = live_groups(&all)
            .into_iter()
            .filter(|g| !killed.contains(g))
            .collect();
        if alive.is_empty() {
            return killed.len();
        }
        for group in alive {
            let limit = if guarded.contains(&group) {
                grace * 2 + Duration::from_secs(1)
            } else {
                grace
            };
            if started.elapsed() >= limit {
                signal_group(group, Signal::KILL);
                killed.insert(group);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Makes [`stop_all`] stop the process group `group` too: a child command started in
/// a group of its own that stops its own components on SIGTERM (such as `e2e up`'s
/// background cluster while it starts).
pub fn guard_group(group: u32) {
    guarded().insert(group);
}

/// Undoes [`guard_group`]: the group is meant to outlive this program.
pub fn release_group(group: u32) {
    guarded().remove(&group);
}

/// Whether [`stop_all`] has begun: nothing new starts any more.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// SIGKILLs every supervised process of this program (the second Ctrl-C).
pub fn kill_all() {
    let all: Vec<u32> = groups().iter().chain(guarded().iter()).copied().collect();
    for group in all {
        signal_group(group, Signal::KILL);
    }
}

fn signal_group(group: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(group).ok().and_then(Pid::from_raw) {
        // ESRCH (the group is gone already) is the outcome wanted.
        let _ = kill_process_group(pid, signal);
    }
}

/// Those of `groups` with a process that is not a zombie (a supervisor that exited
/// stays a zombie until its parent reaps it, and is no longer running).
fn live_groups(groups: &BTreeSet<u32>) -> BTreeSet<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
            let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
            let state = fields.next()?;
            let group = fields.nth(1)?.parse::<u32>().ok()?;
            (state != "Z" && groups.contains(&group)).then_some(group)
        })
        .collect()
}

/// Fails unless `path` is a file this process may execute, naming what is wrong and
/// how to get it.
pub fn check_runnable(path: &Path) -> Result<()> {
    let problem = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no such file".to_string(),
        Err(e) => e.to_string(),
        Ok(m) if !m.is_file() => "not a file".to_string(),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => "not executable".to_string(),
        Ok(_) => return Ok(()),
    };
    Err(cannot_run(path, problem))
}

/// The error for a program that cannot run, with how to build it.
pub fn cannot_run(path: &Path, problem: impl Into<String>) -> Error {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hint = match name.as_str() {
        "baton-operator" | "baton-agent" | "kubectl-baton" => format!(
            "build it with `cargo build --bin {name}` (in the target directory the command uses: CARGO_TARGET_DIR or ./target)"
        ),
        _ => "`cargo run -p e2e -- binaries` builds the control plane's binaries".to_string(),
    };
    Error::CannotRun {
        path: path.to_path_buf(),
        problem: problem.into(),
        hint,
    }
}

/// Starts `binary args…` with `KUBECONFIG=kubeconfig` (through `env`, so that nothing
/// else in the caller's environment changes), logging to `log`. A `binary` that is
/// missing or not executable is an error, not a process that exits 127.
pub fn spawn_with_kubeconfig(
    name: &str,
    binary: &Path,
    kubeconfig: &Path,
    args: &[&str],
    log: PathBuf,
) -> Result<Supervised> {
    check_runnable(binary)?;
    let mut full = vec![
        format!("KUBECONFIG={}", kubeconfig.display()),
        binary.display().to_string(),
    ];
    full.extend(args.iter().map(|a| a.to_string()));
    Supervised::spawn(name, Path::new("/usr/bin/env"), &full, log)
}

/// A `/proc/<pid>/status` field in KiB, such as `VmRSS:` or `VmHWM:` (peak).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU time used by `pid` so far, summed over its threads, in nanoseconds (the
/// scheduler's own accounting, `/proc/<pid>/task/*/schedstat`).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// The last `n` lines of a file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
