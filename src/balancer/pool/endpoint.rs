//! One endpoint: its connection, and what calls on it report.
//!
//! Each endpoint owns one HTTP/2 connection. The connection's driver task
//! ending (peer closed, reset, keep-alive timeout) takes the endpoint out of
//! rotation at once, before another call is routed to it; it is reconnected
//! in the background with back-off. A connection joins the rotation only
//! once the server's HTTP/2 preface has arrived (see [`super::preface`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::load::{Load, LoadConfig};
use super::outlier::{OutlierDetection, Tracker};
use super::preface::Preface;
use crate::Instance;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connection settings for every endpoint.
#[derive(Debug, Clone)]
pub(crate) struct ConnConfig {
    pub(crate) connect_timeout: Duration,
    /// `None`: no HTTP/2 keep-alive (tonic's default).
    pub(crate) keep_alive_interval: Option<Duration>,
    pub(crate) keep_alive_timeout: Duration,
    /// Idle time before TCP keep-alive probes (`None`: the kernel's).
    pub(crate) tcp_keepalive: Option<Duration>,
    pub(crate) tcp_nodelay: bool,
    pub(crate) initial_stream_window_size: Option<u32>,
    pub(crate) initial_connection_window_size: Option<u32>,
    pub(crate) adaptive_window: bool,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<super::tls::Connector>,
}

impl ConnConfig {
    fn scheme(&self) -> Scheme {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return Scheme::HTTPS;
        }
        Scheme::HTTP
    }
}

/// How endpoints are weighed; shared by every endpoint of a balancer.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) load: LoadConfig,
    pub(crate) outlier: OutlierDetection,
    /// The metadata key holding an instance's integer weight.
    pub(crate) weight_key: String,
    /// The client's locality: instances whose metadata has this key and
    /// value are preferred.
    pub(crate) zone: Option<(String, String)>,
    /// A new endpoint's share ramps up over this window (gRPC A100).
    pub(crate) slow_start: Option<Duration>,
    /// Budget shared by every endpoint: how many are ejected now.
    pub(crate) ejected: Arc<std::sync::atomic::AtomicUsize>,
    /// Woken when a full endpoint frees a stream.
    pub(crate) capacity: Arc<Notify>,
}

/// The largest weight read from metadata; larger values are capped.
const MAX_WEIGHT: u32 = 10_000;
/// A slow-starting endpoint gets at least this share of its weight.
const SLOW_START_MIN: f64 = 0.1;

impl Policy {
    /// The weight `instance` asks for: its metadata value under the weight
    /// key, a positive integer; absent or invalid means 1.
    pub(crate) fn weight_of(&self, instance: &Instance) -> u32 {
        match instance.metadata.get(&self.weight_key) {
            None => 1,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(w) if w > 0 => w.min(MAX_WEIGHT),
                _ => {
                    tracing::warn!(addr = %instance.addr, key = %self.weight_key, value = %v,
                        "weight is not a positive integer; using 1");
                    1
                }
            },
        }
    }

    /// Whether `instance` is in the client's zone.
    pub(crate) fn is_local(&self, instance: &Instance) -> bool {
        self.zone
            .as_ref()
            .is_some_and(|(k, v)| instance.metadata.get(k).as_deref() == Some(v.as_str()))
    }
}

/// A connected endpoint, in rotation while its connection lives (and it is
/// neither ejected nor reported unhealthy).
pub(crate) struct Ready {
    pub(crate) key: String,
    /// Replaced when only the instance's metadata changes (no redial).
    instance: RwLock<Arc<Instance>>,
    send: SendRequest<tonic::body::Body>,
    scheme: Scheme,
    authority: Authority,
    /// The server's `SETTINGS_MAX_CONCURRENT_STREAMS`: beyond it h2 would
    /// queue calls on this connection, so the balancer sends them elsewhere.
    max_streams: usize,
    pub(crate) load: Load,
    /// The weight its server's load reports give it (weighted round robin).
    pub(crate) reported: super::orca::ReportedWeight,
    pub(crate) outliers: Tracker,
    pub(crate) policy: Arc<Policy>,
    weight: AtomicU32,
    local: AtomicBool,
    /// When it last joined the rotation (µs since the epoch), for slow start.
    joined_at: AtomicU64,
    /// Woken when a call finds the connection closed.
    pub(crate) closed: Notify,
    metrics: crate::metrics::EndpointMetrics,
}

impl Ready {
    /// Whether another call fits within the server's stream limit.
    pub(crate) fn has_capacity(&self) -> bool {
        self.load.pending() < self.max_streams
    }

