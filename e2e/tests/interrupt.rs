//! Ctrl-C stops a command and everything it started, and a binary that cannot run is a
//! clear error, not a restart loop.
//!
//! The demo runs as a real `e2e demo` process in a process group of its own (as a shell
//! runs a foreground job; the test itself is never signalled), with `TMPDIR` set to a
//! directory of this run only: every process the demo starts carries that directory in
//! its command line or its environment, which is how the test finds any left behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use harness::{
    binaries::workspace_binary,
    fleet::{Fleet, FleetOptions},
};

/// How long everything may take to go after Ctrl-C (the bound).
const GONE_WITHIN: Duration = Duration::from_secs(10);

/// A demo started in its own process group, its stdout lines on a channel.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

/// How the demo inherits SIGINT.
#[derive(Clone, Copy, PartialEq)]
enum Sigint {
    /// As from an interactive shell.
    Default,
    /// Ignored, as a background job of a non-interactive shell inherits it: how the
    /// issue's report ran the demo (it then ignored Ctrl-C while etcd died of it).
    Ignored,
}

fn start_demo(run: &Path, sigint: Sigint, args: &[&str], env: &[(&str, PathBuf)]) -> Demo {
    let stderr = run.join("demo.stderr");
    let e2e = env!("CARGO_BIN_EXE_e2e");
    let mut cmd = match sigint {
        Sigint::Default => Command::new(e2e),
        Sigint::Ignored => {
            let mut sh = Command::new("sh");
            sh.args(["-c", "trap '' INT; exec \"$0\" \"$@\"", e2e]);
            sh
        }
    };
    cmd.args(["demo", "--nodes", "2"])
        .args(args)
        .env("TMPDIR", run)
        .env_remove("BATON_KUBECONFIG")
        .env_remove("BATON_E2E_KEEP")
        .env(
            "BATON_OPERATOR_BINARY",
            workspace_binary("baton-operator").unwrap(),
        )
        .env(
            "BATON_AGENT_BINARY",
            workspace_binary("baton-agent").unwrap(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Demo {
        child,
        lines,
        stderr,
    }
}

impl Demo {
    /// Waits (bounded) for a stdout line starting with `prefix`.
    fn wait_line(&self, prefix: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return,
                Ok(_) => {}
                Err(e) => panic!(
                    "no line `{prefix}` within {within:?} ({e}); stderr:\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                ),
            }
        }
    }

    /// SIGINT to the demo's whole process group, as a terminal's Ctrl-C sends it.
    fn ctrl_c(&self) {
        let group = format!("-{}", self.child.id());
        let status = Command::new("kill")
            .args(["-INT", "--", &group])
            .status()
            .unwrap();
        assert!(status.success(), "kill -INT {group}");
    }

    /// The exit code, waiting at most `within`.
    fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("the demo did not exit within {within:?}");
    }
}

/// The processes (pid and command line) whose command line or environment names `run`.
fn processes_of(run: &Path) -> Vec<(u32, String)> {
    let needle = run.to_string_lossy().into_owned();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let read = |f: &str| std::fs::read(format!("/proc/{pid}/{f}")).ok();
            let cmdline = String::from_utf8_lossy(&read("cmdline")?).replace('\0', " ");
            let environ =
                String::from_utf8_lossy(&read("environ").unwrap_or_default()).into_owned();
            let stat = String::from_utf8_lossy(&read("stat")?).into_owned();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            (!zombie && (cmdline.contains(&needle) || environ.contains(&needle)))
                .then_some((pid, cmdline))
        })
        .collect()
}

/// Interrupts the demo once `phase` has been reached and checks what the issue asks:
/// one line saying it stops, exit 130, nothing of the run left after 10 s, and its
/// scratch directories gone.
fn interrupt_and_check(mut demo: Demo, run: &Path) {
    demo.ctrl_c();
    let interrupted = Instant::now();
    let code = demo.exit_code(GONE_WITHIN + Duration::from_secs(5));
    let mut left = processes_of(run);
    while !left.is_empty() && interrupted.elapsed() < GONE_WITHIN {
        std::thread::sleep(Duration::from_millis(200));
        left = processes_of(run);
    }
    let stderr = std::fs::read_to_string(&demo.stderr).unwrap_or_default();
    assert_eq!(code, Some(130), "exit status; stderr:\n{stderr}");
    assert!(
        left.is_empty(),
        "processes left {:?} after Ctrl-C: {left:#?}",
        interrupted.elapsed()
    );
    assert_eq!(
        stderr.matches("interrupted; stopping").count(),
        1,
        "one line says it is stopping; stderr:\n{stderr}"
    );
    let scratch: Vec<_> = std::fs::read_dir(run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("baton-e2e-") && !n.contains("helm"))
        .collect();
    assert!(scratch.is_empty(), "scratch directories left: {scratch:?}");
    eprintln!(
        "[interrupt] exit {code:?}, nothing left {:.1?} after Ctrl-C",
        interrupted.elapsed()
    );
}

