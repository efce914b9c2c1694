//! [`BalancerBuilder`]: every option of a [`Balancer`], and how the
//! layers are put together when it is built.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::Etcd;
use futures_core::Stream;
use http::HeaderValue;
use tokio::time::Instant;
use tower::discover::Change;

use super::call::{CallConfig, Retries};
use super::pool::endpoint::ConnConfig;
use super::pool::load::LoadConfig;
use super::pool::reconcile::{self, PoolConfig};
use super::pool::{subset, AbortOnDrop, Filter, Policy, Shared};
use super::route::{Router, WaitConfig};
#[cfg(feature = "tls")]
use super::TlsConfig;
use super::{Balancer, OutlierDetection};
use crate::config_store::ServiceConfigStatus;
use crate::discovery::{Discover, DiscoverBuilder};
use crate::metrics::CallMetrics;
use crate::schema::Schema;
use crate::time::cap;
use crate::{Error, Instance};

/// Options for a [`Balancer`]. Created by [`Balancer::builder`].
pub struct BalancerBuilder {
    discover: DiscoverBuilder,
    service: String,
    conn: ConnConfig,
    filter: Option<Filter>,
    calls: CallConfig,
    wait: WaitConfig,
    user_agent: Option<String>,
    backoff_max: Duration,
    #[cfg(feature = "tls")]
    tls: Option<TlsConfig>,
    weight_key: String,
    zone: Option<(String, String)>,
    slow_start: Option<Duration>,
    outlier: OutlierDetection,
    health_check: Option<String>,
    metrics_refresh: Duration,
    service_config: Arc<crate::ServiceConfig>,
    config_from_etcd: bool,
    /// Set by `build`: where coordinated subsetting registers the client.
    registry: Option<subset::Registry>,
}

impl fmt::Debug for BalancerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancerBuilder")
            .field("service", &self.service)
            .field("conn", &self.conn)
            .field("filter", &self.filter.is_some())
            .field("calls", &self.calls)
            .field("user_agent", &self.user_agent)
            .finish_non_exhaustive()
    }
}

impl BalancerBuilder {
    pub(super) fn new(client: Etcd, service: String) -> Self {
        Self {
            discover: Discover::builder(client, service.clone()),
            service,
            conn: ConnConfig {
                connect_timeout: Duration::from_secs(1),
                keep_alive_interval: None,
                keep_alive_timeout: Duration::from_secs(20),
                tcp_keepalive: Some(Duration::from_secs(10)),
                tcp_nodelay: true,
                initial_stream_window_size: None,
                initial_connection_window_size: None,
                adaptive_window: false,
                #[cfg(feature = "tls")]
                tls: None,
            },
            filter: None,
            calls: CallConfig {
                call_timeout: None,
                streams: Arc::default(),
                user_agent: HeaderValue::from_static(USER_AGENT),
                // Replaced when built.
                config: tokio::sync::watch::channel(ServiceConfigStatus::builder(Arc::default())).1,
                retries: Arc::new(Retries::new()),
            },
            wait: WaitConfig {
                no_endpoint_timeout: Duration::from_secs(3),
                fail_fast: true,
                max_waiting: 10_000,
            },
            user_agent: None,
            backoff_max: DEFAULT_RECONNECT_BACKOFF_MAX,
            #[cfg(feature = "tls")]
            tls: None,
            weight_key: "weight".into(),
            zone: None,
            slow_start: None,
            outlier: OutlierDetection::new(),
            health_check: None,
            metrics_refresh: Duration::from_secs(10),
            service_config: Arc::default(),
            config_from_etcd: true,
            registry: None,
        }
    }

    /// The key layout (default [`NamingSchema::new`](crate::NamingSchema::new)).
    #[must_use]
    pub fn schema(mut self, schema: impl Schema) -> Self {
        self.discover = self.discover.schema(schema);
        self
    }

    /// Only instances for which `filter` returns true receive calls, e.g.
    /// `|i| i.metadata.get("version").as_deref() == Some("v2")`.
    #[must_use]
    pub fn filter(mut self, filter: impl Fn(&Instance) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Some(Arc::new(filter));
        self
    }

