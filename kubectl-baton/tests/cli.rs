//! The `kubectl baton` binary against a real API server, as a user or a script runs
//! it: kubectl's flags, `-o json|yaml`, one-line errors naming the server, the
//! documented exit codes, and `status -w`'s first frame, lost connection and closed
//! pipe.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use harness::TestCluster;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{Patch, PatchParams},
};

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-baton");

fn run(kubeconfig: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn cluster_with_policy() -> (TestCluster, Vec<String>) {
    let (cluster, nodes) = TestCluster::start_with_nodes(2).await.unwrap();
    cluster.apply_crds().await.unwrap();
    let policies = Api::<crds::UpdatePolicy>::all(cluster.client());
    let policy: crds::UpdatePolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "baton.dev/v1alpha1", "kind": "UpdatePolicy",
        "metadata": {"name": "workers"}, "spec": {},
    }))
    .unwrap();
    policies.create(&Default::default(), &policy).await.unwrap();
    (cluster, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_takes_kubectls_flags_and_exits_with_codes_scripts_can_rely_on() {
    let (cluster, _nodes) = cluster_with_policy().await;
    let kc = cluster.kubeconfig().display().to_string();
    let server = cluster.server().trim_end_matches('/').to_string();

    // A missing policy: exit 3, one line naming it and the server.
    let out = run(&kc, &["status", "nosuch"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        text(&out.stderr),
        format!("kubectl baton: updatepolicy \"nosuch\" not found ({server})\n")
    );
    let out = run(&kc, &["pause", "nosuch"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.lines().count() == 1
            && err.contains("not found")
            && err.contains(&server)
            && !err.contains("Status {"),
        "{err}"
    );

    // -o json and -o yaml are the documented report.
    let out = run(&kc, &["status", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["apiVersion"], kubectl_baton::status::REPORT_VERSION);
    assert_eq!(v["kind"], "Status");
    assert_eq!(v["policies"][0]["name"], "workers");
    assert_eq!(v["policies"][0]["nodeRows"].as_array().unwrap().len(), 2);
    let out = run(&kc, &["status", "workers", "-o", "yaml"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let y: serde_json::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    assert_eq!(y["policies"][0]["name"], "workers");
    let out = run(
        &kc,
        &[
            "plan",
            "workers",
            "-o",
            "json",
            "--start",
            "2026-12-01T00:00:00Z",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["kind"], "Plan");
    assert_eq!(plan["rows"].as_array().unwrap().len(), 2);

    // A change names the context and server it acted on; --context selects one.
    let out = run(&kc, &["--context", "baton-e2e", "pause", "workers"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        stdout,
        format!("updatepolicy/workers paused  [context baton-e2e, server {server}]\n")
    );
    let out = run(&kc, &["resume", "workers", "-n", "baton-system"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // No such context: exit 4, naming what to check.
    let out = run(&kc, &["--context", "prod", "status"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("--context") && err.lines().count() == 1,
        "{err}"
    );

    // Usage: exit 2.
    let out = run(&kc, &["pause"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(&kc, &["status", "-o", "xml"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // An API server that is not there: exit 4, the server named, what to check.
    let port = harness::port::free_port().unwrap();
    let dead = cluster.dir().join("dead-kubeconfig");
    let config = std::fs::read_to_string(cluster.kubeconfig())
        .unwrap()
        .replace(&server, &format!("https://127.0.0.1:{port}"));
    std::fs::write(&dead, config).unwrap();
    let out = run(&dead.display().to_string(), &["status"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(
        text(&out.stderr),
        format!(
            "kubectl baton: cannot reach the API server at https://127.0.0.1:{port}: connection refused; check that the cluster runs and that --kubeconfig/--context select it\n"
        )
    );
}

/// Starts `status -w` against `kubeconfig`, its output piped.
fn watch(kubeconfig: &str) -> std::process::Child {
    Command::new(BIN)
        .args(["--kubeconfig", kubeconfig, "status", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Writes `node`'s agent state as its agent would.
async fn set_state(cluster: &TestCluster, node: &str, state: &str) {
    let patch =
        serde_json::json!({"metadata": {"annotations": {crds::protocol::STATE.name: state}}});
    Api::<Node>::all(cluster.client())
        .patch(node, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// Reads `status -w`'s lines on a thread, so that the test can wait with a bound.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            let hit = l.contains(want);
            seen.push(l);
            if hit {
                return;
            }
        }
    }
    panic!(
        "no line with {want:?} within {within:?}; saw:\n{}",
        seen.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_waits_for_its_caches_says_when_the_connection_is_lost_and_exits_0_on_a_closed_pipe()
 {
    let (mut cluster, nodes) = cluster_with_policy().await;
    let kc = cluster.kubeconfig().display().to_string();
    let server = cluster.server().trim_end_matches('/').to_string();

    // Piped: first "connecting", then the policy with its node rows, never an empty
    // "no UpdatePolicy" frame; then only what changes, time-stamped.
    let mut child = watch(&kc);
    let rx = lines_of(&mut child);
    let mut seen = Vec::new();
    wait_line(&rx, &mut seen, &nodes[1], Duration::from_secs(30));
    assert!(
        seen[0].ends_with(&format!("connecting to {server} …")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|l| l.contains("POLICY workers")),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.contains("no UpdatePolicy")),
        "{seen:?}"
    );
    // Nothing changes: nothing is printed.
    assert!(
        rx.recv_timeout(Duration::from_secs(3)).is_err(),
        "printed with no change"
    );
    // One node changes: one line, with a time stamp.
    set_state(&cluster, &nodes[0], "Staging").await;
    seen.clear();
    wait_line(&rx, &mut seen, "Staging", Duration::from_secs(10));
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].as_bytes()[2] == b':' && seen[0].contains(&nodes[0]),
        "{seen:?}"
    );

    // The API server goes away: said within seconds.
    let lost_at = Instant::now();
    for c in cluster.components() {
        if c.name == "kube-apiserver" {
            c.stop();
        }
    }
    seen.clear();
    wait_line(&rx, &mut seen, "lost", Duration::from_secs(15));
    assert!(
        seen.last()
            .unwrap()
            .contains(&format!("connection to {server} lost")),
        "{seen:?}"
    );
    eprintln!(
        "[status -w] connection lost shown {:?} after the API server stopped",
        lost_at.elapsed()
    );
    child.kill().unwrap();
    let _ = child.wait();
    drop(rx);
    drop(cluster);

    // A closed pipe: the reader leaves; the next write ends the command, exit 0 and
    // no panic. (Against a second cluster, since the first one's API server is gone.)
    let (cluster, nodes) = cluster_with_policy().await;
    let kc = cluster.kubeconfig().display().to_string();
    let mut child = watch(&kc);
    let rx = lines_of(&mut child);
    let mut seen = Vec::new();
    wait_line(&rx, &mut seen, &nodes[1], Duration::from_secs(30));
    drop(rx); // the reader thread ends at its next line and closes the pipe
    for state in ["Staging", "RebootRequired", "Staging"] {
        set_state(&cluster, &nodes[0], state).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "status -w did not end on a closed pipe"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
}
