//! Which cluster a command acts on: kubectl's `--kubeconfig`, `--context`,
//! `--namespace` and `--request-timeout`, resolved as kubectl resolves them.

use std::{future::Future, time::Duration};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::Error;

/// The operator's namespace when `-n` is not given (the chart's default).
pub const DEFAULT_NAMESPACE: &str = "baton-system";

/// kubectl's cluster flags, accepted by every command.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<String>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The operator's namespace, where the reboot Leases are.
    #[arg(short = 'n', long, global = true, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// How long one command may wait for the API server (`status -w` bounds each
    /// connection attempt by it instead).
    #[arg(long, global = true, default_value = "30s", value_parser = parse_timeout)]
    pub request_timeout: Duration,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let d = crds::duration::parse(text).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be more than 0s: every wait has a bound".into());
    }
    Ok(d)
}

/// A connected cluster: the client, and the names a human needs to know what it acted on.
#[derive(Clone)]
pub struct Cluster {
    /// The client.
    pub client: Client,
    /// The API server's URL.
    pub server: String,
    /// The kubeconfig context, or `in-cluster`.
    pub context: String,
    /// The operator's namespace.
    pub namespace: String,
    /// The bound on one command's requests.
    pub timeout: Duration,
}

impl Cluster {
    /// Resolves the flags to a client (no request is made yet).
    pub async fn connect(args: &ClusterArgs) -> Result<Cluster, Error> {
        let options = KubeConfigOptions {
            context: args.context.clone(),
            ..Default::default()
        };
        let config_error = |e: &dyn std::fmt::Display| Error::Config(e.to_string());
        let (mut config, context) = match (&args.kubeconfig, &args.context) {
            (Some(path), _) => {
                let file = Kubeconfig::read_from(path).map_err(|e| config_error(&e))?;
                let context = args
                    .context
                    .clone()
                    .or_else(|| file.current_context.clone());
                let config = Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| config_error(&e))?;
                (config, context)
            }
            (None, Some(context)) => (
                Config::from_kubeconfig(&options)
                    .await
                    .map_err(|e| config_error(&e))?,
                Some(context.clone()),
            ),
            (None, None) => {
                let context = Kubeconfig::read().ok().and_then(|k| k.current_context);
                let config = Config::infer().await.map_err(|e| config_error(&e))?;
                (config, context)
            }
        };
        config.connect_timeout = Some(args.request_timeout.min(Duration::from_secs(10)));
        let server = config.cluster_url.to_string();
        let server = server.trim_end_matches('/').to_string();
        let client = Client::try_from(config).map_err(Error::Kube)?;
        Ok(Cluster {
            client,
            server,
            context: context.unwrap_or_else(|| "in-cluster".into()),
            namespace: args.namespace.clone(),
            timeout: args.request_timeout,
        })
    }

    /// Runs one command's requests within the bound.
    pub async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| Error::Timeout(self.timeout))?
    }

    /// `[context NAME, server URL]`: printed after a change so that nobody wonders where
    /// it happened.
    pub fn acted_on(&self) -> String {
        format!("[context {}, server {}]", self.context, self.server)
    }
}
