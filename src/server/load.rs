//! The server's load, reported the gRPC way (ORCA, gRFC A51): in a trailer
//! of every response and on an out-of-band stream (see [`crate::orca`]).
//!
//! [`LoadLayer`] counts the calls in flight (in total and per method), the
//! calls answered and failed per second, and the process's CPU use, and
//! adds the report to each response's trailers as
//! `endpoint-load-metrics-bin`; it also answers
//! `xds.service.orca.v3.OpenRcaService/StreamCoreMetrics` itself, so every
//! server built on [`builder`](super::builder) serves both with nothing
//! else to add. The application adds its own metrics through the
//! [`LoadReporter`] it built the server with, and each call's own (what
//! it cost) through a [`CallMetricsRecorder`] when the reporter offers one.
//!
//! Cheap per call, and nothing runs while the server is idle: rates and CPU
//! are worked out when a report is made (at most every 100 ms for the
//! trailer, which is shared by the calls in between), never on a timer.
//! The health service and the ORCA stream itself are not counted: a
//! health-checking client or an operator's `drain --wait` would otherwise
//! keep "calls in flight" above zero for ever.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::orca::{
    OrcaLoadReport, OrcaLoadReportRequest, IN_FLIGHT, IN_FLIGHT_METHOD, LOAD_HEADER, OOB_PATH,
};

/// How long a per-call report is shared by the calls that end after it.
const SHARED_FOR: Duration = Duration::from_millis(100);
/// The shortest window rates and CPU are measured over.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// The shortest interval between out-of-band reports (grpc-go's server
/// default is 30 s; `drain --wait` needs about one a second).
pub const MIN_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Out-of-band reports when the client asks for no interval.
const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);

const LOAD: HeaderName = HeaderName::from_static(LOAD_HEADER);
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Paths whose calls are not load: health checks and the ORCA stream.
fn counted(path: &str) -> bool {
    !path.starts_with("/grpc.health.v1.Health/") && path != OOB_PATH
}

/// The load one server reports, and the handle through which the
/// application adds its own metrics (gRPC's `ServerMetricsRecorder`).
/// Cheap to clone; every clone reports into the same server's reports.
///
/// ```
/// let load = tonic_etcd::server::LoadReporter::new();
/// let router = tonic_etcd::server::builder_with_load(load.clone());
/// // ... add services; later, from anywhere in the application:
/// load.set_application_utilization(0.42);
/// load.set_named_metric("queue_depth", 17.0);
/// # drop(router);
/// ```
#[derive(Clone, Default)]
pub struct LoadReporter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LoadReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadReporter")
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

struct Shared {
    in_flight: AtomicU64,
    /// Told each time the last call in flight ends: the out-of-band
    /// streams report it at once (`drain --wait` returns then, not at the
    /// next interval).
    idle: tokio::sync::watch::Sender<()>,
    /// Whether each response carries the report (the out-of-band stream
    /// is served either way).
    per_call: std::sync::atomic::AtomicBool,
    /// Whether each call gets a [`CallMetricsRecorder`] (opt-in: it costs
    /// an allocation per call).
    call_metrics: std::sync::atomic::AtomicBool,
    answered: AtomicU64,
    failed: AtomicU64,
    /// Calls in flight per method path (entries stay once seen: a server
    /// has a fixed set of methods). A call finds its method's counter under
    /// the read lock, by comparing paths (a handful, no hashing), and ends
    /// with one atomic decrement.
    methods: std::sync::RwLock<Vec<Arc<Method>>>,
    app: Mutex<AppMetrics>,
    window: Mutex<Window>,
    /// The trailer value shared by calls ending within [`SHARED_FOR`].
    shared_header: Mutex<Option<(Instant, HeaderValue)>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            idle: tokio::sync::watch::Sender::new(()),
            per_call: std::sync::atomic::AtomicBool::new(true),
            call_metrics: std::sync::atomic::AtomicBool::new(false),
            answered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            methods: std::sync::RwLock::default(),
            app: Mutex::default(),
            window: Mutex::default(),
            shared_header: Mutex::default(),
        }
    }
}

#[derive(Default)]
struct AppMetrics {
    application_utilization: f64,
    utilization: std::collections::BTreeMap<String, f64>,
    named: std::collections::BTreeMap<String, f64>,
}

