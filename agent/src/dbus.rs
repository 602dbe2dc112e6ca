//! The system bus connection, for update_engine and logind.

/// Connects to the bus at `address`, or to the system bus when `None` (the default,
/// `/run/dbus/system_bus_socket`, or `$DBUS_SYSTEM_BUS_ADDRESS`).
pub async fn connect(address: Option<&str>) -> zbus::Result<zbus::Connection> {
    match address {
        Some(address) => zbus::connection::Builder::address(address)?.build().await,
        None => zbus::Connection::system().await,
    }
}
