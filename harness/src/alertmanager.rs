//! A real Alertmanager (Debian's `prometheus-alertmanager` package) on loopback, with
//! no receiver and no clustering: the tests post alerts to it and read back whether a
//! silence suppresses them.

use std::time::{Duration, Instant};

use crate::{
    error::{Error, Result, io},
    port::free_port,
    process::Supervised,
};

/// A running Alertmanager. Dropping it stops the server and removes its files.
#[derive(Debug)]
pub struct Alertmanager {
    _proc: Supervised,
    url: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    /// Starts Alertmanager and waits until it is ready.
    pub async fn start() -> Result<Alertmanager> {
        crate::packages::ensure()?;
        let binary = crate::packages::find("prometheus-alertmanager").ok_or_else(|| {
            Error::Other(
                "prometheus-alertmanager not found: `cargo run -p e2e -- test` installs Debian's package".into(),
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("baton-e2e-alertmanager-")
            .tempdir()
            .map_err(io("creating Alertmanager's directory"))?;
        crate::interrupt::scratch(dir.path());
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            "route: {receiver: nobody}\nreceivers: [{name: nobody}]\n",
        )
        .map_err(io("writing alertmanager.yml"))?;
        let port = free_port()?;
        let args = [
            format!("--config.file={}", config.display()),
            format!("--storage.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--cluster.listen-address=".into(),
        ];
        let proc = Supervised::spawn(
            "alertmanager",
            &binary,
            &args,
            dir.path().join("alertmanager.log"),
        )?;
        let am = Alertmanager {
            _proc: proc,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| Error::Other(e.to_string()))?,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ready = am
                .http
                .get(format!("{}/-/ready", am.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(am);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(Error::Other(
            "Alertmanager did not become ready within 60s".into(),
        ))
    }

    /// The base URL, for `spec.health.alertmanager.url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Posts (or refreshes) a firing alert `name` with the label `node=<node>`, for an
    /// hour.
    pub async fn fire(&self, name: &str, node: &str) -> Result<()> {
        let body = serde_json::json!([{
            "labels": {"alertname": name, "node": node},
            "endsAt": jiff::Timestamp::now().checked_add(jiff::SignedDuration::from_hours(1)).map_err(|e| Error::Other(e.to_string()))?,
        }]);
        let r = self
            .http
            .post(format!("{}/api/v2/alerts", self.url))
            .json(&body)
            .send()
            .await
            .map_err(|e| Error::Other(format!("posting an alert: {e}")))?;
        if !r.status().is_success() {
            return Err(Error::Other(format!(
                "posting an alert: HTTP {}",
                r.status()
            )));
        }
        Ok(())
    }

    /// The state of alert `name` for `node`: `active`, `suppressed` or `unprocessed`.
    pub async fn state(&self, name: &str, node: &str) -> Result<String> {
        let alerts: serde_json::Value = self
            .http
            .get(format!("{}/api/v2/alerts", self.url))
            .send()
            .await
            .map_err(|e| Error::Other(format!("listing alerts: {e}")))?
            .json()
            .await
            .map_err(|e| Error::Other(format!("decoding alerts: {e}")))?;
        Ok(alerts
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["labels"]["alertname"] == name && a["labels"]["node"] == node)
            .and_then(|a| a["status"]["state"].as_str())
            .unwrap_or("absent")
            .to_string())
    }

    /// Every silence, as Alertmanager reports them (JSON).
    pub async fn silences(&self) -> Result<Vec<serde_json::Value>> {
        let all: serde_json::Value = self
            .http
            .get(format!("{}/api/v2/silences", self.url))
            .send()
            .await
            .map_err(|e| Error::Other(format!("listing silences: {e}")))?
            .json()
            .await
            .map_err(|e| Error::Other(format!("decoding silences: {e}")))?;
        Ok(all.as_array().cloned().unwrap_or_default())
    }
}