/// Rates and CPU over the last window of at least [`RATE_WINDOW`].
#[derive(Default)]
struct Window {
    started: Option<(Instant, u64, u64, Option<Duration>)>,
    rps: f64,
    eps: f64,
    cpu: f64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LoadReporter {
    /// A reporter with nothing counted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether each response carries the report in its trailers (default
    /// true). The trailer costs the server about 4 % more instructions per
    /// call and each client about 2 % (decoding one more header); without
    /// it, clients learn the load from the out-of-band stream only
    /// (`weighted_round_robin` with `enableOobLoadReport`, `drain --wait`,
    /// the console).
    #[must_use]
    pub fn per_call_reports(self, enabled: bool) -> Self {
        self.shared.per_call.store(enabled, Ordering::Relaxed);
        self
    }

    /// Whether handlers can record each call's own metrics (default
    /// false): each call then carries a [`CallMetricsRecorder`] in its
    /// request's extensions, and what the handler records goes into that
    /// call's trailer beside the server's load (gRPC's per-call
    /// `CallMetricsRecorder`, A51). Off by default because it costs an
    /// allocation per call, and it needs [`per_call_reports`](Self::per_call_reports)
    /// on (the default), since the trailer is where per-call metrics go.
    #[must_use]
    pub fn call_metrics(self, enabled: bool) -> Self {
        self.shared.call_metrics.store(enabled, Ordering::Relaxed);
        self
    }

    /// The trailer for a call ending now, unless per-call reports are off:
    /// the shared report, or one of its own when its handler recorded
    /// metrics.
    fn trailer(&self, recorded: Option<&CallMetricsRecorder>) -> Option<HeaderValue> {
        if !self.shared.per_call.load(Ordering::Relaxed) {
            return None;
        }
        let recorded = recorded.map(|r| std::mem::take(&mut *lock(&r.0)));
        match recorded {
            Some(m) if !m.is_empty() => {
                let mut report = self.report(false);
                m.merge_into(&mut report);
                Some(report.to_header())
            }
            _ => Some(self.header()),
        }
    }

    /// The calls in flight now (health checks and ORCA streams not counted).
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// The application's utilization (0 to 1, more when past a soft limit),
    /// which weighted round robin prefers to the CPU's (gRFC A58).
    pub fn set_application_utilization(&self, value: f64) {
        lock(&self.shared.app).application_utilization = value.max(0.0);
    }

    /// A named utilization (a fraction of some resource).
    pub fn set_utilization(&self, name: impl Into<String>, value: f64) {
        lock(&self.shared.app)
            .utilization
            .insert(name.into(), value.max(0.0));
    }

    /// An application metric of any meaning.
    pub fn set_named_metric(&self, name: impl Into<String>, value: f64) {
        lock(&self.shared.app).named.insert(name.into(), value);
    }

    /// Removes every metric the application set.
    pub fn clear_application_metrics(&self) {
        *lock(&self.shared.app) = AppMetrics::default();
    }

    /// The report as of now. `per_method` adds the calls in flight of each
    /// method that has any (the out-of-band report does; the per-call one
    /// keeps to the totals).
    pub fn report(&self, per_method: bool) -> OrcaLoadReport {
        let now = Instant::now();
        let (rps, eps, cpu) = self.rates(now);
        let mut report = OrcaLoadReport {
            cpu_utilization: cpu,
            rps_fractional: rps,
            eps,
            ..OrcaLoadReport::default()
        };
        {
            let app = lock(&self.shared.app);
            report.application_utilization = app.application_utilization;
            report.utilization = app.utilization.clone();
            report.named_metrics = app.named.clone();
        }
        report
            .named_metrics
            .insert(IN_FLIGHT.to_owned(), self.in_flight() as f64);
        if per_method {
            let methods = self
                .shared
                .methods
                .read()
                .unwrap_or_else(|p| p.into_inner());
            for m in methods.iter() {
                let n = m.in_flight.load(Ordering::Relaxed);
                if n > 0 {
                    report
                        .named_metrics
                        .insert(format!("{IN_FLIGHT_METHOD}{}", m.path), n as f64);
                }
            }
        }
        report
    }

    /// Rates and CPU, measured anew when the window is old enough.
    fn rates(&self, now: Instant) -> (f64, f64, f64) {
        let answered = self.shared.answered.load(Ordering::Relaxed);
        let failed = self.shared.failed.load(Ordering::Relaxed);
        let mut w = lock(&self.shared.window);
        match w.started {
            None => w.started = Some((now, answered, failed, process_cpu())),
            Some((at, a0, f0, cpu0)) => {
                let elapsed = now.saturating_duration_since(at);
                if elapsed >= RATE_WINDOW {
                    let secs = elapsed.as_secs_f64();
                    let cpu1 = process_cpu();
                    w.rps = answered.saturating_sub(a0) as f64 / secs;
                    w.eps = failed.saturating_sub(f0) as f64 / secs;
                    if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
                        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                        w.cpu = (c1.saturating_sub(c0).as_secs_f64() / secs / cores as f64)
                            .clamp(0.0, 1.0);
                    }
                    w.started = Some((now, answered, failed, cpu1));
                }
            }
        }
        (w.rps, w.eps, w.cpu)
    }

