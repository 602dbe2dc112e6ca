//! `baton-operator` entry point: configuration, logging, then the controller.

use std::process::ExitCode;

use clap::Parser;
use operator::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(e) = config.log.init() {
        eprintln!("baton-operator: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = config.validate() {
        eprintln!("baton-operator: invalid configuration: {e}");
        return ExitCode::from(2);
    }
    tracing::info!(namespace = %config.namespace, identity = %config.identity, "baton-operator starting");
    let client = match operator::client().await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("baton-operator: cannot reach the Kubernetes API: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = std::sync::Arc::new(operator::metrics::Metrics::default());
    let server = operator::metrics::serve(config.metrics_addr, std::sync::Arc::clone(&metrics));
    let clock = std::sync::Arc::new(operator::clock::Clock::system());
    let replica = operator::replica::run_replica_until(client, config, metrics, clock, shutdown());
    tokio::select! {
        ended = replica => match ended {
            // Exit, and be restarted as a follower.
            operator::replica::Ended::LostLeadership => ExitCode::FAILURE,
            operator::replica::Ended::ShutDown => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
        },
        Err(e) = server => {
            eprintln!("baton-operator: cannot serve metrics: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM (what Kubernetes sends to stop a pod) or SIGINT.
async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("asked to stop");
}
