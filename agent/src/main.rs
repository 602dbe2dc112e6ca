//! `baton-agent` entry point: configuration, logging, then the agent loop.

use std::process::ExitCode;

use agent::config::Config;
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(e) = config.log.init() {
        eprintln!("baton-agent: {e}");
        return ExitCode::from(2);
    }
    tracing::info!(node = %config.node_name, backend = ?config.backend, "baton-agent configured");
    ExitCode::SUCCESS
}
