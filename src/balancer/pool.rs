//! The background side of the balancer: applies discovery changes as they
//! come (not only when calls flow) and keeps one connector task per endpoint.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tower::discover::Change;

use super::endpoint::{connect, ConnConfig, Policy, Ready};
use super::ring_hash::{self, Member, Points, Ring};
use super::subset::{self, SubsetStatus};
use super::AbortOnDrop;
use crate::backoff::Backoff;
use crate::config_store::ServiceConfigStatus;
use crate::service_config::{RingHashConfig, SubsetScheme, Subsetting};
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
    /// Under subsetting, where it stands.
    pub(crate) subset: Option<SubsetStatus>,
}

/// The endpoints in rotation, those of the client's zone first.
#[derive(Default)]
pub(crate) struct ReadySet {
    pub(crate) endpoints: Vec<Arc<Ready>>,
    /// How many leading entries are in the client's zone.
    pub(crate) local: usize,
}

impl std::ops::Deref for ReadySet {
    type Target = [Arc<Ready>];
    fn deref(&self) -> &[Arc<Ready>] {
        &self.endpoints
    }
}

/// Where an endpoint stands, for [`Balancer::endpoints`](super::Balancer::endpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndpointState {
    /// Registered, not connected yet (or reconnecting after a failure).
    Connecting,
    /// In rotation.
    Ready,
    /// Connected, out of rotation after failing calls (outlier detection).
    Ejected,
    /// Connected, out of rotation: its health check does not say `SERVING`.
    Unhealthy,
    /// Connected, out of rotation: an operator drained it (see
    /// [`overrides`](crate::overrides)); calls in flight finish.
    Drained,
}

/// One endpoint of a [`Balancer`](super::Balancer), as it is now.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// The instance as registered.
    pub instance: Instance,
    /// In rotation or why not.
    pub state: EndpointState,
    /// Calls in flight on it, open streams included.
    pub in_flight: usize,
    /// Of those, calls that have their response headers and are still open:
    /// streams (and unary answers being read). They count as load, and do
    /// not make the endpoint look slow however long they stay open.
    pub open_streams: usize,
    /// Its latency estimate (none before it is connected).
    pub latency: Option<Duration>,
    /// Share of recent calls that succeeded, 0 to 1 (an EWMA).
    pub success_rate: f64,
    /// Its weight from metadata.
    pub weight: u32,
    /// Whether it is in the preferred zone.
    pub local: bool,
    /// While it is not connected: why the last connection attempt failed.
    pub last_error: Option<ConnectError>,
    /// Under ring hash, the share of the hash space (of keys) it owns now,
    /// once a call has built the ring.
    pub ring_share: Option<f64>,
}

/// A registered endpoint in the registry.
struct Entry {
    state: EndpointState,
    instance: Arc<Instance>,
    connected: Option<Arc<Ready>>,
    /// Why the last connection attempt failed, until one succeeds.
    last_error: Option<ConnectError>,
}

/// Why a connection to an endpoint failed (TCP, TLS, or the HTTP/2 preface),
/// with its `source()` chain.
pub type ConnectError = Arc<dyn std::error::Error + Send + Sync>;

/// State shared by the pool task, the connectors and every call.
pub(crate) struct Shared {
    pub(crate) service: String,
    /// Every registered endpoint and where it stands.
    registry: std::sync::Mutex<HashMap<String, Entry>>,
    ready: RwLock<Arc<ReadySet>>,
    pub(crate) info: watch::Sender<PoolInfo>,
    pub(crate) policy: Arc<Policy>,
    /// Calls waiting in the balancer for an endpoint or a free stream.
    pub(crate) waiting: AtomicUsize,
    /// How etcd discovery is doing (none for a discovery stream of the
    /// user's own).
    pub(crate) etcd: Option<watch::Receiver<crate::WatchStatus>>,
    /// The ring-hash ring of the last ready set it was asked for, with its
    /// settings: rebuilt only when either changes.
    ring: RwLock<Option<CachedRing>>,
    /// The ring's entries, with the members and settings they were built
    /// for (kept while only the ready set changes).
    ring_points: std::sync::Mutex<Option<CachedPoints>>,
}

