//! The pool task: applies discovery changes as they come (not only when
//! calls flow), keeps one connector per endpoint (or, under subsetting, per
//! subset member), and takes part in coordinated subsetting.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;
use std::sync::Arc;

use futures_core::Stream;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tower::discover::Change;

use super::connector::maintain;
use super::endpoint::ConnConfig;
use super::subset;
use super::{AbortOnDrop, Filter, Shared, SubsetStatus};
use crate::config_store::ServiceConfigStatus;
use crate::service_config::{SubsetScheme, Subsetting};
use crate::Instance;

/// A registered endpoint's connector: dropping `instance` stops it; sending
/// on it updates the instance's metadata without redialling.
struct Connector {
    instance: watch::Sender<Arc<Instance>>,
}

/// Applies discovery changes until the stream ends or the balancer is
/// dropped: keeps a connector for every instance, or, under subsetting
/// (from the service config in force, `config`), for the subset's members
/// only (see [`super::subset`]).
pub(crate) async fn run<D, E>(
    mut discover: D,
    shared: Arc<Shared>,
    cfg: Arc<PoolConfig>,
    mut config: watch::Receiver<ServiceConfigStatus>,
) where
    D: Stream<Item = Result<Change<String, Instance>, E>> + Unpin,
    E: Display,
{
    let mut pool = Pool {
        instances: BTreeMap::new(),
        filtered: HashSet::new(),
        connectors: HashMap::new(),
        seed: rand::random(),
        coordinator: None,
    };
    let mut info = shared.info.subscribe();
    let mut config_open = true;
    loop {
        let subsetting = config.borrow().config.subsetting;
        pool.coordinate(subsetting, &cfg);
        pool.reconcile(&shared, &cfg, subsetting);
        let rank = pool.coordinator.as_mut().map(|(_, rank)| rank);
        tokio::select! {
            change = discover.next() => match change {
                None => return,
                Some(Ok(Change::Insert(key, instance))) => {
                    pool.filtered.remove(&key);
                    if (cfg.filter)(&instance) {
                        pool.instances.insert(key, Arc::new(instance));
                    } else {
                        tracing::debug!(%key, "instance does not pass the filter");
                        pool.instances.remove(&key);
                        pool.filtered.insert(key);
                    }
                }
                Some(Ok(Change::Remove(key))) => {
                    pool.instances.remove(&key);
                    pool.filtered.remove(&key);
                }
                Some(Err(error)) => tracing::warn!(%error, "discovery error"),
            },
            changed = config.changed(), if config_open => config_open = changed.is_ok(),
            () = rank_changed(rank), if subsetting.is_some() => {}
            // Members' states decide replacements.
            _ = info.changed(), if subsetting.is_some() => {}
        }
    }
}

/// Resolves when the coordinated rank changes; never without one (or once
/// its task is gone), so that the pool task does not spin.
async fn rank_changed(rank: Option<&mut watch::Receiver<subset::Rank>>) {
    if let Some(r) = rank {
        if r.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// The pool task's state.
struct Pool {
    /// Every registered instance that passes the filter.
    instances: BTreeMap<String, Arc<Instance>>,
    /// Registered instances the filter rejects.
    filtered: HashSet<String>,
    connectors: HashMap<String, Connector>,
    /// This client's seed for random subsets (A68).
    seed: u64,
    /// Under coordinated subsetting: the task holding this client's key,
    /// and its rank.
    coordinator: Option<(AbortOnDrop, watch::Receiver<subset::Rank>)>,
}

impl Pool {
    /// Starts or stops taking part in the client registry as the scheme in
    /// force says (only for a balancer over etcd).
    fn coordinate(&mut self, subsetting: Option<Subsetting>, cfg: &PoolConfig) {
        let wanted = subsetting.is_some_and(|s| s.scheme == SubsetScheme::Coordinated);
        match (&self.coordinator, &cfg.registry) {
            (None, Some(registry)) if wanted => {
                let id = format!("{:016x}", rand::random::<u64>());
                let (tx, rx) = watch::channel(None);
                let task = tokio::spawn(subset::coordinate(registry.clone(), id, tx));
                self.coordinator = Some((AbortOnDrop(task), rx));
            }
            (Some(_), _) if !wanted => self.coordinator = None,
            _ => {}
        }
    }

    /// Makes the connectors match the instances to connect to.
    fn reconcile(
        &mut self,
        shared: &Arc<Shared>,
        cfg: &Arc<PoolConfig>,
        subsetting: Option<Subsetting>,
    ) {
        let desired: HashSet<String> = match subsetting {
            None => self.instances.keys().cloned().collect(),
            Some(s) => {
                let list: Vec<(String, Arc<Instance>)> = self
                    .instances
                    .iter()
                    .map(|(k, i)| (k.clone(), i.clone()))
                    .collect();
                let rank = self.coordinator.as_ref().and_then(|(_, r)| *r.borrow());
                let who = match rank {
                    Some((index, count)) => subset::Who::Rank { index, count },
                    None => subset::Who::Seed(self.seed),
                };
                let size = s.size as usize;
                let order = subset::order(&list, size, who);
                let members: HashSet<String> =
                    subset::select(&order, size, |i| shared.usable(&list[i].0))
                        .into_iter()
                        .map(|i| list[i].0.clone())
                        .collect();
                let status = SubsetStatus {
                    scheme: s.scheme,
                    size: s.size,
                    rank: rank.filter(|_| s.scheme == SubsetScheme::Coordinated),
                    instances: list.len(),
                    members: members.len(),
                };
                let clients = status.rank.map_or(0, |(_, n)| n);
                let changed = shared.info.send_if_modified(|i| {
                    let changed = i.subset.as_ref() != Some(&status);
                    i.subset = Some(status);
                    changed
                });
                if changed {
                    crate::metrics::subset(&shared.target, members.len(), clients);
                }
                members
            }
        };
        if subsetting.is_none() {
            shared.info.send_if_modified(|i| i.subset.take().is_some());
        }
        // Dropping a connector stops it; its connection closes once the
        // calls on it finish.
        self.connectors.retain(|key, _| desired.contains(key));
        for key in desired {
            let Some(instance) = self.instances.get(&key) else {
                continue;
            };
            match self.connectors.get(&key) {
                Some(c) if Arc::ptr_eq(&c.instance.borrow(), instance) => {}
                Some(c) if c.instance.borrow().addr == instance.addr => {
                    tracing::debug!(%key, "metadata updated");
                    c.instance.send_replace(instance.clone());
                }
                _ => {
                    let (tx, rx) = watch::channel(instance.clone());
                    tokio::spawn(maintain(key.clone(), shared.clone(), cfg.clone(), rx));
                    self.connectors.insert(key, Connector { instance: tx });
                }
            }
        }
        let (registered, filtered_out) = (self.instances.len(), self.filtered.len());
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
    /// Active health checking: the service name to watch.
    pub(crate) health_check: Option<String>,
    /// Where coordinated subsetting registers this client (a balancer
    /// over etcd only).
    pub(crate) registry: Option<subset::Registry>,
    /// The service config in force: each connection streams its server's
    /// load reports while it asks for them.
    pub(crate) service_config: watch::Receiver<ServiceConfigStatus>,
}
