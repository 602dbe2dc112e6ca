//! A fleet of simulated machines: one real `baton-agent` process (sim backend) per kwok
//! node, each with its own state directory. When an agent "reboots" it exits with code
//! 0 and a new boot id on disk; the fleet starts it again after the reboot time, as the
//! machine coming back would. Any other exit is a crash, restarted at once, as the
//! kubelet restarts a container: same boot, no reboot. An agent that cannot run at all
//! (exit 126 or 127) is not restarted: the fleet reports it ([`Fleet::failure`]).

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};

use crate::{
    error::{Result, io},
    process::{Supervised, cannot_run, check_runnable},
};

/// What else happens to a machine when it reboots (such as its etcd member stopping
/// and starting again). Called from the machine's supervisor thread.
pub trait MachineHooks: Send + Sync + std::fmt::Debug {
    /// `node` went down (its agent exited for the reboot).
    fn down(&self, node: &str);
    /// `node` is back up, just before its agent starts again.
    fn up(&self, node: &str);
}

/// How the fleet's agents run.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// The `baton-agent` binary.
    pub binary: PathBuf,
    /// The kubeconfig the agents use.
    pub kubeconfig: PathBuf,
    /// Per-node kubeconfigs (such as tokens bound to each node's agent pod), used
    /// instead of `kubeconfig` for the nodes they name.
    pub kubeconfigs: BTreeMap<String, PathBuf>,
    /// How long a simulated machine is down.
    pub reboot_time: Duration,
    /// Extra `baton-agent` arguments (such as `--sim-stage-time 1s`). Without a
    /// `--backend` among them, the agents run `--backend sim`.
    pub args: Vec<String>,
    /// Extra arguments per node (such as each machine's disk image).
    pub node_args: BTreeMap<String, Vec<String>>,
    /// What else a reboot does.
    pub hooks: Option<Arc<dyn MachineHooks>>,
}

impl FleetOptions {
    /// Agents run from `binary` with `kubeconfig` and the extra `args`, machines down
    /// for `reboot_time`; no per-node kubeconfigs or arguments.
    pub fn new(
        binary: impl Into<PathBuf>,
        kubeconfig: PathBuf,
        reboot_time: Duration,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> FleetOptions {
        FleetOptions {
            binary: binary.into(),
            kubeconfig,
            kubeconfigs: BTreeMap::new(),
            reboot_time,
            args: args.into_iter().map(Into::into).collect(),
            node_args: BTreeMap::new(),
            hooks: None,
        }
    }
}

/// What happened to one machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineLog {
    /// Simulated reboots (exit code 0).
    pub reboots: u32,
    /// Agent restarts without a reboot (crashes and kills).
    pub restarts: u32,
}

struct Machine {
    kill: AtomicBool,
    /// The running agent's process id (0 while none runs).
    pid: AtomicU32,
    log: Mutex<MachineLog>,
    /// Wakes the machine's supervisor (an eventfd): a kill, or the fleet stopping. The
    /// supervisor sleeps until its agent exits or this is written, so 1,000 idle
    /// machines cost the machine that runs them nothing.
    wake: OwnedFd,
}

impl Machine {
    fn new() -> Result<Machine> {
        let wake = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| io("creating a machine's wake-up descriptor")(e.into()))?;
        Ok(Machine {
            kill: AtomicBool::new(false),
            pid: AtomicU32::new(0),
            log: Mutex::new(MachineLog::default()),
            wake,
        })
    }

    /// Wakes the supervisor to look at its flags.
    fn nudge(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// Sleeps until the machine is nudged, `exit` polls readable (the agent exited) or
    /// `timeout` passes.
    fn wait(&self, exit: Option<BorrowedFd<'_>>, timeout: Duration) {
        let mut fds = [
            PollFd::new(&self.wake, PollFlags::IN),
            PollFd::new(&self.wake, PollFlags::IN),
        ];
        let watched = match exit {
            Some(fd) => {
                fds[1] = PollFd::from_borrowed_fd(fd, PollFlags::IN);
                2
            }
            None => 1,
        };
        let timeout = Timespec::try_from(timeout).ok();
        // An interrupted poll only means the caller looks at its flags again.
        let _ = rustix::event::poll(&mut fds[..watched], timeout.as_ref());
        if fds[0].revents().contains(PollFlags::IN) {
            let _ = rustix::io::read(&self.wake, &mut [0u8; 8]);
        }
    }

    /// Sleeps for `d`, less if `stop` is set meanwhile.
    fn sleep_unless_stopped(&self, d: Duration, stop: &AtomicBool) {
        let end = Instant::now() + d;
        while !stop.load(Ordering::SeqCst) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            self.wait(None, left);
        }
    }
}

