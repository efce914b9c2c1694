//! The greeter service from `proto/greeter.proto`: its reply names the server
//! instance that answered, so callers can see where each call went.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

/// Generated protobuf and tonic code.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("greeter.v1");
}

pub use pb::greeter_client::GreeterClient;
pub use pb::greeter_server::GreeterServer;
pub use pb::{HelloReply, HelloRequest};

/// A greeter that answers with its own id, optionally after a delay, or
/// fails every call while its [`FailSwitch`] is set.
#[derive(Debug, Clone)]
pub struct Greeter {
    id: String,
    delay: Duration,
    /// With this probability per call, this much more delay.
    spikes: Option<(f64, Duration)>,
    calls: Arc<AtomicU64>,
    fail: FailSwitch,
    draining: Option<crate::server::Draining>,
    /// Each `SayHello`'s `grpc-previous-rpc-attempts` (0 when absent).
    attempts: Arc<std::sync::Mutex<Vec<u32>>>,
    /// `SayHello` calls cancelled by their client before the reply.
    cancelled: Arc<AtomicU64>,
    /// A limited capacity: the delay is work a worker does.
    workers: Option<Arc<Workers>>,
}

/// A pool of workers that does each call's work (the greeter's delay), and
/// reports the share of its time it spends working as the server's
/// application utilization (ORCA): a backend of known capacity, `workers /
/// delay` calls a second, whose load reports say how close to it it is.
struct Workers {
    permits: tokio::sync::Semaphore,
    n: usize,
    load: crate::server::LoadReporter,
    /// Worker time spent so far, µs.
    busy_us: AtomicU64,
    /// Where the current measuring window began, and `busy_us` then.
    window: std::sync::Mutex<(tokio::time::Instant, u64)>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

impl Workers {
    /// Utilization is measured over windows of at least this, as the
    /// server's calls per second are: over 200 ms windows it was noisy
    /// enough to throw weighted round robin's weights off by 13 %.
    const WINDOW: Duration = Duration::from_secs(1);

    /// Reports the share of worker time spent working since the window
    /// began, once the window is long enough.
    fn report(&self) {
        let now = tokio::time::Instant::now();
        let busy = self.busy_us.load(Ordering::Relaxed);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(w.0);
        if elapsed < Self::WINDOW {
            return;
        }
        let capacity_us = elapsed.as_micros() as f64 * self.n as f64;
        let utilization = busy.saturating_sub(w.1) as f64 / capacity_us;
        // Never 0: weighted round robin reads 0 as "no report".
        self.load
            .set_application_utilization(utilization.max(0.001));
        *w = (now, busy);
    }
}

/// Makes a [`Greeter`] fail calls with a status, or answer again.
#[derive(Debug, Clone, Default)]
pub struct FailSwitch(Arc<FailState>);

#[derive(Debug, Default)]
struct FailState {
    code: AtomicI32,
    /// How many more calls fail; negative: every call.
    times: std::sync::atomic::AtomicI64,
    /// `grpc-retry-pushback-ms` sent with each failure.
    pushback: std::sync::Mutex<Option<String>>,
}

impl FailSwitch {
    /// Fails every call with `code` (`None`: answer normally).
    pub fn set(&self, code: Option<tonic::Code>) {
        self.0.times.store(-1, Ordering::Relaxed);
        self.0
            .code
            .store(code.map_or(0, |c| c as i32), Ordering::Relaxed);
    }

    /// Fails the next `n` calls with `code`, then answers again.
    pub fn fail_next(&self, n: u32, code: tonic::Code) {
        self.0.times.store(i64::from(n), Ordering::Relaxed);
        self.0.code.store(code as i32, Ordering::Relaxed);
    }

    /// Sends `grpc-retry-pushback-ms: value` with every failure.
    pub fn pushback(&self, value: Option<&str>) {
        *self.0.pushback.lock().unwrap_or_else(|p| p.into_inner()) = value.map(str::to_owned);
    }

