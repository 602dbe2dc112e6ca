//! A private D-Bus bus: a real `dbus-daemon` (Debian's `dbus-daemon` package) on a unix
//! socket in a temporary directory, for tests of the agent's update_engine and logind
//! clients. Nothing else connects to it.
//!
//! [`Bus::start_host_like`] plays a host's system bus: method calls are denied by
//! default, as on the system bus; only root owns names; update_engine takes calls from
//! root only (Flatcar's own policy); logind and systemd take calls from anyone and let
//! polkit decide; and the policy drop-ins given (baton's) are included as the host
//! would, with the users they name known to the daemon (through `nss_wrapper`).

use std::time::{Duration, Instant};

use crate::{
    error::{Error, Result, io},
    packages,
    process::Supervised,
};

/// A running bus. Dropping it stops the daemon and removes its directory.
#[derive(Debug)]
pub struct Bus {
    _proc: Supervised,
    address: String,
    _dir: tempfile::TempDir,
}

/// A host's system-bus policy, with `{includes}` for the drop-ins.
const HOST_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow own="*"/>
    <allow send_destination="*"/>
  </policy>
  <!-- update_engine (Flatcar): root only. -->
  <policy context="default">
    <deny send_destination="com.coreos.update1"/>
  </policy>
  <!-- logind and systemd: anyone may ask; polkit decides. -->
  <policy context="default">
    <allow send_destination="org.freedesktop.login1"/>
    <allow send_destination="org.freedesktop.systemd1"/>
  </policy>
{includes}"#;

impl Bus {
    /// Starts a bus that lets any local client own any name and call anything.
    pub fn start() -> Result<Bus> {
        let open = r#"
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>"#;
        Bus::spawn(open, &[])
    }

    /// Starts a bus with a host's system-bus policy plus `drop_ins` (D-Bus policy files,
    /// as installed in `/etc/dbus-1/system.d/`), knowing the users `users` (name, UID)
    /// besides root. Clients of any UID can connect.
    pub fn start_host_like(drop_ins: &[&std::path::Path], users: &[(&str, u32)]) -> Result<Bus> {
        let includes: String = drop_ins
            .iter()
            .map(|d| format!("  <include>{}</include>\n", d.display()))
            .collect();
        Bus::spawn(&HOST_POLICY.replace("{includes}", &includes), users)
    }

    fn spawn(policy: &str, users: &[(&str, u32)]) -> Result<Bus> {
        let binary = packages::find("dbus-daemon").ok_or_else(|| {
            Error::Other("dbus-daemon not found: `cargo run -p e2e -- test` installs Debian's `dbus-daemon` package".into())
        })?;
        let dir = tempfile::Builder::new()
            .prefix("baton-e2e-dbus-")
            .tempdir()
            .map_err(io("creating the bus directory"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(io("opening the bus directory to other users"))?;
        let socket = dir.path().join("bus");
        let config = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
{policy}
</busconfig>
"#,
            socket.display()
        );
        let config_path = dir.path().join("bus.conf");
        std::fs::write(&config_path, config).map_err(io("writing the bus configuration"))?;
        // Through `env`: the daemon alone gets the users (nss_wrapper), not the test.
        let mut args: Vec<String> = Vec::new();
        if !users.is_empty() {
            let wrapper = packages::find("libnss_wrapper.so").ok_or_else(|| {
                Error::Other("libnss_wrapper.so not found: `cargo run -p e2e -- test` installs Debian's `libnss-wrapper`".into())
            })?;
            let mut passwd = String::from("root:x:0:0:root:/root:/bin/sh\n");
            let mut group = String::from("root:x:0:\n");
            for (name, uid) in users {
                passwd.push_str(&format!("{name}:x:{uid}:{uid}::/:/usr/sbin/nologin\n"));
                group.push_str(&format!("{name}:x:{uid}:\n"));
            }
            let (p, g) = (dir.path().join("passwd"), dir.path().join("group"));
            std::fs::write(&p, passwd).map_err(io("writing the bus's passwd"))?;
            std::fs::write(&g, group).map_err(io("writing the bus's group"))?;
            args.push(format!("LD_PRELOAD={}", wrapper.display()));
            args.push(format!("NSS_WRAPPER_PASSWD={}", p.display()));
            args.push(format!("NSS_WRAPPER_GROUP={}", g.display()));
        }
        args.extend([
            binary.display().to_string(),
            format!("--config-file={}", config_path.display()),
            "--nofork".into(),
            "--nopidfile".into(),
        ]);
        let proc = Supervised::spawn(
            "dbus-daemon",
            std::path::Path::new("/usr/bin/env"),
            &args,
            dir.path().join("dbus.log"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    component: "dbus-daemon".into(),
                    seconds: 20,
                    log: proc.log.clone(),
                    tail: proc.log_tail(20),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Bus {
            _proc: proc,
            address: format!("unix:path={}", socket.display()),
            _dir: dir,
        })
    }

    /// The bus address, such as `unix:path=/tmp/…/bus`.
    pub fn address(&self) -> &str {
        &self.address
    }
}
