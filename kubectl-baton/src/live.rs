//! `kubectl baton status -w`: the live view. [`Screen`] is pure: given the state of
//! the connection and the latest report it says what to print, and prints nothing when
//! nothing changed. [`watch`] feeds it from three watches (policies, nodes, Leases).
//!
//! - Until every watch has listed once, it says `connecting to <server>`: no frame
//!   is drawn from half-filled caches.
//! - A watch error (the server went away, credentials expired) is shown as
//!   `connection to <server> lost`, at once; the rows stay as last seen, marked stale.
//! - On a terminal it redraws the whole screen, only when its text changed; piped, it
//!   prints only the lines that changed, each with a time stamp.

use std::collections::BTreeMap;

use futures::{FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api,
    runtime::{WatchStreamExt, reflector, watcher},
};

use crds::UpdatePolicy;

use crate::{
    Error,
    cluster::Cluster,
    output::{self, Format},
    status::{self, Report},
};

/// The connection as the watches see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Not every watch has listed yet.
    Connecting,
    /// Every watch has listed; the caches are current.
    Synced,
    /// A watch failed; it retries with backoff.
    Lost {
        /// Since when.
        since: Timestamp,
        /// The error, in words.
        why: String,
    },
}

/// What the screen shows, and what it showed last.
#[derive(Debug)]
pub struct Screen {
    /// The API server, for the status line.
    pub server: String,
    /// Whether standard output is a terminal (redraw) or not (changed lines only).
    pub terminal: bool,
    /// The terminal's width, to wrap messages.
    pub width: Option<usize>,
    /// `-o`.
    pub format: Format,
    /// The policy asked for, if one.
    pub only: Option<String>,
    last_body: Option<String>,
    last_lines: BTreeMap<String, String>,
    last_link: Option<Link>,
}

impl Screen {
    /// A screen that has shown nothing yet.
    pub fn new(server: &str, terminal: bool, width: Option<usize>, format: Format) -> Screen {
        Screen {
            server: server.to_string(),
            terminal,
            width,
            format,
            only: None,
            last_body: None,
            last_lines: BTreeMap::new(),
            last_link: None,
        }
    }

    /// What to print for `link` and `report` at `now`, or `None` when nothing changed.
    pub fn update(&mut self, link: &Link, report: &Report, now: Timestamp) -> Option<String> {
        let clock = now.strftime("%H:%M:%S").to_string();
        let link_line = match link {
            Link::Connecting => Some(format!("connecting to {} …", self.server)),
            Link::Synced => None,
            Link::Lost { since, why } => Some(format!(
                "connection to {} lost since {} ({why}); retrying, the rows below are as last seen",
                self.server,
                since.strftime("%H:%M:%S")
            )),
        };
        let link_changed = self.last_link.as_ref() != Some(link);
        self.last_link = Some(link.clone());
        if *link == Link::Connecting {
            // Nothing from half-filled caches; say it once.
            return link_changed.then(|| match self.terminal {
                true => format!("\x1b[H\x1b[2J{clock}  {}\n", link_line.unwrap_or_default()),
                false => format!("{clock} {}\n", link_line.unwrap_or_default()),
            });
        }
        if self.format != Format::Table {
            return self.encoded(report, link_changed.then_some(link_line).flatten());
        }
        let body = self.body(report);
        if self.terminal {
            let full = match &link_line {
                Some(l) => format!("! {l}\n{body}"),
                None => body,
            };
            if self.last_body.as_ref() == Some(&full) {
                return None;
            }
            self.last_body = Some(full.clone());
            return Some(format!(
                "\x1b[H\x1b[2J{clock}  kubectl baton status -w  {}  (Ctrl-C to stop)\n{full}",
                self.server
            ));
        }
        // Piped: the lines that changed, keyed by policy and node, stamped.
        let mut out = String::new();
        if link_changed {
            match &link_line {
                Some(l) => out.push_str(&format!("{clock} ! {l}\n")),
                None if self.last_lines.is_empty() => {}
                None => out.push_str(&format!("{clock} connection to {} restored\n", self.server)),
            }
        }
        let lines = self.keyed_lines(report);
        for (key, line) in &lines {
            if self.last_lines.get(key) != Some(line) {
                out.push_str(&format!("{clock} {line}\n"));
            }
        }
        for key in self.last_lines.keys() {
            if !lines.contains_key(key) {
                out.push_str(&format!("{clock} {key}: gone\n"));
            }
        }
        self.last_lines = lines;
        (!out.is_empty()).then_some(out)
    }

    fn body(&self, report: &Report) -> String {
        match (&self.only, report.policies.is_empty()) {
            (Some(name), true) => format!("no UpdatePolicy {name:?} (yet): waiting for it\n"),
            _ => status::table(report, self.width),
        }
    }

