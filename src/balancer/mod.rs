//! This crate's own balanced channel: load-aware, failure-aware, never hangs.
//!
//! [`Balancer`] is a `Clone` service that tonic-generated clients take
//! directly (`GreeterClient::new(balancer)`). It is fed by the etcd
//! [`Discover`] and keeps every promise of a gRPC channel, plus what
//! production needs:
//!
//! * **Deadlines**: a call's deadline (its `grpc-timeout` header, set by
//!   `Request::set_timeout`, or [`call_timeout`](BalancerBuilder::call_timeout)
//!   for unary calls without one) bounds the wait for an endpoint, the wait
//!   for the response headers *and* the response body. On expiry the call
//!   fails with `DeadlineExceeded` and the stream is reset. tonic's `Channel`
//!   enforces the same header until the response headers arrive; a backend
//!   that sends headers and then stalls cannot hold a call here either.
//!   `call_timeout` does not apply to the methods named in
//!   [`stream_methods`](BalancerBuilder::stream_methods): a watch that lives
//!   for hours is bounded only by a deadline of its own.
//! * **Load-aware**: every endpoint (up to 16, else 8 sampled) is weighed by
//!   its cost, peak-EWMA latency × (load / weight + 1). The
//!   latency is learnt from the time to response headers (for a unary call,
//!   the whole call; for a stream, how fast it was opened), and is at least
//!   the age of the calls still waiting for their headers, so a backend that
//!   stalls looks slower every millisecond. The load is the calls waiting
//!   for their headers plus half the open streams, however long they stay
//!   open: a stream never makes its endpoint look slow (taking its age for
//!   latency starved a replica holding one stream of nearly every unary
//!   call). Endpoints within 2.5× of the cheapest (the first quartile,
//!   with more than four) share calls by weight; costlier ones get a share
//!   falling with the fourth power of the excess (see *Picking* below).
//!   Every endpoint idle for a second gets a probe call, so none is starved
//!   and a recovered one is seen at once. tonic compares a load that is
//!   always zero, i.e. picks at random.
//! * **Errors count**: each call's gRPC status (from a trailers-only
//!   response's headers, or the trailers after the body) feeds the
//!   endpoint's success rate, which scales its share, and passive
//!   [`OutlierDetection`] (gRPC A50 in spirit) ejects endpoints that keep
//!   failing, never more than half of them.
//! * **Weights, zones, slow start, health checks**:
//!   [`weight_key`](BalancerBuilder::weight_key) (metadata `weight`),
//!   [`prefer_zone`](BalancerBuilder::prefer_zone) (locality with fallback),
//!   [`slow_start`](BalancerBuilder::slow_start) (A100) and
//!   [`health_check`](BalancerBuilder::health_check) (A17, opt-in).
//! * **Introspection**: [`Balancer::endpoints`] lists every endpoint with its
//!   state and load (calls in flight, open streams, latency estimate,
//!   success rate); with feature `metrics`, calls by status with a duration
//!   histogram, and the same per endpoint as gauges (see [`crate::metrics`]).
//! * **Failure-aware**: every endpoint owns one HTTP/2 connection; when it
//!   fails, is refused or is closed (a killed server), the endpoint leaves the
//!   rotation at once and is reconnected in the background with back-off.
//!   etcd stays the source of truth: the endpoint is not forgotten. A
//!   connection joins the rotation only after the server's HTTP/2 SETTINGS
//!   arrived (as grpc-go waits for the server preface), so a port that
//!   accepts TCP but does not speak HTTP/2 never receives a call.
//! * **No lost calls for a dead backend**: a call no server processed (the
//!   connection closed before the request left, the server refused the
//!   stream with `REFUSED_STREAM`, or it was above the last stream id of a
//!   graceful `GOAWAY`) is sent once more on another endpoint, whatever the
//!   policy (gRPC's transparent retry; the request body is kept until the
//!   response headers for it). A call that may have reached a server is
//!   retried only as the method's service config says (see *Retries*
//!   below).
//! * **Transport failures read `UNAVAILABLE`**: a connection lost before the
//!   response headers or while the body streams fails the call with
//!   `UNAVAILABLE` naming the endpoint's address, as grpc-go does (tonic
//!   says `UNKNOWN`); a stream the server reset maps by grpc-go's table
//!   (`CANCEL` is `CANCELLED`), and a status the server sent is kept.
//! * **No work without a reason**: the background tasks (discovery, one
//!   connector per endpoint, the health watch when asked for) wait on events
//!   and timers; an idle balancer with four connected endpoints uses about
//!   0.1 ms of CPU per second (the `cpu` benchmark, with tonic's figures).
//! * **Fail fast, bounded**: when no endpoint has been in rotation for
//!   [`no_endpoint_timeout`](BalancerBuilder::no_endpoint_timeout) (default
//!   3 s), the balancer fails new calls at once with `Unavailable`, naming the
//!   service and why there is no endpoint, until one is ready again (linkerd's
//!   fail-fast gate). Before that, a call waits at most until its deadline or
//!   that timeout. [`fail_fast(false)`](BalancerBuilder::fail_fast) gives
//!   gRPC's wait-for-ready instead. At most
//!   [`max_waiting_calls`](BalancerBuilder::max_waiting_calls) calls wait in
//!   the balancer at once; more fail with `ResourceExhausted`.
//! * **The server's stream limit**: each server's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS` is read from its preface; an endpoint
//!   at its limit gets no new call (h2 would queue it on that connection)
//!   while another has room; when all are full, calls wait for a free stream.
//! * **Applied without traffic, idempotent**: a background task applies every
//!   discovery change as it arrives; an update that only changes an
//!   instance's metadata keeps its connection. A removed endpoint's
//!   connection closes once the calls on it finish.
//! * **Metadata-aware**: [`filter`](BalancerBuilder::filter) sees each
//!   instance's address and metadata (e.g. only `version=v2`).
//! * **TLS and mTLS** to backends with `BalancerBuilder::tls` (feature
//!   `tls`).
//! * **No buffer task**: a call picks its endpoint in the caller's task and
//!   goes straight to that endpoint's connection; `poll_ready` is always
//!   ready, and the waits above are per call, bounded by its deadline.
//!
//! # Picking
//!
//! Power of two choices has a floor: with half of four endpoints slow, both
//! random picks land on the slow half a sixth of the time whatever the load
//! signal says (brpc measured p99 7.7 ms for best-of-2 against 0.3 ms for
//! best-of-4). So the pick weighs every endpoint when there are up to 16
//! (else 8 random ones) and draws one with probability proportional to
//!
//! ```text
//! weight × slow-start ramp × success² × min(1, 2.5 × reference cost / cost)⁴
//! ```
//!
//! where the reference is the first quartile of the costs (the cheapest,
//! with four or fewer endpoints).
//!
//! Between endpoints of similar cost the weights alone decide, as in gRPC's
//! weighted round robin (A58); an endpoint 10× costlier than the reference
//! gets 0.4 % of a fast one's share: enough to keep sampling it, too little
//! to hurt the tail. Before its first answer an endpoint is assumed to take
//! 30 ms (not flooded before it has a baseline), and its first call comes at
//! once as a probe.
//!
//! # Retries
//!
//! For the methods whose [`ServiceConfig`](crate::ServiceConfig) sets a
//! `retryPolicy` ([`BalancerBuilder::service_config`], or the service's
//! document in etcd, watched live: see [`crate::config_store`]), as gRFC A6
//! and grpc-go do it:
//!
//! * an attempt that failed before response headers, or a trailers-only
//!   response, with a code in `retryableStatusCodes` is retried; response
//!   headers without a status commit the call (what follows is the
//!   application's);
//! * at most `maxAttempts` attempts (capped at 5), all within the call's
//!   one deadline; back-off `random(0, min(initialBackoff ×
//!   multiplier^(n−1), maxBackoff))`, or exactly the server's
//!   `grpc-retry-pushback-ms` (negative or malformed: no retry);
//! * on another endpoint than the one that failed whenever one is in
//!   rotation, each carrying `grpc-previous-rpc-attempts`;
//! * the request body (unary or client-streaming) replays from a buffer of
//!   256 KiB per call and 16 MiB per balancer; a call that outgrows it is
//!   not retried;
//! * `retryThrottling` when set (A6's token bucket), and always a budget as
//!   linkerd keeps (20 % of calls plus 10 per second, at most 100 saved up;
//!   see `budget.rs` for why not tower's `TpsBudget`), so retries never
//!   multiply an outage.
//!
//!
//! A `hedgingPolicy` sends a further attempt every `hedgingDelay` (up to
//! `maxAttempts`, capped at 5), each on an endpoint the call has not used;
//! the first response headers win and the others are cancelled at once; a
//! status in `nonFatalStatusCodes` sends the next hedge at once, any other
//! ends the call. Hedges share the replay buffer, throttle and budget.

