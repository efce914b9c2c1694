//! Serve a tonic `Router` and keep it registered for exactly as long as it
//! can answer.
//!
//! [`RegisteredServer::serve_with_shutdown`] is the one call:
//!
//! 1. the listener is bound (by the caller) and the server starts accepting;
//! 2. only then is the instance registered. An unreachable etcd is retried
//!    with back-off until the registration's start-up deadline (30 s by
//!    default), then the call fails with [`Error::StartupDeadline`] carrying
//!    the last etcd error. Meanwhile the server answers calls from clients
//!    that already know its address but is in no client's view; the first
//!    failure is logged at error level ("etcd unreachable at start-up"), the
//!    health service says `NOT_SERVING`, and a shutdown signal ends it at
//!    once;
//! 3. when the shutdown signal fires, handlers are told
//!    ([`RegisteredServer::draining`]), the instance is **deregistered
//!    first**, the server keeps answering for a short grace period while
//!    clients see the removal, then stops accepting and lets in-flight RPCs
//!    finish, saying what it waits for. At the drain limit
//!    ([`drain_timeout`](RegisteredServer::drain_timeout), default 30 s)
//!    connections still open are cut, streams and all, and the call returns:
//!    one open watch cannot hold a deploy for ever. The load reports'
//!    out-of-band streams ([`LoadLayer`]) end by themselves with the
//!    server's last call.
//!
//! The server also answers the standard health service (`grpc.health.v1`,
//! tonic-health): `SERVING` for the whole server (`""`) and each registered
//! service once it is registered, `NOT_SERVING` before that and from the
//! moment shutdown begins, so clients that health-check (the
//! [`Balancer`](crate::Balancer) with `health_check`, grpc-go with A17) stop
//! sending before etcd's removal even reaches them. If the router already
//! serves tonic-health, hand its reporter to
//! [`health_reporter`](RegisteredServer::health_reporter) instead.
//!
//! Build the router on [`builder`]: its HTTP/2 limits keep connections
//! alive through storms of cancelled calls, and it answers an expired
//! deadline with `DEADLINE_EXCEEDED` ([`DeadlineLayer`]).
//!
//! ```no_run
//! # async fn run(router: tonic::transport::server::Router<tower::layer::util::Stack<tonic_etcd::server::DeadlineLayer, tower::layer::util::Identity>>) -> Result<(), tonic_etcd::Error> {
//! use tonic_etcd::{Registration, server::RegisteredServer};
//!
//! let client = tonic_etcd::connect(["127.0.0.1:2379"], Some(tonic_etcd::connect_options()))
//!     .await
//!     .map_err(|e| tonic_etcd::Error::Etcd { op: "connect", source: e })?;
//! let listener = tokio::net::TcpListener::bind("10.0.0.1:50051").await?;
//! let registration = Registration::builder(client).service("greeter.v1.Greeter");
//! RegisteredServer::new(registration)
//!     .serve_with_shutdown(router, listener, async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::{Router, TcpIncoming};
use tower::{Layer, Service};

use crate::registration::RegistrationBuilder;
use crate::Error;

mod deadline;
mod drain;
mod load;

pub use deadline::{Deadline, DeadlineFuture, DeadlineLayer};
use drain::Connections;
pub use drain::Draining;
pub use load::{
    CallMetricsRecorder, Load, LoadFuture, LoadLayer, LoadReporter, MIN_REPORT_INTERVAL,
};

/// While draining, how often the server says what it still waits for.
const DRAIN_REPORT: Duration = Duration::from_secs(5);
/// After the cut, how long the cut connections may take to close.
const AFTER_CUT: Duration = Duration::from_secs(1);

const DEFAULT_GRACE: Duration = Duration::from_secs(1);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Reset streams a server lets wait for its accept loop before it closes
/// the connection (hyper's default: 20).
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 4_096;

/// What [`builder`] returns: tonic's server builder with [`LoadLayer`]
/// outside [`DeadlineLayer`].
pub type ServerBuilder = tonic::transport::Server<
    tower::layer::util::Stack<
        DeadlineLayer,
        tower::layer::util::Stack<LoadLayer, tower::layer::util::Identity>,
    >,
>;