    /// One line per policy heading, problem and node row; node rows with the Lease
    /// shown as `held` (its age alone is no change worth a line).
    fn keyed_lines(&self, report: &Report) -> BTreeMap<String, String> {
        let mut lines = BTreeMap::new();
        if let (Some(name), true) = (&self.only, report.policies.is_empty()) {
            lines.insert(
                format!("updatepolicy/{name}"),
                format!("no UpdatePolicy {name:?} (yet): waiting for it"),
            );
        }
        for p in &report.policies {
            lines.insert(format!("updatepolicy/{}", p.name), status::heading(p));
            for (i, problem) in p.problems.iter().enumerate() {
                lines.insert(
                    format!("updatepolicy/{}#{i}", p.name),
                    format!("  ! {problem}"),
                );
            }
            for r in &p.node_rows {
                let mut stable = r.clone();
                stable.lease_since = None;
                lines.insert(
                    format!("updatepolicy/{} node/{}", p.name, r.name),
                    format!(
                        "{}/{}",
                        p.name,
                        status::row(&stable, report.time, None, 0)
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                );
            }
        }
        lines
    }

    /// JSON or YAML: a whole report per change (one JSON document per line; YAML
    /// documents separated by `---`), and the connection state on standard error.
    fn encoded(&mut self, report: &Report, link_line: Option<String>) -> Option<String> {
        if let Some(l) = link_line {
            eprintln!("kubectl baton: {l}");
        }
        let mut timeless = report.clone();
        timeless.time = Timestamp::UNIX_EPOCH;
        let key = serde_json::to_string(&timeless).unwrap_or_default();
        if self.last_body.as_ref() == Some(&key) {
            return None;
        }
        self.last_body = Some(key);
        match self.format {
            Format::Json => serde_json::to_string(report).ok().map(|s| s + "\n"),
            _ => serde_yaml_ng::to_string(report)
                .ok()
                .map(|s| format!("---\n{s}")),
        }
    }
}

/// What a watch said, reduced to what the screen needs.
enum Heard {
    /// It listed (again).
    Listed(usize),
    /// Some change.
    Changed,
    /// It failed, with this error.
    Failed(String),
}

/// One watch's event, heard from watch number `i`.
fn heard<K>(i: usize) -> impl Fn(Result<watcher::Event<K>, watcher::Error>) -> Heard {
    move |e| match e {
        Ok(watcher::Event::InitDone) => Heard::Listed(i),
        Ok(_) => Heard::Changed,
        Err(e) => Heard::Failed(watch_error(&e)),
    }
}

/// Watches and prints until interrupted or standard output closes.
pub async fn watch(cluster: &Cluster, mut screen: Screen) -> Result<(), Error> {
    let client = cluster.client.clone();
    let (policies, pw) = reflector::store::<UpdatePolicy>();
    let (nodes, nw) = reflector::store::<Node>();
    let (leases, lw) = reflector::store::<Lease>();
    let p = watcher(
        Api::<UpdatePolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(pw)
    .map(heard(0));
    let n = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(nw)
        .map(heard(1));
    let l = watcher(
        Api::<Lease>::namespaced(client.clone(), &cluster.namespace),
        watcher::Config::default().labels("app.kubernetes.io/managed-by=baton"),
    )
    .default_backoff()
    .reflect(lw)
    .map(heard(2));
    let mut events = futures::stream::select(futures::stream::select(p, n), l).boxed();
    let mut listed = [false; 3];
    let mut link = Link::Connecting;
    // Ages (the Lease column) move with the clock: look once a second; print only if
    // the text changed.
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let mut next = tokio::select! {
            e = events.next() => match e {
                Some(h) => Some(h),
                None => return Ok(()),
            },
            _ = ticker.tick() => None,
        };
        // Take every event already waiting, then draw once.
        while let Some(h) = next {
            match h {
                Heard::Listed(i) => {
                    listed[i] = true;
                    if listed.iter().all(|l| *l) {
                        link = Link::Synced;
                    }
                }
                Heard::Changed => {
                    if listed.iter().all(|l| *l) {
                        link = Link::Synced;
                    }
                }
                Heard::Failed(why) => {
                    if !matches!(link, Link::Lost { .. }) {
                        link = Link::Lost {
                            since: Timestamp::now(),
                            why,
                        };
                    }
                }
            }
            next = events.next().now_or_never().flatten();
        }
        let now = Timestamp::now();
        let report = status::report(
            &owned(policies.state()),
            &owned(nodes.state()),
            &owned(leases.state()),
            &BTreeMap::new(),
            screen.only.as_deref(),
            now,
        );
        if let Some(text) = screen.update(&link, &report, now) {
            output::print(&text)?;
        }
    }
}

/// A watch error in words: the API server's message, or why it cannot be reached.
fn watch_error(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => Error::Kube(clone_kube(k)).to_string(),
        e => e.to_string(),
    }
}

/// The parts of a kube error worth showing, owned (kube errors are not `Clone`).
fn clone_kube(e: &kube::Error) -> kube::Error {
    match e {
        kube::Error::Api(s) => kube::Error::Api(s.clone()),
        e => kube::Error::Service(e.to_string().into()),
    }
}

