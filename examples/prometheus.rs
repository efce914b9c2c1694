//! A Balancer's metrics in Prometheus' text format, with
//! `metrics-exporter-prometheus`: a real etcd started for the example, two
//! greeter servers registered in it (one failing every call), calls and a
//! stream through one Balancer, then what a scrape would read.
//!
//! ```sh
//! cargo run --example prometheus
//! ```
//!
//! In a service, install the exporter before building the Balancer, with
//! the same buckets and idle timeout as here, and let Prometheus scrape it
//! (`.with_http_listener(([127, 0, 0, 1], 9000)).install()?`).
//!
//! - A66's buckets make the durations histograms, which add up across
//!   clients (the exporter's default is a summary, which does not).
//! - The idle timeout for gauges drops the series of endpoints that left
//!   (every deploy brings new addresses); a Balancer touches its live
//!   endpoints' gauges every `metrics_refresh` (10 s), so they stay.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use metrics_util::MetricKindMask;
use tonic_etcd::metrics::{COUNT_BUCKETS, LATENCY_BUCKETS};
use tonic_etcd::server::RegisteredServer;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Balancer, Registration};

const SERVICE: &str = "greeter.v1.Greeter";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The recorder first: series made before it would go nowhere.
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration".into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("retry_delay".into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("retries".into()), &COUNT_BUCKETS)?
        .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(120)))
        .install_recorder()?;

    let etcd = Etcd::start();
    let client = etcd.client().await;
    let mut stops = Vec::new();
    for (id, failing) in [("good", false), ("bad", true)] {
        let greeter = Greeter::new(id);
        if failing {
            greeter.fail_switch().set(Some(tonic::Code::Unavailable));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let router = tonic_etcd::server::builder().add_service(greeter.into_service());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            RegisteredServer::new(Registration::builder(client.clone()).service(SERVICE))
                .grace(Duration::ZERO)
                .serve_with_shutdown(router, listener, async {
                    let _ = stopped.await;
                }),
        );
        stops.push(stop);
    }

    let balancer = Balancer::builder(client, SERVICE)
        .call_timeout(Duration::from_secs(1))
        .stream_methods(["greeter.v1.Greeter/Chat"])
        .build()?;
    balancer.wait_for_ready(2, Duration::from_secs(10)).await?;
    let mut greeter = GreeterClient::new(balancer.clone());
    for _ in 0..50 {
        let _ = greeter.say_hello(HelloRequest { name: "x".into() }).await;
    }
    // A stream left open: it shows as in flight and open on its endpoint.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = greeter
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tx.send(HelloRequest { name: "s".into() }).await?;
    replies.message().await?;

    // Every series but the buckets, and the buckets of one histogram.
    for line in prometheus.render().lines() {
        let shown = if line.contains("_bucket{") {
            line.contains("grpc_client_call_duration_bucket")
                && line.contains("SayHello")
                && line.contains("\"OK\"")
        } else {
            line.contains("grpc_client") || line.contains("tonic_etcd_balancer")
        };
        if shown {
            println!("{line}");
        }
    }
    drop(stops);
    Ok(())
}
