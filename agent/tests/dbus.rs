//! The agent's D-Bus side against a real `dbus-daemon`: a small test service implements
//! update_engine's `com.coreos.update1` and logind's `Reboot`, and the agent talks to
//! them as it would on a Flatcar node.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use agent::{
    backend::{Backend, flatcar::Flatcar},
    daemon::{self, Settings},
    lifecycle::Update,
    reboot::Rebooter,
    record::RecordFile,
};
use crds::protocol::{BootId, Version};
use futures::StreamExt;
use harness::{TestCluster, dbus::Bus};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use zbus::object_server::SignalEmitter;

type EngineStatus = (i64, f64, String, String, i64);

/// update_engine as the test drives it.
struct FakeEngine {
    status: Arc<Mutex<EngineStatus>>,
}

#[zbus::interface(name = "com.coreos.update1.Manager")]
impl FakeEngine {
    fn get_status(&self) -> EngineStatus {
        self.status.lock().unwrap().clone()
    }

    #[zbus(signal)]
    async fn status_update(
        emitter: &SignalEmitter<'_>,
        last_checked_time: i64,
        progress: f64,
        current_operation: String,
        new_version: String,
        new_size: i64,
    ) -> zbus::Result<()>;
}

/// polkit as a host runs it: the shipped rules, and the host's users by UID (a UID
/// with no name is known by its number).
#[derive(Clone)]
struct Polkit {
    rules: harness::polkit::Rules,
    users: Vec<(u32, String)>,
}

impl Polkit {
    /// Refuses `action` unless the caller of the current method may do it.
    async fn authorize(
        &self,
        connection: &zbus::Connection,
        header: &zbus::message::Header<'_>,
        action: &str,
    ) -> zbus::fdo::Result<()> {
        let sender = header
            .sender()
            .ok_or_else(|| zbus::fdo::Error::AccessDenied("no sender".into()))?;
        let uid = zbus::fdo::DBusProxy::new(connection)
            .await?
            .get_connection_unix_user(sender.clone().into())
            .await?;
        let user = self
            .users
            .iter()
            .find(|(u, _)| *u == uid)
            .map_or(uid.to_string(), |(_, n)| n.clone());
        if self.rules.allows(action, &user).unwrap() {
            Ok(())
        } else {
            Err(zbus::fdo::Error::AccessDenied(format!(
                "polkit: {user} may not {action}"
            )))
        }
    }
}

