//! The Flatcar backend: update_engine over D-Bus (`com.coreos.update1`). update_engine
//! downloads and stages by itself; baton reads `GetStatus`, follows the `StatusUpdate`
//! signal instead of polling, asks for a reboot on `UPDATE_STATUS_UPDATED_NEED_REBOOT`,
//! and after the new boot passes its checks marks it good as Flatcar does (its
//! `flatcar-setgoodroot`, through `--mark-good-command`).

use std::path::PathBuf;

use futures::StreamExt;
use futures::stream::BoxStream;
use jiff::Timestamp;

use crds::protocol::Version;

use crate::{
    backend::{Backend, Desired},
    error::AgentError,
    lifecycle::{Status, Update},
    os_release,
};

/// The zbus proxy (its generated items carry no docs of their own).
#[allow(missing_docs)]
mod updateengine_proxy {

    /// update_engine's D-Bus interface, as far as baton uses it.
    #[zbus::proxy(
        interface = "com.coreos.update1.Manager",
        default_service = "com.coreos.update1",
        default_path = "/com/coreos/update1"
    )]
    pub trait UpdateEngine {
        /// `(last_checked_time, progress, current_operation, new_version, new_size)`.
        fn get_status(&self) -> zbus::Result<(i64, f64, String, String, i64)>;

        /// Sent on every status change, with `GetStatus`'s body.
        #[zbus(signal)]
        fn status_update(
            &self,
            last_checked_time: i64,
            progress: f64,
            current_operation: String,
            new_version: String,
            new_size: i64,
        ) -> zbus::Result<()>;
    }
}
pub use updateengine_proxy::UpdateEngineProxy;

/// Maps update_engine's operation to baton's view of the update, with a note for the
/// states a human should hear about.
pub fn map(operation: &str, new_version: &str) -> (Update, Option<String>) {
    let version = Version::new(new_version).ok();
    match operation {
        "UPDATE_STATUS_UPDATED_NEED_REBOOT" => (
            Update::Staged {
                version,
                slot: None,
            },
            None,
        ),
        "UPDATE_STATUS_UPDATE_AVAILABLE"
        | "UPDATE_STATUS_DOWNLOADING"
        | "UPDATE_STATUS_VERIFYING"
        | "UPDATE_STATUS_FINALIZING" => (Update::Staging(version), None),
        "UPDATE_STATUS_IDLE" | "UPDATE_STATUS_CHECKING_FOR_UPDATE" => (Update::Idle, None),
        "UPDATE_STATUS_REPORTING_ERROR_EVENT" => (
            Update::Idle,
            Some("update_engine reported an error; it retries on its own".into()),
        ),
        other => (
            Update::Idle,
            Some(format!("unknown update_engine status {other}")),
        ),
    }
}

/// The Flatcar backend.
pub struct Flatcar {
    proxy: UpdateEngineProxy<'static>,
    signals: Option<BoxStream<'static, ()>>,
    os_release: PathBuf,
    mark_good: Option<crate::command::Command>,
}

impl Flatcar {
    /// Connects to update_engine on `connection` (the system bus) and subscribes to its
    /// signal.
    pub async fn open(
        connection: &zbus::Connection,
        os_release: PathBuf,
        mark_good: Option<crate::command::Command>,
    ) -> Result<Flatcar, AgentError> {
        let proxy = UpdateEngineProxy::new(connection).await?;
        let signals = proxy.receive_status_update().await?.map(|_| ()).boxed();
        Ok(Flatcar {
            proxy,
            signals: Some(signals),
            os_release,
            mark_good,
        })
    }
}

impl Backend for Flatcar {
    async fn status(&mut self, _desired: Option<&Desired>) -> Result<Status, AgentError> {
        let (last_checked, _progress, operation, new_version, _size) =
            self.proxy.get_status().await?;
        let (update, note) = map(&operation, &new_version);
        Ok(Status {
            current_version: os_release::version(&self.os_release),
            slot: None,
            update,
            last_checked: (last_checked > 0)
                .then(|| Timestamp::from_second(last_checked).ok())
                .flatten(),
            note,
        })
    }

    async fn stage(&mut self, desired: &Desired) -> Result<(), AgentError> {
        let version = &desired.version;
        Err(AgentError::Backend(format!(
            "update_engine chooses what to install; baton cannot ask it for {version}"
        )))
    }

    async fn commit(&mut self) -> Result<(), AgentError> {
        match &self.mark_good {
            Some(command) => command
                .run("mark-good", std::time::Duration::from_secs(60))
                .await
                .map_err(|e| AgentError::Backend(e.to_string())),
            None => Ok(()),
        }
    }

    fn changes(&mut self) -> Option<BoxStream<'static, ()>> {
        self.signals.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_engine_operations_map_to_baton_states() {
        assert_eq!(
            map("UPDATE_STATUS_UPDATED_NEED_REBOOT", "4230.2.1").0,
            Update::Staged {
                version: Version::new("4230.2.1").ok(),
                slot: None
            }
        );
        assert_eq!(
            map("UPDATE_STATUS_DOWNLOADING", "4230.2.1").0,
            Update::Staging(Version::new("4230.2.1").ok())
        );
        assert_eq!(map("UPDATE_STATUS_IDLE", "").0, Update::Idle);
        assert!(map("UPDATE_STATUS_REPORTING_ERROR_EVENT", "").1.is_some());
        assert_eq!(
            map("UPDATE_STATUS_BOGUS", "").1.as_deref(),
            Some("unknown update_engine status UPDATE_STATUS_BOGUS")
        );
    }
}