//! # Ring hash
//!
//! A service config whose `loadBalancingConfig` selects
//! `ring_hash_experimental` (gRFC A42/A76) sends every call with the same
//! key to the same endpoint, from every client:
//!
//! ```json
//! {"loadBalancingConfig": [{"ring_hash_experimental": {
//!     "requestHashHeader": "x-item-id", "minRingSize": 1024, "maxRingSize": 4096,
//!     "hashBalanceFactor": 125}}]}
//! ```
//!
//! * the key is the `requestHashHeader` value (several joined by `,`; a
//!   call without it hashes at random); XXH64, seed 0;
//! * the ring holds every registered instance, `XXH64("<id>_<n>")` per
//!   entry as grpc-go hashes `"<address>_<n>"`, at least `minRingSize`
//!   entries, at most `maxRingSize` (entries per weight rounded up to a
//!   power of two, where A42 sizes the ring exactly: then a join resizes
//!   every endpoint's entries and moves twice the keys it must); the id
//!   is the instance's metadata `hash_key` (A76) or its instance id, so an
//!   instance that re-registers at another address keeps its keys (grpc-go
//!   keys by address: Go and Rust clients of one service agree only when
//!   instances set `hash_key` to their address);
//! * an endpoint out of rotation (connecting, ejected, unhealthy, at its
//!   stream limit, or already tried by this call's retry or hedge) is
//!   walked past to the next one on the ring; no other key moves;
//! * `hashBalanceFactor` (beyond A42; Envoy's `hash_balance_factor`,
//!   consistent hashing with bounded loads): an endpoint takes at most
//!   `ceil(ceil((calls in flight + 1) × factor / 100) × its weight share)`
//!   calls; a key whose endpoint is full goes to positions drawn from its
//!   own hash, so a hot key spreads instead of overloading one replica;
//! * zones, slow start and the cost-weighted shares do not apply; the
//!   call's deadline, outlier ejection, retries and hedging do.
//!   [`EndpointStatus::ring_share`] is each endpoint's share of the keys.

