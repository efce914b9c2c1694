//! This crate's own balanced channel: load-aware, failure-aware, never hangs.
//!
//! [`Balancer`] is a `Clone` service that tonic-generated clients take
//! directly (`GreeterClient::new(balancer)`). It is fed by the etcd
//! [`Discover`] and differs from tonic's balanced channel in what production
//! needs:
//!
//! * **Load-aware**: power of two choices over peak-EWMA latency × calls in
//!   flight, so a slow backend gets few calls (tonic compares a load that is
//!   always zero, i.e. picks at random).
//! * **Failure-aware**: every endpoint owns one HTTP/2 connection; when it
//!   fails, is refused or is closed (a killed server), the endpoint leaves the
//!   rotation at once and is reconnected in the background with back-off.
//!   etcd stays the source of truth: the endpoint is not forgotten.
//! * **No lost calls for a dead backend**: a call that was not sent (the
//!   connection closed before the request left) is retried once on another
//!   endpoint. A call that may have reached a server is never retried.
//! * **Never hangs**: with no endpoint in rotation a call waits at most
//!   [`no_endpoint_timeout`](BalancerBuilder::no_endpoint_timeout) (default
//!   3 s) and then fails with `Unavailable`, naming the service and saying
//!   whether no instance is registered or none is reachable.
//! * **Applied without traffic**: a background task applies every discovery
//!   change as it arrives; a removed endpoint's connection closes once the
//!   calls on it finish.
//! * **Metadata-aware**: [`filter`](BalancerBuilder::filter) sees each
//!   instance's address and metadata (e.g. only `version=v2`).
//! * **No buffer task**: a call picks its endpoint in the caller's task and
//!   goes straight to that endpoint's connection.
//!
//! Endpoints are dialed over plaintext HTTP/2; for TLS to backends use
//! [`ChannelBuilder`](crate::ChannelBuilder) (tonic's balancer).

mod endpoint;
mod pool;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::Client;
use futures_core::Stream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::discover::Change;
use tower::Service;

use crate::discovery::{Discover, DiscoverBuilder};
use crate::schema::Schema;
use crate::{Error, Instance};
use endpoint::ConnConfig;
use pool::{Filter, PoolConfig, PoolInfo, Shared};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Options for a [`Balancer`]. Created by [`Balancer::builder`].
pub struct BalancerBuilder {
    discover: DiscoverBuilder,
    service: String,
    conn: ConnConfig,
    filter: Option<Filter>,
    no_endpoint_timeout: Duration,
    request_timeout: Option<Duration>,
    backoff_max: Duration,
}

