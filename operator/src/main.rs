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
    tokio::select! {
        // Returns only when leadership is lost: exit, and be restarted as a follower.
        () = operator::controller::run_replica_with(client, config, metrics) => return ExitCode::FAILURE,
        Err(e) = server => {
            eprintln!("baton-operator: cannot serve metrics: {e}");
            return ExitCode::FAILURE;
        }
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
    }
    ExitCode::SUCCESS
}
