//! A health probe from outside: one `grpc.health.v1.Health/Check` of the
//! whole server (`""`), as an operator's tool would make it.

use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `SERVING`, `NOT_SERVING`, `UNIMPLEMENTED` (no health service: the
    /// server answered, which is all that can be said), or why it failed.
    pub status: String,
    /// Connect and check, end to end.
    pub latency: Duration,
    /// Whether the server answered at all.
    pub reachable: bool,
}

/// Probes `addr` (`host:port`) within `timeout`.
pub async fn probe(addr: &str, timeout: Duration) -> Probe {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, check(addr)).await;
    let latency = started.elapsed();
    let (status, reachable) = match outcome {
        Err(_) => (format!("no answer in {timeout:?}"), false),
        Ok(Ok(status)) => (status, true),
        Ok(Err(e)) => (e, false),
    };
    Probe {
        status,
        latency,
        reachable,
    }
}

/// Probes every `(key, addr)` within `timeout` each, 32 at a time (a page
/// or a listing of thousands must not open thousands of connections at
/// once).
pub async fn probe_all<K: Send + 'static>(
    targets: Vec<(K, String)>,
    timeout: Duration,
) -> Vec<(K, Probe)> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for (key, addr) in targets {
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            (key, probe(&addr, timeout).await)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(done) = r {
            out.push(done);
        }
    }
    out
}

async fn check(addr: &str) -> Result<String, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad address: {e}"))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    let mut client = HealthClient::new(channel);
    match client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(resp) => Ok(match resp.into_inner().status() {
            ServingStatus::Serving => "SERVING".into(),
            ServingStatus::NotServing => "NOT_SERVING".into(),
            ServingStatus::ServiceUnknown => "SERVICE_UNKNOWN".into(),
            ServingStatus::Unknown => "UNKNOWN".into(),
        }),
        Err(s) if s.code() == tonic::Code::Unimplemented => Ok("UNIMPLEMENTED".into()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}
