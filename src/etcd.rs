//! [`Etcd`]: one etcd client and what the crate shares over it.

use std::sync::Arc;

use etcd_client::Client;

use crate::registration::SharedLease;
use crate::watcher::multiplex::Multiplexer;

/// An etcd client shared by everything one process builds on it.
///
/// Every watch opened through one `Etcd` and its clones (each Balancer's
/// instances, service config and overrides, every Discover and Catalog)
/// rides on one etcd Watch stream, as with etcd's Go client: a stream
/// costs etcd about fifty times what a watcher on it costs. Build one per
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
}

impl Etcd {
    /// Shares `client`: the watches opened through the result and its
    /// clones share one stream.
    pub fn new(client: Client) -> Self {
        Self {
            watches: Arc::new(Multiplexer::new(client.clone())),
            lease: Arc::default(),
            client,
        }
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
