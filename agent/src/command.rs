//! Commands the agent runs (health checks, before-reboot steps, the sentinel, reboot and
//! mark-good commands): a program and its arguments, run **without a shell**, each with
//! a bound past which it is killed.
//!
//! The agent image holds no shell, so a command is split into words the way a shell
//! would quote them (`shlex`), and nothing else: no pipes, redirections, variables or
//! globs. A user who wants those writes the shell explicitly, `sh -c '…'`, on an image
//! that has one.

use std::time::Duration;

use thiserror::Error;

/// A command line, checked once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    text: String,
    argv: Vec<String>,
}

/// A command line that cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("command {text:?} is not a valid command line: {reason}")]
pub struct BadCommand {
    /// The command as written.
    pub text: String,
    /// Why.
    pub reason: &'static str,
}

/// How a command failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Failure {
    /// It ran past its bound and was killed.
    #[error("{what} {command:?} timed out after {}s", .after.as_secs())]
    TimedOut {
        /// What it is for.
        what: String,
        /// The command.
        command: String,
        /// Its bound.
        after: Duration,
    },
    /// It could not be started (no such program, say).
    #[error("{what} {command:?} could not start: {reason}")]
    NotStarted {
        /// What it is for.
        what: String,
        /// The command.
        command: String,
        /// Why.
        reason: String,
    },
    /// It exited unsuccessfully; the last line of its stderr says why.
    #[error("{what} {command:?} failed ({status}){}", if .stderr.is_empty() { String::new() } else { format!(": {}", .stderr) })]
    Failed {
        /// What it is for.
        what: String,
        /// The command.
        command: String,
        /// How it exited.
        status: String,
        /// The last line of its stderr.
        stderr: String,
    },
}

impl Command {
    /// Splits `text` into a program and its arguments.
    pub fn parse(text: &str) -> Result<Command, BadCommand> {
        let bad = |reason| BadCommand {
            text: text.to_string(),
            reason,
        };
        let argv = shlex::split(text).ok_or_else(|| bad("its quoting is unbalanced"))?;
        if argv.is_empty() {
            return Err(bad("it is empty"));
        }
        Ok(Command {
            text: text.to_string(),
            argv,
        })
    }

    /// Parses each of `texts`.
    pub fn parse_all(texts: &[String]) -> Result<Vec<Command>, BadCommand> {
        texts.iter().map(|t| Command::parse(t)).collect()
    }

    /// The command as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Runs it within `timeout`; its exit status decides (`Ok(true)`: 0).
    pub async fn status(&self, what: &str, timeout: Duration) -> Result<bool, Failure> {
        match self.output(what, timeout).await? {
            out if out.status.success() => Ok(true),
            _ => Ok(false),
        }
    }

    /// Runs it within `timeout`; anything but exit 0 is a failure.
    pub async fn run(&self, what: &str, timeout: Duration) -> Result<(), Failure> {
        let out = self.output(what, timeout).await?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(Failure::Failed {
            what: what.to_string(),
            command: self.text.clone(),
            status: out.status.to_string(),
            stderr: stderr
                .lines()
                .last()
                .unwrap_or("")
                .trim()
                .chars()
                .take(400)
                .collect(),
        })
    }

    async fn output(&self, what: &str, timeout: Duration) -> Result<std::process::Output, Failure> {
        let child = tokio::process::Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null())
            .output();
        match tokio::time::timeout(timeout, child).await {
            Err(_) => Err(Failure::TimedOut {
                what: what.to_string(),
                command: self.text.clone(),
                after: timeout,
            }),
            Ok(Err(e)) => Err(Failure::NotStarted {
                what: what.to_string(),
                command: self.text.clone(),
                reason: e.to_string(),
            }),
            Ok(Ok(out)) => Ok(out),
        }
    }
}

/// Runs every command in order, stopping at the first failure.
pub async fn run_all(what: &str, commands: &[Command], timeout: Duration) -> Result<(), Failure> {
    for command in commands {
        command.run(what, timeout).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(text: &str) -> Command {
        Command::parse(text).unwrap()
    }

    #[tokio::test]
    async fn failures_say_which_command_and_why() {
        let t = Duration::from_secs(5);
        assert_eq!(run_all("check", &[c("true")], t).await, Ok(()));
        let e = run_all(
            "check",
            &[c("true"), c("sh -c 'echo broken >&2; exit 3'")],
            t,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("exit status: 3") && e.ends_with(": broken"),
            "{e}"
        );
        let e = c("sleep 5")
            .run("check", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
    }

    #[tokio::test]
    async fn commands_run_without_a_shell() {
        // Shell syntax is passed as arguments, not interpreted: `echo` prints it all.
        let e = c("false && true")
            .run("check", Duration::from_secs(5))
            .await;
        assert!(
            matches!(e, Err(Failure::Failed { .. })),
            "`false` ran with the arguments `&&` and `true`"
        );
        assert_eq!(
            c("test -e '/no such file'")
                .status("sentinel", Duration::from_secs(5))
                .await,
            Ok(false)
        );
        let e = c("no-such-program-anywhere")
            .run("check", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, Failure::NotStarted { .. }), "{e}");
    }

    #[test]
    fn a_command_line_is_split_like_a_shell_would_and_checked_at_start_up() {
        assert_eq!(c("nsenter -t 1 -m -- systemctl reboot").argv.len(), 7);
        assert_eq!(
            c("sh -c 'test -e /run/x && exit 1'").argv,
            ["sh", "-c", "test -e /run/x && exit 1"]
        );
        assert!(
            Command::parse("")
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        assert!(
            Command::parse("echo 'unbalanced")
                .unwrap_err()
                .to_string()
                .contains("unbalanced")
        );
    }
}
