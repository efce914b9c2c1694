//! The background side of the balancer: applies discovery changes as they
//! come (not only when calls flow) and keeps one connector task per endpoint.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tower::discover::Change;

use super::endpoint::{connect, ConnConfig, Ready};
use crate::backoff::Backoff;
use crate::Instance;

/// Decides which instances receive calls.
pub(crate) type Filter = Arc<dyn Fn(&Instance) -> bool + Send + Sync>;

/// What callers waiting for an endpoint need to know.
#[derive(Debug, Clone, Default)]
pub(crate) struct PoolInfo {
    /// Instances registered in etcd that pass the filter.
    pub(crate) registered: usize,
    /// Instances registered but rejected by the filter.
    pub(crate) filtered_out: usize,
    /// Instances connected and in rotation.
    pub(crate) ready: usize,
    /// The last connection failure.
    pub(crate) last_error: Option<String>,
    /// Since when no endpoint has been in rotation (`None` while one is):
    /// the fail-fast gate closes once this is older than the no-endpoint
    /// timeout.
    pub(crate) empty_since: Option<Instant>,
}

/// State shared by the pool task, the connectors and every call.
pub(crate) struct Shared {
    pub(crate) service: String,
    ready: RwLock<Arc<Vec<Arc<Ready>>>>,
    pub(crate) info: watch::Sender<PoolInfo>,
    /// Woken when an endpoint at its stream limit frees a stream.
    pub(crate) capacity: Arc<Notify>,
    /// Calls waiting in the balancer for an endpoint or a free stream.
    pub(crate) waiting: AtomicUsize,
}

impl Shared {
    pub(crate) fn new(service: String) -> Self {
        let info = PoolInfo {
            empty_since: Some(Instant::now()),
            ..PoolInfo::default()
        };
        Self {
            service,
            ready: RwLock::new(Arc::new(Vec::new())),
            info: watch::channel(info).0,
            capacity: Arc::new(Notify::new()),
            waiting: AtomicUsize::new(0),
        }
    }

