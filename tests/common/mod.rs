//! Helpers shared by the integration tests: bounded polling, key reads.
#![allow(dead_code)]

pub mod cpu;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every 10 ms until it returns `Some`, or panics after `limit`
/// with `what`. Every wait in the tests is bounded this way.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value and lease of `key`, or `None`; etcd errors count as "not known".
pub async fn get(client: &etcd_client::Client, key: &str) -> Option<(Vec<u8>, i64)> {
    let mut c = client.clone();
    let resp = tokio::time::timeout(Duration::from_secs(2), c.get(key, None))
        .await
        .ok()?
        .ok()?;
    resp.kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.lease()))
}

/// Whether etcd answered that `key` does not exist.
pub async fn absent(client: &etcd_client::Client, key: &str) -> bool {
    let mut c = client.clone();
    matches!(
        tokio::time::timeout(Duration::from_secs(2), c.get(key, None)).await,
        Ok(Ok(resp)) if resp.kvs().is_empty()
    )
}

/// Registers `addr` for `svc` with `meta` through `client`.
pub async fn register_with(
    client: &etcd_client::Client,
    svc: &str,
    addr: &str,
    meta: tonic_etcd::Metadata,
) -> tonic_etcd::Registration {
    tonic_etcd::Registration::builder(client.clone())
        .service(svc)
        .addr(addr)
        .metadata(meta)
        .register()
        .await
        .expect("registered")
}

/// Serves gRPC's interop service `server` on a free loopback port: its
/// address, and the task serving it.
pub async fn serve_interop(
    server: tonic_etcd::testing::interop::TestServer,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let router = tonic_etcd::server::builder().add_service(server.into_service());
    let task = tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let _ = router.serve_with_incoming(incoming).await;
    });
    (addr, task)
}

/// A service name unique to this test process and call site.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A service unique to the caller on the shared etcd: a client to it, the
/// service's name, and the `grpc.target` its Balancer's metrics carry.
pub async fn metered_service(prefix: &str) -> (tonic_etcd::Etcd, String, String) {
    let client = tonic_etcd::testing::shared().client().await;
    let svc = unique(prefix);
    let target = format!("etcd:///{svc}");
    (client, svc, target)
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