//! # Subsetting
//!
//! `random_subsetting_experimental` (gRFC A68) or
//! `tonic_etcd_coordinated_subsetting` in `loadBalancingConfig`, with
//! `subsetSize` and a `childPolicy`, makes the balancer connect to that
//! many instances only; the child policy (the cost-weighted pick or ring
//! hash) runs within them. The coordinated scheme registers the client
//! under `_tonic-etcd/clients/` in etcd and takes the SRE book's
//! deterministic subset by its rank, so instances get equal numbers of
//! clients; A68's random subsets are uneven. A member out of rotation is
//! replaced until it recovers. [`Balancer::subset`] shows where it stands.

// A call's life as layers, each in its own file: `call` (deadline, record,
// attempts) → `attempt` (pick, send, classify; `wait` when nothing can take
// it) → `pool` (endpoints, connections, health, ejection). `body` carries
// the call's deadline and accounting into the response body.
mod attempt;
mod body;
mod budget;
mod call;
mod classify;
mod deadline;
mod endpoint;
mod health;
mod hedge;
mod load;
mod outlier;
mod pick;
mod pool;
mod preface;
mod replay;
mod retry;
mod ring_hash;
mod subset;
#[cfg(feature = "tls")]
mod tls;
mod wait;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::Client;
use futures_core::Stream;
use http::HeaderValue;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::discover::Change;
use tower::Service;