    /// Weight × slow-start ramp at `now`.
    pub(crate) fn share_factor(&self, now: u64) -> f64 {
        let weight = f64::from(self.weight.load(Ordering::Relaxed));
        let Some(window) = self.policy.slow_start else {
            return weight;
        };
        let age = now.saturating_sub(self.joined_at.load(Ordering::Relaxed)) as f64;
        let ramp = (age / window.as_micros().max(1) as f64).clamp(SLOW_START_MIN, 1.0);
        weight * ramp
    }

    pub(crate) fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub(crate) fn is_local(&self) -> bool {
        self.local.load(Ordering::Relaxed)
    }

    /// Marks the moment it joins the rotation (slow start counts from here).
    pub(crate) fn joined(&self) {
        self.joined_at.store(self.load.now(), Ordering::Relaxed);
    }

    /// The instance as last registered.
    pub(crate) fn instance(&self) -> Arc<Instance> {
        self.instance
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A metadata update: weight and locality follow it. Returns whether
    /// the locality changed (the ready set's order depends on it).
    pub(crate) fn set_instance(&self, instance: Arc<Instance>) -> bool {
        self.weight
            .store(self.policy.weight_of(&instance), Ordering::Relaxed);
        let local = self.policy.is_local(&instance);
        *self.instance.write().unwrap_or_else(|p| p.into_inner()) = instance;
        self.local.swap(local, Ordering::Relaxed) != local
    }

    /// The address dialled.
    pub(crate) fn addr(&self) -> &str {
        self.authority.as_str()
    }

    /// Points `uri` (a path, as tonic's generated code sets it) at this endpoint.
    pub(crate) fn uri(&self, uri: &http::Uri) -> Result<http::Uri, http::Error> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = uri.path_and_query().cloned();
        http::Uri::from_parts(parts).map_err(Into::into)
    }

    pub(crate) fn sender(&self) -> SendRequest<tonic::body::Body> {
        self.send.clone()
    }

    /// Its calls in flight changed: the gauges follow.
    fn counted(&self) {
        self.metrics
            .in_flight(self.load.pending(), self.load.open_streams());
    }

    /// The connection is gone; calls still ending on it no longer speak
    /// for the endpoint in metrics.
    pub(crate) fn retire(&self) {
        self.metrics.retire();
    }

    /// Counts a call in flight until the guard is dropped.
    /// `now` (µs, as `Load::now`) is a time the caller read already: the
    /// pick's.
    pub(crate) fn start(self: &Arc<Self>, now: u64) -> InFlight {
        let started = self.load.start(now);
        self.counted();
        InFlight {
            ep: self.clone(),
            started,
            settled: false,
            awaiting: true,
            reports: None,
        }
    }
}

/// How a call ended, for the endpoint's health and outlier accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failure,
}

impl Outcome {
    /// The outcome a gRPC status code means under `policy`.
    pub(crate) fn of(code: tonic::Code, policy: &Policy) -> Self {
        if policy.outlier.is_failure(code) {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }
}

/// A call in flight on an endpoint, from the moment it is sent until its
/// response body ends (or the call is dropped).
pub(crate) struct InFlight {
    ep: Arc<Ready>,
    started: u64,
    /// Its outcome has been recorded.
    settled: bool,
    /// Still waiting for the response headers (the call ages).
    awaiting: bool,
    /// Under weighted round robin with per-call reports: the error
    /// utilization penalty the report's weight is worked out with.
    reports: Option<f64>,
}

impl InFlight {
    /// Reads the server's load report at the call's end (weighted round
    /// robin), weighing errors by `penalty`.
    pub(crate) fn read_load_reports(&mut self, penalty: f64) {
        self.reports = Some(penalty);
    }

    /// Takes the load report in `headers` (the trailers, or the headers of
    /// a trailers-only answer), when reports are read.
    pub(crate) fn load_report(&self, headers: &http::HeaderMap) {
        let Some(penalty) = self.reports else {
            return;
        };
        if let Some(report) = crate::orca::OrcaLoadReport::from_headers(headers) {
            self.ep
                .reported
                .update(&report, penalty, self.ep.load.now());
        }
    }

    /// The response headers arrived: the call stops ageing and, with
    /// `sample`, their latency feeds the estimate (not for failures: errors
    /// come back fast and would make a failing backend look the fastest).
    pub(crate) fn headers_arrived(&mut self, sample: bool) {
        let now = self.ep.load.now();
        if std::mem::take(&mut self.awaiting) {
            self.ep.load.headers(self.started);
            self.ep.counted();
            if sample {
                self.ep
                    .load
                    .observe(now.saturating_sub(self.started) as f64, now);
                self.ep.metrics.latency(self.ep.load.latency_us());
            }
        }
    }

