//! A live view of every service under a namespace: service -> instances.
//!
//! Built on the same watch task as [`Discover`](crate::Discover): listed, then
//! watched, resumed after faults, re-listed after compaction. Read a
//! [`snapshot`](Catalog::snapshot) at any time, or poll the `Stream` of
//! [`CatalogEvent`]s; after a snapshot the stream carries only later
//! changes. Without a namespace every key in etcd is read, and keys that do
//! not decode are taken for other applications' (not warned about).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::Etcd;
use futures_core::Stream;
use tokio::sync::watch;

use crate::schema::{DecodeError, Schema};
use crate::time::Waited;
use crate::watcher::{ViewChange, ViewOptions, WatchConfig, WatchStatus, Watched};
use crate::{Error, Instance};

/// A change to the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogEvent {
    /// An instance appeared or changed.
    Insert {
        /// Its etcd key.
        key: String,
        /// The instance (its `service` names the service).
        instance: Instance,
    },
    /// An instance went away.
    Remove {
        /// Its etcd key.
        key: String,
        /// The instance as it was last seen.
        instance: Instance,
    },
}

/// A one-time reading of the registry: what [`list`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Service -> instances (sorted by id).
    pub services: BTreeMap<String, Vec<Instance>>,
    /// Keys under the namespace that do not decode, with the reason. Empty
    /// without a namespace: every key in etcd is then under the prefix, and
    /// one that does not decode is someone else's, not a broken entry.
    pub undecodable: Vec<(String, DecodeError)>,
    /// The etcd revision the listing was read at.
    pub revision: i64,
    /// Where each instance is stored, by service and id.
    pub keys: BTreeMap<(String, String), KeyInfo>,
}

/// An instance's key in etcd: what `tonic-etcd list` and the console show
/// beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key.
    pub key: String,
    /// The lease the key is bound to (0: none; it stays until deleted).
    pub lease: i64,
    /// The revision that created the key: when this registration was made
    /// (etcd keeps revisions, not times).
    pub create_revision: i64,
    /// The revision of its last change (metadata updates).
    pub mod_revision: i64,
}

impl Listing {
    /// The registered service whose name is closest to `name`, when it is
    /// close enough to be a typo of it (for "did you mean" hints).
    pub fn nearest_service(&self, name: &str) -> Option<&str> {
        let names: Vec<&str> = self.services.keys().map(String::as_str).collect();
        crate::service_config::lint::nearest(name, &names)
    }
}

/// Reads every instance under `schema`'s namespace (or of one `service`)
/// once, listing undecodable entries beside them instead of hiding them
/// (except without a namespace, where keys that do not decode are other
/// applications' and are left out).
pub async fn list(
    client: &Etcd,
    schema: &dyn Schema,
    service: Option<&str>,
    timeout: Duration,
) -> Result<Listing, Error> {
    let prefix = match service {
        Some(s) => {
            schema.validate_service(s)?;
            schema.service_prefix(s)
        }
        None => schema.root_prefix(),
    };
    let everything = prefix.is_empty();
    let mut kvs = Vec::new();
    let crate::watcher::Listed { revision, .. } =
        crate::watcher::list_prefix(client, &prefix, timeout, |page| kvs.extend(page)).await?;
    let mut listing = Listing {
        revision,
        ..Listing::default()
    };
    for kv in kvs {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        if service.is_none() && crate::schema::is_reserved(&kv.key, &prefix) {
            continue;
        }
        match schema.decode(&kv.key, &kv.value) {
            Ok(i) if service.is_some_and(|s| s != i.service) => {}
            Ok(i) => {
                listing.keys.insert(
                    (i.service.clone(), i.id.clone()),
                    KeyInfo {
                        key,
                        lease: kv.lease,
                        create_revision: kv.create_revision,
                        mod_revision: kv.mod_revision,
                    },
                );
                listing
                    .services
                    .entry(i.service.clone())
                    .or_default()
                    .push(i);
            }
            Err(_) if everything => {}
            Err(e) => listing.undecodable.push((key, e)),
        }
    }
    for instances in listing.services.values_mut() {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
    }
    Ok(listing)
}