/// A ring's entries with the members and settings they were built for.
type CachedPoints = (Vec<Member>, RingHashConfig, Arc<Points>);

/// A ring with the ready set and settings it was built from.
type CachedRing = (Arc<ReadySet>, RingHashConfig, Arc<Ring>);

impl Shared {
    pub(crate) fn new(
        service: String,
        policy: Arc<Policy>,
        etcd: Option<watch::Receiver<crate::WatchStatus>>,
    ) -> Self {
        let info = PoolInfo {
            empty_since: Some(Instant::now()),
            ..PoolInfo::default()
        };
        Self {
            service,
            registry: Default::default(),
            ready: RwLock::new(Arc::default()),
            info: watch::channel(info).0,
            policy,
            waiting: AtomicUsize::new(0),
            etcd,
            ring: RwLock::new(None),
            ring_points: Default::default(),
        }
    }

    /// The ring of every registered endpoint with `config`, and those of
    /// `set` in rotation: built once per ready set and membership, its
    /// entries once per membership.
    pub(crate) fn ring(&self, set: &Arc<ReadySet>, config: RingHashConfig) -> Arc<Ring> {
        let fresh = |cached: &Option<CachedRing>| match cached {
            Some((s, c, ring)) if Arc::ptr_eq(s, set) && *c == config => Some(ring.clone()),
            _ => None,
        };
        if let Some(ring) = fresh(&self.ring.read().unwrap_or_else(|p| p.into_inner())) {
            return ring;
        }
        let mut cached = self.ring.write().unwrap_or_else(|p| p.into_inner());
        if let Some(ring) = fresh(&cached) {
            return ring;
        }
        let members = {
            let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
            ring_hash::members(registry.iter().map(|(key, e)| {
                let id = ring_hash::stable_id(&e.instance);
                (key.clone(), id, self.policy.weight_of(&e.instance))
            }))
        };
        let points = {
            let mut points = self.ring_points.lock().unwrap_or_else(|p| p.into_inner());
            match &*points {
                Some((m, c, p)) if *m == members && *c == config => p.clone(),
                _ => {
                    let p = ring_hash::points(&members, config);
                    *points = Some((members.clone(), config, p.clone()));
                    p
                }
            }
        };
        let fresh_points =
            !matches!(&*cached, Some((_, c, r)) if *c == config && r.same_points(&points));
        let ring = Arc::new(Ring::new(points, &members, set));
        if fresh_points {
            let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
            for (key, share) in ring.shares() {
                if let Some(e) = registry.get(&key) {
                    crate::metrics::ring_share(&self.service, &e.instance.addr, share);
                }
            }
        }
        *cached = Some((set.clone(), config, ring.clone()));
        ring
    }

    /// Whether endpoint `key` counts as a usable subset member: in
    /// rotation, or connecting without a failure yet (a new member is
    /// given its chance before a replacement is added).
    pub(crate) fn usable(&self, key: &str) -> bool {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        registry.get(key).is_none_or(|e| match e.state {
            EndpointState::Ready => true,
            EndpointState::Connecting => e.last_error.is_none(),
            _ => false,
        })
    }