/// A tonic server builder with the HTTP/2 settings this crate's clients
/// need; build the router on it (`server::builder().add_service(..)`).
///
/// A client resets the stream of every call that ends early: at its
/// deadline, when the caller drops it, when a hedge loses. hyper's server
/// counts the streams reset before its accept loop picked them up and
/// closes the whole connection past 20 of them (`GOAWAY ENHANCE_YOUR_CALM
/// "too_many_resets"`, its guard against the HTTP/2 rapid-reset attack):
/// on a busy server, a storm of calls expiring at their deadline then
/// costs every other call on the connection too (measured: 6,000 calls
/// with a 5 ms deadline against a 20 ms backend lost the connection within
/// a second). This raises the limit to
/// [`MAX_PENDING_ACCEPT_RESET_STREAMS`]: the memory a pending reset stream
/// holds is small, and the peers are the clients of one's own fleet. It
/// also sets `TCP_NODELAY`, without which a new connection's first call
/// waits about 40 ms, answers calls whose deadline passed with
/// `DEADLINE_EXCEEDED` as grpc-go's server does, where tonic's says
/// `CANCELLED` ([`DeadlineLayer`]), and reports the server's load the gRPC
/// way (ORCA: a trailer on every response and an out-of-band stream,
/// [`LoadLayer`]); [`builder_with_load`] reports into a [`LoadReporter`]
/// the application keeps, to add metrics of its own.
pub fn builder() -> ServerBuilder {
    builder_with_load(LoadReporter::new())
}

/// [`builder`], reporting into `load`.
pub fn builder_with_load(load: LoadReporter) -> ServerBuilder {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .layer(LoadLayer::new(load))
        .layer(DeadlineLayer)
}

/// Serves a tonic router with registration. See the [module docs](self).
#[derive(Debug)]
#[must_use = "a RegisteredServer does nothing until `serve_with_shutdown` is awaited"]
pub struct RegisteredServer {
    registration: RegistrationBuilder,
    grace: Duration,
    drain_timeout: Duration,
    health: Health,
    draining: Draining,
}

/// Who serves `grpc.health.v1.Health`.
enum Health {
    /// This server adds tonic-health's service to the router.
    Own,
    /// The router already serves it; statuses go through this reporter.
    Reporter(tonic_health::server::HealthReporter),
    /// Not at all.
    Off,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Own => "Own",
            Health::Reporter(_) => "Reporter",
            Health::Off => "Off",
        })
    }
}

impl RegisteredServer {
    /// Serves with `registration`. Its address defaults to the listener's
    /// local address, unless that is unspecified (`0.0.0.0`, `[::]`): then set
    /// [`RegistrationBuilder::addr`] to the address clients dial.
    pub fn new(registration: RegistrationBuilder) -> Self {
        Self {
            registration,
            grace: DEFAULT_GRACE,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            health: Health::Own,
            draining: Draining::default(),
        }
    }

    /// The notice handlers select on to learn that shutdown began (see
    /// [`Draining`]): give a clone to each service before serving. It fires
    /// when the shutdown signal does, before deregistration.
    pub fn draining(&self) -> Draining {
        self.draining.clone()
    }

    /// Reports through `reporter` instead of adding a health service: for a
    /// router that already serves tonic-health (adding a second one would
    /// clash).
    pub fn health_reporter(mut self, reporter: tonic_health::server::HealthReporter) -> Self {
        self.health = Health::Reporter(reporter);
        self
    }

    /// Serves no health service and reports nothing.
    pub fn without_health_service(mut self) -> Self {
        self.health = Health::Off;
        self
    }

