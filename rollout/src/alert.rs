//! The Prometheus alert gate, as rules: which firing alerts hold new grants back. The
//! query itself is I/O and lives in the operator; this module only judges its answer.

use regex::Regex;

/// A validated `spec.health.prometheus`.
#[derive(Debug, Clone)]
pub struct AlertGate {
    /// The Prometheus base URL.
    pub url: String,
    /// Alerts whose name this matches (anywhere in the name, as kured's
    /// `--alert-filter-regexp`) are ignored.
    pub ignore: Option<Regex>,
}

/// One alert as Prometheus reports it on `/api/v1/alerts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// The `alertname` label.
    pub name: String,
    /// `firing` or `pending`.
    pub state: String,
}

/// How many alert names a gate message lists before it says "and N more".
const LISTED: usize = 5;

impl AlertGate {
    /// Compiles a spec's gate. The error is the regex's own message.
    pub fn compile(spec: &crds::PrometheusGate) -> Result<AlertGate, String> {
        let ignore = match spec.alert_filter.as_deref().filter(|f| !f.is_empty()) {
            Some(f) => Some(
                Regex::new(f)
                    .map_err(|e| format!("alertFilter is not a valid regular expression: {e}"))?,
            ),
            None => None,
        };
        Ok(AlertGate {
            url: spec.url.clone(),
            ignore,
        })
    }

    /// Why the gate is closed given these alerts, or `None` when it is open. Pending
    /// alerts do not close it; firing ones do unless ignored. Names are deduplicated
    /// and sorted, so the same alerts always give the same message.
    pub fn verdict(&self, alerts: &[Alert]) -> Option<String> {
        let mut names: Vec<&str> = alerts
            .iter()
            .filter(|a| a.state == "firing")
            .map(|a| a.name.as_str())
            .filter(|n| !self.ignore.as_ref().is_some_and(|r| r.is_match(n)))
            .collect();
        names.sort_unstable();
        names.dedup();
        if names.is_empty() {
            return None;
        }
        let more = names.len().saturating_sub(LISTED);
        let listed = names
            .into_iter()
            .take(LISTED)
            .collect::<Vec<_>>()
            .join(", ");
        Some(if more > 0 {
            format!("alerts firing in Prometheus: {listed} and {more} more")
        } else {
            format!("alerts firing in Prometheus: {listed}")
        })
    }

    /// The gate's message when Prometheus cannot be asked: it fails closed, because an
    /// unknown cluster health is no reason to disrupt a node.
    pub fn unreachable(&self, why: &str) -> String {
        format!(
            "cannot query Prometheus at {} (gate closed until it answers): {why}",
            self.url
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(filter: Option<&str>) -> AlertGate {
        AlertGate::compile(&crds::PrometheusGate {
            url: "http://127.0.0.1:9090".into(),
            alert_filter: filter.map(Into::into),
        })
        .unwrap()
    }

    fn alert(name: &str, state: &str) -> Alert {
        Alert {
            name: name.into(),
            state: state.into(),
        }
    }

    #[test]
    fn firing_alerts_close_the_gate_and_pending_ones_do_not() {
        let g = gate(None);
        assert_eq!(g.verdict(&[alert("DiskFull", "pending")]), None);
        assert_eq!(
            g.verdict(&[
                alert("DiskFull", "firing"),
                alert("DiskFull", "firing"),
                alert("Apiserver", "firing")
            ])
            .as_deref(),
            Some("alerts firing in Prometheus: Apiserver, DiskFull")
        );
    }

    #[test]
    fn the_filter_ignores_matching_alerts_anywhere_in_the_name() {
        let g = gate(Some("^Watchdog$|Info"));
        assert_eq!(
            g.verdict(&[
                alert("Watchdog", "firing"),
                alert("KubeInfoInhibitor", "firing")
            ]),
            None
        );
        assert!(g.verdict(&[alert("WatchdogDown", "firing")]).is_some());
    }

    #[test]
    fn long_lists_are_cut() {
        let alerts: Vec<_> = (0..8).map(|i| alert(&format!("A{i}"), "firing")).collect();
        assert_eq!(
            gate(None).verdict(&alerts).as_deref(),
            Some("alerts firing in Prometheus: A0, A1, A2, A3, A4 and 3 more")
        );
    }

    #[test]
    fn a_bad_filter_is_an_error() {
        let e = AlertGate::compile(&crds::PrometheusGate {
            url: "http://p:9090".into(),
            alert_filter: Some("(".into()),
        })
        .unwrap_err();
        assert!(
            e.starts_with("alertFilter is not a valid regular expression"),
            "{e}"
        );
    }
}
