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
//! 3. when the shutdown signal fires, the instance is **deregistered first**,
//!    the server keeps answering for a short grace period while clients see
//!    the removal, then stops accepting and lets in-flight RPCs finish.
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
//! ```no_run
//! # async fn run(router: tonic::transport::server::Router) -> Result<(), tonic_etcd::Error> {
//! use tonic_etcd::{Registration, server::RegisteredServer};
//!
//! let client = etcd_client::Client::connect(["127.0.0.1:2379"], Some(tonic_etcd::connect_options()))
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

const DEFAULT_GRACE: Duration = Duration::from_secs(1);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves a tonic router with registration. See the [module docs](self).
#[derive(Debug)]
#[must_use = "a RegisteredServer does nothing until `serve_with_shutdown` is awaited"]
pub struct RegisteredServer {
    registration: RegistrationBuilder,
    grace: Duration,
    drain_timeout: Duration,
    health: Health,
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
        }
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

    /// The longest wait for in-flight RPCs after the server stops accepting
    /// (default 30 s); the call returns when it passes.
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
        if !registration.has_addr() {
            let local = listener.local_addr()?;
            registration = registration.addr(local.to_string());
        }
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
        let server = router.serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = stop_rx.await;
            },
        );
        tokio::pin!(server);

        // The listener is bound and the server polled: it accepts before we
        // announce it. A shutdown signal is honoured at any point of start-up:
        // an abandoned registration attempt revokes its own lease.
        tokio::pin!(signal);
        let registered = tokio::select! {
            r = registration.register() => r,
            () = &mut signal => {
                tracing::info!("shutdown during start-up; not registered");
                let _ = stop_tx.send(());
                let _ = tokio::time::timeout(self.drain_timeout, &mut server).await;
                return Ok(());
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
                let _ = stop_tx.send(());
                let _ = tokio::time::timeout(self.drain_timeout, &mut server).await;
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

        // Health-checking clients stop first, then etcd's removal follows,
        // while still serving.
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
        let _ = stop_tx.send(());
        match tokio::time::timeout(self.drain_timeout, &mut server).await {
            Ok(r) => r?,
            Err(_) => {
                tracing::warn!(timeout = ?self.drain_timeout, "in-flight RPCs did not finish in time")
            }
        }
        Ok(())
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what Kubernetes and systemd send):
/// the signal a server waits for before it shuts down gracefully.
///
/// ```no_run
/// # async fn run(router: tonic::transport::server::Router, reg: tonic_etcd::RegistrationBuilder, l: tokio::net::TcpListener) -> Result<(), tonic_etcd::Error> {
/// use tonic_etcd::server::{shutdown_signal, RegisteredServer};
/// RegisteredServer::new(reg).serve_with_shutdown(router, l, shutdown_signal()).await
/// # }
/// ```
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