/// logind, counting reboots; with a polkit, it asks it first.
struct FakeLogind {
    reboots: Arc<AtomicUsize>,
    polkit: Option<Polkit>,
}

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl FakeLogind {
    async fn reboot(
        &self,
        interactive: bool,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> zbus::fdo::Result<()> {
        assert!(!interactive, "baton never asks interactively");
        if let Some(polkit) = &self.polkit {
            polkit
                .authorize(connection, &header, "org.freedesktop.login1.reboot")
                .await?;
        }
        self.reboots.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// systemd's manager, as far as a caller could abuse it: StartTransientUnit runs any
/// command as root, so polkit's `manage-units` decides.
struct FakeSystemd {
    polkit: Polkit,
    started: Arc<AtomicUsize>,
}

type UnitProperties = Vec<(String, zbus::zvariant::OwnedValue)>;

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl FakeSystemd {
    async fn start_transient_unit(
        &self,
        _name: String,
        _mode: String,
        _properties: UnitProperties,
        _aux: Vec<(String, UnitProperties)>,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> zbus::fdo::Result<zbus::zvariant::OwnedObjectPath> {
        self.polkit
            .authorize(connection, &header, "org.freedesktop.systemd1.manage-units")
            .await?;
        self.started.fetch_add(1, Ordering::SeqCst);
        zbus::zvariant::OwnedObjectPath::try_from("/org/freedesktop/systemd1/job/1")
            .map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }
}

/// The fake services on `bus`.
struct Services {
    engine: zbus::Connection,
    status: Arc<Mutex<EngineStatus>>,
    reboots: Arc<AtomicUsize>,
    _logind: zbus::Connection,
}

impl Services {
    async fn start(bus: &Bus) -> Services {
        Services::start_with(bus, None).await
    }

    async fn start_with(bus: &Bus, polkit: Option<Polkit>) -> Services {
        let status = Arc::new(Mutex::new((
            1_764_150_000,
            0.0,
            "UPDATE_STATUS_IDLE".to_string(),
            String::new(),
            0,
        )));
        let engine = zbus::connection::Builder::address(bus.address())
            .unwrap()
            .name("com.coreos.update1")
            .unwrap()
            .serve_at(
                "/com/coreos/update1",
                FakeEngine {
                    status: status.clone(),
                },
            )
            .unwrap()
            .build()
            .await
            .unwrap();
        let reboots = Arc::new(AtomicUsize::new(0));
        let logind = zbus::connection::Builder::address(bus.address())
            .unwrap()
            .name("org.freedesktop.login1")
            .unwrap()
            .serve_at(
                "/org/freedesktop/login1",
                FakeLogind {
                    reboots: reboots.clone(),
                    polkit,
                },
            )
            .unwrap()
            .build()
            .await
            .unwrap();
        Services {
            engine,
            status,
            reboots,
            _logind: logind,
        }
    }

    /// Sets update_engine's status and emits `StatusUpdate`, as update_engine does.
    async fn announce(&self, operation: &str, version: &str) {
        let body = (
            1_764_153_600,
            1.0,
            operation.to_string(),
            version.to_string(),
            1 << 30,
        );
        *self.status.lock().unwrap() = body.clone();
        let iface = self
            .engine
            .object_server()
            .interface::<_, FakeEngine>("/com/coreos/update1")
            .await
            .unwrap();
        FakeEngine::status_update(
            iface.signal_emitter(),
            body.0,
            body.1,
            body.2,
            body.3,
            body.4,
        )
        .await
        .unwrap();
    }
}

fn os_release(dir: &std::path::Path, version: &str) -> std::path::PathBuf {
    let path = dir.join("os-release");
    std::fs::write(
        &path,
        format!("ID=flatcar\nVERSION={version}\nVERSION_ID={version}\n"),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_engine_signals_are_followed_and_its_status_mapped() {
    let bus = Bus::start().unwrap();
    let services = Services::start(&bus).await;
    let dir = tempfile::tempdir().unwrap();
    let client = agent::dbus::connect(Some(bus.address())).await.unwrap();
    let mut flatcar = Flatcar::open(&client, os_release(dir.path(), "4230.2.1"), None)
        .await
        .unwrap();
    let mut changes = flatcar.changes().unwrap();

    let idle = flatcar.status(None).await.unwrap();
    assert_eq!(idle.update, Update::Idle);
    assert_eq!(idle.current_version.unwrap().as_str(), "4230.2.1");
    assert_eq!(idle.last_checked.unwrap().as_second(), 1_764_150_000);

    for (operation, expected) in [
        (
            "UPDATE_STATUS_DOWNLOADING",
            Update::Staging(Version::new("4459.0.0").ok()),
        ),
        (
            "UPDATE_STATUS_UPDATED_NEED_REBOOT",
            Update::Staged {
                version: Version::new("4459.0.0").ok(),
                slot: None,
            },
        ),
    ] {
        services.announce(operation, "4459.0.0").await;
        tokio::time::timeout(Duration::from_secs(10), changes.next())
            .await
            .expect("the StatusUpdate signal reached the agent")
            .unwrap();
        assert_eq!(
            flatcar.status(None).await.unwrap().update,
            expected,
            "{operation}"
        );
    }
}

async fn wait_node(
    cluster: &TestCluster,
    nodes: &Api<Node>,
    name: &str,
    what: &str,
    check: impl Fn(&Node) -> bool,
) {
    cluster
        .wait_for(what, || async { check(&nodes.get(name).await.unwrap()) })
        .await
        .unwrap();
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.annotations().get(key).map(String::as_str)
}

/// Starts the agent daemon in-process, with the flatcar backend on `bus` and logind
/// rebooting, under `boot`.
async fn start_agent(
    cluster: &TestCluster,
    bus: &Bus,
    node: &str,
    dir: &std::path::Path,
    boot: &str,
    version: &str,
) -> tokio::task::JoinHandle<()> {
    let connection = agent::dbus::connect(Some(bus.address())).await.unwrap();
    let mark_good = format!("touch {}", dir.join("marked-good").display());
    let mark_good = agent::command::Command::parse(&mark_good).unwrap();
    let backend = Flatcar::open(&connection, os_release(dir, version), Some(mark_good))
        .await
        .unwrap();
    let settings = Settings {
        node_name: node.to_string(),
        lease_namespace: "baton-system".into(),
        boot_id: BootId::new(boot).unwrap(),
        record: RecordFile::new(dir),
        rebooter: Rebooter::Logind(Some(bus.address().to_string())),
        health_checks: vec![agent::command::Command::parse("true").unwrap()],
        before_reboot: Vec::new(),
        command_timeout: Duration::from_secs(10),
        // An hour: everything below must be driven by signals and watch events.
        check_interval: Duration::from_secs(3600),
        verify_timeout: Duration::from_secs(60),
    };
    let client = cluster.client();
    tokio::spawn(async move {
        let _keep = connection;
        daemon::run(client, backend, settings).await.unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flatcar_node_reboots_through_logind_only_when_granted_and_is_verified_after() {
    let cluster = TestCluster::start().await.unwrap();
    let name = cluster.add_nodes(1).await.unwrap().remove(0);
    let nodes: Api<Node> = Api::all(cluster.client());
    let bus = Bus::start().unwrap();
    let services = Services::start(&bus).await;
    let dir = tempfile::tempdir().unwrap();
    let boot1 = "0b0b0b0b-0000-4000-8000-000000000001";

    let agent = start_agent(&cluster, &bus, &name, dir.path(), boot1, "4230.2.1").await;
    wait_node(&cluster, &nodes, &name, "the agent to report Idle", |n| {
        annotation(n, "baton.dev/state") == Some("Idle")
            && annotation(n, "baton.dev/current-version") == Some("4230.2.1")
            && annotation(n, "baton.dev/boot-id") == Some(boot1)
    })
    .await;

    // update_engine finishes staging: the signal alone moves the agent.
    services
        .announce("UPDATE_STATUS_UPDATED_NEED_REBOOT", "4459.0.0")
        .await;
    wait_node(
        &cluster,
        &nodes,
        &name,
        "the agent to ask for a reboot",
        |n| {
            annotation(n, "baton.dev/state") == Some("RebootRequired")
                && annotation(n, "baton.dev/target-version") == Some("4459.0.0")
                && n.labels()
                    .get("baton.dev/reboot-required")
                    .map(String::as_str)
                    == Some("true")
        },
    )
    .await;

    // A grant for another boot is no grant.
    let grant = |boot: &str| serde_json::json!({"metadata": {"annotations": {"baton.dev/reboot-ok": boot}}});
    nodes
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&grant("ffffffff")),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        services.reboots.load(Ordering::SeqCst),
        0,
        "rebooted on a stale grant"
    );

    // reboot-ok naming this boot, without the operator's Lease and cordon, is no grant
    // either: the agent confirms on fresh reads right before it reboots.
    nodes
        .patch(&name, &PatchParams::default(), &Patch::Merge(&grant(boot1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        services.reboots.load(Ordering::SeqCst),
        0,
        "rebooted on reboot-ok alone, without a Lease"
    );
    wait_node(&cluster, &nodes, &name, "the agent to ask again", |n| {
        annotation(n, "baton.dev/state") == Some("RebootRequired")
    })
    .await;

    // The real grant (the Lease, baton's cordon and reboot-ok, as the operator gives
    // it): logind is asked to reboot.
    nodes
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&grant("ffffffff")),
        )
        .await
        .unwrap();
    cluster.create_namespace("baton-system").await.unwrap();
    let lease: k8s_openapi::api::coordination::v1::Lease =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("baton-reboot-{name}"),
                         "annotations": {"baton.dev/granted-boot-id": boot1}},
            "spec": {"holderIdentity": name},
        }))
        .unwrap();
    Api::namespaced(cluster.client(), "baton-system")
        .create(&kube::api::PostParams::default(), &lease)
        .await
        .unwrap();
    let cordon_and_grant = serde_json::json!({
        "spec": {"unschedulable": true},
        "metadata": {"annotations": {"baton.dev/cordoned": "true", "baton.dev/reboot-ok": boot1}},
    });
    nodes
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&cordon_and_grant),
        )
        .await
        .unwrap();
    cluster
        .wait_for("logind's Reboot to be called", || async {
            services.reboots.load(Ordering::SeqCst) == 1
        })
        .await
        .unwrap();
    wait_node(&cluster, &nodes, &name, "Rebooting", |n| {
        annotation(n, "baton.dev/state") == Some("Rebooting")
    })
    .await;

    // The agent restarts under the same boot (the reboot has not happened): it asks
    // logind again and never claims the new version.
    agent.abort();
    let _ = agent.await;
    let agent = start_agent(&cluster, &bus, &name, dir.path(), boot1, "4230.2.1").await;
    cluster
        .wait_for("logind's Reboot to be called again", || async {
            services.reboots.load(Ordering::SeqCst) == 2
        })
        .await
        .unwrap();
    let n = nodes.get(&name).await.unwrap();
    assert_eq!(annotation(&n, "baton.dev/state"), Some("Rebooting"));
    assert!(!dir.path().join("marked-good").exists());

    // The machine comes back on the new version under a new boot: verified, marked good
    // as Flatcar does, Done.
    agent.abort();
    let _ = agent.await;
    services.announce("UPDATE_STATUS_IDLE", "").await;
    let boot2 = "0b0b0b0b-0000-4000-8000-000000000002";
    let _agent = start_agent(&cluster, &bus, &name, dir.path(), boot2, "4459.0.0").await;
    wait_node(
        &cluster,
        &nodes,
        &name,
        "the agent to report Done on 4459.0.0",
        |n| {
            annotation(n, "baton.dev/state") == Some("Done")
                && annotation(n, "baton.dev/current-version") == Some("4459.0.0")
                && annotation(n, "baton.dev/boot-id") == Some(boot2)
                && !n.labels().contains_key("baton.dev/reboot-required")
        },
    )
    .await;
    assert!(
        dir.path().join("marked-good").exists(),
        "the new boot was marked good"
    );
    assert_eq!(services.reboots.load(Ordering::SeqCst), 2);
}

/// The host files the chart ships for the agent (`charts/baton/files/host/`).
fn host_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/baton/files/host")
        .join(name)
}

