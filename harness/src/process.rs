//! Supervised child processes that cannot outlive the harness.
//!
//! Each component runs under `sh` with a watchdog reading the harness's end of a pipe:
//! when the harness exits for any reason (a panic, a kill), the pipe closes and the
//! watchdog stops the component. Dropping a [`Supervised`] stops it at once.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use crate::error::{Result, io};

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
            .spawn()
            .map_err(io(format!("starting {}", program.display())))?;
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
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `binary args…` with `KUBECONFIG=kubeconfig` (through `env`, so that nothing
/// else in the caller's environment changes), logging to `log`.
pub fn spawn_with_kubeconfig(
    name: &str,
    binary: &Path,
    kubeconfig: &Path,
    args: &[&str],
    log: PathBuf,
) -> Result<Supervised> {
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
