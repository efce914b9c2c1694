//! This crate's own balanced channel: load-aware, failure-aware, never hangs.
//!
//! [`Balancer`] is a `Clone` service that tonic-generated clients take
//! directly (`GreeterClient::new(balancer)`). It is fed by the etcd
//! [`Discover`](crate::Discover) and keeps every promise of a gRPC channel, plus what
//! production needs:
//!
//! * **Deadlines**: a call's deadline (its `grpc-timeout` header, set by
//!   `Request::set_timeout`, or [`call_timeout`](BalancerBuilder::call_timeout)
//!   for unary calls without one) bounds the wait for an endpoint, the wait
//!   for the response headers *and* the response body; a call whose
//!   deadline has passed is never sent. On expiry the call fails with
//!   `DeadlineExceeded` (also when the server's timer answered `CANCELLED`
//!   first, as tonic's does); the stream is reset once the caller holds
//!   neither half of it (a client or bidi stream's request sender too: see
//!   docs/clients.md). tonic's `Channel`
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
//! under `<namespace prefix>_tonic-etcd/clients/` in etcd and takes the SRE book's
//! deterministic subset by its rank, so instances get equal numbers of
//! clients; A68's random subsets are uneven. A member out of rotation is
//! replaced until it recovers. [`Balancer::subset`] shows where it stands.

// A call's life as three layers, one folder each, whose imports only
// point down: `call` (deadline, method config, attempts: retry, hedge,
// transparent retry, replay, budget, classification) → `route` (which
// endpoint: the cost-weighted pick, ring hash; bounded waits) → `pool`
// (endpoints, connections, TLS, load, ejection, health, subsetting). See
// ARCHITECTURE.md at the crate's root.
mod builder;
mod call;
mod error;
mod pool;
mod route;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::Etcd;
use tokio::time::Instant;
use tower::Service;

use crate::config_store::ServiceConfigStatus;
use crate::metrics::CallMetrics;
use crate::time::{deadline_after, wait_until, Waited};
use crate::{Error, Instance};
pub use builder::BalancerBuilder;
pub(crate) use call::grpc_timeout;
use call::CallConfig;
use error::BoxError;
pub use pool::outlier::OutlierDetection;
pub use pool::subset::SubsetStatus;
#[cfg(feature = "tls")]
pub use pool::tls::TlsConfig;
use pool::AbortOnDrop;
pub use pool::{ConnectError, EndpointState, EndpointStatus};
use route::Router;

/// A balanced channel to one service, fed by etcd. See the [module docs](self).
///
/// `Clone` and cheap to clone; the discovery and connections stop when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Balancer {
    router: Arc<Router>,
    calls: Arc<CallConfig>,
    metrics: Arc<CallMetrics>,
    /// The pool's task, and the service config's watch.
    _task: Arc<(AbortOnDrop, Option<AbortOnDrop>)>,
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("service", &self.router.pool.service)
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

impl Balancer {
    /// Options for a balancer over the instances of `service` in etcd.
    pub fn builder(etcd: impl Into<Etcd>, service: impl Into<String>) -> BalancerBuilder {
        BalancerBuilder::new(etcd.into(), service.into())
    }

    /// Endpoints connected and in rotation now.
    pub fn ready(&self) -> usize {
        self.router.pool.ready().len()
    }

    /// Instances registered (and passing the filter) now.
    pub fn registered(&self) -> usize {
        self.router.pool.info.borrow().registered
    }

    /// The instances in rotation now.
    pub fn ready_instances(&self) -> Vec<Instance> {
        self.router
            .pool
            .ready()
            .iter()
            .map(|e| (*e.instance()).clone())
            .collect()
    }

    /// Every registered instance that passes the filter, with where it
    /// stands (connecting, ready, ejected, unhealthy) and its load: calls in
    /// flight, latency estimate, success rate, weight, zone.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.router.pool.snapshot(&self.router.ring_shares())
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
        self.router.pool.info.borrow().subset.clone()
    }

    /// Whether the fail-fast gate is closed: no endpoint has been in rotation
    /// for the no-endpoint timeout, and calls fail at once.
    pub fn failing_fast(&self) -> bool {
        self.router
            .pool
            .info
            .borrow()
            .empty_since
            .is_some_and(|since| self.router.wait.gate(since) <= Instant::now())
    }

    /// Waits until at least `n` endpoints are in rotation, up to `timeout`.
    ///
    /// Fails at once with [`Error::Refused`] (naming the grant to add) when
    /// etcd refuses this user the service's instances.
    pub async fn wait_for_ready(&self, n: usize, timeout: Duration) -> Result<(), Error> {
        let mut info = self.router.pool.info.subscribe();
        let deadline = deadline_after(Instant::now(), timeout);
        let refused = async {
            let Some(mut etcd) = self.router.pool.etcd.clone() else {
                return std::future::pending().await;
            };
            let refusal = |s: &crate::WatchStatus| s.last_error.as_ref().and_then(|e| e.refusal());
            let found = match etcd.wait_for(|s| refusal(s).is_some()).await {
                Ok(s) => refusal(&s),
                Err(_) => None,
            };
            match found {
                Some(e) => Some(e),
                None => std::future::pending().await,
            }
        };
        let waited = tokio::select! {
            biased;
            w = wait_until(&mut info, deadline, |i| i.ready >= n) => w,
            Some(e) = refused => return Err(e),
        };
        match waited {
            Waited::Ready => Ok(()),
            Waited::Gone => Err(Error::TaskGone("balancer")),
            Waited::TimedOut => Err(Error::NoEndpoints {
                service: self.router.pool.service.clone(),
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
        let (router, cfg, metrics) = (
            self.router.clone(),
            self.calls.clone(),
            self.metrics.clone(),
        );
        Box::pin(call::call(router, cfg, metrics, request))
    }
}

#[cfg(test)]
mod tests;