    /// A deadline for unary calls that carry none, and a cap on those that
    /// do: a call's deadline is the earlier of its own `grpc-timeout` and
    /// this, as with tonic's `Endpoint::timeout`. The effective deadline is
    /// sent to the server in `grpc-timeout`. Default: none (gRPC's default:
    /// calls without a deadline may wait for their response indefinitely).
    ///
    /// It does not apply to the methods named in
    /// [`stream_methods`](Self::stream_methods): a stream is bounded by its
    /// own deadline if it sets one. On the wire a stream looks like a unary
    /// call until it ends, so the balancer cannot tell them apart by itself:
    /// name every streaming method whose calls may outlive this timeout.
    #[must_use]
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.calls.call_timeout = Some(cap(timeout));
        self
    }

    /// gRPC's service config for this service's calls (see
    /// [`ServiceConfig`](crate::ServiceConfig)): a method's `timeout`
    /// replaces `call_timeout` for the methods it names (streams included,
    /// as in gRPC; the call's own deadline wins when earlier), and
    /// `waitForReady` replaces [`fail_fast`](Self::fail_fast) for them, and
    /// a `retryPolicy` retries their calls as gRFC A6 says, throttled by
    /// `retryThrottling` and always within a retry budget (see
    /// [*Retries*](crate::balancer#retries) in the module docs), and a
    /// `hedgingPolicy` hedges them.
    ///
    /// A config for the service in etcd replaces this one (see
    /// [`service_config_from_etcd`](Self::service_config_from_etcd)).
    #[must_use]
    pub fn service_config(mut self, config: crate::ServiceConfig) -> Self {
        self.service_config = Arc::new(config);
        self
    }

    /// Whether the service's config in etcd (see [`crate::config_store`])
    /// is watched and, while there is one, replaces
    /// [`service_config`](Self::service_config), as a gRPC resolver's
    /// config does. Default `true`; `false` keeps the builder's whatever
    /// etcd holds.
    #[must_use]
    pub fn service_config_from_etcd(mut self, enabled: bool) -> Self {
        self.config_from_etcd = enabled;
        self
    }

    /// Methods that stream (server, client or bidi): [`call_timeout`](
    /// Self::call_timeout) does not apply to them. Each entry is a method
    /// (`inventory.v1.Inventory/Watch`) or a whole service
    /// (`inventory.v1.Inventory`), as in gRPC's service config names; a
    /// leading `/` is allowed. Adds to earlier calls.
    #[must_use]
    pub fn stream_methods<I, S>(mut self, methods: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let streams = Arc::make_mut(&mut self.calls.streams);
        for m in methods {
            let m = m.as_ref().trim_start_matches('/');
            streams.insert(match m.split_once('/') {
                Some(_) => format!("/{m}"),
                None => format!("/{m}/"),
            });
        }
        self
    }

    /// How long the balancer may have no endpoint in rotation before it
    /// fails calls at once (default 3 s). Until then a call waits for an
    /// endpoint, at most until its deadline; after it, calls fail with
    /// `Unavailable` and the reason until an endpoint is ready again.
    #[must_use]
    pub fn no_endpoint_timeout(mut self, timeout: Duration) -> Self {
        self.wait.no_endpoint_timeout = cap(timeout);
        self
    }

    /// `false` gives gRPC's *wait-for-ready*: with no endpoint in rotation a
    /// call waits for one until its own deadline (calls without a deadline
    /// wait at most the no-endpoint timeout), and the fail-fast gate does not
    /// apply. Default `true`.
    #[must_use]
    pub fn fail_fast(mut self, fail_fast: bool) -> Self {
        self.wait.fail_fast = fail_fast;
        self
    }

    /// The most calls that may wait in the balancer at once, for an endpoint
    /// or for a free stream (default 10,000); further calls fail at once with
    /// `ResourceExhausted`. Keeps memory bounded when callers outpace every
    /// backend.
    #[must_use]
    pub fn max_waiting_calls(mut self, max: usize) -> Self {
        self.wait.max_waiting = max;
        self
    }

    /// The limit on connecting to an endpoint: TCP, TLS and the server's
    /// HTTP/2 preface together (default 1 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.conn.connect_timeout = cap(timeout);
        self
    }

    /// HTTP/2 keep-alive (gRFC A8): a ping every `interval` (idle
    /// connections included), the connection dead when no answer comes
    /// within `timeout`. Off by default, as in tonic, grpc-go and
    /// grpc-java: gRPC servers refuse pings more often than every 5
    /// minutes unless told otherwise (grpc-go's `EnforcementPolicy.MinTime`;
    /// past two such pings they close the connection with `GOAWAY
    /// too_many_pings`), and hyper's ping bookkeeping costs every call about
    /// 2,100 instructions (`benches/cpu.rs`). What it adds over
    /// [`tcp_keepalive`](Self::tcp_keepalive): a backend whose process is
    /// frozen while its kernel still answers TCP is noticed too. Set the
    /// servers' policy to match when you turn it on (this crate's servers
    /// accept any rate).
    #[must_use]
    pub fn http2_keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.conn.keep_alive_interval = Some(cap(interval));
        self.conn.keep_alive_timeout = cap(timeout);
        self
    }

    /// No HTTP/2 keep-alive (the default; undoes
    /// [`http2_keep_alive`](Self::http2_keep_alive)).
    #[must_use]
    pub fn no_http2_keep_alive(mut self) -> Self {
        self.conn.keep_alive_interval = None;
        self
    }

    /// TCP keep-alive on every backend connection: the kernel probes a
    /// connection idle for `idle` every `idle / 2`, three times, and
    /// `TCP_USER_TIMEOUT` (Linux) drops one whose sent data stays
    /// unacknowledged as long; either way the connection ends and the
    /// endpoint leaves the rotation. This is what notices a backend host
    /// that vanished (powered off, partitioned) without closing its
    /// connections, within about `2.5 × idle`, at no cost per call and
    /// invisibly to the servers. Default 10 s; `None` leaves the kernel's
    /// defaults (tonic's default).
    #[must_use]
    pub fn tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.conn.tcp_keepalive = idle.map(cap);
        self
    }

    /// `TCP_NODELAY` on every connection (default `true`, as tonic).
    #[must_use]
    pub fn tcp_nodelay(mut self, enabled: bool) -> Self {
        self.conn.tcp_nodelay = enabled;
        self
    }

    /// HTTP/2's initial flow-control window per stream (default hyper's).
    #[must_use]
    pub fn initial_stream_window_size(mut self, size: u32) -> Self {
        self.conn.initial_stream_window_size = Some(size);
        self
    }

    /// HTTP/2's initial flow-control window per connection (default hyper's).
    #[must_use]
    pub fn initial_connection_window_size(mut self, size: u32) -> Self {
        self.conn.initial_connection_window_size = Some(size);
        self
    }

    /// BDP-based adaptive flow-control windows (default off, as tonic).
    #[must_use]
    pub fn http2_adaptive_window(mut self, enabled: bool) -> Self {
        self.conn.adaptive_window = enabled;
        self
    }

    /// Prepended to the `user-agent` of calls that set none
    /// (`<yours> tonic-etcd/<version>`).
    #[must_use]
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = Some(user_agent.into());
        self
    }

    /// The metadata key holding each instance's weight (default `weight`):
    /// a positive integer, absent means 1. Between equally fast backends the
    /// share of calls follows the weights (as gRPC's weighted round robin);
    /// a slow or failing one still gets less.
    #[must_use]
    pub fn weight_key(mut self, key: impl Into<String>) -> Self {
        self.weight_key = key.into();
        self
    }

    /// Prefers instances whose metadata has `key` = `value` (e.g. `zone` =
    /// `a`): calls stay with them while any of them can take a call, and go
    /// to the others when none is in rotation (down, ejected, unhealthy or
    /// at its stream limit). Unlike a [`filter`](Self::filter), it never
    /// leaves a caller without an endpoint while others are healthy.
    #[must_use]
    pub fn prefer_zone(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.zone = Some((key.into(), value.into()));
        self
    }

    /// Ramps a newly ready endpoint's share up over `window`, from 10 % of
    /// its weight (gRPC's slow start, A100, with aggression 1). Default off.
    #[must_use]
    pub fn slow_start(mut self, window: Duration) -> Self {
        self.slow_start = Some(cap(window));
        self
    }

    /// Passive outlier detection (default [`OutlierDetection::new`]): an
    /// endpoint whose calls fail is ejected for a while.
    #[must_use]
    pub fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.outlier = outlier;
        self
    }

    /// Active health checking (gRPC A17): each connection watches
    /// `grpc.health.v1.Health` for `service` (`""`: the server as a whole)
    /// and the endpoint is in rotation only while the answer is `SERVING`.
    /// Default off.
    #[must_use]
    pub fn health_check(mut self, service: impl Into<String>) -> Self {
        self.health_check = Some(service.into());
        self
    }

    /// How often every endpoint's gauges are set from the endpoint (feature
    /// `metrics`; default 10 s; zero: never). An exporter that drops series
    /// idle for longer than this (`metrics-exporter-prometheus`'
    /// `idle_timeout`) then drops only those of endpoints that left, so a
    /// fleet whose addresses churn does not grow the scrape; see
    /// [`metrics`](crate::metrics).
    #[must_use]
    pub fn metrics_refresh(mut self, period: Duration) -> Self {
        self.metrics_refresh = cap(period);
        self
    }

    /// TLS (and mutual TLS, with a client identity) to every backend.
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The longest pause between reconnection attempts to an endpoint that
    /// stays unreachable (default 30 s). Pauses start at 50 ms and double
    /// (each drawn from its upper half), so a brief outage is retried
    /// quickly and the cap is only reached after about half a minute of
    /// failures. It is what an endpoint that is registered but down costs
    /// an idle client: at 5 s, a process with 100 Balancers spent most of
    /// its idle CPU on about 27 refused connections a second. gRPC's
    /// default is 120 s. An endpoint whose registration changes is tried
    /// again at once, whatever the pause.
    #[must_use]
    pub fn reconnect_backoff_max(mut self, max: Duration) -> Self {
        self.backoff_max = cap(max);
        self
    }

    /// The limit on each etcd request of the discovery (default 5 s).
    #[must_use]
    pub fn etcd_request_timeout(mut self, timeout: Duration) -> Self {
        self.discover = self.discover.request_timeout(timeout);
        self
    }

    /// Checks the options and completes what depends on several of them.
    fn finish(&mut self) -> Result<(), Error> {
        for (name, d) in [
            ("connect_timeout", self.conn.connect_timeout),
            ("no_endpoint_timeout", self.wait.no_endpoint_timeout),
            (
                "http2_keep_alive interval",
                self.conn.keep_alive_interval.unwrap_or(Duration::MAX),
            ),
            ("http2_keep_alive timeout", self.conn.keep_alive_timeout),
            (
                "call_timeout",
                self.calls.call_timeout.unwrap_or(Duration::MAX),
            ),
        ] {
            if d.is_zero() {
                return Err(Error::InvalidConfig(format!(
                    "balancer: {name} must be above zero"
                )));
            }
        }
        self.outlier
            .check()
            .map_err(|e| Error::InvalidConfig(format!("balancer: {e}")))?;
        if self.weight_key.is_empty() {
            return Err(Error::InvalidConfig(
                "balancer: weight_key must not be empty".into(),
            ));
        }
        if self.slow_start.is_some_and(|d| d.is_zero()) {
            return Err(Error::InvalidConfig(
                "balancer: slow_start must be above zero".into(),
            ));
        }
        if self.wait.max_waiting == 0 {
            return Err(Error::InvalidConfig(
                "balancer: max_waiting_calls must be at least 1".into(),
            ));
        }
        let agent = match &self.user_agent {
            None => USER_AGENT.to_owned(),
            Some(mine) => format!("{mine} {USER_AGENT}"),
        };
        self.calls.user_agent = HeaderValue::try_from(agent).map_err(|_| {
            Error::InvalidConfig(
                "balancer: user_agent must be visible ASCII (a valid header value)".into(),
            )
        })?;
        #[cfg(feature = "tls")]
        {
            self.conn.tls = self.tls.as_ref().map(TlsConfig::connector).transpose()?;
        }
        Ok(())
    }

    /// Starts discovery and the balancer. Needs a tokio runtime.
    pub fn build(mut self) -> Result<Balancer, Error> {
        self.finish()?;
        let discover = self.discover.clone().build()?;
        let etcd = discover.status();
        let config = if self.config_from_etcd {
            let opts = self.discover.options();
            Some(crate::config_store::WatchConfig {
                key: crate::config_store::config_key(&*opts.schema, &self.service)?,
                default: self.service_config.clone(),
                request_timeout: opts.request_timeout,
                idle: opts.idle,
            })
        } else {
            None
        };
        let client = self.discover.client().clone();
        let opts = self.discover.options();
        let registry = subset::Registry {
            client: client.clone(),
            schema: opts.schema.clone(),
            service: self.service.clone(),
            request_timeout: opts.request_timeout,
        };
        self.registry = Some(registry);
        // Operators' drains and weight overrides, applied live.
        let discover = crate::overrides::WithOverrides::new(
            discover,
            client.clone(),
            &*opts.schema,
            &self.service,
            self.weight_key.clone(),
            opts.request_timeout,
        );
        Ok(self.discover_into(discover, Some(etcd), config.map(|c| (client, c))))
    }

    /// Builds the balancer over any discovery stream of instances instead of
    /// etcd's (keys identify instances; an Insert of a known key replaces it).
    pub fn build_with<D, E>(mut self, discover: D) -> Result<Balancer, Error>
    where
        D: Stream<Item = Result<Change<String, Instance>, E>> + Unpin + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        self.finish()?;
        Ok(self.discover_into(discover, None, None))
    }

    fn discover_into<D, E>(
        mut self,
        discover: D,
        etcd: Option<tokio::sync::watch::Receiver<crate::WatchStatus>>,
        config: Option<(Etcd, crate::config_store::WatchConfig)>,
    ) -> Balancer
    where
        D: Stream<Item = Result<Change<String, Instance>, E>> + Unpin + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let policy = Arc::new(Policy {
            load: LoadConfig {
                base: Instant::now(),
                prior: INITIAL_LATENCY,
                tau: LATENCY_TAU,
                probe_interval: PROBE_INTERVAL,
            },
            outlier: self.outlier,
            weight_key: self.weight_key,
            zone: self.zone,
            slow_start: self.slow_start,
            ejected: Arc::default(),
            capacity: Arc::default(),
        });
        let shared = Arc::new(Shared::new(self.service, policy, etcd));
        let shared_for_pool = shared.clone();
        let router = Arc::new(Router::new(shared, self.wait));
        let (config_tx, config_rx) =
            tokio::sync::watch::channel(ServiceConfigStatus::builder(self.service_config.clone()));
        let cfg = Arc::new(PoolConfig {
            conn: self.conn,
            filter: self.filter.unwrap_or_else(|| Arc::new(|_: &Instance| true)),
            backoff_base: Duration::from_millis(50),
            backoff_max: self.backoff_max,
            health_check: self.health_check,
            registry: self.registry,
            service_config: config_rx.clone(),
        });
        self.calls.config = config_rx.clone();
        let pool_config = config_rx.clone();
        let (config_task, first_read) = match config {
            Some((client, watch)) => {
                let limit = watch.request_timeout;
                let task = tokio::spawn(crate::config_store::watch(client, watch, config_tx));
                (Some(AbortOnDrop(task)), Some((config_rx, limit)))
            }
            None => (None, None),
        };
        // The methods the builder names have their series from now on;
        // others from their first call.
        let known: Vec<String> = self
            .calls
            .streams
            .iter()
            .filter(|s| !s.ends_with('/'))
            .cloned()
            .chain(self.service_config.method_configs.iter().flat_map(|mc| {
                mc.names
                    .iter()
                    .filter_map(|n| match (&n.service, &n.method) {
                        (Some(s), Some(m)) => Some(format!("/{s}/{m}")),
                        _ => None,
                    })
            }))
            .collect();
        let metrics = Arc::new(CallMetrics::new(
            &router.pool.target,
            known.iter().map(String::as_str),
        ));
        crate::metrics::balancer_built(&router.pool.target);
        let refresh = (router.clone(), self.metrics_refresh);
        let task = tokio::spawn(async move {
            // No endpoint (so no call) before the config in etcd is read or
            // its first reading failed, bounded by the request timeout.
            if let Some((mut rx, limit)) = first_read {
                let _ =
                    tokio::time::timeout(limit, rx.wait_for(ServiceConfigStatus::settled)).await;
            }
            tokio::select! {
                () = reconcile::run(discover, shared_for_pool, cfg, pool_config) => {}
                () = refresh_metrics(refresh.0, refresh.1) => {}
            }
        });
        Balancer {
            metrics,
            router,
            calls: Arc::new(self.calls),
            _task: Arc::new((AbortOnDrop(task), config_task)),
        }
    }
}

/// Sets every registered endpoint's gauges from the endpoint every
/// `period`: a live endpoint's series never look idle to an exporter that
/// drops idle series, and come back if one was dropped anyway. Without the
/// `metrics` feature it never wakes.
async fn refresh_metrics(router: Arc<Router>, period: Duration) {
    if !cfg!(feature = "metrics") || period.is_zero() {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let target = &router.pool.target;
        for status in router.pool.snapshot(&router.ring_shares()) {
            crate::metrics::endpoint_status(target, &status);
        }
    }
}

const USER_AGENT: &str = concat!("tonic-etcd/", env!("CARGO_PKG_VERSION"));
/// See [`BalancerBuilder::reconnect_backoff_max`].
const DEFAULT_RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A new endpoint's latency until its first answer: conservative, so it is
/// not flooded before it has a baseline (tower does the same); its first
/// call comes at once as a probe, and its answer replaces this.
const INITIAL_LATENCY: Duration = Duration::from_millis(30);
/// Time constant weighting a faster latency sample against the estimate.
const LATENCY_TAU: Duration = Duration::from_secs(2);
/// An endpoint idle this long gets the next call, so none is starved.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
