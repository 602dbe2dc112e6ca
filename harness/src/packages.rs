//! The Debian packages some tests run for real: Prometheus (the alert gate), Alertmanager
//! (silences for disrupted nodes), Chromium
//! (renders `kubectl baton plan --svg` headless),
//! dbus-daemon (the agent's update_engine and logind clients), and cgpt and sgdisk (the
//! A/B backend's reference for GPT attribute bits, and Flatcar's real disk layout), and fio
//! (the workload whose read latency the staging benchmark measures). `ensure` installs the
//! missing ones with apt-get when it can, and otherwise says how.

use std::{path::PathBuf, process::Command};

use crate::error::{Error, Result, io};

/// A program (or shared library) a test needs, and the package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Package {
    /// The program looked up on the PATH, or a library (`lib….so`) looked up in the
    /// system's library directories.
    pub program: &'static str,
    /// The Debian package.
    pub package: &'static str,
}

/// Everything the tests need from the system.
pub const PACKAGES: [Package; 9] = [
    Package {
        program: "fio",
        package: "fio",
    },
    Package {
        program: "prometheus",
        package: "prometheus",
    },
    Package {
        program: "dbus-daemon",
        package: "dbus-daemon",
    },
    Package {
        program: "cgpt",
        package: "cgpt",
    },
    Package {
        program: "sgdisk",
        package: "gdisk",
    },
    Package {
        program: "node",
        package: "nodejs",
    },
    Package {
        program: "libnss_wrapper.so",
        package: "libnss-wrapper",
    },
    Package {
        program: "chromium",
        package: "chromium",
    },
    Package {
        program: "prometheus-alertmanager",
        package: "prometheus-alertmanager",
    },
];

/// `program` on the PATH, or a `lib….so` in the system's library directories.
pub fn find(program: &str) -> Option<PathBuf> {
    if program.starts_with("lib") && program.ends_with(".so") {
        return ["/usr/lib", "/lib", "/usr/lib64"]
            .iter()
            .flat_map(|root| {
                let arch = std::fs::read_dir(root)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path());
                std::iter::once(PathBuf::from(root)).chain(arch)
            })
            .map(|dir| dir.join(program))
            .find(|p| p.is_file());
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Installs the packages whose programs are missing, with apt-get (as root, or with
/// sudo). Fails with instructions when that is impossible.
pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|p| find(p.program).is_none())
        .map(|p| p.package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {} with apt-get", missing.join(" "));
    let sudo = find("sudo").filter(|_| !is_root());
    let apt = |args: &[&str]| -> Result<bool> {
        let mut cmd = match &sudo {
            Some(sudo) => {
                let mut c = Command::new(sudo);
                c.arg("apt-get");
                c
            }
            None => Command::new("apt-get"),
        };
        let status = cmd
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(args)
            .status()
            .map_err(io("running apt-get"))?;
        Ok(status.success())
    };
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&missing);
    if find("apt-get").is_some() && (apt(&install)? || (apt(&["update"])? && apt(&install)?)) {
        return Ok(());
    }
    Err(Error::Other(format!(
        "the tests need {}: install them (Debian: apt-get install {}) and run again",
        missing.join(" and "),
        missing.join(" ")
    )))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}
