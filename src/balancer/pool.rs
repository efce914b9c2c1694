//! The background side of the balancer: applies discovery changes as they
//! come (not only when calls flow) and keeps one connector task per endpoint.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::sync::{Arc, RwLock};

use futures_core::Stream;
use tokio::sync::watch;
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
}

/// State shared by the pool task, the connectors and every call.
pub(crate) struct Shared {
    pub(crate) service: String,
    ready: RwLock<Arc<Vec<Arc<Ready>>>>,
    pub(crate) info: watch::Sender<PoolInfo>,
}

impl Shared {
    pub(crate) fn new(service: String) -> Self {
        Self {
            service,
            ready: RwLock::new(Arc::new(Vec::new())),
            info: watch::channel(PoolInfo::default()).0,
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
        self.info.send_modify(|i| i.ready = count);
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

/// Applies discovery changes until the stream ends or the balancer is dropped.
pub(crate) async fn run<D, E>(mut discover: D, shared: Arc<Shared>, cfg: Arc<PoolConfig>)
where
    D: Stream<Item = Result<Change<String, Instance>, E>> + Unpin,
    E: Display,
{
    // Dropping a sender stops its connector.
    let mut connectors: HashMap<String, watch::Sender<()>> = HashMap::new();
    let mut filtered: HashSet<String> = HashSet::new();
    while let Some(change) = discover.next().await {
        match change {
            Ok(Change::Insert(key, instance)) => {
                connectors.remove(&key);
                filtered.remove(&key);
                if (cfg.filter)(&instance) {
                    let (stop, stopped) = watch::channel(());
                    tokio::spawn(maintain(
                        key.clone(),
                        Arc::new(instance),
                        shared.clone(),
                        cfg.clone(),
                        stopped,
                    ));
                    connectors.insert(key, stop);
                } else {
                    tracing::debug!(%key, "instance does not pass the filter");
                    filtered.insert(key);
                }
            }
            Ok(Change::Remove(key)) => {
                connectors.remove(&key);
                filtered.remove(&key);
            }
            Err(error) => tracing::warn!(%error, "discovery error"),
        }
        let (registered, filtered_out) = (connectors.len(), filtered.len());
        shared.info.send_modify(|i| {
            i.registered = registered;
            i.filtered_out = filtered_out;
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

/// Keeps one endpoint connected while it is registered: connect, join the
/// rotation, leave it the moment the connection ends, reconnect with
/// back-off. Returns when the endpoint is removed (its stop sender dropped);
/// the connection then closes once the calls still on it finish.
async fn maintain(
    key: String,
    instance: Arc<Instance>,
    shared: Arc<Shared>,
    cfg: Arc<PoolConfig>,
    mut stop: watch::Receiver<()>,
) {
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max);
    loop {
        let connected = tokio::select! {
            _ = stop.changed() => return,
            r = connect(&key, instance.clone(), &cfg.conn) => r,
        };
        match connected {
            Ok(mut conn) => {
                backoff.reset();
                tracing::debug!(addr = %instance.addr, "endpoint connected");
                shared.add(conn.ready.clone());
                let removed = tokio::select! {
                    _ = stop.changed() => true,
                    _ = &mut conn.driver => false,
                    () = conn.ready.closed.notified() => false,
                };
                shared.remove(&conn.ready);
                if removed {
                    // The driver runs on until in-flight calls finish and the
                    // last handle to the connection is dropped.
                    return;
                }
                tracing::info!(addr = %instance.addr, service = %shared.service,
                    "connection lost; endpoint out of rotation until it reconnects");
            }
            Err(error) => {
                tracing::debug!(addr = %instance.addr, %error, "connect failed");
                let msg = format!("{}: {error}", instance.addr);
                shared.info.send_modify(|i| i.last_error = Some(msg));
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}
