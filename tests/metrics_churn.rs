//! Bounded cardinality: a long-lived client whose service's addresses
//! change with every deploy must not grow its scrape. 1,000 distinct
//! addresses churn through one Balancer (real servers, registered in a real
//! etcd) with `metrics-exporter-prometheus` installed as the docs say (an
//! idle timeout for gauges): once the churn is over, the scrape holds the
//! live endpoints' series and no others, and live endpoints keep theirs
//! however long they stay idle.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::{Balancer, Registration};

const LIMIT: Duration = Duration::from_secs(10);
/// The exporter drops gauges untouched for this long.
const IDLE: Duration = Duration::from_secs(1);
/// The Balancer touches every live endpoint's gauges this often (< IDLE).
const REFRESH: Duration = Duration::from_millis(200);
const LIVE: usize = 10;
const ROUNDS: usize = 100;

/// A greeter on a loopback address not in `seen` (the kernel reuses the
/// ports of stopped servers), registered for `svc`.
struct Server {
    addr: String,
    registration: Registration,
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(client: &etcd_client::Client, svc: &str, seen: &BTreeSet<String>) -> Server {
    let mut tries = 0;
    let (listener, addr) = loop {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        if !seen.contains(&addr) {
            break (listener, addr);
        }
        tries += 1;
        assert!(tries < 100, "no fresh port in 100 tries");
    };
    let router = tonic_etcd::server::builder().add_service(Greeter::new(&addr).into_service());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(router.serve_with_incoming_shutdown(
        tonic::transport::server::TcpIncoming::from(listener),
        async {
            let _ = stopped.await;
        },
    ));
    let registration = common::register_with(client, svc, &addr, tonic_etcd::Metadata::new()).await;
    Server {
        addr,
        registration,
        stop,
    }
}

/// The `endpoint` labels of the Balancer's per-endpoint series in a scrape,
/// and how many such series there are.
fn endpoint_series(handle: &PrometheusHandle) -> (BTreeSet<String>, usize) {
    let scrape = handle.render();
    let mut addrs = BTreeSet::new();
    let mut series = 0;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        if let Some(rest) = line.split("endpoint=\"").nth(1) {
            series += 1;
            addrs.insert(rest.split('"').next().unwrap_or_default().to_owned());
        }
    }
    (addrs, series)
}

/// Series in the whole scrape (histogram buckets count once per series).
fn all_series(handle: &PrometheusHandle) -> usize {
    handle
        .render()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains("_bucket{") && !l.is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_a_thousand_addresses_leaves_only_the_live_endpoints_series() {
    let recorder = PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::GAUGE, Some(IDLE))
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder in this test binary");

    let etcd = tonic_etcd::testing::shared();
    let client = etcd.client().await;
    let svc = common::unique("churned");
    let balancer = Balancer::builder(client.clone(), &svc)
        .metrics_refresh(REFRESH)
        .build()
        .unwrap();
    let mut greeter = GreeterClient::new(balancer.clone());

    let mut live: Vec<Server> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut peak = 0;
    let mut first_round_series = 0;
    for round in 0..ROUNDS {
        // A deploy: LIVE new servers come up, then the old ones leave.
        let mut next = Vec::with_capacity(LIVE);
        for _ in 0..LIVE {
            let server = start(&client, &svc, &seen).await;
            seen.insert(server.addr.clone());
            next.push(server);
        }
        let old = std::mem::replace(&mut live, next);
        for server in old {
            server.registration.deregister().await.unwrap();
            let _ = server.stop.send(());
        }
        let wanted: BTreeSet<String> = live.iter().map(|s| s.addr.clone()).collect();
        common::eventually(LIMIT, "the new servers in rotation", || async {
            let ready: BTreeSet<String> = balancer
                .ready_instances()
                .into_iter()
                .map(|i| i.addr)
                .collect();
            (ready == wanted).then_some(())
        })
        .await;
        for _ in 0..LIVE {
            greeter
                .say_hello(HelloRequest { name: "c".into() })
                .await
                .unwrap();
        }
        let (_, series) = endpoint_series(&handle);
        peak = peak.max(series);
        if round == 0 {
            first_round_series = all_series(&handle);
        }
    }
    assert_eq!(seen.len(), LIVE * ROUNDS, "distinct addresses churned");

    // After the idle timeout only the live endpoints' series remain, all
    // five of each; and they stay while nothing calls them.
    let wanted: BTreeSet<String> = live.iter().map(|s| s.addr.clone()).collect();
    common::eventually(LIMIT, "departed endpoints' series gone", || async {
        let (addrs, _) = endpoint_series(&handle);
        (addrs == wanted).then_some(())
    })
    .await;
    tokio::time::sleep(IDLE * 3).await;
    let (addrs, series) = endpoint_series(&handle);
    assert_eq!(addrs, wanted, "live endpoints keep their series while idle");
    assert_eq!(
        series,
        LIVE * 5,
        "state, in flight, open streams, latency, success"
    );
    let total = all_series(&handle);
    eprintln!(
        "{} addresses churned: per-endpoint series peaked at {peak}, {series} at rest; \
         whole scrape {total} series (after the first deploy: {first_round_series})",
        seen.len()
    );
    assert!(
        total <= first_round_series + LIVE,
        "the scrape stays bounded: {total} series against {first_round_series} after one deploy"
    );
}