impl fmt::Debug for BalancerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancerBuilder")
            .field("service", &self.service)
            .field("conn", &self.conn)
            .field("filter", &self.filter.is_some())
            .field("no_endpoint_timeout", &self.no_endpoint_timeout)
            .field("request_timeout", &self.request_timeout)
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

    /// The layout, shared with other users.
    #[must_use]
    pub fn schema_arc(mut self, schema: Arc<dyn Schema>) -> Self {
        self.discover = self.discover.schema_arc(schema);
        self
    }

    /// Only instances for which `filter` returns true receive calls, e.g.
    /// `|i| i.metadata.get("version").as_deref() == Some("v2")`.
    #[must_use]
    pub fn filter(mut self, filter: impl Fn(&Instance) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Some(Arc::new(filter));
        self
    }

    /// The longest a call waits for an endpoint in rotation before failing
    /// with `Unavailable` (default 3 s).
    #[must_use]
    pub fn no_endpoint_timeout(mut self, timeout: Duration) -> Self {
        self.no_endpoint_timeout = timeout;
        self
    }

    /// A limit on each call until its response headers arrive (default none;
    /// the call's own gRPC deadline applies at the server).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// The limit on connecting to an endpoint (default 1 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.conn.connect_timeout = timeout;
        self
    }

    /// HTTP/2 keep-alive: a ping every `interval`, the connection dead when
    /// no answer comes within `timeout` (default 10 s / 5 s). This is what
    /// notices a backend that vanished without closing its connections.
    #[must_use]
    pub fn http2_keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.conn.keep_alive_interval = interval;
        self.conn.keep_alive_timeout = timeout;
        self
    }

    /// The longest pause between reconnection attempts (default 5 s).
    #[must_use]
    pub fn reconnect_backoff_max(mut self, max: Duration) -> Self {
        self.backoff_max = max;
        self
    }

    /// The limit on each etcd request of the discovery (default 5 s).
    #[must_use]
    pub fn etcd_request_timeout(mut self, timeout: Duration) -> Self {
        self.discover = self.discover.request_timeout(timeout);
        self
    }

    fn check(&self) -> Result<(), Error> {
        for (name, d) in [
            ("connect_timeout", self.conn.connect_timeout),
            ("no_endpoint_timeout", self.no_endpoint_timeout),
            ("keep-alive interval", self.conn.keep_alive_interval),
            ("keep-alive timeout", self.conn.keep_alive_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::InvalidConfig(format!("{name} must be above zero")));
            }
        }
        Ok(())
    }

    /// Starts discovery and the balancer. Needs a tokio runtime.
    pub fn build(self) -> Result<Balancer, Error> {
        self.check()?;
        let discover = self.discover.clone().build()?;
        self.discover_into(discover)
    }

    /// Builds the balancer over any discovery stream of instances instead of
    /// etcd's (keys identify instances; an Insert of a known key replaces it).
    pub fn build_with<D, E>(self, discover: D) -> Result<Balancer, Error>
    where
        D: Stream<Item = Result<Change<String, Instance>, E>> + Unpin + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        self.check()?;
        self.discover_into(discover)
    }

    fn discover_into<D, E>(self, discover: D) -> Result<Balancer, Error>
    where
        D: Stream<Item = Result<Change<String, Instance>, E>> + Unpin + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let shared = Arc::new(Shared::new(self.service));
        let cfg = Arc::new(PoolConfig {
            conn: self.conn,
            filter: self.filter.unwrap_or_else(|| Arc::new(|_: &Instance| true)),
            backoff_base: Duration::from_millis(50),
            backoff_max: self.backoff_max,
        });
        let task = tokio::spawn(pool::run(discover, shared.clone(), cfg));
        Ok(Balancer {
            shared,
            no_endpoint_timeout: self.no_endpoint_timeout,
            request_timeout: self.request_timeout,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }
}

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
    no_endpoint_timeout: Duration,
    request_timeout: Option<Duration>,
    _task: Arc<AbortOnDrop>,
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
                // Short enough that a backend that was slow once is probed
                // again within seconds.
                decay: Duration::from_secs(2),
                default_rtt: Duration::from_millis(1),
            },
            filter: None,
            no_endpoint_timeout: Duration::from_secs(3),
            request_timeout: None,
            backoff_max: Duration::from_secs(5),
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
            .map(|e| (*e.instance).clone())
            .collect()
    }

    /// Waits until at least `n` endpoints are in rotation, up to `timeout`.
    pub async fn wait_for_ready(&self, n: usize, timeout: Duration) -> Result<(), Error> {
        let mut info = self.shared.info.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            info.wait_for(|i| i.ready >= n).await.map(|_| ())
        })
        .await;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::TaskGone("balancer")),
            Err(_) => Err(Error::NoEndpoints {
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
        Box::pin(dispatch(
            self.shared.clone(),
            self.no_endpoint_timeout,
            self.request_timeout,
            request,
        ))
    }
}

/// Two random endpoints, the less loaded one.
fn pick(set: &[Arc<endpoint::Ready>]) -> Option<Arc<endpoint::Ready>> {
    use rand::Rng;
    match set.len() {
        0 => None,
        1 => Some(set[0].clone()),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (x, y) = (&set[a], &set[b]);
            Some(if x.load() <= y.load() { x } else { y }.clone())
        }
    }
}

