//! etcd-based service registration and client-side load balancing for tonic.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod backoff;
pub mod catalog;
pub mod channel;
pub mod discovery;
pub mod error;
pub mod instance;
pub mod registration;
pub mod schema;
pub mod server;
#[cfg(feature = "testing")]
pub mod testing;
mod watcher;

pub use catalog::{Catalog, CatalogEvent};
pub use channel::{ChannelBuilder, EtcdChannel};
pub use discovery::Discover;
pub use error::Error;
pub use instance::{Instance, Metadata};
pub use registration::{Registration, RegistrationBuilder, RegistrationState};
pub use schema::{ColonSchema, DecodeError, NamingSchema, Schema};
pub use watcher::WatchStatus;

use std::time::Duration;

/// etcd-client options this crate recommends for a [`etcd_client::Client`].
///
/// * HTTP/2 keep-alive every 5 s, dead after 3 s without an answer, also while
///   idle: a frozen member or a partition is noticed instead of hanging
///   silently (etcd drops clients that ping more often than every 5 s).
/// * `require_leader`: a member cut off from its cluster fails watches and
///   keep-alives within seconds instead of serving them from a stale view.
/// * A 2 s connect timeout, so a dead member is left quickly.
///
/// Auth and TLS are added with [`ConnectOptions::with_user`](etcd_client::ConnectOptions::with_user)
/// and `with_tls`.
pub fn connect_options() -> etcd_client::ConnectOptions {
    etcd_client::ConnectOptions::new()
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true)
        .with_connect_timeout(Duration::from_secs(2))
}
