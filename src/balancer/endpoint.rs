//! One endpoint's connection and load.
//!
//! Each endpoint owns one HTTP/2 connection. The connection's driver task
//! ending (peer closed, reset, keep-alive timeout) takes the endpoint out of
//! rotation at once, before another call is routed to it; it is reconnected
//! in the background with back-off. A connection joins the rotation only
//! once the server's HTTP/2 preface has arrived (see [`super::preface`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::preface::Preface;
use crate::Instance;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connection settings for every endpoint.
#[derive(Debug, Clone)]
pub(crate) struct ConnConfig {
    pub(crate) connect_timeout: Duration,
    pub(crate) keep_alive_interval: Duration,
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) tcp_nodelay: bool,
    pub(crate) initial_stream_window_size: Option<u32>,
    pub(crate) initial_connection_window_size: Option<u32>,
    pub(crate) adaptive_window: bool,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<super::tls::Connector>,
    /// Time constant of the latency estimate's decay.
    pub(crate) decay: Duration,
    /// The latency assumed for an endpoint before its first response.
    pub(crate) default_rtt: Duration,
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

/// A connected endpoint, in rotation while its connection lives.
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
    pending: AtomicUsize,
    rtt: PeakEwma,
    /// Woken when a call finds the connection closed.
    pub(crate) closed: Notify,
    /// Shared by the pool: woken when a full endpoint frees a stream.
    capacity: Arc<Notify>,
}

impl Ready {
    /// p2c's load: the latency estimate times the calls in flight (+1, so an
    /// idle slow endpoint still weighs more than an idle fast one).
    pub(crate) fn load(&self) -> f64 {
        self.rtt.estimate() * (self.pending.load(Ordering::Relaxed) + 1) as f64
    }

    /// Whether another call fits within the server's stream limit.
    pub(crate) fn has_capacity(&self) -> bool {
        self.pending.load(Ordering::Relaxed) < self.max_streams
    }

    /// The instance as last registered.
    pub(crate) fn instance(&self) -> Arc<Instance> {
        self.instance
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_instance(&self, instance: Arc<Instance>) {
        *self.instance.write().unwrap_or_else(|p| p.into_inner()) = instance;
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

    /// Counts a call in flight until the guard is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            ep: self.clone(),
            started: Instant::now(),
        }
    }
}

/// A call in flight on an endpoint, from the moment it is sent until its
/// response body ends (or the call is dropped).
pub(crate) struct InFlight {
    ep: Arc<Ready>,
    started: Instant,
}

impl InFlight {
    /// The response headers arrived: their latency feeds the estimate.
    pub(crate) fn responded(&self) {
        self.ep.rtt.observe(self.started.elapsed());
    }

    /// The call's deadline passed on this endpoint: the time it waited is a
    /// latency sample too, so a stalled endpoint looks slow, not idle.
    pub(crate) fn timed_out(self) {
        self.ep.rtt.observe(self.started.elapsed());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let before = self.ep.pending.fetch_sub(1, Ordering::Relaxed);
        if before >= self.ep.max_streams {
            self.ep.capacity.notify_one();
        }
    }
}

/// Peak-EWMA of response latency (as in Finagle and tower): a slower sample
/// replaces the estimate at once, faster ones pull it down gradually, and the
/// estimate decays toward zero while nothing is observed, so a backend that
/// was slow gets probed again. With calls made one at a time the balancer
/// therefore favours the endpoint with the lowest recent latency; the share
/// evens out as calls overlap (the load multiplies by calls in flight).
struct PeakEwma {
    base: Instant,
    /// (nanoseconds as f64 bits, time of update in ns since `base`)
    rtt_ns: AtomicU64,
    stamp_ns: AtomicU64,
    decay_ns: f64,
}

impl PeakEwma {
    fn new(default_rtt: Duration, decay: Duration) -> Self {
        Self {
            base: Instant::now(),
            rtt_ns: AtomicU64::new((default_rtt.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(0),
            decay_ns: decay.as_nanos().max(1) as f64,
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn decayed(&self, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
        rtt * (-elapsed / self.decay_ns).exp()
    }

    fn estimate(&self) -> f64 {
        self.decayed(self.now_ns())
    }

    fn observe(&self, rtt: Duration) {
        let now = self.now_ns();
        let sample = rtt.as_nanos() as f64;
        let current = self.decayed(now);
        let next = if sample > current {
            sample
        } else {
            let elapsed = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
            // Weighted by time like tower's, but every sample counts at least
            // 10%: with samples a millisecond apart a purely time-based weight
            // would never let a fast endpoint's estimate reach its latency.
            let w = (-elapsed / self.decay_ns).exp().min(0.9);
            current * w + sample * (1.0 - w)
        };
        // Racing updates may overwrite each other; each is a valid estimate.
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.stamp_ns.store(now, Ordering::Relaxed);
    }
}

/// A live connection: the endpoint for the ready set, and the driver task
/// whose end means the connection is gone.
pub(crate) struct Connection {
    pub(crate) ready: Arc<Ready>,
    pub(crate) driver: JoinHandle<()>,
}

/// Connects to `instance` over HTTP/2 (prior knowledge, as gRPC does; over
/// TLS with ALPN `h2` when configured). Returns once the server's SETTINGS
/// frame has arrived, all within the connect timeout.
pub(crate) async fn connect(
    key: &str,
    instance: Arc<Instance>,
    cfg: &ConnConfig,
    capacity: Arc<Notify>,
) -> Result<Connection, BoxError> {
    let authority: Authority = instance.addr.parse()?;
    let deadline = crate::time::deadline_after(Instant::now(), cfg.connect_timeout);
    let timed_out = |stage: &str| format!("{stage} timed out after {:?}", cfg.connect_timeout);
    let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(instance.addr.as_str()))
        .await
        .map_err(|_| timed_out("connect"))??;
    tcp.set_nodelay(cfg.tcp_nodelay)?;
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

    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(cfg.keep_alive_interval)
        .keep_alive_timeout(cfg.keep_alive_timeout)
        .keep_alive_while_idle(true)
        .adaptive_window(cfg.adaptive_window);
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
        if let Err(error) = conn.await {
            tracing::debug!(%addr, %error, "connection ended");
        }
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
    Ok(Connection {
        ready: Arc::new(Ready {
            key: key.to_owned(),
            instance: RwLock::new(instance),
            send,
            scheme: cfg.scheme(),
            authority,
            max_streams,
            pending: AtomicUsize::new(0),
            rtt: PeakEwma::new(cfg.default_rtt, cfg.decay),
            closed: Notify::new(),
            capacity,
        }),
        driver,
    })
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

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_up_and_decays_down() {
        let e = PeakEwma::new(Duration::from_millis(1), Duration::from_secs(1));
        let ms = |v: f64| v / 1e6;
        assert!((ms(e.estimate()) - 1.0).abs() < 0.01);
        e.observe(Duration::from_millis(20));
        assert!(
            (ms(e.estimate()) - 20.0).abs() < 0.01,
            "a slow sample counts at once"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let after = ms(e.estimate());
        assert!((after - 20.0 / std::f64::consts::E).abs() < 0.1, "{after}");
        e.observe(Duration::from_millis(1));
        assert!(ms(e.estimate()) < after, "a fast sample pulls it down");
    }
}
