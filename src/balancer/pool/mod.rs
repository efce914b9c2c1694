//! The pool layer: endpoints and their connections. It knows no call and
//! no routing policy.
//!
//! [`Shared`] is what calls read: the ready set (the endpoints in rotation,
//! each a [`Ready`] connection with its load and health), the registry of
//! every registered endpoint and where it stands, and a cache slot a
//! routing policy may fill over the ready set (emptied on every change).
//! In the background, [`reconcile::run`] applies discovery changes and
//! keeps one [`connector`] task per endpoint; [`subset`] decides which
//! instances get a connection under subsetting; [`load`], [`outlier`] and
//! [`health`] measure endpoints where calls are counted.

pub(crate) mod connector;
pub(crate) mod endpoint;
pub(crate) mod health;
pub(crate) mod load;
mod orca;
pub(crate) mod outlier;
mod preface;
pub(crate) mod reconcile;
pub(crate) mod subset;
#[cfg(feature = "tls")]
pub(crate) mod tls;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::Instance;
pub(crate) use endpoint::{InFlight, Outcome, Policy, Ready};
use subset::SubsetStatus;

/// A task that ends with its owner.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A routing policy's cache over the ready set, opaque to the pool.
type RouteCache = Option<Arc<dyn std::any::Any + Send + Sync>>;

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

/// Where an endpoint stands, for [`Balancer::endpoints`](crate::Balancer::endpoints).
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

/// One endpoint of a [`Balancer`](crate::Balancer), as it is now.
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
    /// Connection attempts that failed in a row (0 once one succeeds):
    /// the pause before the next grows with them, up to
    /// [`reconnect_backoff_max`](crate::balancer::BalancerBuilder::reconnect_backoff_max).
    pub failed_attempts: u32,
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
    /// Attempts failed since the last success.
    failed_attempts: u32,
}

/// Why a connection to an endpoint failed (TCP, TLS, or the HTTP/2 preface),
/// with its `source()` chain.
pub type ConnectError = Arc<dyn std::error::Error + Send + Sync>;

/// State shared by the pool task, the connectors and every call.
pub(crate) struct Shared {
    pub(crate) service: String,
    /// `etcd:///<service>`, the `grpc.target` of its metrics (A66).
    pub(crate) target: String,
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
    /// What a routing policy built over the ready set (the ring-hash
    /// ring). It holds endpoints, so it is emptied on every change of the
    /// ready set or of the registered instances, and never outlives one.
    route_cache: RwLock<RouteCache>,
}

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
            target: format!("etcd:///{service}"),
            service,
            registry: Default::default(),
            ready: RwLock::new(Arc::default()),
            info: watch::channel(info).0,
            policy,
            waiting: AtomicUsize::new(0),
            etcd,
            route_cache: RwLock::new(None),
        }
    }

    /// The route cache, if it holds a `T`.
    pub(crate) fn route_cache<T: std::any::Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let cached = self.route_cache.read().unwrap_or_else(|p| p.into_inner());
        cached.clone()?.downcast().ok()
    }

    /// Fills the route cache until the next change.
    pub(crate) fn set_route_cache(&self, value: Arc<dyn std::any::Any + Send + Sync>) {
        *self.route_cache.write().unwrap_or_else(|p| p.into_inner()) = Some(value);
    }

    /// Every registered endpoint (passing the filter): its key and instance.
    pub(crate) fn instances(&self) -> Vec<(String, Arc<Instance>)> {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        registry
            .iter()
            .map(|(key, e)| (key.clone(), e.instance.clone()))
            .collect()
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

    /// Empties the route cache: it holds endpoints, and must not outlive a
    /// change of the ready set or of the registered instances.
    fn drop_route_cache(&self) {
        *self.route_cache.write().unwrap_or_else(|p| p.into_inner()) = None;
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
            self.drop_route_cache();
            count
        };
        self.info.send_modify(|i| {
            i.ready = count;
            i.empty_since = match (count, i.empty_since) {
                (0, None) => Some(Instant::now()),
                (0, since) => since,
                (_, Some(_)) => {
                    crate::metrics::fail_fast(&self.target, false);
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
        let (last_error, failed_attempts) = match (connected, registry.get(key)) {
            (None, Some(e)) => (e.last_error.clone(), e.failed_attempts),
            _ => (None, 0),
        };
        crate::metrics::endpoint_state(&self.target, &instance.addr, Some(state));
        let entry = Entry {
            state,
            instance: connected.map_or_else(|| instance.clone(), |ep| ep.instance()),
            connected: connected.cloned(),
            last_error,
            failed_attempts,
        };
        registry.insert(key.to_owned(), entry);
        self.publish(&registry);
        drop(registry);
        self.drop_route_cache();
    }

    /// A connection attempt to endpoint `key` failed.
    fn connect_failed(&self, key: &str, addr: &str, error: ConnectError) {
        let msg = format!("{addr}: {error}");
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = registry.get_mut(key) {
            entry.last_error = Some(error);
            entry.failed_attempts = entry.failed_attempts.saturating_add(1);
        }
        drop(registry);
        self.info.send_modify(|i| i.last_error = Some(msg));
    }

    /// A live connection to `addr` ended: the reason callers that find no
    /// endpoint are given (the endpoint's own status keeps no error: it
    /// reconnects at once, as a new subset member would).
    fn connection_lost(&self, addr: &str, why: &str) {
        let msg = format!("{addr}: connection lost: {why}");
        self.info.send_modify(|i| i.last_error = Some(msg));
    }

    /// Endpoint `key` is no longer registered.
    fn forget(&self, key: &str) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gone) = registry.remove(key) {
            crate::metrics::endpoint_state(&self.target, &gone.instance.addr, None);
        }
        self.publish(&registry);
        drop(registry);
        self.drop_route_cache();
    }

    fn publish(&self, registry: &HashMap<String, Entry>) {
        for (name, state) in [
            ("ready", EndpointState::Ready),
            ("ejected", EndpointState::Ejected),
            ("unhealthy", EndpointState::Unhealthy),
            ("drained", EndpointState::Drained),
        ] {
            let n = registry.values().filter(|e| e.state == state).count();
            crate::metrics::balancer_endpoints(&self.target, name, n);
        }
    }

    /// Every registered endpoint that passes the filter, as it is now,
    /// with its ring share as `shares` (by endpoint key) has it.
    pub(crate) fn snapshot(&self, shares: &HashMap<String, f64>) -> Vec<EndpointStatus> {
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
                    failed_attempts: 0,
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
                    failed_attempts: e.failed_attempts,
                    ring_share: None,
                },
            })
            .collect();
        out.sort_by(|a, b| a.instance.addr.cmp(&b.instance.addr));
        out
    }
}