fn owned<T: Clone>(items: Vec<std::sync::Arc<T>>) -> Vec<T> {
    items.into_iter().map(|o| (*o).clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: &str, now: &str) -> Report {
        let policy: UpdatePolicy = serde_json::from_value(serde_json::json!({
            "kind": "UpdatePolicy", "metadata": {"name": "workers"},
            "spec": {}, "status": {"nodes": 2, "upToDate": 1, "window": "Always"},
        }))
        .unwrap();
        let nodes: Vec<Node> = ["n1", "n2"]
            .iter()
            .map(|n| {
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": n, "annotations": {
                        crds::protocol::STATE.name: if *n == "n1" { "Done" } else { state },
                    }},
                }))
                .unwrap()
            })
            .collect();
        status::report(
            &[policy],
            &nodes,
            &[],
            &BTreeMap::new(),
            None,
            now.parse().unwrap(),
        )
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// One update of `s` with the report at `time`, where the second node is in `state`.
    fn tick(s: &mut Screen, link: &Link, state: &str, time: &str) -> Option<String> {
        s.update(link, &report(state, time), at(time))
    }

    #[test]
    fn nothing_is_drawn_from_unsynced_caches_and_a_lost_link_is_said() {
        let mut s = Screen::new("https://127.0.0.1:6443", false, None, Format::Table);
        let r = report("Staging", "2026-12-01T10:00:00Z");
        let first = s
            .update(&Link::Connecting, &r, at("2026-12-01T10:00:00Z"))
            .unwrap();
        assert_eq!(first, "10:00:00 connecting to https://127.0.0.1:6443 …\n");
        assert_eq!(
            s.update(&Link::Connecting, &r, at("2026-12-01T10:00:01Z")),
            None
        );
        let synced = s
            .update(&Link::Synced, &r, at("2026-12-01T10:00:02Z"))
            .unwrap();
        assert!(
            synced.contains("POLICY workers") && synced.contains("n2"),
            "{synced}"
        );
        assert!(!synced.contains("no UpdatePolicy"), "{synced}");
        let lost = Link::Lost {
            since: at("2026-12-01T10:00:05Z"),
            why: "cannot reach the API server: connection refused".into(),
        };
        let text = s.update(&lost, &r, at("2026-12-01T10:00:05Z")).unwrap();
        assert_eq!(
            text,
            "10:00:05 ! connection to https://127.0.0.1:6443 lost since 10:00:05 (cannot reach the API server: connection refused); retrying, the rows below are as last seen\n"
        );
        assert_eq!(s.update(&lost, &r, at("2026-12-01T10:00:06Z")), None);
        let back = s
            .update(&Link::Synced, &r, at("2026-12-01T10:00:09Z"))
            .unwrap();
        assert_eq!(
            back,
            "10:00:09 connection to https://127.0.0.1:6443 restored\n"
        );
    }

    #[test]
    fn piped_it_prints_only_changed_rows_with_a_time_stamp() {
        let mut s = Screen::new("https://k", false, None, Format::Table);
        let _ = tick(&mut s, &Link::Connecting, "Staging", "2026-12-01T10:00:00Z");
        let first = tick(&mut s, &Link::Synced, "Staging", "2026-12-01T10:00:01Z").unwrap();
        assert_eq!(first.lines().count(), 3, "heading and two rows: {first}");
        assert_eq!(
            tick(&mut s, &Link::Synced, "Staging", "2026-12-01T10:00:02Z"),
            None,
            "nothing changed, nothing printed"
        );
        let changed = tick(&mut s, &Link::Synced, "Verifying", "2026-12-01T10:00:03Z").unwrap();
        assert_eq!(changed.lines().count(), 1, "{changed}");
        assert!(
            changed.starts_with("10:00:03 workers/n2 ") && changed.contains("Verifying"),
            "{changed}"
        );
    }

    #[test]
    fn on_a_terminal_it_redraws_only_on_change() {
        let mut s = Screen::new("https://k", true, Some(120), Format::Table);
        let r = report("Staging", "2026-12-01T10:00:01Z");
        let _ = s.update(&Link::Connecting, &r, at("2026-12-01T10:00:00Z"));
        let frame = s
            .update(&Link::Synced, &r, at("2026-12-01T10:00:01Z"))
            .unwrap();
        assert!(
            frame.starts_with("\x1b[H\x1b[2J10:00:01  kubectl baton status -w  https://k"),
            "{frame}"
        );
        assert_eq!(
            tick(&mut s, &Link::Synced, "Staging", "2026-12-01T10:00:02Z"),
            None
        );
        assert!(tick(&mut s, &Link::Synced, "Verifying", "2026-12-01T10:00:03Z").is_some());
    }

    #[test]
    fn json_lines_only_on_change() {
        let mut s = Screen::new("https://k", false, None, Format::Json);
        let _ = tick(&mut s, &Link::Connecting, "Staging", "2026-12-01T10:00:00Z");
        let one = tick(&mut s, &Link::Synced, "Staging", "2026-12-01T10:00:01Z").unwrap();
        let v: serde_json::Value = serde_json::from_str(one.trim()).unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(
            tick(&mut s, &Link::Synced, "Staging", "2026-12-01T10:00:02Z"),
            None
        );
    }
}
