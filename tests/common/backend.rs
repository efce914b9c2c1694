//! A greeter server on a runtime of its own, for tests that need a backend
//! to die alone (shutting its runtime down closes every socket at once, as a
//! SIGKILL would, while its etcd key stays registered), fail on purpose, or
//! report its health.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;

use tonic_etcd::testing::greeter::{FailSwitch, Greeter};

/// What `server::builder().add_service(..)` returns.
pub type Routed = tonic::transport::server::Router<
    tower::layer::util::Stack<
        tonic_etcd::server::DeadlineLayer,
        tower::layer::util::Stack<tonic_etcd::server::LoadLayer, tower::layer::util::Identity>,
    >,
>;

/// A greeter on a runtime of its own (so it can die alone, as with SIGKILL),
/// optionally serving tonic-health too.
pub struct Backend {
    pub addr: String,
    pub fail: FailSwitch,
    pub health: Option<tonic_health::server::HealthReporter>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Backend {
    pub fn start_on(addr: &str, id: &str, with_health: bool) -> Self {
        Self::start_with(addr, Greeter::new(id), with_health)
    }

    pub fn start_with(addr: &str, greeter: Greeter, with_health: bool) -> Self {
        let fail = greeter.fail_switch();
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let mut router = tonic_etcd::server::builder().add_service(greeter.into_service());
        if with_health {
            router = router.add_service(health_service);
        }
        let mut backend = Self::serve(addr, router);
        backend.fail = fail;
        backend.health = with_health.then_some(reporter);
        backend
    }

    /// Serves `router` (any services, built on `server::builder`) on `addr`.
    pub fn serve(addr: &str, router: Routed) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = std::net::TcpListener::bind(addr).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let incoming = tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(move |conn| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    conn
                });
            router.serve_with_incoming(incoming).await
        });
        Self {
            addr,
            fail: FailSwitch::default(),
            health: None,
            accepted,
            rt: Some(rt),
        }
    }

    /// Connections this backend has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn start(id: &str) -> Self {
        Self::start_on("127.0.0.1:0", id, false)
    }

    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Backend {
    /// A greeter named `id` that waits `delay` before every reply.
    pub fn start_slow(addr: &str, id: &str, delay: Duration) -> Self {
        Self::start_with(addr, Greeter::new(id).with_delay(delay), false)
    }
}
