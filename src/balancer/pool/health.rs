//! Active health checking, as gRPC's client-side health checking (gRFC A17).
//!
//! Each connection carries one `grpc.health.v1.Health/Watch` stream for the
//! configured service name. The endpoint joins the rotation only after the
//! first `SERVING` answer, and leaves it on any other status. A server that
//! answers `UNIMPLEMENTED` is treated as healthy and not asked again; any
//! other end of the stream marks the endpoint unhealthy and the watch is
//! retried with back-off (reset by every message), as A17 specifies. The
//! stream counts against the server's concurrent stream limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::Service;

use super::endpoint::Ready;
use crate::backoff::Backoff;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Calls on one endpoint's connection, outside the balancer (health
/// checks, load reports).
#[derive(Clone)]
pub(super) struct OnConnection(pub(super) Arc<Ready>);

impl Service<http::Request<tonic::body::Body>> for OnConnection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let ep = self.0.clone();
        Box::pin(async move {
            *request.uri_mut() = ep.uri(request.uri())?;
            Ok(ep.sender().send_request(request).await?)
        })
    }
}

/// Watches `service`'s health on `ep`'s connection, reporting on `healthy`,
/// until the task is aborted (the connection's end).
pub(crate) async fn watch(ep: Arc<Ready>, service: String, healthy: watch::Sender<bool>) {
    let mut client = HealthClient::new(OnConnection(ep.clone()));
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let request = HealthCheckRequest {
            service: service.clone(),
        };
        let status = match client.watch(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(answer)) => {
                            backoff.reset();
                            let serving = answer.status == ServingStatus::Serving as i32;
                            healthy.send_if_modified(|h| std::mem::replace(h, serving) != serving);
                        }
                        Ok(None) => break tonic::Status::unavailable("health watch ended"),
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        if status.code() == tonic::Code::Unimplemented {
            tracing::warn!(addr = %ep.addr(), %service,
                "the server does not implement grpc.health.v1.Health/Watch; treating it as healthy");
            healthy.send_replace(true);
            return;
        }
        tracing::debug!(addr = %ep.addr(), %service, %status, "health watch failed; retrying");
        healthy.send_replace(false);
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