    /// The trailer for a call ending now: the report made within the last
    /// [`SHARED_FOR`], or a new one.
    fn header(&self) -> HeaderValue {
        let now = Instant::now();
        let mut shared = lock(&self.shared.shared_header);
        if let Some((at, value)) = shared.as_ref() {
            if now.saturating_duration_since(*at) < SHARED_FOR {
                return value.clone();
            }
        }
        drop(shared);
        let value = self.report(false).to_header();
        shared = lock(&self.shared.shared_header);
        *shared = Some((now, value.clone()));
        value
    }

    /// Counts a call to `path` in flight until the returned guard ends it.
    fn start(&self, path: &str) -> CallGuard {
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let method = self.method(path);
        method.in_flight.fetch_add(1, Ordering::Relaxed);
        let recorder = self
            .shared
            .call_metrics
            .load(Ordering::Relaxed)
            .then(CallMetricsRecorder::default);
        CallGuard {
            reporter: self.clone(),
            method,
            recorder,
        }
    }

    /// The counter of method `path`, made at its first call. A server has
    /// few methods, but paths come from clients: past [`MAX_METHODS`] the
    /// rest share one counter under `other`.
    fn method(&self, path: &str) -> Arc<Method> {
        let find = |methods: &[Arc<Method>]| methods.iter().find(|m| &*m.path == path).cloned();
        if let Some(m) = find(
            &self
                .shared
                .methods
                .read()
                .unwrap_or_else(|p| p.into_inner()),
        ) {
            return m;
        }
        let mut methods = self
            .shared
            .methods
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(m) = find(&methods) {
            return m;
        }
        let path = if methods.len() < MAX_METHODS {
            path
        } else {
            "other"
        };
        if let Some(m) = methods.iter().find(|m| &*m.path == path) {
            return m.clone();
        }
        let m = Arc::new(Method {
            path: path.into(),
            in_flight: AtomicU64::new(0),
        });
        methods.push(m.clone());
        m
    }
}

/// The process's CPU time so far (user and system, every thread), from
/// `/proc/self/stat` (Linux; elsewhere unknown, and reported as 0). Its
/// unit is USER_HZ, 100 a second on every Linux the kernel ABI allows.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu(&stat)
}

/// utime + stime of a `/proc/<pid>/stat` line, whose command name (in
/// parentheses) may hold anything, spaces and parentheses included.
fn parse_cpu(stat: &str) -> Option<Duration> {
    const USER_HZ: u64 = 100;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime + stime;
    Some(Duration::from_millis(ticks * 1_000 / USER_HZ))
}

/// Methods counted one by one; calls to others count under `other` (the
/// paths come from clients, and the list is scanned on every call).
const MAX_METHODS: usize = 64;

/// One method's calls in flight.
struct Method {
    path: Box<str>,
    in_flight: AtomicU64,
}

/// One counted call; ends it when finished or dropped (cancelled).
struct CallGuard {
    reporter: LoadReporter,
    method: Arc<Method>,
    /// What the handler records, when the reporter offers it.
    recorder: Option<CallMetricsRecorder>,
}