/// Each lease's TTL left and granted, in seconds (`(-1, -1)` when it is
/// gone or etcd did not answer within `timeout`), asked 32 at a time: what
/// `tonic-etcd list` and the console show beside each instance.
pub async fn lease_ttls(
    client: &Etcd,
    leases: std::collections::BTreeSet<i64>,
    timeout: Duration,
) -> std::collections::HashMap<i64, (i64, i64)> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for lease in leases.into_iter().filter(|l| *l != 0) {
        let (mut c, permits) = (client.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let r = tokio::time::timeout(timeout, c.lease_time_to_live(lease, None)).await;
            match r {
                Ok(Ok(r)) if r.ttl() >= 0 => (lease, (r.ttl(), r.granted_ttl())),
                _ => (lease, (-1, -1)),
            }
        });
    }
    let mut out = std::collections::HashMap::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok((lease, ttl)) = r {
            out.insert(lease, ttl);
        }
    }
    out
}

/// Options for a [`Catalog`]. Created by [`Catalog::builder`].
#[derive(Clone)]
pub struct CatalogBuilder {
    client: Etcd,
    opts: ViewOptions,
}

impl std::fmt::Debug for CatalogBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogBuilder")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl CatalogBuilder {
    /// The key layout, and with it the namespace (default: etcd naming
    /// without namespace, which watches every key in etcd; give a namespace).
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

    /// Starts watching. Needs a tokio runtime.
    pub fn build(self) -> Result<Catalog, Error> {
        self.opts.check()?;
        let cfg = WatchConfig {
            prefix: self.opts.schema.root_prefix(),
            service: None,
            request_timeout: self.opts.request_timeout,
            idle: self.opts.idle,
        };
        Ok(Catalog {
            watched: self.client.view(self.opts.schema, cfg),
        })
    }
}

/// Every service under a namespace and its instances. See the [module docs](self).
#[derive(Debug)]
pub struct Catalog {
    watched: Watched,
}

impl Catalog {
    /// Options for a catalog read through `client`.
    pub fn builder(etcd: impl Into<Etcd>) -> CatalogBuilder {
        CatalogBuilder {
            client: etcd.into(),
            opts: ViewOptions::default(),
        }
    }

    /// Service -> instances (sorted by id), as known now.
    ///
    /// Taking a snapshot also marks every change up to it as delivered: the
    /// [`Stream`] continues with what changes after the snapshot, so a
    /// snapshot followed by the stream never shows an instance twice. (Read
    /// the stream alone, without snapshots, to get every instance as an
    /// `Insert` first.)
    pub fn snapshot(&mut self) -> BTreeMap<String, Vec<Instance>> {
        let mut map: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for (_, instance) in self.watched.snapshot_and_catch_up() {
            map.entry(instance.service.clone())
                .or_default()
                .push((*instance).clone());
        }
        for instances in map.values_mut() {
            instances.sort_by(|a, b| a.id.cmp(&b.id));
        }
        map
    }

    /// Waits until the first listing is done, so that a snapshot is complete.
    pub async fn synced(&self, timeout: Duration) -> Result<(), Error> {
        let mut status = self.status();
        let deadline = crate::time::deadline_after(tokio::time::Instant::now(), timeout);
        match crate::time::wait_until(&mut status, deadline, |s| s.synced).await {
            Waited::Ready => Ok(()),
            Waited::Gone => Err(Error::TaskGone("catalog")),
            Waited::TimedOut => Err(Error::Timeout {
                op: "catalog listing",
                timeout,
            }),
        }
    }

    /// What the watch task is doing.
    pub fn status(&self) -> watch::Receiver<WatchStatus> {
        self.watched.status()
    }
}

impl Stream for Catalog {
    type Item = CatalogEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.watched.poll_change(cx).map(|change| {
            Some(match change {
                ViewChange::Upsert(key, instance) => CatalogEvent::Insert {
                    key,
                    instance: Arc::unwrap_or_clone(instance),
                },
                ViewChange::Remove(key, instance) => CatalogEvent::Remove {
                    key,
                    instance: Arc::unwrap_or_clone(instance),
                },
            })
        })
    }
}