    /// The endpoint's address, for errors that name it.
    pub(crate) fn addr(&self) -> &str {
        self.ep.addr()
    }

    /// Records how the call went (once; later calls are ignored).
    pub(crate) fn settle(&mut self, outcome: Outcome) {
        self.settle_at(outcome, Instant::now());
    }

    /// [`settle`](Self::settle) with the time the caller already read.
    pub(crate) fn settle_at(&mut self, outcome: Outcome, now: Instant) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let ok = outcome == Outcome::Success;
        self.ep.load.outcome(ok);
        self.ep.metrics.success(self.ep.load.health());
        let now = self.ep.load.at(now);
        self.ep.outliers.record(ok, now, &self.ep.policy.outlier);
    }

    /// The policy the call is judged by.
    pub(crate) fn policy(&self) -> &Policy {
        &self.ep.policy
    }

    /// The call's deadline passed on this endpoint. Before the response
    /// headers, the time it waited is a latency sample too, so a stalled
    /// endpoint looks slow, not idle; after them (a stream reaching its
    /// deadline is normal) it teaches nothing about latency.
    pub(crate) fn timed_out(mut self) {
        self.settled = true;
        self.headers_arrived(true);
        self.ep.load.timed_out(self.ep.load.now());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let before = self.ep.load.end(self.started, self.awaiting);
        self.ep.counted();
        if before >= self.ep.max_streams {
            self.ep.policy.capacity.notify_one();
        }
    }
}

/// A live connection: the endpoint for the ready set, and the driver task
/// whose end means the connection is gone (with why, when it failed).
pub(crate) struct Connection {
    pub(crate) ready: Arc<Ready>,
    pub(crate) driver: JoinHandle<Option<String>>,
}

/// Reset streams h2 remembers per connection (h2's default: 50): none. A
/// remembered stream's late DATA frames are dropped quietly but charged to
/// h2's small-frame budget (h2 >= 0.4.16) and never refunded, so a client
/// that cancels calls while their responses are on the wire closed its own
/// connection after some thousands of them (GOAWAY ENHANCE_YOUR_CALM
/// "too_many_data_frames"); hyper offers no way to set that budget. A
/// forgotten stream's late frame is answered with a `RST_STREAM` instead,
/// which costs the budget nothing and counts toward the local reset limit,
/// which is off here.
const MAX_RESET_STREAMS: usize = 0;

