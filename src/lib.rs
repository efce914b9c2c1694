//! etcd-based service registration and client-side load balancing for tonic.
//!
//! * Servers register themselves under a lease that is kept alive, survive
//!   lease loss, and leave before they stop serving: [`Registration`],
//!   [`server::RegisteredServer`].
//! * Clients dial a service by name: [`Discover`] turns etcd's view of a
//!   service into tower `Change`s. [`Balancer`] (recommended) balances over
//!   them by load, leaves dead endpoints at once and never hangs;
//!   [`ChannelBuilder`] feeds them to tonic's own balanced channel. Generated
//!   clients take either unchanged. [`Catalog`] shows every service under a
//!   namespace.
//! * The default key layout, [`NamingSchema`], is byte-compatible with etcd's
//!   Go naming package; [`ColonSchema`] and custom [`Schema`]s are supported.
//!
//! # In production
//!
//! A server registers itself once it serves and leaves before it stops
//! (the same code as the README's first section):
//!
//! ```no_run
//! use tonic_etcd::server::{shutdown_signal, RegisteredServer};
//! use tonic_etcd::{Metadata, Registration};
//!
//! // `router` is your tonic_etcd::server::builder().add_service(...): tonic's, with HTTP/2 settings for fleets
//! async fn serve(router: tonic::transport::server::Router) -> Result<(), Box<dyn std::error::Error>> {
//!     let client = tonic_etcd::connect(["127.0.0.1:2379"], Some(tonic_etcd::connect_options())).await?;
//!     let listener = tokio::net::TcpListener::bind("10.0.0.7:50051").await?;
//!     let registration = Registration::builder(client)
//!         .service("greeter.v1.Greeter")
//!         .metadata(Metadata::new().with("zone", "a"));
//!     RegisteredServer::new(registration)
//!         .serve_with_shutdown(router, listener, shutdown_signal())   // SIGINT or SIGTERM
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! A client dials the service by name through the [`Balancer`], which any
//! tonic-generated client takes:
//!
//! ```no_run
//! use std::time::Duration;
//! use tonic_etcd::Balancer;
//! # use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
//!
//! async fn call(client: etcd_client::Client) -> Result<(), Box<dyn std::error::Error>> {
//!     let balancer = Balancer::builder(client, "greeter.v1.Greeter")
//!         .call_timeout(Duration::from_secs(2))   // deadline for unary calls that set none
//!         .stream_methods(["greeter.v1.Greeter/Chat"])   // streams: no call_timeout
//!         .build()?;
//!     let mut greeter = GreeterClient::new(balancer);   // your generated client
//!     greeter.say_hello(HelloRequest { name: "x".into() }).await?;
//!     Ok(())
//! }
//! ```
//!
//! # Try it
//!
//! The same, runnable: against a real etcd started for the example
//! (`testing::Etcd`, feature `testing`), with one server in this process.
//!
//! ```
//! use std::time::Duration;
//! use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
//! use tonic_etcd::{server::RegisteredServer, Balancer, Registration};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let etcd = tonic_etcd::testing::Etcd::start();
//! let client =
//!     tonic_etcd::connect(etcd.endpoints(), Some(tonic_etcd::connect_options())).await?;
//!
//! // A server registers itself once it serves, and leaves when told to stop.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let router = tonic_etcd::server::builder().add_service(Greeter::new("a").into_service());
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(
//!     RegisteredServer::new(Registration::builder(client.clone()).service("greeter.v1.Greeter"))
//!         .grace(Duration::ZERO)
//!         .serve_with_shutdown(router, listener, async {
//!             let _ = stopped.await;
//!         }),
//! );
//!
//! // A client dials it by name.
//! let balancer = Balancer::builder(client, "greeter.v1.Greeter").build()?;
//! balancer.wait_for_ready(1, Duration::from_secs(5)).await?;
//! let reply = GreeterClient::new(balancer)
//!     .say_hello(HelloRequest { name: "etcd".into() })
//!     .await?;
//! assert_eq!(reply.into_inner().server_id, "a");
//!
//! let _ = stop.send(());
//! server.await??;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod backoff;
pub mod balancer;
pub mod catalog;
pub mod channel;
pub mod config_store;
mod connect;
#[cfg(feature = "console")]
pub mod console;
pub mod discovery;
pub mod error;
mod etcd;
pub mod instance;
pub mod metrics;
pub mod orca;
pub mod overrides;
pub mod rbac;
pub mod registration;
mod retry;
pub mod schema;
pub mod server;
pub mod service_config;
#[cfg(feature = "testing")]
pub mod testing;
mod time;
pub mod upgrade;
mod watcher;

pub use balancer::{Balancer, BalancerBuilder};
pub use catalog::{Catalog, CatalogEvent};
pub use channel::{ChannelBuilder, EtcdChannel};
pub use config_store::{ConfigStore, ServiceConfigStatus};
pub use connect::connect;
pub use discovery::Discover;
pub use error::Error;
pub use etcd::Etcd;
pub use instance::{Instance, Metadata};
pub use overrides::{Override, OverrideStore};
pub use registration::{Registration, RegistrationBuilder, RegistrationState};
pub use schema::{ColonSchema, DecodeError, NamingSchema, Schema};
pub use service_config::ServiceConfig;
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
/// and `with_tls`. Pass them to [`connect`], which also keeps the
/// connection from closing itself under a storm of cancelled etcd calls.
pub fn connect_options() -> etcd_client::ConnectOptions {
    etcd_client::ConnectOptions::new()
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true)
        .with_connect_timeout(Duration::from_secs(2))
}

/// The README's Rust snippets, compiled as doc tests so that it cannot drift
/// from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The reference pages' Rust snippets, compiled the same way.
#[cfg(doctest)]
#[doc = include_str!("../docs/clients.md")]
#[doc = include_str!("../docs/operations.md")]
#[doc = include_str!("../docs/performance.md")]
struct DocsDoctests;