async fn dispatch(
    shared: Arc<Shared>,
    wait: Duration,
    request_timeout: Option<Duration>,
    mut request: http::Request<tonic::body::Body>,
) -> Result<http::Response<tonic::body::Body>, BoxError> {
    let deadline = Instant::now() + wait;
    // After a request could not be sent, the endpoint it failed on, until its
    // connector has taken it out of rotation.
    let mut failed_on: Option<Arc<endpoint::Ready>> = None;
    loop {
        let ready = shared.ready();
        let picked = match &failed_on {
            None => pick(&ready),
            Some(bad) => pick(
                &ready
                    .iter()
                    .filter(|e| !Arc::ptr_eq(e, bad))
                    .cloned()
                    .collect::<Vec<_>>(),
            ),
        };
        let Some(ep) = picked else {
            if let Some(bad) = &failed_on {
                let listed = |set: &[Arc<endpoint::Ready>]| set.iter().any(|e| Arc::ptr_eq(e, bad));
                if listed(&ready) {
                    // Only the endpoint that just failed is left: wait for
                    // its connector to act instead of spinning. Subscribe
                    // first, then look again, so no change is missed.
                    let mut info = shared.info.subscribe();
                    if listed(&shared.ready())
                        && tokio::time::timeout_at(deadline, info.changed())
                            .await
                            .is_err()
                    {
                        return Err(Box::new(tonic::Status::unavailable(format!(
                            "no endpoint of service {:?} could take the call: the connection to {} \
                             closed before the request was sent",
                            shared.service, bad.instance.addr
                        ))));
                    }
                    continue;
                }
            }
            wait_for_endpoint(&shared, deadline, wait).await?;
            continue;
        };
        *request.uri_mut() = ep.uri(request.uri())?;
        let in_flight = ep.start();
        let send = ep.sender().try_send_request(request);
        let result = match request_timeout {
            Some(t) => match tokio::time::timeout(t, send).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Box::new(tonic::Status::deadline_exceeded(format!(
                        "no response from {} within {t:?}",
                        ep.instance.addr
                    ))))
                }
            },
            None => send.await,
        };
        match result {
            Ok(response) => {
                in_flight.responded();
                return Ok(response.map(tonic::body::Body::new));
            }
            Err(mut e) => {
                drop(in_flight);
                let unsent = e.take_message();
                let error = e.into_error();
                if error.is_closed() || unsent.is_some() {
                    // The connector takes it out of rotation and reconnects.
                    ep.closed.notify_one();
                }
                match unsent {
                    // Never left this process: safe to send elsewhere, once.
                    Some(r) if failed_on.is_none() => {
                        tracing::debug!(addr = %ep.instance.addr, %error,
                            "request not sent; retrying on another endpoint");
                        failed_on = Some(ep);
                        request = r;
                    }
                    _ => return Err(Box::new(error)),
                }
            }
        }
    }
}

/// Waits for an endpoint to join the rotation, or fails with `Unavailable`
/// saying why there is none.
async fn wait_for_endpoint(
    shared: &Shared,
    deadline: Instant,
    wait: Duration,
) -> Result<(), BoxError> {
    let mut info = shared.info.subscribe();
    let ready = tokio::time::timeout_at(deadline, async {
        info.wait_for(|i| i.ready > 0).await.map(|_| ())
    })
    .await;
    if let Ok(Ok(())) = ready {
        return Ok(());
    }
    let PoolInfo {
        registered,
        filtered_out,
        last_error,
        ..
    } = shared.info.borrow().clone();
    let service = &shared.service;
    let message = match (registered, filtered_out) {
        (0, 0) => format!("no instance of service {service:?} is registered in etcd (waited {wait:?})"),
        (0, n) => format!(
            "{n} instance(s) of service {service:?} are registered but none passes the filter (waited {wait:?})"
        ),
        (n, _) => format!(
            "{n} instance(s) of service {service:?} are registered but none is reachable (waited {wait:?}; last error: {})",
            last_error.as_deref().unwrap_or("none yet")
        ),
    };
    Err(Box::new(tonic::Status::unavailable(message)))
}
