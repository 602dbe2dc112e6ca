//! Commands the agent runs: health checks after a boot, before-reboot steps, and
//! backend helpers. Each runs under `sh -c` with a bound, and is killed past it.

use std::time::Duration;

/// Runs `command`; `Err` says which one failed and how.
pub async fn run(what: &str, command: &str, timeout: Duration) -> Result<(), String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output();
    match tokio::time::timeout(timeout, child).await {
        Err(_) => Err(format!(
            "{what} {command:?} timed out after {}s",
            timeout.as_secs()
        )),
        Ok(Err(e)) => Err(format!("{what} {command:?} could not start: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().last().unwrap_or("").trim();
            Err(format!(
                "{what} {command:?} failed ({}){}",
                out.status,
                if last.is_empty() {
                    String::new()
                } else {
                    format!(": {last}")
                }
            )
            .chars()
            .take(512)
            .collect())
        }
    }
}

/// Runs every command in order, stopping at the first failure.
pub async fn run_all(what: &str, commands: &[String], timeout: Duration) -> Result<(), String> {
    for command in commands {
        run(what, command, timeout).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_say_which_command_and_why() {
        assert_eq!(
            run_all("check", &["true".into()], Duration::from_secs(5)).await,
            Ok(())
        );
        let e = run_all(
            "check",
            &["true".into(), "echo broken >&2; exit 3".into()],
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(
            e.contains("exit status: 3") && e.ends_with(": broken"),
            "{e}"
        );
        let e = run("check", "sleep 5", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
    }
}