use crate::config_store::ServiceConfigStatus;
use crate::discovery::{Discover, DiscoverBuilder};
use crate::metrics::CallMetrics;
use crate::schema::Schema;
use crate::time::{cap, deadline_after, wait_until, Waited};
use crate::{Error, Instance};
use call::CallConfig;
use endpoint::{ConnConfig, Policy};
use load::LoadConfig;
pub use outlier::OutlierDetection;
pub use pool::{ConnectError, EndpointState, EndpointStatus};
use pool::{Filter, PoolConfig, Shared};
pub use subset::SubsetStatus;
#[cfg(feature = "tls")]
pub use tls::TlsConfig;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Options for a [`Balancer`]. Created by [`Balancer::builder`].
pub struct BalancerBuilder {
    discover: DiscoverBuilder,
    service: String,
    conn: ConnConfig,
    filter: Option<Filter>,
    calls: CallConfig,
    user_agent: Option<String>,
    backoff_max: Duration,
    #[cfg(feature = "tls")]
    tls: Option<TlsConfig>,
    weight_key: String,
    zone: Option<(String, String)>,
    slow_start: Option<Duration>,
    outlier: OutlierDetection,
    health_check: Option<String>,
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
    /// [*Retries*](self#retries) in the module docs), and a
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
        self.calls.no_endpoint_timeout = cap(timeout);
        self
    }

    /// `false` gives gRPC's *wait-for-ready*: with no endpoint in rotation a
    /// call waits for one until its own deadline (calls without a deadline
    /// wait at most the no-endpoint timeout), and the fail-fast gate does not
    /// apply. Default `true`.
    #[must_use]
    pub fn fail_fast(mut self, fail_fast: bool) -> Self {
        self.calls.fail_fast = fail_fast;
        self
    }

    /// The most calls that may wait in the balancer at once, for an endpoint
    /// or for a free stream (default 10,000); further calls fail at once with
    /// `ResourceExhausted`. Keeps memory bounded when callers outpace every
    /// backend.
    #[must_use]
    pub fn max_waiting_calls(mut self, max: usize) -> Self {
        self.calls.max_waiting = max;
        self
    }

    /// The limit on connecting to an endpoint: TCP, TLS and the server's
    /// HTTP/2 preface together (default 1 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.conn.connect_timeout = cap(timeout);
        self
    }

    /// HTTP/2 keep-alive: a ping every `interval`, the connection dead when
    /// no answer comes within `timeout` (default 10 s / 5 s). This is what
    /// notices a backend that vanished without closing its connections.
    #[must_use]
    pub fn http2_keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.conn.keep_alive_interval = cap(interval);
        self.conn.keep_alive_timeout = cap(timeout);
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

    /// TLS (and mutual TLS, with a client identity) to every backend.
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The longest pause between reconnection attempts (default 5 s).
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
            ("no_endpoint_timeout", self.calls.no_endpoint_timeout),
            ("http2_keep_alive interval", self.conn.keep_alive_interval),
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
        if self.calls.max_waiting == 0 {
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
            service: format!("{}{}", opts.schema.root_prefix(), self.service),
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
        config: Option<(Client, crate::config_store::WatchConfig)>,
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
        let cfg = Arc::new(PoolConfig {
            conn: self.conn,
            filter: self.filter.unwrap_or_else(|| Arc::new(|_: &Instance| true)),
            backoff_base: Duration::from_millis(50),
            backoff_max: self.backoff_max,
            health_check: self.health_check,
            registry: self.registry,
        });
        let (config_tx, config_rx) =
            tokio::sync::watch::channel(ServiceConfigStatus::builder(self.service_config.clone()));
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
        let task = tokio::spawn(async move {
            // No endpoint (so no call) before the config in etcd is read or
            // its first reading failed, bounded by the request timeout.
            if let Some((mut rx, limit)) = first_read {
                let _ =
                    tokio::time::timeout(limit, rx.wait_for(ServiceConfigStatus::settled)).await;
            }
            pool::run(discover, shared_for_pool, cfg, pool_config).await;
        });
        Balancer {
            metrics: Arc::new(CallMetrics::new(&shared.service)),
            shared,
            calls: Arc::new(self.calls),
            _task: Arc::new((AbortOnDrop(task), config_task)),
        }
    }
}

const USER_AGENT: &str = concat!("tonic-etcd/", env!("CARGO_PKG_VERSION"));
/// A new endpoint's latency until its first answer: conservative, so it is
/// not flooded before it has a baseline (tower does the same); its first
/// call comes at once as a probe, and its answer replaces this.
const INITIAL_LATENCY: Duration = Duration::from_millis(30);
/// Time constant weighting a faster latency sample against the estimate.
const LATENCY_TAU: Duration = Duration::from_secs(2);
/// An endpoint idle this long gets the next call, so none is starved.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A task that ends with its owner.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A balanced channel to one service, fed by etcd. See the [module docs](self).
///
/// `Clone` and cheap to clone; the discovery and connections stop when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
    calls: Arc<CallConfig>,
    metrics: Arc<CallMetrics>,
    /// The pool's task, and the service config's watch.
    _task: Arc<(AbortOnDrop, Option<AbortOnDrop>)>,
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("service", &self.shared.service)
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

