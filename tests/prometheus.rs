//! A Balancer's metrics as Prometheus scrapes them, with
//! `metrics-exporter-prometheus` installed as the docs say (A66's buckets,
//! an idle timeout for gauges), against real servers in a real etcd:
//!
//! * mixed traffic (unary calls with a retry policy, a server stream and a
//!   bidi stream on one client) shows gRPC's instruments per method, the
//!   durations as histograms with A66's buckets, and retries only on the
//!   method whose policy allows them;
//! * bounded cardinality: 1,000 distinct addresses churn through one
//!   Balancer; once the churn is over the scrape holds the live endpoints'
//!   series and no others, and live endpoints keep theirs however long
//!   they stay idle.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use backend::Backend;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tonic_etcd::metrics::{COUNT_BUCKETS, LATENCY_BUCKETS};
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

/// The recorder of this test binary, installed on first use as the docs
/// say: A66's buckets, and gauges dropped after `IDLE` untouched.
fn prometheus() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration".into()), &LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("retry_delay".into()),
                        &LATENCY_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("retries".into()), &COUNT_BUCKETS)
                })
                .expect("buckets")
                .idle_timeout(MetricKindMask::GAUGE, Some(IDLE))
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).expect("the only recorder in this test binary");
            handle
        })
        .clone()
}

/// The scrape's sample lines of `target` (`grpc_target="…"`).
fn samples_of(handle: &PrometheusHandle, target: &str) -> Vec<String> {
    let label = format!("grpc_target=\"{target}\"");
    handle
        .render()
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .map(str::to_owned)
        .collect()
}