    /// How long the server keeps accepting new calls after deregistering,
    /// so that clients see the removal before connections close (default
    /// 1 s; the same idea as a Kubernetes preStop delay).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = crate::time::cap(grace);
        self
    }

    /// The drain limit: the longest wait for in-flight RPCs after the server
    /// stops accepting (default 30 s). Connections still open then are cut
    /// (their streams fail on the client with `UNAVAILABLE`) and the call
    /// returns.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = crate::time::cap(timeout);
        self
    }

    /// Serves `router` on `listener` until `signal` resolves, registered in
    /// etcd while it serves. Returns after deregistration and draining; an
    /// error when the configuration is invalid, the registration could not be
    /// made within its start-up deadline, or the server failed.
    pub async fn serve_with_shutdown<L, ResBody, F>(
        self,
        router: Router<L>,
        listener: TcpListener,
        signal: F,
    ) -> Result<(), Error>
    where
        L: Layer<tonic::service::Routes>,
        L::Service: Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>
            + Clone
            + Send
            + 'static,
        <L::Service as Service<http::Request<tonic::body::Body>>>::Future: Send,
        <L::Service as Service<http::Request<tonic::body::Body>>>::Error:
            Into<Box<dyn std::error::Error + Send + Sync>> + Send,
        ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        F: Future<Output = ()>,
    {
        let mut registration = self.registration;
        let local = listener.local_addr()?;
        if !registration.has_addr() {
            registration = registration.addr(local.to_string());
        }
        // Layers inside the router (the load reports' out-of-band stream)
        // find this server's draining notice by its address.
        let _listed = self.draining.list(local);
        // Configuration errors surface before anything is served.
        registration.encode()?;

        let (router, reporter) = match self.health {
            Health::Own => {
                let (reporter, service) = tonic_health::server::health_reporter();
                (router.add_service(service), Some(reporter))
            }
            Health::Reporter(reporter) => (router, Some(reporter)),
            Health::Off => (router, None),
        };
        let mut names: Vec<String> = registration.service_names().to_vec();
        names.push(String::new());
        let report = |status| {
            let reporter = reporter.clone();
            let names = names.clone();
            async move {
                if let Some(reporter) = reporter {
                    for name in names {
                        reporter.set_service_status(name, status).await;
                    }
                }
            }
        };
        use tonic_health::ServingStatus;
        report(ServingStatus::NotServing).await;

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let connections = Connections::default();
        let incoming = {
            use tokio_stream::StreamExt;
            let connections = connections.clone();
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(move |accepted| accepted.map(|io| connections.track(io)))
        };
        let server = router.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
        tokio::pin!(server);
        let drain = |server, stop: tokio::sync::oneshot::Sender<()>| {
            self.draining.start();
            let _ = stop.send(());
            drain(server, &connections, self.drain_timeout)
        };

        // The listener is bound and the server polled: it accepts before we
        // announce it. A shutdown signal is honoured at any point of start-up:
        // an abandoned registration attempt revokes its own lease.
        tokio::pin!(signal);
        let registered = tokio::select! {
            r = registration.register() => r,
            () = &mut signal => {
                tracing::info!("shutdown during start-up; not registered");
                return drain(server.as_mut(), stop_tx).await;
            }
            r = &mut server => {
                r?;
                // It cannot end cleanly before its shutdown signal.
                return Err(Error::TaskGone("gRPC server (stopped before it was registered)"));
            }
        };
        let registered = match registered {
            Ok(r) => r,
            Err(e) => {
                let _ = drain(server.as_mut(), stop_tx).await;
                return Err(e);
            }
        };

        report(ServingStatus::Serving).await;

        tokio::select! {
            () = &mut signal => {}
            r = &mut server => {
                // The server failed on its own: deregister, report.
                let _ = registered.deregister().await;
                r?;
                return Ok(());
            }
        }

        // Handlers and health-checking clients learn first, then etcd's
        // removal follows, while still serving.
        self.draining.start();
        tracing::info!(grace = ?self.grace, drain_limit = ?self.drain_timeout,
            "shutting down: deregistering; new calls accepted for the grace period, \
             then calls in flight get up to the drain limit");
        report(ServingStatus::NotServing).await;
        let deregistered = tokio::select! {
            r = registered.deregister() => r,
            r = &mut server => { r?; return Ok(()); }
        };
        if let Err(e) = &deregistered {
            tracing::warn!(error = %e, "deregistration failed; the keys expire with the lease");
        }
        tokio::select! {
            () = tokio::time::sleep(self.grace) => {}
            r = &mut server => { r?; return Ok(()); }
        }
        drain(server.as_mut(), stop_tx).await
    }
}

/// The server has stopped accepting (GOAWAY sent on every connection):
/// waits for its connections to close, saying how many are still open, and
/// cuts those left at `limit`.
async fn drain<F>(
    mut server: std::pin::Pin<&mut F>,
    connections: &Connections,
    limit: Duration,
) -> Result<(), Error>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    let deadline = crate::time::deadline_after(tokio::time::Instant::now(), limit);
    let mut reported = false;
    loop {
        let open = connections.open();
        if open > 0 {
            tracing::info!(connections = open, drain_limit = ?limit,
                "draining: waiting for connections with calls in flight");
            reported = true;
        }
        let next = crate::time::deadline_after(tokio::time::Instant::now(), DRAIN_REPORT);
        tokio::select! {
            r = server.as_mut() => {
                if reported {
                    tracing::info!("drained: every connection closed");
                }
                return Ok(r?);
            }
            () = tokio::time::sleep_until(next.min(deadline)) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    tracing::warn!(connections = connections.open(), drain_limit = ?limit,
        "drain limit passed: cutting the connections still open and their streams");
    connections.cut();
    match tokio::time::timeout(AFTER_CUT, server).await {
        Ok(r) => Ok(r?),
        Err(_) => {
            tracing::warn!(
                connections = connections.open(),
                "connections still open after the cut"
            );
            Ok(())
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what Kubernetes and systemd send):
/// the signal a server waits for before it shuts down gracefully.
///
/// The handlers are installed when this is called, not when the future is
/// first polled: a signal that arrives in between (while a registration is
/// still being written, say) is not lost, nor does it kill the process with
/// the default action. Needs a tokio runtime.
///
/// ```no_run
/// # async fn run(router: tonic::transport::server::Router, reg: tonic_etcd::RegistrationBuilder, l: tokio::net::TcpListener) -> Result<(), tonic_etcd::Error> {
/// use tonic_etcd::server::{shutdown_signal, RegisteredServer};
/// RegisteredServer::new(reg).serve_with_shutdown(router, l, shutdown_signal()).await
/// # }
/// ```
pub fn shutdown_signal() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
