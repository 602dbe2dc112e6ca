//! Events (`events.k8s.io/v1`) on the Nodes and UpdatePolicies baton acts on, with
//! series used as the events API means them: the same event happening again (same
//! object, type, reason and note) within [`SERIES_TTL`] bumps the series count of the
//! Event already written; anything else, a new note included, is a new Event.
//!
//! kube-runtime's `Recorder` keys its series on the reason alone, so a second
//! `DrainStarted` kept the first drain's deadline in its note, and "granted by
//! UpdatePolicy demo" stood for a grant by another policy. This keeps its Event shape
//! (name, reporting controller and instance, the namespace of cluster-scoped objects).
//!
//! Events are written by a task of their own ([`Queue`]), off the path of the steps that
//! report them: a step waits for its own writes, never for an Event. The task has
//! [`WRITERS`] writers; each object's Events go to one of them, so they are written in
//! the order they happened, while other objects' Events are written beside them.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    time::{Duration, Instant},
};

use futures::FutureExt;
use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::events::EventType,
};
use tokio::sync::mpsc;
use tracing::warn;

/// How long an Event may still grow a series (kube-runtime's and client-go's value).
pub const SERIES_TTL: Duration = Duration::from_secs(6 * 60);

/// The namespace of the Events of cluster-scoped objects (Nodes, UpdatePolicies).
const CLUSTER_SCOPED_NAMESPACE: &str = "default";

/// What makes two Events the same event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    /// The object's uid, or its kind/namespace/name when it has none.
    regarding: String,
    type_: EventType,
    reason: String,
    note: String,
}

/// An Event written, and its series so far.
struct Written {
    namespace: String,
    name: String,
    count: i32,
    last: Instant,
}

/// What names `regarding` among the objects Events are about: its uid, or its
/// kind/namespace/name when it has none.
fn identity(regarding: &ObjectReference) -> String {
    regarding.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}/{}",
            regarding.kind.as_deref().unwrap_or_default(),
            regarding.namespace.as_deref().unwrap_or_default(),
            regarding.name.as_deref().unwrap_or_default()
        )
    })
}

/// Writes Events for one reporting controller instance.
pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    written: tokio::sync::Mutex<HashMap<Key, Written>>,
}

impl Recorder {
    /// A recorder reporting as `controller` (`instance`: this replica).
    pub fn new(client: Client, controller: &str, instance: &str) -> Recorder {
        Recorder {
            client,
            controller: controller.into(),
            instance: instance.into(),
            written: tokio::sync::Mutex::default(),
        }
    }

    /// A recorder for the same controller instance with a series record of its own
    /// (for a writer that alone writes some objects' Events).
    fn sibling(&self) -> Recorder {
        Recorder {
            client: self.client.clone(),
            controller: self.controller.clone(),
            instance: self.instance.clone(),
            written: tokio::sync::Mutex::default(),
        }
    }

    /// Records that `reason` happened to `regarding`, described by `note`, at `now`:
    /// a repeat of the same event within [`SERIES_TTL`] bumps its series; anything else
    /// is a new Event.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
        now: jiff::Timestamp,
    ) -> Result<(), kube::Error> {
        let key = Key {
            regarding: identity(regarding),
            type_,
            reason: reason.into(),
            note: note.into(),
        };
        // Held across the write: two publishes of one event must not both create it.
        let mut written = self.written.lock().await;
        written.retain(|_, w| w.last.elapsed() < SERIES_TTL);
        if let Some(w) = written.get_mut(&key) {
            let count = w.count + 1;
            let patch = serde_json::json!({"series": EventSeries {
                count,
                last_observed_time: MicroTime(now),
            }});
            let events: Api<Event> = Api::namespaced(self.client.clone(), &w.namespace);
            match events
                .patch(&w.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    w.count = count;
                    w.last = Instant::now();
                    return Ok(());
                }
                // Gone (the API server's own TTL, or deleted): a new one below.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| CLUSTER_SCOPED_NAMESPACE.into());
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(&self.controller),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(reason.into()),
            reason: Some(reason.into()),
            note: Some(note.chars().take(1024).collect()),
            type_: Some(
                match type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &event)
            .await?;
        written.insert(
            key,
            Written {
                namespace,
                name,
                count: 1,
                last: Instant::now(),
            },
        );
        Ok(())
    }
}