/// The value of the one sample of `name` whose labels include each of `labels`.
fn value(samples: &[String], name: &str, labels: &[&str]) -> Option<f64> {
    samples
        .iter()
        .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

/// The `endpoint` labels of `target`'s per-endpoint series in a scrape,
/// and how many such series there are.
fn endpoint_series(handle: &PrometheusHandle, target: &str) -> (BTreeSet<String>, usize) {
    let mut addrs = BTreeSet::new();
    let mut series = 0;
    for line in samples_of(handle, target) {
        if let Some(rest) = line.split("endpoint=\"").nth(1) {
            series += 1;
            addrs.insert(rest.split('"').next().unwrap_or_default().to_owned());
        }
    }
    (addrs, series)
}

/// `target`'s series in the scrape (a histogram's buckets count once).
fn all_series(handle: &PrometheusHandle, target: &str) -> usize {
    samples_of(handle, target)
        .iter()
        .filter(|l| !l.contains("_bucket{"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_a_thousand_addresses_leaves_only_the_live_endpoints_series() {
    let handle = prometheus();
    let (client, svc, target) = common::metered_service("churned").await;
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
        let (_, series) = endpoint_series(&handle, &target);
        peak = peak.max(series);
        if round == 0 {
            first_round_series = all_series(&handle, &target);
        }
    }
    assert_eq!(seen.len(), LIVE * ROUNDS, "distinct addresses churned");

    // After the idle timeout only the live endpoints' series remain, all
    // five of each; and they stay while nothing calls them.
    let wanted: BTreeSet<String> = live.iter().map(|s| s.addr.clone()).collect();
    common::eventually(LIMIT, "departed endpoints' series gone", || async {
        let (addrs, _) = endpoint_series(&handle, &target);
        (addrs == wanted).then_some(())
    })
    .await;
    tokio::time::sleep(IDLE * 3).await;
    let (addrs, series) = endpoint_series(&handle, &target);
    assert_eq!(addrs, wanted, "live endpoints keep their series while idle");
    assert_eq!(
        series,
        LIVE * 5,
        "state, in flight, open streams, latency, success"
    );
    let total = all_series(&handle, &target);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_traffic_scrapes_as_grpc_histograms_per_method_with_retries_where_allowed() {
    let handle = prometheus();
    let (client, svc, target) = common::metered_service("scraped").await;
    // Two servers, one failing every call with UNAVAILABLE: SayHello may
    // retry it (its policy says so), the streams may not.
    let (good, bad) = (Backend::start("good"), Backend::start("bad"));
    bad.fail.set(Some(tonic::Code::Unavailable));
    let _regs = [
        common::register_with(&client, &svc, &good.addr, tonic_etcd::Metadata::new()).await,
        common::register_with(&client, &svc, &bad.addr, tonic_etcd::Metadata::new()).await,
    ];
    let config: tonic_etcd::ServiceConfig = r#"{"methodConfig":[{"name":[{"service":"greeter.v1.Greeter","method":"SayHello"}],
        "retryPolicy":{"maxAttempts":4,"initialBackoff":"0.001s","maxBackoff":"0.002s","backoffMultiplier":2,
        "retryableStatusCodes":["UNAVAILABLE"]}}]}"#
        .parse()
        .unwrap();
    let balancer = Balancer::builder(client.clone(), &svc)
        .service_config(config)
        .stream_methods([
            "greeter.v1.Greeter/Chat",
            "greeter.v1.Greeter/SayHelloStream",
        ])
        .outlier_detection(tonic_etcd::balancer::OutlierDetection::disabled())
        .build()
        .unwrap();
    balancer.wait_for_ready(2, LIMIT).await.unwrap();
    let mut greeter = GreeterClient::new(balancer.clone());
    let (mut unary_ok, mut streams) = (0, 0);
    for i in 0..30 {
        let reply = greeter.say_hello(HelloRequest { name: "u".into() }).await;
        unary_ok += usize::from(reply.is_ok());
        if i % 3 == 0 {
            // A server stream and a bidi stream beside the unary calls.
            let s = greeter
                .say_hello_stream(HelloRequest { name: "s".into() })
                .await;
            if let Ok(s) = s {
                let mut s = s.into_inner();
                while let Ok(Some(_)) = s.message().await {}
            }
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            if let Ok(chat) = greeter
                .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                let mut chat = chat.into_inner();
                let _ = tx.send(HelloRequest { name: "c".into() }).await;
                drop(tx);
                while let Ok(Some(_)) = chat.message().await {}
            }
            streams += 1;
        }
    }
    assert_eq!(unary_ok, 30, "every unary call succeeds after its retries");
    let samples = samples_of(&handle, &target);
    for method in ["SayHello", "SayHelloStream", "Chat"] {
        let m = format!("grpc_method=\"greeter.v1.Greeter/{method}\"");
        // Histograms with A66's boundaries (a summary has no `le`).
        for le in [
            "le=\"0.00001\"",
            "le=\"0.0003\"",
            "le=\"0.065\"",
            "le=\"100\"",
        ] {
            assert!(
                value(&samples, "grpc_client_call_duration_bucket", &[&m, le]).is_some(),
                "{method}: call duration bucket {le}"
            );
        }
        assert!(
            value(&samples, "grpc_client_attempt_duration_count", &[&m]).is_some(),
            "{method}"
        );
        assert!(
            value(&samples, "grpc_client_attempt_started", &[&m]).unwrap_or(0.0) > 0.0,
            "{method}"
        );
    }
    let hello = "grpc_method=\"greeter.v1.Greeter/SayHello\"";
    let ok = value(
        &samples,
        "grpc_client_call_duration_count",
        &[hello, "grpc_status=\"OK\""],
    );
    assert_eq!(ok, Some(30.0));
    let retried = |method: &str| {
        let m = format!("grpc_method=\"greeter.v1.Greeter/{method}\"");
        value(
            &samples,
            "tonic_etcd_client_retries_total",
            &[&m, "result=\"retried\""],
        )
    };
    assert!(
        retried("SayHello").unwrap_or(0.0) > 0.0,
        "SayHello retries the failing server"
    );
    assert_eq!(retried("SayHelloStream"), Some(0.0), "no policy: no retry");
    assert_eq!(retried("Chat"), Some(0.0), "no policy: no retry");
    let calls_retried = value(&samples, "grpc_client_call_retries_count", &[hello]).unwrap_or(0.0);
    assert!(
        calls_retried > 0.0,
        "the retries histogram counts the calls that retried"
    );
    for le in ["le=\"0\"", "le=\"1\"", "le=\"4\"", "le=\"65536\""] {
        assert!(
            value(&samples, "grpc_client_call_retries_bucket", &[hello, le]).is_some(),
            "{le}"
        );
    }
    // Failures of the streams are answered, not retried: they show by status.
    let failed_streams: f64 = ["SayHelloStream", "Chat"]
        .iter()
        .filter_map(|m| {
            let m = format!("grpc_method=\"greeter.v1.Greeter/{m}\"");
            value(
                &samples,
                "grpc_client_call_duration_count",
                &[&m, "grpc_status=\"UNAVAILABLE\""],
            )
        })
        .sum();
    eprintln!("{streams} rounds of streams; {failed_streams} failed on the bad server, unretried");
}
