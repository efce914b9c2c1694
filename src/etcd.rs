//! [`Etcd`]: one etcd client and what the crate shares over it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use etcd_client::Client;

use crate::registration::SharedLease;
use crate::schema::Schema;
use crate::watcher::multiplex::Multiplexer;
use crate::watcher::{Running, WatchConfig, Watched};

/// An etcd client shared by everything one process builds on it.
///
/// Every watch opened through one `Etcd` and its clones (each Balancer's
/// instances, service config and overrides, every Discover and Catalog)
/// rides on one etcd Watch stream, as with etcd's Go client: a stream
/// costs etcd about fifty times what a watcher on it costs. Discovers,
/// Balancers and Catalogs of one prefix also share one view of it: one
/// listing, one watcher and one task, however many read it, and one built
/// beside a running view starts from what it holds without asking etcd
/// (the view stops with its last reader). Build one per
/// process with [`connect`](crate::connect) and pass clones of it to every
/// builder; a builder given a bare `etcd_client::Client` makes an `Etcd` of
/// its own, so its watches share a stream only among themselves.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let etcd = tonic_etcd::connect(["127.0.0.1:2379"], None).await?;
/// let greeter = tonic_etcd::Balancer::builder(etcd.clone(), "greeter.v1.Greeter").build()?;
/// let catalog = tonic_etcd::Catalog::builder(etcd.clone()).build()?;
/// # drop((greeter, catalog)); Ok(()) }
/// ```
///
/// It dereferences to the `etcd_client::Client`, so etcd calls of one's own
/// (`etcd.put(…)`) work on it as they did on the client.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    watches: Arc<Multiplexer>,
    /// The one lease this process's client keys (coordinated subsetting)
    /// share.
    lease: Arc<SharedLease>,
    /// The views running on this client, by what they watch: a second
    /// Discover, Balancer or Catalog of one prefix joins the first's.
    views: Arc<Mutex<HashMap<ViewKey, Weak<Running>>>>,
}

/// What makes two views the same: the prefix, the service they keep, the
/// schema that decodes them, and their timings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ViewKey {
    schema: String,
    prefix: String,
    service: Option<String>,
    request_timeout: Duration,
    idle: Duration,
}

impl Etcd {
    /// Shares `client`: the watches opened through the result and its
    /// clones share one stream.
    pub fn new(client: Client) -> Self {
        Self {
            watches: Arc::new(Multiplexer::new(client.clone())),
            lease: Arc::default(),
            views: Arc::default(),
            client,
        }
    }

    /// A view of `cfg.prefix`: the running one of this client when there is
    /// one (its consumers share one listing, one watch and one task, and a
    /// new one starts from what it holds), else a new one. Views of a
    /// schema without an [`identity`](Schema::identity) are never shared.
    pub(crate) fn view(&self, schema: Arc<dyn Schema>, cfg: WatchConfig) -> Watched {
        let Some(identity) = schema.identity() else {
            return crate::watcher::spawn(self.clone(), schema, cfg);
        };
        let key = ViewKey {
            schema: identity,
            prefix: cfg.prefix.clone(),
            service: cfg.service.clone(),
            request_timeout: cfg.request_timeout,
            idle: cfg.idle,
        };
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = views.get(&key).and_then(Weak::upgrade) {
            return running.join();
        }
        let watched = crate::watcher::spawn(self.clone(), schema, cfg);
        views.retain(|_, v| v.strong_count() > 0);
        views.insert(key, Arc::downgrade(watched.running()));
        watched
    }

    /// The etcd client, for calls of one's own.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn watches(&self) -> &Multiplexer {
        &self.watches
    }

    /// Keeps `entry` in etcd under the lease every such key of this `Etcd`
    /// shares, until the result is dropped.
    pub(crate) fn hold_key(
        &self,
        entry: crate::schema::Encoded,
        label: String,
        request_timeout: std::time::Duration,
    ) -> crate::registration::LeaseKey {
        self.lease.hold(&self.client, entry, label, request_timeout)
    }
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("watches", &self.watches)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for Etcd {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Etcd {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl From<Client> for Etcd {
    fn from(client: Client) -> Self {
        Self::new(client)
    }
}

impl From<Etcd> for Client {
    fn from(etcd: Etcd) -> Self {
        etcd.client
    }
}