/// How many Events may wait for one writer; past it new ones are dropped with a
/// warning (Events are best effort, and a step must never wait for one).
pub const QUEUE: usize = 1024;

/// How many Events are written at once. One writer kept up with neither a 1,000-node
/// rollout nor an API server at ~0.5 s a request (768 Events dropped in one run).
pub const WRITERS: usize = 8;

/// One Event waiting to be written.
#[derive(Debug)]
struct Pending {
    regarding: ObjectReference,
    type_: EventType,
    reason: String,
    note: String,
    at: jiff::Timestamp,
}

/// The queue of Events to write; cloning it shares it.
#[derive(Clone, Debug)]
pub struct Queue {
    writers: Vec<mpsc::Sender<Pending>>,
}

impl Queue {
    /// Starts the task that writes queued Events through `recorder`'s controller
    /// instance with [`WRITERS`] writers, each object's Events in order by one of them.
    /// It ends when every clone of the queue is dropped, or when its handle is aborted
    /// (which stops every writer: they run inside it).
    pub fn start(recorder: Recorder) -> (Queue, tokio::task::JoinHandle<()>) {
        let (writers, queues): (Vec<_>, Vec<_>) = (0..WRITERS)
            .map(|_| mpsc::channel::<Pending>(QUEUE))
            .unzip();
        let writing = queues.into_iter().map(move |mut rx| {
            let recorder = recorder.sibling();
            async move {
                while let Some(p) = rx.recv().await {
                    if let Err(e) = recorder
                        .publish(&p.regarding, p.type_, &p.reason, &p.note, p.at)
                        .await
                    {
                        warn!(error = %e, reason = %p.reason, "could not publish an event");
                    }
                }
            }
        });
        let task = tokio::spawn(futures::future::join_all(writing).map(|_| ()));
        (Queue { writers }, task)
    }

    /// Queues an Event: `reason` happened to `regarding` at `at`, described by `note`.
    pub fn send(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
        at: jiff::Timestamp,
    ) {
        let pending = Pending {
            regarding: regarding.clone(),
            type_,
            reason: reason.into(),
            note: note.into(),
            at,
        };
        if let Err(e) = self.writers[writer(&pending.regarding)].try_send(pending) {
            warn!(reason, error = %e, "an event was not queued");
        }
    }
}

/// Which of the [`WRITERS`] writes the Events regarding `regarding`: always the same one.
fn writer(regarding: &ObjectReference) -> usize {
    let mut hasher = DefaultHasher::new();
    identity(regarding).hash(&mut hasher);
    // The remainder is below WRITERS, so it fits.
    usize::try_from(hasher.finish() % WRITERS as u64).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, uid: Option<&str>) -> ObjectReference {
        ObjectReference {
            kind: Some("Node".into()),
            name: Some(name.into()),
            uid: uid.map(Into::into),
            ..ObjectReference::default()
        }
    }

    #[test]
    fn an_object_always_has_the_same_writer_and_objects_spread_over_all() {
        let used: std::collections::BTreeSet<usize> = (0..200)
            .map(|i| {
                let n = node(&format!("node-{i}"), Some(&format!("uid-{i}")));
                let w = writer(&n);
                assert_eq!(writer(&n), w);
                assert!(w < WRITERS);
                w
            })
            .collect();
        assert_eq!(used.len(), WRITERS);
        // Without a uid, the name decides, the same way every time.
        assert_eq!(writer(&node("a", None)), writer(&node("a", None)));
    }
}