/// The running fleet. Dropping it stops every agent.
pub struct Fleet {
    machines: BTreeMap<String, Arc<Machine>>,
    stop: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Fleet {
    /// Starts one agent per node. A binary that is missing or not executable is an
    /// error naming it and how to build it.
    pub fn start(nodes: &[String], options: &FleetOptions) -> Result<Fleet> {
        check_runnable(&options.binary)?;
        let dir = tempfile::Builder::new()
            .prefix("baton-e2e-fleet-")
            .tempdir()
            .map_err(io("creating the fleet's directory"))?;
        crate::interrupt::scratch(dir.path());
        // Built first, so that a machine that cannot be set up drops it: the agents
        // already started are stopped, not left running.
        let mut fleet = Fleet {
            machines: BTreeMap::new(),
            stop: Arc::new(AtomicBool::new(false)),
            failure: Arc::new(Mutex::new(None)),
            threads: Vec::new(),
            dir,
        };
        for node in nodes {
            let machine = Arc::new(Machine::new()?);
            let state = fleet.dir.path().join(node);
            std::fs::create_dir_all(&state).map_err(io("creating a machine's state directory"))?;
            let mut args = vec![
                "--node-name".to_string(),
                node.clone(),
                "--state-dir".into(),
                state.display().to_string(),
            ];
            if !options.args.iter().any(|a| a == "--backend") {
                args.extend(["--backend".into(), "sim".into()]);
            }
            args.extend(options.args.iter().cloned());
            args.extend(options.node_args.get(node).into_iter().flatten().cloned());
            let supervisor = Supervisor {
                node: node.clone(),
                state,
                args,
                options: options.clone(),
                machine: Arc::clone(&machine),
                stop: Arc::clone(&fleet.stop),
                failure: Arc::clone(&fleet.failure),
            };
            fleet.machines.insert(node.clone(), machine);
            fleet
                .threads
                .push(std::thread::spawn(move || supervisor.run()));
        }
        Ok(fleet)
    }

    /// Kills `node`'s agent (no reboot); it is restarted at once under the same boot.
    pub fn kill_agent(&self, node: &str) {
        if let Some(m) = self.machines.get(node) {
            m.kill.store(true, Ordering::SeqCst);
            m.nudge();
        }
    }

    /// Makes `node`'s next simulated boot fall back to its old slot.
    pub fn fail_next_boot(&self, node: &str) -> Result<()> {
        let marker = self.dir.path().join(node).join("fail-next-boot");
        std::fs::write(&marker, "").map_err(io(format!("writing {}", marker.display())))
    }

    /// Makes `node`'s staging fail (`true`) until called again with `false`.
    pub fn fail_staging(&self, node: &str, failing: bool) -> Result<()> {
        let marker = self.dir.path().join(node).join("fail-staging");
        if failing {
            std::fs::write(&marker, "the payload does not verify")
                .map_err(io(format!("writing {}", marker.display())))
        } else {
            std::fs::remove_file(&marker).map_err(io(format!("removing {}", marker.display())))
        }
    }

    /// What happened to `node` so far.
    pub fn log(&self, node: &str) -> MachineLog {
        self.machines
            .get(node)
            .map(|m| {
                m.log
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            })
            .unwrap_or_default()
    }

    /// The process id of `node`'s running agent.
    pub fn pid(&self, node: &str) -> Option<u32> {
        self.machines
            .get(node)
            .map(|m| m.pid.load(Ordering::SeqCst))
            .filter(|p| *p != 0)
    }

    /// Why an agent could not run at all (exit 126 or 127), if one could not: its
    /// machine is not restarted, and a command should stop with this message.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A machine's state directory.
    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for m in self.machines.values() {
            m.nudge();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Supervisor {
    node: String,
    state: PathBuf,
    args: Vec<String>,
    options: FleetOptions,
    machine: Arc<Machine>,
    stop: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
}

/// How often a supervisor looks for its agent's process id after starting it, and for
/// its exit where it has no pidfd of it; otherwise it sleeps until the exit, a nudge
/// or [`EXIT_WAIT`].
const EXIT_POLL: Duration = Duration::from_millis(100);

/// The longest a supervisor sleeps without looking at its flags, a nudge missed or not.
const EXIT_WAIT: Duration = Duration::from_secs(10);

impl Supervisor {
    fn run(self) {
        let mut generation = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            generation += 1;
            let log = self.state.join(format!("agent-{generation}.log"));
            let kubeconfig = self
                .options
                .kubeconfigs
                .get(&self.node)
                .unwrap_or(&self.options.kubeconfig);
            let mut proc = match spawn(&self.options.binary, &self.args, kubeconfig, log) {
                Ok(p) => p,
                Err(e) => {
                    if !crate::process::stopping() {
                        eprintln!("[fleet] {}: cannot start the agent: {e}", self.node);
                    }
                    return;
                }
            };
            let exit = proc.exit_fd();
            let code = loop {
                if self.machine.pid.load(Ordering::SeqCst) == 0
                    && let Some(pid) = proc.component_pid()
                {
                    self.machine.pid.store(pid, Ordering::SeqCst);
                }
                if self.stop.load(Ordering::SeqCst) {
                    proc.stop();
                    return;
                }
                if self.machine.kill.swap(false, Ordering::SeqCst) {
                    proc.stop();
                    break None;
                }
                if proc.exited() {
                    break proc.exit_code();
                }
                let known = self.machine.pid.load(Ordering::SeqCst) != 0;
                let timeout = if exit.is_some() && known {
                    EXIT_WAIT
                } else {
                    EXIT_POLL
                };
                self.machine.wait(exit.as_ref().map(AsFd::as_fd), timeout);
            };
            self.machine.pid.store(0, Ordering::SeqCst);
            if let Some(code @ (126 | 127)) = code {
                let problem = if code == 126 {
                    "it cannot be executed (exit 126)"
                } else {
                    "it or its interpreter was not found (exit 127)"
                };
                let error = cannot_run(&self.options.binary, problem).to_string();
                let mut failure = self
                    .failure
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if failure.is_none() {
                    eprintln!("[fleet] {}: {error}\n{}", self.node, proc.log_tail(5));
                    *failure = Some(error);
                }
                return;
            }
            let mut log = self
                .machine
                .log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if code == Some(0) {
                log.reboots += 1;
                drop(log);
                if let Some(hooks) = &self.options.hooks {
                    hooks.down(&self.node);
                }
                self.machine
                    .sleep_unless_stopped(self.options.reboot_time, &self.stop);
                if let Some(hooks) = self
                    .options
                    .hooks
                    .as_ref()
                    .filter(|_| !self.stop.load(Ordering::SeqCst))
                {
                    hooks.up(&self.node);
                }
            } else {
                log.restarts += 1;
                drop(log);
                if code.is_some() {
                    eprintln!(
                        "[fleet] {}: agent exited with {code:?}:\n{}",
                        self.node,
                        proc.log_tail(5)
                    );
                }
                self.machine
                    .sleep_unless_stopped(Duration::from_millis(200), &self.stop);
            }
        }
    }
}

fn spawn(binary: &Path, args: &[String], kubeconfig: &Path, log: PathBuf) -> Result<Supervised> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    crate::process::spawn_with_kubeconfig("baton-agent", binary, kubeconfig, &args, log)
}
