//! Servers built on `server::builder` report their load the gRPC way (ORCA,
//! gRFC A51), against real servers and real etcd: a trailer on every
//! response, success or failure, and an out-of-band stream whose calls in
//! flight follow the calls.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::time::Duration;

use backend::Backend;
use common::unique;
use tokio_stream::StreamExt;
use tonic_etcd::orca::OrcaLoadReport;
use tonic_etcd::server::LoadReporter;
use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata};

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_the_servers_load() {
    let client = shared().client().await;
    let svc = unique("orca-trailer");
    let backend = Backend::start("trailer");
    let _reg = common::register_with(&client, &svc, &backend.addr, Metadata::new()).await;
    let b = Balancer::builder(client.clone(), &svc).build().unwrap();
    b.wait_for_ready(1, LIMIT).await.unwrap();
    let mut greeter = GreeterClient::new(b.clone());

    // Calls for a little over the report's one-second rate window.
    let started = tokio::time::Instant::now();
    let mut last = None;
    let mut calls = 0u32;
    while started.elapsed() < Duration::from_millis(1_300) && calls < 100_000 {
        let response = greeter
            .say_hello(HelloRequest { name: "x".into() })
            .await
            .unwrap();
        let report = OrcaLoadReport::from_metadata(response.metadata())
            .expect("an endpoint-load-metrics-bin trailer on every response");
        assert!(report.in_flight().is_some(), "{report:?}");
        last = Some(report);
        calls += 1;
    }
    // The last trailer may be up to 100 ms old: wait that out and call once
    // more, so that it covers a whole rate window.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let report = OrcaLoadReport::from_metadata(
        greeter
            .say_hello(HelloRequest { name: "x".into() })
            .await
            .unwrap()
            .metadata(),
    )
    .unwrap();
    assert!(last.is_some());
    assert!(
        report.rps_fractional > 1.0,
        "{calls} calls in 1.3 s, reported {} a second",
        report.rps_fractional
    );
    assert_eq!(report.eps, 0.0);

    // A failure answered at once (trailers-only) carries one too, and the
    // errors show as eps once a window has passed.
    backend.fail.set(Some(tonic::Code::Internal));
    let until = tokio::time::Instant::now() + Duration::from_millis(1_300);
    while tokio::time::Instant::now() < until {
        let status = greeter
            .say_hello(HelloRequest { name: "x".into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            OrcaLoadReport::from_metadata(status.metadata()).is_some(),
            "a report on an error too: {status:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let status = greeter
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .unwrap_err();
    let report = OrcaLoadReport::from_metadata(status.metadata()).unwrap();
    assert!(report.eps > 1.0, "{report:?}");
}

/// Per-call reports can be turned off; the out-of-band stream stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_reports_can_be_turned_off() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let load = tonic_etcd::server::LoadReporter::new().per_call_reports(false);
    let server = tokio::spawn(
        tonic_etcd::server::builder_with_load(load)
            .add_service(tonic_etcd::testing::greeter::Greeter::new("quiet").into_service())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let response = GreeterClient::new(channel)
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .unwrap();
    assert!(OrcaLoadReport::from_metadata(response.metadata()).is_none());
    let mut reports = Box::pin(
        tonic_etcd::orca::watch(&addr, Duration::from_secs(1), LIMIT)
            .await
            .unwrap(),
    );
    let report = reports.next().await.unwrap().unwrap();
    assert_eq!(report.in_flight(), Some(0));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_out_of_band_stream_follows_the_calls_in_flight() {
    let client = shared().client().await;
    let svc = unique("orca-oob");
    let backend = Backend::start_slow("127.0.0.1:0", "slow", Duration::from_millis(1_500));
    let _reg = common::register_with(&client, &svc, &backend.addr, Metadata::new()).await;
    let b = Balancer::builder(client.clone(), &svc).build().unwrap();
    b.wait_for_ready(1, LIMIT).await.unwrap();

    // A stream of its own does not count.
    let mut idle = Box::pin(
        tonic_etcd::orca::watch(&backend.addr, Duration::from_secs(1), LIMIT)
            .await
            .unwrap(),
    );
    let first = idle.next().await.unwrap().unwrap();
    assert_eq!(
        first.in_flight(),
        Some(0),
        "the stream does not count itself"
    );
    drop(idle);

    let call = tokio::spawn({
        let b = b.clone();
        async move {
            let r = GreeterClient::new(b)
                .say_hello(HelloRequest { name: "x".into() })
                .await;
            (r, tokio::time::Instant::now())
        }
    });
    // A report every minute: the first at once shows the call, by method.
    let mut seen = None;
    for _ in 0..50 {
        let mut reports = Box::pin(
            tonic_etcd::orca::watch(&backend.addr, Duration::from_secs(60), LIMIT)
                .await
                .unwrap(),
        );
        let report = reports.next().await.unwrap().unwrap();
        if report.in_flight() == Some(1) {
            seen = Some((report, reports));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (report, mut reports) = seen.expect("the call in flight reported");
    let methods: Vec<_> = report.in_flight_by_method().into_iter().collect();
    assert_eq!(methods, [("/greeter.v1.Greeter/SayHello", 1)]);
    // The next report comes when the call ends, not a minute later.
    let (answered, ended) = call.await.unwrap();
    answered.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(5), reports.next())
        .await
        .expect("a report when the last call ended")
        .unwrap()
        .unwrap();
    assert_eq!(report.in_flight(), Some(0));
    assert!(
        ended.elapsed() < Duration::from_secs(1),
        "reported {:?} after the call ended",
        ended.elapsed()
    );
}

/// Serves a greeter with `workers` workers doing `work` per call on a
/// runtime of its own, reporting its utilization; its address and runtime.
fn capacity_backend(
    id: &str,
    workers: usize,
    work: Duration,
    load: LoadReporter,
) -> (String, Stops) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let greeter = tonic_etcd::testing::greeter::Greeter::new(id)
        .with_delay(work)
        .with_workers(workers, load.clone());
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        tonic_etcd::server::builder_with_load(load)
            .add_service(greeter.into_service())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    (addr, Stops(Some(rt)))
}

/// A handler's own per-call metrics (gRPC's `CallMetricsRecorder`) reach
/// the client in that call's trailer, beside the server's load: the
/// greeter reports the work each call did as `work_ms`. A server that does
/// not offer the recorder sends the server's load only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_reports_what_each_call_cost() {
    let work = Duration::from_millis(20);
    for offered in [true, false] {
        let (addr, _rt) =
            capacity_backend("cost", 2, work, LoadReporter::new().call_metrics(offered));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut greeter = GreeterClient::new(channel);
        for _ in 0..3 {
            let response = greeter
                .say_hello(HelloRequest { name: "x".into() })
                .await
                .unwrap();
            let report = OrcaLoadReport::from_metadata(response.metadata())
                .expect("an endpoint-load-metrics-bin trailer");
            assert_eq!(
                report.in_flight(),
                Some(0),
                "the server's load is there too"
            );
            let cost = report.request_cost.get("work_ms").copied();
            if offered {
                let cost = cost.unwrap_or_else(|| panic!("no request cost: {report:?}"));
                assert!(
                    (20.0..1_000.0).contains(&cost),
                    "20 ms of work reported as {cost} ms"
                );
                assert_eq!(report.request_cost.len(), 1, "{report:?}");
            } else {
                assert_eq!(cost, None, "{report:?}");
            }
        }
    }
}

/// Stops a backend's runtime when dropped (from async code too).
struct Stops(Option<tokio::runtime::Runtime>);

impl Drop for Stops {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Weighted round robin (gRFC A58) on the servers' own reports, the
/// per-call ones: two backends, one with twice the workers of the other,
/// get calls in proportion to their capacity (2:1) once the weights are in;
/// before any report counts (the blackout), it is plain round robin (1:1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_the_servers_capacity() {
    wrr_follows_capacity(r#"{"blackoutPeriod":"1s","weightUpdatePeriod":"0.1s"}"#).await;
}

/// The same from the out-of-band stream (`enableOobLoadReport`), where the
/// per-call reports are not read: red when the stream is not followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_out_of_band_reports() {
    wrr_follows_capacity(
        r#"{"enableOobLoadReport":true,"oobReportingPeriod":"1s",
            "blackoutPeriod":"1s","weightUpdatePeriod":"0.1s"}"#,
    )
    .await;
}

async fn wrr_follows_capacity(wrr: &str) {
    use std::collections::HashMap;
    let client = shared().client().await;
    let svc = unique("wrr");
    let work = Duration::from_millis(4);
    let (big, _big_rt) = capacity_backend("big", 8, work, LoadReporter::new());
    let (small, _small_rt) = capacity_backend("small", 4, work, LoadReporter::new());
    let _r1 = common::register_with(&client, &svc, &big, Metadata::new()).await;
    let _r2 = common::register_with(&client, &svc, &small, Metadata::new()).await;
    let config = tonic_etcd::ServiceConfig::from_json(&format!(
        r#"{{"loadBalancingConfig":[{{"weighted_round_robin":{wrr}}}]}}"#
    ))
    .unwrap();
    let b = Balancer::builder(client.clone(), &svc)
        .service_config(config)
        .build()
        .unwrap();
    b.wait_for_ready(2, LIMIT).await.unwrap();

    // Closed loop, 16 callers: about 80 % of the pair's 3,000 calls a
    // second would saturate the small one under round robin.
    let shares = |secs: u64| {
        let b = b.clone();
        async move {
            let until = tokio::time::Instant::now() + Duration::from_secs(secs);
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..16 {
                let b = b.clone();
                tasks.spawn(async move {
                    let mut counts = HashMap::<String, u64>::new();
                    let mut greeter = GreeterClient::new(b);
                    while tokio::time::Instant::now() < until {
                        let id = greeter
                            .say_hello(HelloRequest { name: "x".into() })
                            .await
                            .unwrap()
                            .into_inner()
                            .server_id;
                        *counts.entry(id).or_default() += 1;
                    }
                    counts
                });
            }
            let mut counts = HashMap::<String, u64>::new();
            while let Some(done) = tasks.join_next().await {
                for (k, n) in done.unwrap() {
                    *counts.entry(k).or_default() += n;
                }
            }
            let big = *counts.get("big").unwrap_or(&0) as f64;
            let small = *counts.get("small").unwrap_or(&0) as f64;
            (big / (big + small).max(1.0), (big + small) as u64)
        }
    };
    let (early, n) = shares(1).await;
    assert!(
        (0.4..=0.6).contains(&early),
        "in the blackout, round robin: the big one took {early:.2} of {n}"
    );
    // Weights count after the 1 s blackout; give them a second more.
    shares(1).await;
    let (settled, n) = shares(3).await;
    eprintln!("round robin {early:.3}, weighted {settled:.3} of {n}");
    assert!(
        (0.6..=0.73).contains(&settled),
        "the big one has 2/3 of the capacity and took {settled:.2} of {n} calls"
    );
}