    /// Forgets the ring: it holds its endpoints, and must not outlive a
    /// change of the ready set or of the registered instances.
    fn drop_ring(&self) {
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The endpoints in rotation now.
    pub(crate) fn ready(&self) -> Arc<ReadySet> {
        self.ready.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update_ready(&self, f: impl FnOnce(&mut Vec<Arc<Ready>>)) {
        let count = {
            let mut guard = self.ready.write().unwrap_or_else(|p| p.into_inner());
            let mut endpoints = guard.endpoints.clone();
            f(&mut endpoints);
            // Stable: the zone's endpoints first, each group in join order.
            endpoints.sort_by_key(|e| !e.is_local());
            let local = endpoints.iter().take_while(|e| e.is_local()).count();
            let count = endpoints.len();
            *guard = Arc::new(ReadySet { endpoints, local });
            self.drop_ring();
            count
        };
        self.info.send_modify(|i| {
            i.ready = count;
            i.empty_since = match (count, i.empty_since) {
                (0, None) => Some(Instant::now()),
                (0, since) => since,
                (_, Some(_)) => {
                    crate::metrics::fail_fast(&self.service, false);
                    None
                }
                (_, None) => None,
            };
        });
    }

    fn add(&self, ep: Arc<Ready>) {
        ep.joined();
        self.update_ready(|set| {
            set.retain(|e| e.key != ep.key);
            set.push(ep);
        });
    }

    fn remove(&self, ep: &Arc<Ready>) {
        self.update_ready(|set| set.retain(|e| !Arc::ptr_eq(e, ep)));
    }

    /// An endpoint's locality changed: restore the zone-first order.
    fn reorder(&self) {
        self.update_ready(|_| {});
    }

    /// Records where endpoint `key` stands.
    fn set_state(
        &self,
        key: &str,
        state: EndpointState,
        instance: &Arc<Instance>,
        connected: Option<&Arc<Ready>>,
    ) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Reconnecting keeps the reason it had to; a connection clears it.
        let last_error = match connected {
            Some(_) => None,
            None => registry.get(key).and_then(|e| e.last_error.clone()),
        };
        crate::metrics::endpoint_state(
            &self.service,
            &instance.addr,
            match state {
                EndpointState::Connecting => 0,
                EndpointState::Ready => 1,
                EndpointState::Ejected => 2,
                EndpointState::Unhealthy => 3,
                EndpointState::Drained => 5,
            },
        );
        let entry = Entry {
            state,
            instance: connected.map_or_else(|| instance.clone(), |ep| ep.instance()),
            connected: connected.cloned(),
            last_error,
        };
        registry.insert(key.to_owned(), entry);
        self.publish(&registry);
        drop(registry);
        self.drop_ring();
    }

    /// A connection attempt to endpoint `key` failed.
    fn connect_failed(&self, key: &str, addr: &str, error: ConnectError) {
        let msg = format!("{addr}: {error}");
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = registry.get_mut(key) {
            entry.last_error = Some(error);
        }
        drop(registry);
        self.info.send_modify(|i| i.last_error = Some(msg));
    }

    /// Endpoint `key` is no longer registered.
    fn forget(&self, key: &str) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gone) = registry.remove(key) {
            crate::metrics::endpoint_state(&self.service, &gone.instance.addr, 4);
        }
        self.publish(&registry);
        drop(registry);
        self.drop_ring();
    }

    fn publish(&self, registry: &HashMap<String, Entry>) {
        for (name, state) in [
            ("ready", EndpointState::Ready),
            ("ejected", EndpointState::Ejected),
            ("unhealthy", EndpointState::Unhealthy),
            ("drained", EndpointState::Drained),
        ] {
            let n = registry.values().filter(|e| e.state == state).count();
            crate::metrics::balancer_endpoints(&self.service, name, n);
        }
    }

    /// Every registered endpoint that passes the filter, as it is now.
    pub(crate) fn snapshot(&self) -> Vec<EndpointStatus> {
        let shares: HashMap<String, f64> = self
            .ring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, _, ring)| ring.shares().into_iter().collect())
            .unwrap_or_default();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<EndpointStatus> = registry
            .values()
            .map(|e| match &e.connected {
                Some(ep) => EndpointStatus {
                    instance: (*ep.instance()).clone(),
                    state: e.state,
                    in_flight: ep.load.pending(),
                    open_streams: ep.load.open_streams(),
                    latency: Some(Duration::from_secs_f64(ep.load.latency_us() / 1e6)),
                    success_rate: ep.load.health(),
                    weight: ep.weight(),
                    local: ep.is_local(),
                    last_error: None,
                    ring_share: shares.get(&ep.key).copied(),
                },
                None => EndpointStatus {
                    instance: (*e.instance).clone(),
                    state: e.state,
                    in_flight: 0,
                    open_streams: 0,
                    latency: None,
                    success_rate: 1.0,
                    weight: self.policy.weight_of(&e.instance),
                    local: self.policy.is_local(&e.instance),
                    last_error: e.last_error.clone(),
                    ring_share: None,
                },
            })
            .collect();
        out.sort_by(|a, b| a.instance.addr.cmp(&b.instance.addr));
        out
    }
}

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
                    crate::metrics::subset(&shared.service, members.len(), clients);
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
}