#[test]
fn ctrl_c_while_the_chart_installs_stops_everything_and_exits_130() {
    let run = tempfile::tempdir().unwrap();
    let demo = start_demo(run.path(), Sigint::Default, &[], &[]);
    demo.wait_line("Installing the chart", Duration::from_secs(300));
    assert!(
        !processes_of(run.path()).is_empty(),
        "the control plane runs when Ctrl-C comes"
    );
    interrupt_and_check(demo, run.path());
}

#[test]
fn ctrl_c_during_the_rollout_stops_everything_and_exits_130_even_when_sigint_was_ignored() {
    let run = tempfile::tempdir().unwrap();
    let demo = start_demo(run.path(), Sigint::Ignored, &[], &[]);
    demo.wait_line("baton-operator and 2 baton-agent", Duration::from_secs(400));
    // A frame of the live rollout has been drawn: the rollout is under way.
    demo.wait_line("--- ", Duration::from_secs(60));
    let running = processes_of(run.path());
    for wanted in ["baton-agent", "baton-operator", "etcd", "kube-apiserver"] {
        assert!(
            running.iter().any(|(_, cmd)| cmd.contains(wanted)),
            "{wanted} runs when Ctrl-C comes: {running:#?}"
        );
    }
    interrupt_and_check(demo, run.path());
}

#[test]
fn ctrl_c_on_a_kept_cluster_stops_everything_and_exits_130() {
    let run = tempfile::tempdir().unwrap();
    let demo = start_demo(run.path(), Sigint::Default, &["--keep"], &[]);
    demo.wait_line("Ctrl-C to stop.", Duration::from_secs(600));
    interrupt_and_check(demo, run.path());
}

#[test]
fn a_missing_agent_binary_stops_the_demo_with_the_path_and_how_to_build_it() {
    let run = tempfile::tempdir().unwrap();
    let missing = run.path().join("target/debug/baton-agent");
    let mut demo = start_demo(
        run.path(),
        Sigint::Default,
        &[],
        &[("BATON_AGENT_BINARY", missing.clone())],
    );
    let code = demo.exit_code(Duration::from_secs(30));
    let stderr = std::fs::read_to_string(&demo.stderr).unwrap();
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("cannot run {}: no such file", missing.display()))
            && stderr.contains("cargo build --bin baton-agent"),
        "the error names the path and how to build it:\n{stderr}"
    );
    assert!(processes_of(run.path()).is_empty(), "nothing was started");
}

#[test]
fn an_agent_that_exits_127_is_reported_once_and_never_restarted() {
    let dir = tempfile::tempdir().unwrap();
    // Runs (so the up-front check passes) and then fails as a missing interpreter does.
    let agent = dir.path().join("baton-agent");
    std::fs::write(&agent, "#!/bin/sh\nexit 127\n").unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nodes = vec!["node-a".to_string(), "node-b".to_string()];
    let start = |binary: &Path| {
        Fleet::start(
            &nodes,
            &FleetOptions::new(
                binary,
                dir.path().join("kubeconfig"),
                Duration::from_secs(1),
                Vec::<String>::new(),
            ),
        )
    };
    let fleet = start(&agent).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.failure().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let failure = fleet.failure().expect("the fleet reports the agent");
    assert!(
        failure.contains(&agent.display().to_string()) && failure.contains("exit 127"),
        "{failure}"
    );
    std::thread::sleep(Duration::from_secs(1));
    for node in &nodes {
        assert_eq!(fleet.log(node).restarts, 0, "{node} was never restarted");
        assert_eq!(fleet.pid(node), None, "{node} runs no agent");
    }
    // A missing binary fails at once, before any process is started.
    let missing = dir.path().join("nowhere/baton-agent");
    let err = start(&missing).unwrap_err().to_string();
    assert!(
        err.contains(&format!("cannot run {}: no such file", missing.display()))
            && err.contains("cargo build --bin baton-agent"),
        "{err}"
    );
}