/// What the agent's UID could do on the bus, run as that UID by the test below:
/// prints one line per call, `<call>: ok` or `<call>: refused: <why>`.
#[tokio::test]
#[ignore = "run as the agent's UID by the_agents_uid_reads_update_engine_and_reboots_and_is_refused_everything_else"]
async fn as_the_agents_uid() {
    let Ok(address) = std::env::var("BATON_TEST_BUS") else {
        return;
    };
    let line = |call: &str, r: Result<(), String>| match r {
        Ok(()) => println!("{call}: ok"),
        Err(e) => println!("{call}: refused: {e}"),
    };
    let connection = agent::dbus::connect(Some(&address)).await.unwrap();
    let status = async {
        let mut flatcar = Flatcar::open(&connection, "/nonexistent".into(), None)
            .await
            .map_err(|e| e.to_string())?;
        flatcar
            .status(None)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
    .await;
    line("GetStatus", status);
    let reboot = Rebooter::Logind(Some(address.clone()))
        .reboot()
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    line("Reboot", reboot);
    let exec: UnitProperties = vec![(
        "Description".into(),
        zbus::zvariant::Value::from("a root shell")
            .try_into()
            .unwrap(),
    )];
    let aux: Vec<(String, UnitProperties)> = Vec::new();
    let unit = connection
        .call_method(
            Some("org.freedesktop.systemd1"),
            "/org/freedesktop/systemd1",
            Some("org.freedesktop.systemd1.Manager"),
            "StartTransientUnit",
            &("baton-escape.service", "fail", exec, aux),
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    line("StartTransientUnit", unit);
}

/// On a bus set up as a host's, with the D-Bus drop-in and the polkit rule the chart
/// ships: the agent's fixed UID reads update_engine's status and may reboot through
/// logind, and is refused a StartTransientUnit (which would run any command as root).
/// Another non-root UID, without the drop-in's grant, cannot even read the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_uid_reads_update_engine_and_reboots_and_is_refused_everything_else() {
    use std::os::unix::process::CommandExt;
    let rules = harness::polkit::Rules::load(&host_file("50-baton-agent.rules")).unwrap();
    // The rule itself: reboot, and nothing else, for baton-agent (or UID 65532 with no
    // name); nothing for anyone else.
    for user in ["baton-agent", "65532"] {
        assert!(rules.allows("org.freedesktop.login1.reboot", user).unwrap());
        assert!(
            rules
                .allows("org.freedesktop.login1.reboot-multiple-sessions", user)
                .unwrap()
        );
        for action in [
            "org.freedesktop.systemd1.manage-units",
            "org.freedesktop.login1.power-off",
            "org.freedesktop.login1.set-wall-message",
            "org.freedesktop.policykit.exec",
        ] {
            assert!(!rules.allows(action, user).unwrap(), "{user} {action}");
        }
    }
    assert!(
        !rules
            .allows("org.freedesktop.login1.reboot", "nobody")
            .unwrap()
    );

    let drop_in = host_file("baton-agent.dbus.conf");
    let bus = Bus::start_host_like(
        &[&drop_in],
        &[("baton-agent", 65532), ("someone-else", 65533)],
    )
    .unwrap();
    let polkit = Polkit {
        rules,
        users: vec![
            (65532, "baton-agent".into()),
            (65533, "someone-else".into()),
        ],
    };
    let services = Services::start_with(&bus, Some(polkit.clone())).await;
    let started = Arc::new(AtomicUsize::new(0));
    let _systemd = zbus::connection::Builder::address(bus.address())
        .unwrap()
        .name("org.freedesktop.systemd1")
        .unwrap()
        .serve_at(
            "/org/freedesktop/systemd1",
            FakeSystemd {
                polkit,
                started: started.clone(),
            },
        )
        .unwrap()
        .build()
        .await
        .unwrap();
    let run_as = |uid: u32| {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "as_the_agents_uid",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BATON_TEST_BUS", bus.address())
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        eprintln!(
            "[dbus] as UID {uid}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let agent = run_as(65532);
    assert!(agent.contains("GetStatus: ok"), "{agent}");
    assert!(agent.contains("Reboot: ok"), "{agent}");
    assert!(
        agent.contains("StartTransientUnit: refused")
            && agent.contains("polkit: baton-agent may not org.freedesktop.systemd1.manage-units"),
        "{agent}"
    );
    assert_eq!(services.reboots.load(Ordering::SeqCst), 1);
    assert_eq!(started.load(Ordering::SeqCst), 0, "no unit ever started");
    let other = run_as(65533);
    assert!(
        other.contains("GetStatus: refused") && other.contains("AccessDenied"),
        "the drop-in is what lets the agent read update_engine: {other}"
    );
    assert!(other.contains("Reboot: refused"), "{other}");
    assert_eq!(services.reboots.load(Ordering::SeqCst), 1);
}