impl Balancer {
    /// Options for a balancer over the instances of `service` in etcd.
    pub fn builder(client: Client, service: impl Into<String>) -> BalancerBuilder {
        let service = service.into();
        BalancerBuilder {
            discover: Discover::builder(client, service.clone()),
            service,
            conn: ConnConfig {
                connect_timeout: Duration::from_secs(1),
                keep_alive_interval: Duration::from_secs(10),
                keep_alive_timeout: Duration::from_secs(5),
                tcp_nodelay: true,
                initial_stream_window_size: None,
                initial_connection_window_size: None,
                adaptive_window: false,
                #[cfg(feature = "tls")]
                tls: None,
            },
            filter: None,
            calls: CallConfig {
                no_endpoint_timeout: Duration::from_secs(3),
                call_timeout: None,
                streams: Arc::default(),
                fail_fast: true,
                max_waiting: 10_000,
                user_agent: HeaderValue::from_static(USER_AGENT),
                // Replaced when built.
                config: tokio::sync::watch::channel(ServiceConfigStatus::builder(Arc::default())).1,
                retries: Arc::new(retry::Retries::new()),
            },
            user_agent: None,
            backoff_max: Duration::from_secs(5),
            #[cfg(feature = "tls")]
            tls: None,
            weight_key: "weight".into(),
            zone: None,
            slow_start: None,
            outlier: OutlierDetection::new(),
            health_check: None,
            service_config: Arc::default(),
            config_from_etcd: true,
            registry: None,
        }
    }

    /// Endpoints connected and in rotation now.
    pub fn ready(&self) -> usize {
        self.shared.ready().len()
    }

    /// Instances registered (and passing the filter) now.
    pub fn registered(&self) -> usize {
        self.shared.info.borrow().registered
    }

    /// The instances in rotation now.
    pub fn ready_instances(&self) -> Vec<Instance> {
        self.shared
            .ready()
            .iter()
            .map(|e| (*e.instance()).clone())
            .collect()
    }

    /// Every registered instance that passes the filter, with where it
    /// stands (connecting, ready, ejected, unhealthy) and its load: calls in
    /// flight, latency estimate, success rate, weight, zone.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.shared.snapshot()
    }

    /// The service config in force and where it came from (the builder or
    /// etcd), with the last document etcd held that was refused, if any.
    pub fn service_config(&self) -> ServiceConfigStatus {
        self.calls.config.borrow().clone()
    }

    /// Under subsetting (the service config's `loadBalancingConfig`): the
    /// scheme, this client's rank among the service's clients (coordinated
    /// scheme), and how many instances it connects to of how many.
    pub fn subset(&self) -> Option<SubsetStatus> {
        self.shared.info.borrow().subset.clone()
    }

    /// Whether the fail-fast gate is closed: no endpoint has been in rotation
    /// for the no-endpoint timeout, and calls fail at once.
    pub fn failing_fast(&self) -> bool {
        self.shared
            .info
            .borrow()
            .empty_since
            .is_some_and(|since| self.calls.gate(since) <= Instant::now())
    }

    /// Waits until at least `n` endpoints are in rotation, up to `timeout`.
    pub async fn wait_for_ready(&self, n: usize, timeout: Duration) -> Result<(), Error> {
        let mut info = self.shared.info.subscribe();
        let deadline = deadline_after(Instant::now(), timeout);
        match wait_until(&mut info, deadline, |i| i.ready >= n).await {
            Waited::Ready => Ok(()),
            Waited::Gone => Err(Error::TaskGone("balancer")),
            Waited::TimedOut => Err(Error::NoEndpoints {
                service: self.shared.service.clone(),
                timeout,
            }),
        }
    }
}

impl Service<http::Request<tonic::body::Body>> for Balancer {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Waiting for an endpoint happens per call, bounded by its deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (shared, cfg, metrics) = (
            self.shared.clone(),
            self.calls.clone(),
            self.metrics.clone(),
        );
        Box::pin(call::call(shared, cfg, metrics, request))
    }
}

/// The no-endpoint paths on tokio's paused clock: no etcd and no backend
/// are involved (the discovery stream never yields an endpoint).
#[cfg(test)]
mod tests {
    use super::*;

    type NoChange = Result<Change<String, Instance>, std::convert::Infallible>;

    async fn balancer(configure: impl FnOnce(BalancerBuilder) -> BalancerBuilder) -> Balancer {
        // Never dialled: etcd-client connects lazily, and `build_with`
        // replaces etcd as the source of endpoints.
        let client = Client::connect(["http://127.0.0.1:1"], None).await.unwrap();
        let never = tokio_stream::pending::<NoChange>();
        configure(Balancer::builder(client, "svc"))
            .build_with(never)
            .unwrap()
    }

