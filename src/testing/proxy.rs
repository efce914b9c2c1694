//! A loopback TCP proxy that puts faults between a client and a server
//! (etcd, or a gRPC backend): deterministic partitions without signals or
//! root.
//!
//! * [`cut`](FaultProxy::cut): existing connections closed, new ones refused
//!   (a crashed peer, a firewall that rejects);
//! * [`freeze`](FaultProxy::freeze): sockets stay open and no byte moves in
//!   either direction, new connections included (a frozen process, a silent
//!   partition, a blackhole); bytes read before the freeze are delivered
//!   after it;
//! * [`thaw`](FaultProxy::thaw) and [`resume`](FaultProxy::resume) undo
//!   them; [`heal`](FaultProxy::heal) undoes both.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A fault-injecting TCP proxy on a free loopback port. Stops when dropped.
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: std::net::SocketAddr,
    open: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    generation: watch::Sender<u64>,
    frozen: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Copies `from` to `to` while not frozen; returns when either side closes.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Frozen while waiting to read: stop reading at once.
            _ = frozen.wait_for(|f| *f) => continue,
        };
        // Bytes read just before a freeze are held until the thaw.
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl FaultProxy {
    /// Forwards connections on a free loopback port to `target` (`host:port`).
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the fault proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let open = Arc::new(AtomicBool::new(true));
        let (generation, gen_rx) = watch::channel(0u64);
        let (frozen, frozen_rx) = watch::channel(false);
        let open2 = open.clone();
        let active = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (active2, accepted2) = (active.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !open2.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                accepted2.fetch_add(1, Ordering::SeqCst);
                let target = target.clone();
                let mut cut = gen_rx.clone();
                cut.mark_unchanged();
                let frozen = frozen_rx.clone();
                let active = active2.clone();
                active.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let (in_r, in_w) = inbound.into_split();
                        let (out_r, out_w) = outbound.into_split();
                        tokio::select! {
                            _ = pipe(in_r, out_w, frozen.clone()) => {}
                            _ = pipe(out_r, in_w, frozen) => {}
                            _ = cut.changed() => {}
                        }
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            open,
            active,
            accepted,
            generation,
            frozen,
            task,
        }
    }

    /// Connections open through the proxy now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The URL to give an etcd client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn resume(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Stops moving bytes in either direction; sockets stay open.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Moves bytes again.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Undoes every fault: accepts connections and moves bytes.
    pub fn heal(&self) {
        self.resume();
        self.thaw();
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
