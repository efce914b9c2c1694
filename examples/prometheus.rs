//! A Balancer's metrics in Prometheus' text format, with
//! `metrics-exporter-prometheus`: a real etcd started for the example, two
//! greeter servers registered in it (one failing every call), calls and a
//! stream through one Balancer, then what a scrape would read.
//!
//! ```sh
//! cargo run --example prometheus
//! ```
//!
//! In a service, install the exporter before building the Balancer and let
//! Prometheus scrape it:
//!
//! ```text
//! metrics_exporter_prometheus::PrometheusBuilder::new()
//!     .with_http_listener(([127, 0, 0, 1], 9000))
//!     .install()?;
//! ```

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use tonic_etcd::server::RegisteredServer;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Balancer, Registration};

const SERVICE: &str = "greeter.v1.Greeter";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The recorder first: series made before it would go nowhere.
    let prometheus = PrometheusBuilder::new().install_recorder()?;

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

    for line in prometheus.render().lines() {
        if line.contains("tonic_etcd_client") || line.contains("tonic_etcd_balancer_endpoint") {
            println!("{line}");
        }
    }
    drop(stops);
    Ok(())
}