    /// The endpoints in rotation now.
    pub(crate) fn ready(&self) -> Arc<Vec<Arc<Ready>>> {
        self.ready.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update_ready(&self, f: impl FnOnce(&mut Vec<Arc<Ready>>)) {
        let count = {
            let mut guard = self.ready.write().unwrap_or_else(|p| p.into_inner());
            let mut set = (**guard).clone();
            f(&mut set);
            let count = set.len();
            *guard = Arc::new(set);
            count
        };
        self.info.send_modify(|i| {
            i.ready = count;
            i.empty_since = match (count, i.empty_since) {
                (0, None) => Some(Instant::now()),
                (0, since) => since,
                _ => None,
            };
        });
    }

    fn add(&self, ep: Arc<Ready>) {
        self.update_ready(|set| {
            set.retain(|e| e.key != ep.key);
            set.push(ep);
        });
    }

    fn remove(&self, ep: &Arc<Ready>) {
        self.update_ready(|set| set.retain(|e| !Arc::ptr_eq(e, ep)));
    }
}

/// A registered endpoint's connector: dropping `instance` stops it; sending
/// on it updates the instance's metadata without redialling.
struct Connector {
    instance: watch::Sender<Arc<Instance>>,
}

/// Applies discovery changes until the stream ends or the balancer is dropped.
///
/// Updates are idempotent: an Insert for a key already connected at the same
/// address only replaces the instance (metadata), as linkerd's pool does.
pub(crate) async fn run<D, E>(mut discover: D, shared: Arc<Shared>, cfg: Arc<PoolConfig>)
where
    D: Stream<Item = Result<Change<String, Instance>, E>> + Unpin,
    E: Display,
{
    let mut connectors: HashMap<String, Connector> = HashMap::new();
    let mut filtered: HashSet<String> = HashSet::new();
    while let Some(change) = discover.next().await {
        match change {
            Ok(Change::Insert(key, instance)) => {
                filtered.remove(&key);
                if !(cfg.filter)(&instance) {
                    tracing::debug!(%key, "instance does not pass the filter");
                    connectors.remove(&key);
                    filtered.insert(key);
                } else if let Some(c) = connectors
                    .get(&key)
                    .filter(|c| c.instance.borrow().addr == instance.addr)
                {
                    tracing::debug!(%key, "metadata updated");
                    c.instance.send_replace(Arc::new(instance));
                } else {
                    let (tx, rx) = watch::channel(Arc::new(instance));
                    tokio::spawn(maintain(key.clone(), shared.clone(), cfg.clone(), rx));
                    connectors.insert(key, Connector { instance: tx });
                }
            }
            Ok(Change::Remove(key)) => {
                connectors.remove(&key);
                filtered.remove(&key);
            }
            Err(error) => tracing::warn!(%error, "discovery error"),
        }
        let (registered, filtered_out) = (connectors.len(), filtered.len());
        shared.info.send_if_modified(|i| {
            let changed = i.registered != registered || i.filtered_out != filtered_out;
            i.registered = registered;
            i.filtered_out = filtered_out;
            changed
        });
    }
}

/// Balancer-wide settings.
pub(crate) struct PoolConfig {
    pub(crate) conn: ConnConfig,
    pub(crate) filter: Filter,
    pub(crate) backoff_base: std::time::Duration,
    pub(crate) backoff_max: std::time::Duration,
}

/// A connection that lived this long was healthy: the next failure starts
/// the back-off from its base again. A server that completes the handshake
/// and then drops every connection is retried at the back-off rate.
const HEALTHY_LIFETIME: Duration = Duration::from_secs(1);

/// Keeps one endpoint connected while it is registered: connect, join the
/// rotation, leave it the moment the connection ends, reconnect with
/// back-off. Returns when the endpoint is removed (its sender dropped); the
/// connection then closes once the calls still on it finish.
async fn maintain(
    key: String,
    shared: Arc<Shared>,
    cfg: Arc<PoolConfig>,
    mut instance: watch::Receiver<Arc<Instance>>,
) {
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max);
    loop {
        let current = instance.borrow_and_update().clone();
        let connected = tokio::select! {
            r = connect(&key, current.clone(), &cfg.conn, shared.capacity.clone()) => r,
            () = removed(&mut instance) => return,
        };
        match connected {
            Ok(mut conn) => {
                let since = Instant::now();
                tracing::debug!(addr = %current.addr, "endpoint connected");
                conn.ready
                    .set_instance(instance.borrow_and_update().clone());
                shared.add(conn.ready.clone());
                let removed = loop {
                    tokio::select! {
                        changed = instance.changed() => match changed {
                            Ok(()) => conn.ready.set_instance(instance.borrow_and_update().clone()),
                            Err(_) => break true,
                        },
                        _ = &mut conn.driver => break false,
                        () = conn.ready.closed.notified() => break false,
                    }
                };
                shared.remove(&conn.ready);
                if removed {
                    // The driver runs on until in-flight calls finish and the
                    // last handle to the connection is dropped.
                    return;
                }
                if since.elapsed() >= HEALTHY_LIFETIME {
                    backoff.reset();
                }
                tracing::info!(addr = %current.addr, service = %shared.service,
                    "connection lost; endpoint out of rotation until it reconnects");
            }
            Err(error) => {
                tracing::debug!(addr = %current.addr, %error, "connect failed");
                let msg = format!("{}: {error}", current.addr);
                shared.info.send_modify(|i| i.last_error = Some(msg));
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = removed(&mut instance) => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Resolves when the pool drops the endpoint. Metadata updates seen meanwhile
/// are not lost: the newest instance is read when the connection is made.
async fn removed(instance: &mut watch::Receiver<Arc<Instance>>) {
    while instance.changed().await.is_ok() {}
}
