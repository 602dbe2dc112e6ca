//! polkit's JavaScript rules, evaluated as polkitd does for the tests that play a host's
//! system bus: `polkit.addRule` functions are called in order with the action and the
//! subject, and the first answer that is not `NOT_HANDLED` decides. Node.js (Debian's
//! `nodejs`) runs the rules file as it is shipped. With no rule answering, the action's
//! defaults apply; for a user with no session (a daemon), every action baton's tests ask
//! about defaults to an admin password nobody can type: refused.

use std::path::{Path, PathBuf};

use crate::{
    error::{Error, Result, io},
    packages,
};

/// The shim that loads a rules file and answers one question.
const SHIM: &str = r#"
const fs = require("fs");
const [rulesFile, actionId, user] = process.argv.slice(1);
const rules = [];
const polkit = {
  Result: { NO: "no", YES: "yes", AUTH_SELF: "auth_self", AUTH_SELF_KEEP: "auth_self_keep",
            AUTH_ADMIN: "auth_admin", AUTH_ADMIN_KEEP: "auth_admin_keep", NOT_HANDLED: null },
  addRule: (f) => rules.push(f),
  addAdminRule: () => {},
  log: () => {},
  spawn: () => { throw new Error("polkit.spawn is not allowed in baton's rules"); },
};
new Function("polkit", fs.readFileSync(rulesFile, "utf8"))(polkit);
const action = { id: actionId, lookup: () => undefined };
const subject = { user, pid: 0, groups: [], seat: "", session: "", local: false, active: false,
                  isInGroup: () => false, isInNetGroup: () => false };
let answer = null;
for (const rule of rules) {
  answer = rule(action, subject);
  if (answer) break;
}
process.stdout.write(answer || "not_handled");
"#;

/// A polkit rules file.
#[derive(Debug, Clone)]
pub struct Rules {
    file: PathBuf,
}

impl Rules {
    /// The rules in `file`.
    pub fn load(file: &Path) -> Result<Rules> {
        if !file.is_file() {
            return Err(Error::Other(format!(
                "no polkit rules at {}",
                file.display()
            )));
        }
        Ok(Rules {
            file: file.to_path_buf(),
        })
    }

    /// Whether `user` (a user name, or the decimal UID when it has none) may do
    /// `action` without authenticating: only a rule's `YES` allows it.
    pub fn allows(&self, action: &str, user: &str) -> Result<bool> {
        let node = packages::find("node").ok_or_else(|| {
            Error::Other(
                "node not found: `cargo run -p e2e -- test` installs Debian's `nodejs`".into(),
            )
        })?;
        let out = std::process::Command::new(node)
            .args(["-e", SHIM])
            .arg(&self.file)
            .args([action, user])
            .output()
            .map_err(io("running node for the polkit rules"))?;
        if !out.status.success() {
            return Err(Error::Other(format!(
                "the polkit rules in {} fail to run: {}",
                self.file.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(out.stdout == b"yes")
    }
}