impl CallGuard {
    /// The call was answered, with `ok` or an error status.
    fn answered(&self, ok: bool) {
        // An error is an answer too: rps counts every call, eps the failed
        // ones, as grpc-go's reporter does.
        let shared = &self.reporter.shared;
        shared.answered.fetch_add(1, Ordering::Relaxed);
        if !ok {
            shared.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The call was answered: ends it and returns its trailer, if any. The
    /// report is made once the call no longer counts as in flight.
    fn finish(mut self, ok: bool) -> Option<HeaderValue> {
        self.answered(ok);
        let reporter = self.reporter.clone();
        let recorder = self.recorder.take();
        drop(self);
        reporter.trailer(recorder.as_ref())
    }
}

/// The metrics of one call, recorded by its handler and sent in that
/// call's load report (gRPC's `CallMetricsRecorder`, gRFC A51): what the
/// call cost (`request_cost`), and utilization or named metrics that take
/// the place of the server's for this report. Present in a request's
/// extensions when the server's [`LoadReporter`] has
/// [`call_metrics`](LoadReporter::call_metrics) on.
///
/// ```
/// # fn handler(request: tonic::Request<()>) {
/// use tonic_etcd::server::CallMetricsRecorder;
/// if let Some(recorder) = CallMetricsRecorder::of(&request) {
///     recorder.set_request_cost("db_queries", 3.0);
/// }
/// # }
/// ```
#[derive(Clone, Default)]
pub struct CallMetricsRecorder(Arc<Mutex<CallMetrics>>);

impl std::fmt::Debug for CallMetricsRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallMetricsRecorder")
            .finish_non_exhaustive()
    }
}

impl CallMetricsRecorder {
    /// The recorder of the call `request` belongs to; `None` when the
    /// server does not record per-call metrics.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Self> {
        request.extensions().get::<Self>().cloned()
    }

    /// What the call cost in a unit of the application's (`name`
    /// says which: `db_queries`, `cpu_ms`, …); recorded again, the last
    /// value stands.
    pub fn set_request_cost(&self, name: impl Into<String>, value: f64) {
        lock(&self.0).request_cost.insert(name.into(), value);
    }

    /// A named utilization for this call's report (0 to 1).
    pub fn set_utilization(&self, name: impl Into<String>, value: f64) {
        lock(&self.0)
            .utilization
            .insert(name.into(), value.max(0.0));
    }

    /// A named metric for this call's report.
    pub fn set_named_metric(&self, name: impl Into<String>, value: f64) {
        lock(&self.0).named.insert(name.into(), value);
    }
}

/// What a handler recorded.
#[derive(Default)]
struct CallMetrics {
    request_cost: std::collections::BTreeMap<String, f64>,
    utilization: std::collections::BTreeMap<String, f64>,
    named: std::collections::BTreeMap<String, f64>,
}

impl CallMetrics {
    fn is_empty(&self) -> bool {
        self.request_cost.is_empty() && self.utilization.is_empty() && self.named.is_empty()
    }

    /// Adds the call's metrics to the server's report; the call's win where
    /// both have a name.
    fn merge_into(self, report: &mut OrcaLoadReport) {
        report.request_cost.extend(self.request_cost);
        report.utilization.extend(self.utilization);
        report.named_metrics.extend(self.named);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let shared = &self.reporter.shared;
        self.method.in_flight.fetch_sub(1, Ordering::Relaxed);
        // Told only to an out-of-band stream that listens: notifying costs a
        // lock and a wake-up round, and on a lightly loaded server every
        // call is the last one in flight.
        if shared.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 && shared.idle.receiver_count() > 0
        {
            shared.idle.send_replace(());
        }
    }
}

/// Whether a `grpc-status` value says OK.
fn is_ok(status: Option<&HeaderValue>) -> bool {
    status.is_some_and(|v| v.as_bytes() == b"0")
}

/// Adds load reports to a server (ORCA, see [`crate::orca`]); part of
/// [`builder`](super::builder).
#[derive(Debug, Clone, Default)]
pub struct LoadLayer {
    reporter: LoadReporter,
}

impl LoadLayer {
    /// Reports into `reporter`.
    pub fn new(reporter: LoadReporter) -> Self {
        Self { reporter }
    }
}

impl<S> tower::Layer<S> for LoadLayer {
    type Service = Load<S>;

    fn layer(&self, inner: S) -> Load<S> {
        Load {
            inner,
            reporter: self.reporter.clone(),
        }
    }
}

/// The service of [`LoadLayer`].
#[derive(Debug, Clone)]
pub struct Load<S> {
    inner: S,
    reporter: LoadReporter,
}

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

