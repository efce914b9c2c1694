//! One endpoint's connection and load.
//!
//! Each endpoint owns one HTTP/2 connection. The connection's driver task
//! ending (peer closed, reset, keep-alive timeout) takes the endpoint out of
//! rotation at once, before another call is routed to it; it is reconnected
//! in the background with back-off.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::Instance;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connection settings for every endpoint.
#[derive(Debug, Clone)]
pub(crate) struct ConnConfig {
    pub(crate) connect_timeout: Duration,
    pub(crate) keep_alive_interval: Duration,
    pub(crate) keep_alive_timeout: Duration,
    /// Time constant of the latency estimate's decay.
    pub(crate) decay: Duration,
    /// The latency assumed for an endpoint before its first response.
    pub(crate) default_rtt: Duration,
}

/// A connected endpoint, in rotation while its connection lives.
pub(crate) struct Ready {
    pub(crate) key: String,
    pub(crate) instance: Arc<Instance>,
    send: SendRequest<tonic::body::Body>,
    authority: Authority,
    pending: AtomicUsize,
    rtt: PeakEwma,
    /// Woken when a call finds the connection closed.
    pub(crate) closed: Notify,
}

impl Ready {
    /// p2c's load: the latency estimate times the calls in flight (+1, so an
    /// idle slow endpoint still weighs more than an idle fast one).
    pub(crate) fn load(&self) -> f64 {
        self.rtt.estimate() * (self.pending.load(Ordering::Relaxed) + 1) as f64
    }

    /// Points `uri` (a path, as tonic's generated code sets it) at this endpoint.
    pub(crate) fn uri(&self, uri: &http::Uri) -> Result<http::Uri, http::Error> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = uri.path_and_query().cloned();
        http::Uri::from_parts(parts).map_err(Into::into)
    }

    pub(crate) fn sender(&self) -> SendRequest<tonic::body::Body> {
        self.send.clone()
    }

    /// Counts a call in flight until the guard is dropped or completed.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            ep: self.clone(),
            started: Instant::now(),
        }
    }
}

/// A call in flight on an endpoint.
pub(crate) struct InFlight {
    ep: Arc<Ready>,
    started: Instant,
}

impl InFlight {
    /// The response arrived: its latency feeds the estimate.
    pub(crate) fn responded(self) {
        self.ep.rtt.observe(self.started.elapsed());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ep.pending.fetch_sub(1, Ordering::Relaxed);
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

/// Connects to `instance` over HTTP/2 (prior knowledge, as gRPC does).
pub(crate) async fn connect(
    key: &str,
    instance: Arc<Instance>,
    cfg: &ConnConfig,
) -> Result<Connection, BoxError> {
    let authority: Authority = instance.addr.parse()?;
    let tcp = tokio::time::timeout(
        cfg.connect_timeout,
        tokio::net::TcpStream::connect(instance.addr.as_str()),
    )
    .await
    .map_err(|_| format!("connect timed out after {:?}", cfg.connect_timeout))??;
    tcp.set_nodelay(true)?;
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(cfg.keep_alive_interval)
        .keep_alive_timeout(cfg.keep_alive_timeout)
        .keep_alive_while_idle(true);
    let (send, conn) =
        tokio::time::timeout(cfg.connect_timeout, builder.handshake(TokioIo::new(tcp)))
            .await
            .map_err(|_| format!("HTTP/2 handshake timed out after {:?}", cfg.connect_timeout))??;
    let addr = instance.addr.clone();
    let driver = tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%addr, %error, "connection ended");
        }
    });
    Ok(Connection {
        ready: Arc::new(Ready {
            key: key.to_owned(),
            instance,
            send,
            authority,
            pending: AtomicUsize::new(0),
            rtt: PeakEwma::new(cfg.default_rtt, cfg.decay),
            closed: Notify::new(),
        }),
        driver,
    })
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
