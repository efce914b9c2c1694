//! Clients find a service's instances: a tower [`Discover`](tower::discover::Discover)
//! over the etcd view of one service.
//!
//! [`Discover`] is a `Stream` of `Result<Change<String, Instance>, Infallible>`:
//! the key is the instance's etcd key, the value carries its address and
//! metadata. It yields one `Insert` per instance present at start, then
//! `Insert` for every new or changed instance (a changed address or metadata
//! replaces the old one) and `Remove` for every deleted or expired one. It
//! never fails and never ends while it lives: etcd faults are handled by its
//! task (see [`WatchStatus`] for what it is doing), and the last known
//! instances stay in place while etcd is unreachable.
//!
//! Feed it to tonic through [`crate::channel`], or to tower's p2c balancer
//! after turning each [`Instance`] into a service:
//!
//! ```no_run
//! # async fn run(client: etcd_client::Client) -> Result<(), tonic_etcd::Error> {
//! use tokio_stream::StreamExt;
//! use tonic::transport::Endpoint;
//! use tower::discover::Change;
//! use tower::load::{CompleteOnResponse, PendingRequests};
//!
//! let discover = tonic_etcd::Discover::builder(client, "greeter.v1.Greeter").build()?;
//! let services = discover.map(|change| {
//!     Ok::<_, std::convert::Infallible>(match change? {
//!         Change::Insert(key, instance) => {
//!             let channel = Endpoint::from_shared(instance.uri("http"))
//!                 .expect("decoded addresses are valid URIs")
//!                 .connect_lazy();
//!             Change::Insert(key, PendingRequests::new(channel, CompleteOnResponse::default()))
//!         }
//!         Change::Remove(key) => Change::Remove(key),
//!     })
//! });
//! let balance = tower::balance::p2c::Balance::new(services);
//! let balanced = tower::buffer::Buffer::new(balance, 1024);
//! # let _ = balanced;
//! # Ok(())
//! # }
//! ```

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::Etcd;
use futures_core::Stream;
use tokio::sync::watch;
use tower::discover::Change;

use crate::schema::Schema;
use crate::watcher::{ViewChange, ViewOptions, WatchConfig, WatchStatus, Watched};
use crate::{Error, Instance};

/// Options for a [`Discover`]. Created by [`Discover::builder`].
#[derive(Clone)]
pub struct DiscoverBuilder {
    client: Etcd,
    service: String,
    opts: ViewOptions,
}

impl std::fmt::Debug for DiscoverBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoverBuilder")
            .field("service", &self.service)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl DiscoverBuilder {
    /// The options given so far (the balancer's service-config watch
    /// shares them).
    pub(crate) fn options(&self) -> &ViewOptions {
        &self.opts
    }

    /// The etcd client.
    pub(crate) fn client(&self) -> &Etcd {
        &self.client
    }

    /// The key layout (default [`NamingSchema::new`](crate::NamingSchema::new)).
    #[must_use]
    pub fn schema(mut self, schema: impl Schema) -> Self {
        self.opts.schema = Arc::new(schema);
        self
    }

    /// The limit on each etcd request (default 5 s).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.opts.request_timeout = crate::time::cap(timeout);
        self
    }

    /// After this long without a watch message, a progress notification is
    /// requested; no answer within the request timeout means the watch is
    /// dead and is re-established (default 10 s).
    #[must_use]
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.opts.idle = crate::time::cap(idle);
        self
    }

    /// Starts watching. Needs a tokio runtime.
    pub fn build(self) -> Result<Discover, Error> {
        self.opts.check()?;
        self.opts.schema.validate_service(&self.service)?;
        let cfg = WatchConfig {
            prefix: self.opts.schema.service_prefix(&self.service),
            service: Some(self.service.clone()),
            request_timeout: self.opts.request_timeout,
            idle: self.opts.idle,
        };
        Ok(Discover {
            watched: self.client.view(self.opts.schema, cfg),
            service: self.service,
        })
    }
}

/// The instances of one service, as a tower `Discover`. See the [module docs](self).
#[must_use = "a Discover does nothing unless polled or handed to a balancer"]
#[derive(Debug)]
pub struct Discover {
    watched: Watched,
    service: String,
}

impl Discover {
    /// Options for discovering `service` through `client`.
    pub fn builder(etcd: impl Into<Etcd>, service: impl Into<String>) -> DiscoverBuilder {
        DiscoverBuilder {
            client: etcd.into(),
            service: service.into(),
            opts: ViewOptions::default(),
        }
    }

    /// The service discovered.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The instances known now (whatever has been yielded so far).
    pub fn instances(&self) -> Vec<Instance> {
        self.watched
            .snapshot()
            .into_iter()
            .map(|(_, i)| (*i).clone())
            .collect()
    }

    /// What the watch task is doing: synced, endpoint count, skipped
    /// entries, reconnects, resyncs, last error.
    pub fn status(&self) -> watch::Receiver<WatchStatus> {
        self.watched.status()
    }
}

impl Stream for Discover {
    type Item = Result<Change<String, Instance>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.watched.poll_change(cx).map(|change| {
            Some(Ok(match change {
                ViewChange::Upsert(key, instance) => {
                    Change::Insert(key, Arc::unwrap_or_clone(instance))
                }
                ViewChange::Remove(key, _) => Change::Remove(key),
            }))
        })
    }
}