/// Connects to `instance` over HTTP/2 (prior knowledge, as gRPC does; over
/// TLS with ALPN `h2` when configured). Returns once the server's SETTINGS
/// frame has arrived, all within the connect timeout.
pub(crate) async fn connect(
    key: &str,
    target: &str,
    instance: Arc<Instance>,
    cfg: &ConnConfig,
    policy: Arc<Policy>,
) -> Result<Connection, BoxError> {
    let authority: Authority = instance.addr.parse()?;
    let deadline = crate::time::deadline_after(Instant::now(), cfg.connect_timeout);
    let timed_out = |stage: &str| format!("{stage} timed out after {:?}", cfg.connect_timeout);
    let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(instance.addr.as_str()))
        .await
        .map_err(|_| timed_out("connect"))??;
    tcp.set_nodelay(cfg.tcp_nodelay)?;
    if let Some(idle) = cfg.tcp_keepalive {
        set_tcp_keepalive(&tcp, idle)?;
    }
    #[cfg(feature = "tls")]
    let io = match &cfg.tls {
        Some(tls) => Transport::Tls(Box::new(
            tokio::time::timeout_at(deadline, tls.connect(&instance.addr, tcp))
                .await
                .map_err(|_| timed_out("TLS handshake"))??,
        )),
        None => Transport::Plain(tcp),
    };
    #[cfg(not(feature = "tls"))]
    let io = Transport::Plain(tcp);
    let (io, preface) = Preface::new(io);

    let mut builder = hyper::client::conn::http2::Builder::new(BoxingExecutor);
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(cfg.keep_alive_interval)
        .keep_alive_timeout(cfg.keep_alive_timeout)
        .keep_alive_while_idle(true)
        .adaptive_window(cfg.adaptive_window)
        // A call that ends early (deadline, cancel, a hedge that lost)
        // resets its stream; the server's frames for it keep arriving for
        // a while. Each frame for a stream h2 no longer remembers makes h2
        // reset it again and count the reset toward
        // `max_local_error_reset_streams` (1,024 over the connection's whole
        // life), after which h2 closes the connection itself (GOAWAY
        // ENHANCE_YOUR_CALM "too_many_internal_resets"): a storm of expired
        // calls lost the connection for every call on it. The limit guards
        // a server against a hostile client; a client's peers here are the
        // registered instances it chose to call, so it is off. Reset
        // streams are not remembered at all (see `MAX_RESET_STREAMS`).
        .max_concurrent_reset_streams(MAX_RESET_STREAMS)
        .max_local_error_reset_streams(None);
    if let Some(size) = cfg.initial_stream_window_size {
        builder.initial_stream_window_size(size);
    }
    if let Some(size) = cfg.initial_connection_window_size {
        builder.initial_connection_window_size(size);
    }
    let (send, conn) = tokio::time::timeout_at(deadline, builder.handshake(TokioIo::new(io)))
        .await
        .map_err(|_| timed_out("HTTP/2 handshake"))??;
    let addr = instance.addr.clone();
    let driver = tokio::spawn(async move {
        let error = conn.await.err()?;
        tracing::debug!(%addr, %error, "connection ended");
        // hyper's error alone says "connection error"; its source says why
        // (a GOAWAY's reason and debug data, an I/O error).
        Some(match std::error::Error::source(&error) {
            Some(why) => format!("{error}: {why}"),
            None => error.to_string(),
        })
    });
    // The driver reads the server's preface; until it arrives the server has
    // not shown that it speaks HTTP/2.
    let settings = match tokio::time::timeout_at(deadline, preface).await {
        Ok(Ok(Ok(settings))) => settings,
        Ok(Ok(Err(not_h2))) => {
            driver.abort();
            return Err(not_h2.0.into());
        }
        Ok(Err(_)) => {
            driver.abort();
            return Err("the connection closed before the server's HTTP/2 preface".into());
        }
        Err(_) => {
            driver.abort();
            return Err(format!(
                "no HTTP/2 preface from the server within {:?}",
                cfg.connect_timeout
            )
            .into());
        }
    };
    let max_streams = settings
        .max_concurrent_streams
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let instance_addr = instance.addr.clone();
    let ready = Arc::new(Ready {
        key: key.to_owned(),
        weight: AtomicU32::new(policy.weight_of(&instance)),
        local: AtomicBool::new(policy.is_local(&instance)),
        instance: RwLock::new(instance),
        send,
        scheme: cfg.scheme(),
        authority,
        max_streams,
        load: Load::new(policy.load),
        reported: Default::default(),
        outliers: Tracker::default(),
        joined_at: AtomicU64::new(0),
        policy,
        closed: Notify::new(),
        metrics: crate::metrics::EndpointMetrics::new(target, &instance_addr),
    });
    // The gauge starts where the estimate does (the prior), not at zero.
    ready.metrics.latency(ready.load.latency_us());
    Ok(Connection { ready, driver })
}

/// Probes after `idle`, then every `idle / 2` three times; a connection
/// whose data stays unacknowledged as long is dropped too (Linux).
fn set_tcp_keepalive(tcp: &TcpStream, idle: Duration) -> io::Result<()> {
    let interval = (idle / 2).max(Duration::from_secs(1));
    let sock = socket2::SockRef::from(tcp);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(TCP_KEEPALIVE_PROBES),
    )?;
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(Some(idle + interval * TCP_KEEPALIVE_PROBES))?;
    Ok(())
}

/// Unanswered keep-alive probes before the kernel drops a connection.
const TCP_KEEPALIVE_PROBES: u32 = 3;

/// Spawns hyper's per-call tasks (each request body's pipe to its stream)
/// boxed, as tonic's own executor does. tokio moves a spawned future
/// several times on its way into the task's cell; a pipe future is large,
/// so spawning it unboxed cost about 1,450 more instructions per spawn,
/// two spawns per call (callgrind, `benches/cpu.rs`): a box moves it once.
#[derive(Clone, Copy)]
struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}

/// A plaintext or TLS connection.
enum Transport {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

macro_rules! delegate {
    ($self:ident, $io:ident => $e:expr) => {
        match $self.get_mut() {
            Transport::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            #[cfg(feature = "tls")]
            Transport::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(io) => io.is_write_vectored(),
            #[cfg(feature = "tls")]
            Transport::Tls(io) => io.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel holds what `tcp_keepalive` promises: probes after the
    /// idle time, every half of it, three of them, and (Linux) the same
    /// total as the limit on unacknowledged data.
    #[tokio::test]
    async fn tcp_keepalive_is_set_on_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        set_tcp_keepalive(&tcp, Duration::from_secs(10)).unwrap();
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(10));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), TCP_KEEPALIVE_PROBES);
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(25))
        );
    }
}
