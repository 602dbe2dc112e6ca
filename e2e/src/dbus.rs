//! A private D-Bus bus: a real `dbus-daemon` (Debian's `dbus-daemon` package) on a unix
//! socket in a temporary directory, for tests of the agent's update_engine and logind
//! clients. Nothing else connects to it.

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

impl Bus {
    /// Starts a bus that lets any local client own any name and call anything.
    pub fn start() -> Result<Bus> {
        let binary = packages::find("dbus-daemon").ok_or_else(|| {
            Error::Other("dbus-daemon not found: `cargo run -p e2e -- test` installs Debian's `dbus-daemon` package".into())
        })?;
        let dir = tempfile::Builder::new()
            .prefix("baton-e2e-dbus-")
            .tempdir()
            .map_err(io("creating the bus directory"))?;
        let socket = dir.path().join("bus");
        let config = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
            socket.display()
        );
        let config_path = dir.path().join("bus.conf");
        std::fs::write(&config_path, config).map_err(io("writing the bus configuration"))?;
        let proc = Supervised::spawn(
            "dbus-daemon",
            &binary,
            &[
                format!("--config-file={}", config_path.display()),
                "--nofork".into(),
                "--nopidfile".into(),
            ],
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
