//! Shutdown that ends: handlers learn it began, the server says what it
//! waits for, and connections still open at the drain limit are cut.
//!
//! tonic's graceful shutdown sends GOAWAY and waits for every connection to
//! close; its connections run in tasks of their own, so a stream that never
//! ends would hold them (and the process) for ever. Every accepted
//! connection is therefore wrapped in a [`Conn`] that counts itself and
//! fails its I/O once the drain limit passes, which ends hyper's connection
//! and every stream on it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Tells request handlers that their server began to shut down: it has
/// deregistered (or is about to) and stops accepting after its grace
/// period. Long-lived streams should end soon (with `UNAVAILABLE`, say, so
/// that clients reconnect elsewhere) instead of being cut at the drain
/// limit. Cheap to clone; get it from
/// [`RegisteredServer::draining`](super::RegisteredServer::draining).
///
/// ```no_run
/// # async fn watch(draining: tonic_etcd::server::Draining) -> Result<(), tonic::Status> {
/// tokio::select! {
///     () = draining.started() => {
///         return Err(tonic::Status::unavailable("server shutting down; reconnect"));
///     }
///     // () = next_event() => ...
/// }
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Draining(CancellationToken);

impl Draining {
    /// Whether shutdown has begun.
    pub fn is_started(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once shutdown has begun (at once if it has).
    pub async fn started(&self) {
        self.0.cancelled().await;
    }

    pub(crate) fn start(&self) {
        self.0.cancel();
    }

    /// Resolves once shutdown has begun; owns what it waits on.
    pub(crate) fn started_owned(self) -> WaitForCancellationFutureOwned {
        self.0.cancelled_owned()
    }

    /// Lists this notice as that of the server listening on `addr` until
    /// the returned guard is dropped.
    pub(crate) fn list(&self, addr: SocketAddr) -> Listed {
        lock_servers().push((addr, self.clone()));
        Listed(addr)
    }

    /// The notice of the server of this process that accepted a connection
    /// on `local` (a listener on `0.0.0.0` or `[::]` accepts on any address
    /// of its port).
    pub(crate) fn of(local: SocketAddr) -> Option<Draining> {
        lock_servers()
            .iter()
            .find(|(addr, _)| {
                addr.port() == local.port()
                    && (addr.ip() == local.ip() || addr.ip().is_unspecified())
            })
            .map(|(_, draining)| draining.clone())
    }
}

/// The draining notices of the servers this process serves with
/// [`RegisteredServer`](super::RegisteredServer), by listening address. A
/// layer inside a router is built before its server and never handed its
/// [`Draining`]; it finds it here by the local address of the connection a
/// request came on (tonic puts it in every request's extensions). The
/// out-of-band load stream uses it to end with its server's last call,
/// where it would otherwise hold its connection until the drain limit.
static SERVERS: Mutex<Vec<(SocketAddr, Draining)>> = Mutex::new(Vec::new());

fn lock_servers() -> std::sync::MutexGuard<'static, Vec<(SocketAddr, Draining)>> {
    SERVERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A server's entry in the list of draining notices; removed on drop.
pub(crate) struct Listed(SocketAddr);

impl Drop for Listed {
    fn drop(&mut self) {
        let mut servers = lock_servers();
        if let Some(i) = servers.iter().position(|(addr, _)| *addr == self.0) {
            servers.swap_remove(i);
        }
    }
}

/// The connections of one server: how many are open, and the switch that
/// cuts them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Connections {
    open: Arc<AtomicUsize>,
    cut: CancellationToken,
}

impl Connections {
    /// Wraps an accepted connection.
    pub(crate) fn track(&self, io: TcpStream) -> Conn {
        self.open.fetch_add(1, Ordering::Relaxed);
        Conn {
            io,
            cut: Box::pin(self.cut.clone().cancelled_owned()),
            open: self.open.clone(),
        }
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Fails the I/O of every connection, so each ends with its streams.
    pub(crate) fn cut(&self) {
        self.cut.cancel();
    }
}

/// An accepted connection, counted while it lives and cut on demand.
pub(crate) struct Conn {
    io: TcpStream,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    open: Arc<AtomicUsize>,
}

impl Conn {
    /// `Err` once the connection is cut. Polling registers the task, so a
    /// connection waiting for data wakes when it is cut.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "cut at the server's drain limit",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