    /// Calls once; how long it took and the gRPC status it failed with.
    async fn call(b: &Balancer, deadline: Option<&str>) -> (Duration, tonic::Status) {
        call_path(b, "/svc.S/M", deadline).await
    }

    /// Calls method `path` once; how long it took and the status.
    async fn call_path(
        b: &Balancer,
        path: &str,
        deadline: Option<&str>,
    ) -> (Duration, tonic::Status) {
        let mut req = http::Request::builder().uri(format!("http://svc{path}"));
        if let Some(d) = deadline {
            req = req.header("grpc-timeout", d);
        }
        let req = req.body(tonic::body::Body::empty()).unwrap();
        let t0 = Instant::now();
        let err = b.clone().call(req).await.unwrap_err();
        let status = tonic::Status::from_error(err);
        (t0.elapsed(), status)
    }

    #[tokio::test]
    async fn stream_methods_are_named_by_method_or_service() {
        let b = balancer(|b| b.stream_methods(["pkg.S/Watch", "/pkg.T"])).await;
        let is = |p| b.calls.is_stream(p);
        assert!(is("/pkg.S/Watch"));
        assert!(!is("/pkg.S/Get"));
        assert!(is("/pkg.T/Anything"));
        assert!(!is("/pkg.TT/Anything"), "a service name is no prefix match");
        assert!(!balancer(|b| b).await.calls.is_stream("/pkg.S/Watch"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_method_config_sets_the_deadline_and_wait_for_ready() {
        let config = crate::ServiceConfig::from_json(
            r#"{"methodConfig":[
              {"name":[{"service":"svc.S","method":"M"}],"timeout":"0.5s"},
              {"name":[{"service":"svc.W"}],"timeout":"10s","waitForReady":true}]}"#,
        )
        .unwrap();
        let b = balancer(|b| {
            b.no_endpoint_timeout(Duration::from_secs(3))
                .call_timeout(Duration::from_secs(60))
                .service_config(config)
        })
        .await;
        // The method's timeout replaces call_timeout...
        let (took, status) = call_path(&b, "/svc.S/M", None).await;
        assert_eq!(took, Duration::from_millis(500));
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        // ...and the call's own deadline wins when earlier.
        let (took, _) = call_path(&b, "/svc.S/M", Some("200m")).await;
        assert_eq!(took, Duration::from_millis(200));
        // Once the fail-fast gate has closed, an unconfigured method fails
        // at once, and a waitForReady one waits for its deadline.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (took, _) = call_path(&b, "/svc.Other/X", None).await;
        assert_eq!(took, Duration::ZERO);
        let (took, status) = call_path(&b, "/svc.W/X", None).await;
        assert_eq!(took, Duration::from_secs(10));
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_endpoints_calls_wait_then_fail_fast() {
        let b = balancer(|b| b.no_endpoint_timeout(Duration::from_secs(3))).await;
        // A call without a deadline waits out the no-endpoint timeout.
        let (took, status) = call(&b, None).await;
        assert_eq!(took, Duration::from_secs(3));
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(b.failing_fast());
        // From then on, at once, saying why.
        let (took, status) = call(&b, Some("10S")).await;
        assert_eq!(took, Duration::ZERO);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("failing fast"), "{status:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_shorter_than_the_gate_ends_the_wait() {
        let b = balancer(|b| b.no_endpoint_timeout(Duration::from_secs(3))).await;
        let (took, status) = call(&b, Some("500m")).await;
        assert_eq!(took, Duration::from_millis(500));
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(!b.failing_fast());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_ready_waits_for_the_deadline() {
        let b = balancer(|b| {
            b.no_endpoint_timeout(Duration::from_secs(3))
                .fail_fast(false)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (took, _) = call(&b, Some("10S")).await;
        assert_eq!(took, Duration::from_secs(10));
        // Without a deadline, the no-endpoint timeout bounds the wait.
        let (took, _) = call(&b, None).await;
        assert_eq!(took, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_calls_are_bounded() {
        let b = balancer(|b| b.max_waiting_calls(2)).await;
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { call(&b, Some("1S")).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (took, status) = call(&b, Some("1S")).await;
        assert_eq!(took, Duration::ZERO);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        for w in waiting {
            assert_eq!(w.await.unwrap().0, Duration::from_secs(1));
        }
    }
}