    fn status(&self) -> Option<Status> {
        let code = self.0.code.load(Ordering::Relaxed);
        if code == 0 {
            return None;
        }
        let left = self.0.times.load(Ordering::Relaxed);
        if left == 0 {
            return None;
        }
        if left > 0 {
            self.0.times.fetch_sub(1, Ordering::Relaxed);
        }
        let mut metadata = tonic::metadata::MetadataMap::new();
        let pushback = self
            .0
            .pushback
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(value) = pushback.and_then(|v| v.parse().ok()) {
            metadata.insert("grpc-retry-pushback-ms", value);
        }
        Some(Status::with_metadata(
            tonic::Code::from(code),
            "failing on purpose",
            metadata,
        ))
    }
}

impl Greeter {
    /// A greeter that names itself `id` in every reply.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            delay: Duration::ZERO,
            spikes: None,
            calls: Arc::default(),
            fail: FailSwitch::default(),
            draining: None,
            attempts: Arc::default(),
            cancelled: Arc::default(),
            workers: None,
        }
    }

    /// Gives it `n` workers: each `SayHello` waits for a free one, which
    /// then does the call's delay as work; the share of worker time spent
    /// working is reported as `load`'s application utilization. Serve it
    /// with [`server::builder_with_load`](crate::server::builder_with_load)`(load)`.
    /// When `load` has [`call_metrics`](crate::server::LoadReporter::call_metrics)
    /// on, each call also reports the work it did as its `request_cost`
    /// `work_ms`.
    #[must_use]
    pub fn with_workers(mut self, n: usize, load: crate::server::LoadReporter) -> Self {
        self.workers = Some(Arc::new(Workers {
            permits: tokio::sync::Semaphore::new(n.max(1)),
            n: n.max(1),
            load,
            busy_us: AtomicU64::new(0),
            window: std::sync::Mutex::new((tokio::time::Instant::now(), 0)),
        }));
        self
    }

    /// `SayHello` calls its clients cancelled (reset) before it replied.
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// For each `SayHello` so far, the `grpc-previous-rpc-attempts` it
    /// carried (0 when absent): how a client's retries reached this server.
    pub fn previous_attempts(&self) -> Vec<u32> {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ends its `Chat` streams with `UNAVAILABLE` once its server begins to
    /// shut down (as a long-lived stream should), instead of holding them
    /// until the drain limit cuts them.
    #[must_use]
    pub fn with_draining(mut self, draining: crate::server::Draining) -> Self {
        self.draining = Some(draining);
        self
    }

    /// The switch that makes this greeter (and its clones) fail.
    pub fn fail_switch(&self) -> FailSwitch {
        self.fail.clone()
    }

    /// Adds `delay` to a random share `probability` of its replies: a
    /// backend no worse than another, whose tail no pick can avoid (a GC
    /// pause, a cold cache).
    #[must_use]
    pub fn with_spikes(mut self, probability: f64, delay: Duration) -> Self {
        self.spikes = Some((probability, delay));
        self
    }

    /// Waits `delay` before every reply (a slow backend).
    #[must_use]
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Calls answered so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The tonic service for a `Router`.
    pub fn into_service(self) -> GreeterServer<Self> {
        GreeterServer::new(self)
    }
}

type ReplyStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<HelloReply, Status>> + Send>>;

#[tonic::async_trait]
impl pb::greeter_server::Greeter for Greeter {
    type SayHelloStreamStream = ReplyStream;
    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        request: Request<tonic::Streaming<HelloRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        use tokio_stream::StreamExt;
        self.calls.fetch_add(1, Ordering::Relaxed);
        let id = self.id.clone();
        let replies = request.into_inner().map(move |r| {
            r.map(|r| HelloReply {
                message: format!("hello {}", r.name),
                server_id: id.clone(),
            })
        });
        let Some(draining) = self.draining.clone() else {
            return Ok(Response::new(Box::pin(replies)));
        };
        // Until shutdown begins; then one UNAVAILABLE, and the end.
        let shutdown = tokio_stream::once(Err(Status::unavailable(
            "server shutting down; reconnect elsewhere",
        )));
        let replies = Until {
            stream: replies,
            stop: Box::pin(async move { draining.started().await }),
            done: false,
        }
        .chain(shutdown);
        Ok(Response::new(Box::pin(replies)))
    }

    async fn say_hello_stream(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let reply = HelloReply {
            message: format!("hello {}", request.into_inner().name),
            server_id: self.id.clone(),
        };
        let mut items = vec![Ok(reply.clone()), Ok(reply)];
        if let Some(status) = self.fail.status() {
            items.push(Err(status));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let previous = request
            .metadata()
            .get("grpc-previous-rpc-attempts")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(previous);
        /// Counts the call as cancelled unless it got to reply.
        struct Unless<'a>(&'a AtomicU64, bool);
        impl Drop for Unless<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let mut cancelled = Unless(&self.cancelled, false);
        let spike = self.spikes.and_then(|(p, d)| {
            use rand::Rng;
            rand::rng().random_bool(p.clamp(0.0, 1.0)).then_some(d)
        });
        let delay = self.delay + spike.unwrap_or_default();
        if let Some(workers) = &self.workers {
            let recorder = crate::server::CallMetricsRecorder::of(&request);
            let _worker = workers
                .permits
                .acquire()
                .await
                .map_err(|_| Status::unavailable("no workers"))?;
            let started = tokio::time::Instant::now();
            tokio::time::sleep(delay).await;
            let worked = started.elapsed();
            workers
                .busy_us
                .fetch_add(worked.as_micros() as u64, Ordering::Relaxed);
            if let Some(recorder) = recorder {
                recorder.set_request_cost("work_ms", worked.as_secs_f64() * 1e3);
            }
            workers.report();
        } else if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        cancelled.1 = true;
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(status) = self.fail.status() {
            return Err(status);
        }
        Ok(Response::new(HelloReply {
            message: format!("hello {}", request.into_inner().name),
            server_id: self.id.clone(),
        }))
    }
}

/// Serves a greeter on `addr` (bound and advertised), registered with
/// `registration`, until `shutdown` resolves. The greeter names itself by
/// its address. Used by the examples and the demo's server processes.
pub async fn serve_registered(
    registration: crate::RegistrationBuilder,
    addr: &str,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), crate::Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let router = crate::server::builder().add_service(Greeter::new(addr).into_service());
    crate::server::RegisteredServer::new(registration.addr(addr))
        .serve_with_shutdown(router, listener, shutdown)
        .await
}

/// A stream that ends when `stop` resolves.
struct Until<S> {
    stream: S,
    stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    done: bool,
}

impl<S: tokio_stream::Stream + Unpin> tokio_stream::Stream for Until<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        if self.done || self.stop.as_mut().poll(cx).is_ready() {
            self.done = true;
            return std::task::Poll::Ready(None);
        }
        std::pin::Pin::new(&mut self.stream).poll_next(cx)
    }
}
