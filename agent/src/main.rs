//! `baton-agent` entry point: configuration, logging, then the agent loop. Exit codes:
//! 0 after a simulated reboot (start it again to "boot"), 1 on a runtime failure,
//! 2 on bad configuration.

use std::process::ExitCode;

use agent::config::Config;
use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(e) = config.log.init() {
        eprintln!("baton-agent: {e}");
        return ExitCode::from(2);
    }
    if config.prepare_state_dir {
        return match agent::record::prepare_state_dir(&config.state_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("baton-agent: {e}");
                ExitCode::from(1)
            }
        };
    }
    if config.rollback {
        return match agent::rollback(&config) {
            Ok(slot) => {
                println!("rolled back: {slot} boots next; reboot the node to use it");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("baton-agent: rollback failed: {e}");
                ExitCode::from(1)
            }
        };
    }
    tracing::info!(node = %config.node_name, backend = ?config.backend, "baton-agent starting");
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no Kubernetes client");
            return ExitCode::from(2);
        }
    };
    match agent::run(&config, client).await {
        Ok(agent::daemon::Exit::Rebooted) => {
            tracing::info!("simulated reboot: exiting; start the agent again to boot");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "baton-agent stopped");
            ExitCode::from(1)
        }
    }
}