/// A connection that lived this long was healthy: the next failure starts
/// the back-off from its base again. A server that completes the handshake
/// and then drops every connection is retried at the back-off rate.
const HEALTHY_LIFETIME: Duration = Duration::from_secs(1);

/// Keeps one endpoint connected while it is registered: connect, join the
/// rotation, leave it the moment the connection ends, reconnect with
/// back-off. While connected it also leaves the rotation when ejected by
/// outlier detection (and comes back when the ejection ends) or reported
/// unhealthy by active health checking. Returns when the endpoint is
/// removed (its sender dropped); the connection then closes once the calls
/// still on it finish.
async fn maintain(
    key: String,
    shared: Arc<Shared>,
    cfg: Arc<PoolConfig>,
    mut instance: watch::Receiver<Arc<Instance>>,
) {
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max);
    let mut ejections = Ejections::default();
    loop {
        let current = instance.borrow_and_update().clone();
        shared.set_state(&key, EndpointState::Connecting, &current, None);
        let connected = tokio::select! {
            r = connect(&key, &shared.service, current.clone(), &cfg.conn, shared.policy.clone()) => r,
            () = removed(&mut instance) => return shared.forget(&key),
        };
        match connected {
            Ok(conn) => {
                let since = Instant::now();
                tracing::debug!(addr = %current.addr, "endpoint connected");
                if serve(&shared, &cfg, conn, &mut instance, &mut ejections).await {
                    return shared.forget(&key);
                }
                if since.elapsed() >= HEALTHY_LIFETIME {
                    backoff.reset();
                }
                tracing::info!(addr = %current.addr, service = %shared.service,
                    "connection lost; endpoint out of rotation until it reconnects");
            }
            Err(error) => {
                tracing::debug!(addr = %current.addr, %error, "connect failed");
                crate::metrics::connect_failure(&shared.service);
                shared.connect_failed(&key, &current.addr, ConnectError::from(error));
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = removed(&mut instance) => return shared.forget(&key),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// An endpoint's ejection history, kept across reconnects.
#[derive(Default)]
struct Ejections {
    /// Ejections in a row (the next one lasts longer).
    streak: u32,
    /// When the last one ended.
    ended: Option<Instant>,
}

/// Runs one live connection: in and out of the rotation as its health and
/// ejections say. Returns `true` when the endpoint was removed, `false` when
/// the connection ended.
async fn serve(
    shared: &Arc<Shared>,
    cfg: &PoolConfig,
    mut conn: super::endpoint::Connection,
    instance: &mut watch::Receiver<Arc<Instance>>,
    ejections: &mut Ejections,
) -> bool {
    let ep = conn.ready.clone();
    let policy = &shared.policy;
    ep.set_instance(instance.borrow_and_update().clone());
    // Without health checking there is no health task and nothing to wait
    // for: the branch below is disabled, never polled on a closed channel
    // (a dropped sender makes `changed()` ready at once, forever).
    let (health_tx, mut healthy) = watch::channel(cfg.health_check.is_none());
    let mut watching_health = cfg.health_check.is_some();
    let mut is_healthy = *healthy.borrow_and_update();
    let _health = cfg.health_check.as_ref().map(|service| {
        AbortOnDrop(tokio::spawn(super::health::watch(
            ep.clone(),
            service.clone(),
            health_tx,
        )))
    });
    let mut ejected_until: Option<Instant> = None;
    let mut in_rotation = false;
    let mut state = None;
    let removed = loop {
        let now_state = match (ejected_until.is_some(), is_healthy) {
            _ if crate::overrides::is_drained(&ep.instance()) => EndpointState::Drained,
            (true, _) => EndpointState::Ejected,
            (false, false) => EndpointState::Unhealthy,
            (false, true) => EndpointState::Ready,
        };
        // The state first: whoever sees the endpoint in rotation (a caller
        // of `wait_for_ready`) also sees it as ready in `endpoints()`.
        if state != Some(now_state) {
            state = Some(now_state);
            shared.set_state(&ep.key, now_state, &ep.instance(), Some(&ep));
        }
        let want = now_state == EndpointState::Ready;
        if want != in_rotation {
            in_rotation = want;
            if want {
                shared.add(ep.clone());
            } else {
                shared.remove(&ep);
            }
        }
        let ejection_over = tokio::time::sleep_until(ejected_until.unwrap_or_else(Instant::now));
        tokio::select! {
            changed = instance.changed() => match changed {
                Ok(()) => {
                    let relocated = ep.set_instance(instance.borrow_and_update().clone());
                    // The registry holds the metadata the ring is built
                    // from (a weight, an operator's weight override): it
                    // takes the new instance, and the cached ring goes.
                    shared.set_state(&ep.key, now_state, &ep.instance(), Some(&ep));
                    if relocated && in_rotation {
                        shared.reorder();
                    }
                }
                Err(_) => break true,
            },
            _ = &mut conn.driver => break false,
            () = ep.closed.notified() => break false,
            () = ep.outliers.eject.notified(), if ejected_until.is_none() => {
                ejected_until = eject(shared, &ep, ejections);
                ep.outliers.clear();
            }
            () = ejection_over, if ejected_until.is_some() => {
                ejected_until = None;
                ejections.ended = Some(Instant::now());
                policy.ejected.fetch_sub(1, Ordering::Relaxed);
                ep.outliers.on_probation();
                tracing::info!(addr = %ep.addr(), service = %shared.service, "ejection over");
            }
            changed = healthy.changed(), if watching_health => {
                let now_healthy = match changed {
                    Ok(()) => *healthy.borrow_and_update(),
                    Err(_) => {
                        // The health task ended (UNIMPLEMENTED): healthy for
                        // good, and no more waiting on its channel.
                        watching_health = false;
                        true
                    }
                };
                if now_healthy != is_healthy {
                    is_healthy = now_healthy;
                    tracing::debug!(addr = %ep.addr(), healthy = is_healthy, "health changed");
                }
            }
        }
    };
    if ejected_until.is_some() {
        policy.ejected.fetch_sub(1, Ordering::Relaxed);
    }
    if in_rotation {
        shared.remove(&ep);
    }
    // On removal the driver runs on until in-flight calls finish and the last
    // handle to the connection is dropped.
    removed
}

/// Ejects `ep` if the budget allows: at most `max_ejection_percent` of the
/// connected endpoints, never the last one. Returns when the ejection ends.
fn eject(shared: &Shared, ep: &Ready, ejections: &mut Ejections) -> Option<Instant> {
    let policy = &shared.policy;
    let outlier = &policy.outlier;
    let in_rotation = shared.ready().len();
    let admitted = policy
        .ejected
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |ejected| {
            let connected = in_rotation + ejected;
            let max = connected * outlier.max_ejection_percent as usize / 100;
            (ejected < max && in_rotation > 1).then_some(ejected + 1)
        })
        .is_ok();
    if !admitted {
        tracing::debug!(addr = %ep.addr(), "outlier, but the ejection budget is spent");
        return None;
    }
    let forgiven = ejections
        .ended
        .is_some_and(|t| t.elapsed() >= outlier.base_ejection_time.saturating_mul(10));
    if forgiven {
        ejections.streak = 0;
    }
    ejections.streak = ejections.streak.saturating_add(1);
    let time = outlier.ejection_time_for(ejections.streak);
    tracing::warn!(addr = %ep.addr(), service = %shared.service, ejection = ejections.streak,
        seconds = time.as_secs_f64(), "endpoint ejected: its calls fail");
    crate::metrics::ejection(&shared.service);
    Some(crate::time::deadline_after(Instant::now(), time))
}

/// Resolves when the pool drops the endpoint. Metadata updates seen meanwhile
/// are not lost: the newest instance is read when the connection is made.
async fn removed(instance: &mut watch::Receiver<Arc<Instance>>) {
    while instance.changed().await.is_ok() {}
}
