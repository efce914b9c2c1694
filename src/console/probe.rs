//! A health probe from outside: one `grpc.health.v1.Health/Check` of the
//! whole server (`""`), as an operator's tool would make it, and the
//! server's traffic from its first out-of-band load report (ORCA), when it
//! serves them.

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
    /// Its traffic as its load report has it ("2 in flight, 150.0/s,
    /// CPU 12 %"); `None` for a server that does not report its load.
    pub traffic: Option<String>,
}

/// Probes `addr` (`host:port`) within `timeout`.
pub async fn probe(addr: &str, timeout: Duration) -> Probe {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, check(addr)).await;
    let latency = started.elapsed();
    let (status, reachable, channel) = match outcome {
        Err(_) => (format!("no answer in {timeout:?}"), false, None),
        Ok(Ok((status, channel))) => (status, true, Some(channel)),
        Ok(Err(e)) => (e, false, None),
    };
    // The traffic comes after the health answer (whose latency it must not
    // add to), within what is left of the timeout.
    let left = timeout.saturating_sub(started.elapsed());
    let traffic = match channel {
        Some(channel) => tokio::time::timeout(left, traffic(channel))
            .await
            .ok()
            .flatten(),
        None => None,
    };
    Probe {
        status,
        latency,
        reachable,
        traffic,
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

/// The server's traffic from the first report of its out-of-band load
/// stream (`None`: it has none).
async fn traffic(channel: tonic::transport::Channel) -> Option<String> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.ok()?;
    let mut stream = crate::orca::open(&mut grpc, Duration::from_secs(1))
        .await
        .ok()?;
    let report = stream.message().await.ok()??;
    Some(describe(&report))
}

/// "2 in flight, 150.0/s, CPU 12 %" (and the errors a second, when any).
pub(crate) fn describe(report: &crate::orca::OrcaLoadReport) -> String {
    let mut out = match report.in_flight() {
        Some(n) => format!("{n} in flight, "),
        None => String::new(),
    };
    out.push_str(&format!("{:.1}/s", report.rps_fractional));
    if report.eps > 0.0 {
        out.push_str(&format!(" ({:.1}/s failing)", report.eps));
    }
    out.push_str(&format!(", CPU {:.0} %", report.cpu_utilization * 100.0));
    out
}

async fn check(addr: &str) -> Result<(String, tonic::transport::Channel), String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad address: {e}"))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    let mut client = HealthClient::new(channel.clone());
    let status = match client
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
    }?;
    Ok((status, channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_reads_in_a_line() {
        let mut r = crate::orca::OrcaLoadReport {
            rps_fractional: 150.0,
            cpu_utilization: 0.123,
            ..Default::default()
        };
        assert_eq!(describe(&r), "150.0/s, CPU 12 %");
        r.named_metrics.insert(crate::orca::IN_FLIGHT.into(), 2.0);
        r.eps = 1.5;
        assert_eq!(
            describe(&r),
            "2 in flight, 150.0/s (1.5/s failing), CPU 12 %"
        );
    }
}
