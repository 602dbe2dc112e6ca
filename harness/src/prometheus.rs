//! A real Prometheus server (Debian's `prometheus` package, or `$BATON_E2E_PROMETHEUS`)
//! on loopback, loaded with a rule file, and an [`Alarm`]: a scrape target whose one
//! metric the test sets, so that an alert fires and resolves on demand.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    error::{Error, Result, io},
    port::free_port,
    process::Supervised,
};

/// The alert [`Alarm`] drives.
pub const ALARM_ALERT: &str = "BatonTestAlarm";

/// An alert that always fires, as kube-prometheus's `Watchdog` does.
pub const WATCHDOG_ALERT: &str = "Watchdog";

/// Prometheus evaluates rules and scrapes every second, so alerts follow the alarm
/// within about two seconds.
const RULES: &str = r#"groups:
  - name: baton-test
    interval: 1s
    rules:
      - alert: BatonTestAlarm
        expr: baton_test_alarm > 0
      - alert: Watchdog
        expr: vector(1)
"#;

/// A scrape target serving `baton_test_alarm 0|1`.
#[derive(Debug)]
pub struct Alarm {
    on: Arc<AtomicBool>,
    port: u16,
    server: tokio::task::JoinHandle<()>,
}

impl Alarm {
    /// Serves the metric on a free loopback port, initially `on`.
    pub async fn start(on: bool) -> Result<Alarm> {
        let flag = Arc::new(AtomicBool::new(on));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io("binding the alarm target"))?;
        let port = listener
            .local_addr()
            .map_err(io("binding the alarm target"))?
            .port();
        let served = Arc::clone(&flag);
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let on = served.load(Ordering::SeqCst);
                async move {
                    format!(
                        "# TYPE baton_test_alarm gauge\nbaton_test_alarm {}\n",
                        u8::from(on)
                    )
                }
            }),
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Alarm {
            on: flag,
            port,
            server,
        })
    }

    /// Raises (`true`) or clears the alarm.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    /// `host:port` to scrape.
    pub fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A running Prometheus. Dropping it stops the server and removes its files.
#[derive(Debug)]
pub struct Prometheus {
    proc: Supervised,
    url: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `alarm`, with the test rules, and waits until it is
    /// ready.
    pub async fn start(alarm: &Alarm) -> Result<Prometheus> {
        let binary = binary()?;
        let dir = tempfile::Builder::new()
            .prefix("baton-e2e-prometheus-")
            .tempdir()
            .map_err(io("creating Prometheus's directory"))?;
        crate::interrupt::scratch(dir.path());
        let port = free_port()?;
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yaml]\nscrape_configs:\n  - job_name: alarm\n    static_configs:\n      - targets: ['{}']\n",
            alarm.target()
        );
        write(&dir.path().join("prometheus.yml"), &config)?;
        write(&dir.path().join("rules.yaml"), RULES)?;
        let args = [
            format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--storage.tsdb.retention.time=1h".into(),
        ];
        let proc = Supervised::spawn(
            "prometheus",
            &binary,
            &args,
            dir.path().join("prometheus.log"),
        )?;
        let prometheus = Prometheus {
            proc,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _dir: dir,
        };
        prometheus
            .wait("Prometheus to be ready", |p| async move {
                p.http
                    .get(format!("{}/-/ready", p.url))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            })
            .await?;
        Ok(prometheus)
    }

    /// The base URL, for `spec.health.prometheus.url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The names of the alerts firing now.
    pub async fn firing(&self) -> Result<Vec<String>> {
        let answer: serde_json::Value = self
            .http
            .get(format!("{}/api/v1/alerts", self.url))
            .send()
            .await
            .map_err(|e| Error::Other(format!("querying Prometheus: {e}")))?
            .json()
            .await
            .map_err(|e| Error::Other(format!("decoding Prometheus's alerts: {e}")))?;
        let alerts = answer["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut names: Vec<String> = alerts
            .iter()
            .filter(|a| a["state"] == "firing")
            .filter_map(|a| a["labels"]["alertname"].as_str().map(String::from))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Waits until the alarm's alert is firing (`true`) or not.
    pub async fn wait_alarm(&self, firing: bool) -> Result<()> {
        let what = if firing {
            "the alarm to fire"
        } else {
            "the alarm to resolve"
        };
        self.wait(what, |p| async move {
            p.firing()
                .await
                .is_ok_and(|names| names.iter().any(|n| n == ALARM_ALERT) == firing)
        })
        .await
    }

    async fn wait<'a, F, Fut>(&'a self, what: &str, check: F) -> Result<()>
    where
        F: Fn(&'a Prometheus) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if check(self).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(Error::NotReady {
            component: format!("prometheus ({what})"),
            seconds: 60,
            log: self.proc.log.clone(),
            tail: self.proc.log_tail(20),
        })
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

/// `$BATON_E2E_PROMETHEUS`, or `prometheus` on the PATH.
fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("BATON_E2E_PROMETHEUS") {
        return Ok(PathBuf::from(path));
    }
    crate::packages::find("prometheus").ok_or_else(|| {
        Error::Other(
            "prometheus not found: `cargo run -p e2e -- test` installs Debian's `prometheus` package, or set BATON_E2E_PROMETHEUS".into(),
        )
    })
}