impl<S> tower::Service<Request> for Load<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = LoadFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let path = request.uri().path();
        if path == OOB_PATH {
            return LoadFuture {
                state: State::Oob {
                    fut: Box::pin(oob(self.reporter.clone(), request)),
                },
                _error: std::marker::PhantomData,
            };
        }
        let guard = counted(path).then(|| self.reporter.start(path));
        if let Some(recorder) = guard.as_ref().and_then(|g| g.recorder.clone()) {
            request.extensions_mut().insert(recorder);
        }
        LoadFuture {
            state: State::Call {
                inner: self.inner.call(request),
                guard,
            },
            _error: std::marker::PhantomData,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Load`].
    pub struct LoadFuture<F, E> {
        #[pin]
        state: State<F>,
        _error: std::marker::PhantomData<fn() -> E>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Call { #[pin] inner: F, guard: Option<CallGuard> },
        Oob { fut: Pin<Box<dyn Future<Output = Response> + Send>> },
    }
}

impl<F, E> std::fmt::Debug for LoadFuture<F, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadFuture").finish_non_exhaustive()
    }
}

impl<F, E> Future for LoadFuture<F, E>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Oob { fut } => fut.as_mut().poll(cx).map(Ok),
            StateProj::Call { inner, guard } => {
                let mut response = std::task::ready!(inner.poll(cx))?;
                let Some(call) = guard.take() else {
                    return Poll::Ready(Ok(response));
                };
                // Trailers-only (an error at once): the headers are the
                // trailers.
                if let Some(status) = response.headers().get(&GRPC_STATUS) {
                    let ok = is_ok(Some(status));
                    if let Some(value) = call.finish(ok) {
                        response.headers_mut().insert(LOAD, value);
                    }
                    return Poll::Ready(Ok(response));
                }
                Poll::Ready(Ok(response.map(|body| {
                    tonic::body::Body::new(LoadBody {
                        inner: body,
                        call: Some(call),
                    })
                })))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its call's count and adds the report to
    /// its trailers.
    struct LoadBody {
        #[pin]
        inner: tonic::body::Body,
        call: Option<CallGuard>,
    }
}

impl Body for LoadBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.project();
        match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                let frame = match frame.into_trailers() {
                    Ok(mut trailers) => {
                        if let Some(call) = this.call.take() {
                            if let Some(value) = call.finish(is_ok(trailers.get(&GRPC_STATUS))) {
                                trailers.insert(LOAD, value);
                            }
                        }
                        Frame::trailers(trailers)
                    }
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                if let Some(call) = this.call.take() {
                    call.answered(false);
                }
                Poll::Ready(Some(Err(e)))
            }
            None => {
                // Ended without trailers: not a gRPC answer.
                if let Some(call) = this.call.take() {
                    call.answered(false);
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Answers the out-of-band stream: a report at once, then one every
/// requested interval (at least [`MIN_REPORT_INTERVAL`]) and one each time
/// the last call in flight ends, until the client goes away or, once its
/// server began to shut down, with the report that its last call ended.
async fn oob(reporter: LoadReporter, request: Request) -> Response {
    let draining = request
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.local_addr())
        .and_then(super::Draining::of);
    let codec = tonic_prost::ProstCodec::<OrcaLoadReport, OrcaLoadReportRequest>::default();
    let mut grpc = tonic::server::Grpc::new(codec);
    grpc.server_streaming(Oob { reporter, draining }, request)
        .await
}

struct Oob {
    reporter: LoadReporter,
    /// The notice of the server that accepted the stream's connection, when
    /// it is a [`RegisteredServer`](super::RegisteredServer).
    draining: Option<super::Draining>,
}

type Reports =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<OrcaLoadReport, tonic::Status>> + Send>>;

impl tonic::server::ServerStreamingService<OrcaLoadReportRequest> for Oob {
    type Response = OrcaLoadReport;
    type ResponseStream = Reports;
    type Future = std::future::Ready<Result<tonic::Response<Reports>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<OrcaLoadReportRequest>) -> Self::Future {
        let interval = request
            .into_inner()
            .report_interval
            .map_or(DEFAULT_REPORT_INTERVAL, |d| d.to_duration())
            .max(MIN_REPORT_INTERVAL);
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reports = OobReports {
            idle: tokio_stream::wrappers::WatchStream::from_changes(
                self.reporter.shared.idle.subscribe(),
            ),
            reporter: self.reporter.clone(),
            ticks,
            draining: self.draining.clone().map(|d| Box::pin(d.started_owned())),
            shutting_down: false,
            ended: false,
        };
        std::future::ready(Ok(tonic::Response::new(Box::pin(reports))))
    }
}

/// The out-of-band reports of one stream.
struct OobReports {
    reporter: LoadReporter,
    ticks: tokio::time::Interval,
    /// Told when the last call in flight ends.
    idle: tokio_stream::wrappers::WatchStream<()>,
    /// The server's shutdown, until it begins.
    draining: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    shutting_down: bool,
    /// The last report went out.
    ended: bool,
}

impl tokio_stream::Stream for OobReports {
    type Item = Result<OrcaLoadReport, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        // Every source is polled, so each one that fired is consumed (and
        // each pending one will wake the task).
        let mut due = this.ticks.poll_tick(cx).is_ready();
        due |= matches!(
            tokio_stream::Stream::poll_next(Pin::new(&mut this.idle), cx),
            Poll::Ready(Some(()))
        );
        if let Some(draining) = &mut this.draining {
            if draining.as_mut().poll(cx).is_ready() {
                this.draining = None;
                this.shutting_down = true;
                due = true;
            }
        }
        if !due {
            return Poll::Pending;
        }
        let report = this.reporter.report(true);
        // A shutting-down server's stream ends with its last call, so that
        // it holds the connection no longer than the calls do (a client
        // follows its reports on a new connection).
        this.ended = this.shutting_down && report.in_flight() == Some(0);
        Poll::Ready(Some(Ok(report)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_calls_in_flight_per_method_and_rates_per_window() {
        let r = LoadReporter::new();
        assert_eq!(r.report(true).in_flight(), Some(0));
        let a = r.start("/a.S/M");
        let b = r.start("/a.S/M");
        let c = r.start("/a.S/N");
        let report = r.report(true);
        assert_eq!(report.in_flight(), Some(3));
        let by_method: Vec<_> = report.in_flight_by_method().into_iter().collect();
        assert_eq!(by_method, [("/a.S/M", 2), ("/a.S/N", 1)]);
        a.answered(true);
        b.answered(false);
        drop((a, b));
        drop(c); // cancelled: neither answered nor failed
        assert_eq!(r.in_flight(), 0);
        assert!(r.report(true).in_flight_by_method().is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        let report = r.report(false);
        assert_eq!(report.rps_fractional, 1.0, "two answers in two seconds");
        assert_eq!(report.eps, 0.5);
    }

    #[tokio::test(start_paused = true)]
    async fn the_trailer_is_shared_for_a_moment_then_remade() {
        let r = LoadReporter::new();
        let first = r.header();
        r.set_application_utilization(0.5);
        assert_eq!(r.header(), first, "shared within 100 ms");
        tokio::time::advance(SHARED_FOR).await;
        let second = r.header();
        assert_ne!(second, first);
        let mut md = http::HeaderMap::new();
        md.insert(LOAD, second);
        let md = tonic::metadata::MetadataMap::from_headers(md);
        let report = OrcaLoadReport::from_metadata(&md).unwrap();
        assert_eq!(report.application_utilization, 0.5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_calls_recorded_metrics_go_into_its_report_only() {
        let r = LoadReporter::new().call_metrics(true);
        r.set_named_metric("queue", 1.0);
        let decode = |value: HeaderValue| {
            let mut md = http::HeaderMap::new();
            md.insert(LOAD, value);
            OrcaLoadReport::from_headers(&md).unwrap()
        };
        let a = r.start("/a.S/M");
        let b = r.start("/a.S/M");
        let recorder = a.recorder.clone().expect("offered");
        recorder.set_request_cost("rows", 12.0);
        recorder.set_named_metric("queue", 7.0);
        let report = decode(a.finish(true).expect("a trailer"));
        assert_eq!(report.request_cost.get("rows"), Some(&12.0));
        assert_eq!(
            report.named_metrics.get("queue"),
            Some(&7.0),
            "the call's wins"
        );
        assert_eq!(report.in_flight(), Some(1), "made once the call ended");
        let report = decode(b.finish(true).expect("a trailer"));
        assert!(
            report.request_cost.is_empty(),
            "not another call's: {report:?}"
        );
        assert_eq!(report.named_metrics.get("queue"), Some(&1.0));
        assert!(
            LoadReporter::new().start("/a.S/M").recorder.is_none(),
            "opt-in"
        );
    }

    #[test]
    fn cpu_time_is_read_past_any_command_name() {
        let line = "1234 (a) b (c)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0";
        assert_eq!(parse_cpu(line), Some(Duration::from_secs(3)));
        assert_eq!(parse_cpu("garbage"), None);
        assert!(process_cpu().is_some(), "/proc/self/stat is readable here");
    }

    #[test]
    fn health_and_orca_calls_are_not_load() {
        assert!(counted("/greeter.Greeter/SayHello"));
        assert!(!counted("/grpc.health.v1.Health/Watch"));
        assert!(!counted(OOB_PATH));
    }
}
