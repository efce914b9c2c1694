//! What discovery costs each call.
//!
//! Four greeter servers on loopback (their own runtime), 64 concurrent
//! callers making unary calls through each variant in turn:
//!
//! * `plain`: a `Channel` to one server (no balancing; the reference);
//! * `balance_list`: tonic's static `Channel::balance_list` over the four;
//! * `etcd_channel`: this crate's `EtcdChannel` (tonic's balanced channel fed
//!   by the etcd Discover) over the four, registered in etcd;
//! * `p2c_direct`: the Discover driving `tower::balance::p2c::Balance` over
//!   pending-request load, behind a `Buffer`.
//!
//! Variants run in interleaved rounds after a warm-up, so machine noise hits
//! them alike; figures are totals over the rounds. Ratios are to
//! `balance_list` from the same run.
//!
//! `cargo bench --bench request_path` (`BENCH_SECS` per variant and round,
//! default 2; `BENCH_ROUNDS`, default 3).

#[path = "support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{ms, table, write_json, Stats};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::Etcd;
use tonic_etcd::{ChannelBuilder, Discover, Registration};
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PendingRequests};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Call = Arc<
    dyn Fn()
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>
        + Send
        + Sync,
>;

const CALLERS: usize = 64;
const SERVICE: &str = "bench.request_path";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Makes a call function over any tonic-compatible service.
fn caller<T>(svc: T) -> Call
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + Sync + 'static,
    T::Future: Send,
    T::Error: Into<BoxError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    Arc::new(move || {
        let mut client = GreeterClient::new(svc.clone());
        Box::pin(async move {
            client
                .say_hello(HelloRequest {
                    name: "bench".into(),
                })
                .await
                .map(|_| ())
        })
    })
}

/// Runs `CALLERS` callers for `length`; returns calls, failures, latencies.
async fn load(call: &Call, length: Duration) -> (usize, usize, Vec<Duration>) {
    let end = Instant::now() + length;
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut failed = 0;
            while Instant::now() < end {
                let t = Instant::now();
                match call().await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(_) => failed += 1,
                }
            }
            (lat, failed)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (lat, f) = t.await.unwrap();
        all.extend(lat);
        failed += f;
    }
    (all.len(), failed, all)
}

fn main() {
    let secs = env_num("BENCH_SECS", 2);
    let rounds = env_num("BENCH_ROUNDS", 3);
    let etcd = Etcd::start();

    // Servers on a runtime of their own.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addrs: Vec<String> = server_rt.block_on(async {
        let mut addrs = Vec::new();
        for i in 0..4 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(listener.local_addr().unwrap().to_string());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(Greeter::new(format!("s{i}")).into_service())
                    .serve_with_incoming(
                        tonic::transport::server::TcpIncoming::from(listener)
                            .with_nodelay(Some(true)),
                    ),
            );
        }
        addrs
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = etcd.client().await;
        let mut registrations = Vec::new();
        for a in &addrs {
            registrations.push(
                Registration::builder(client.clone())
                    .service(SERVICE)
                    .addr(a)
                    .register()
                    .await
                    .unwrap(),
            );
        }
        let endpoint = |a: &str| Endpoint::from_shared(format!("http://{a}")).unwrap();

        let plain = endpoint(&addrs[0]).connect_lazy();
        let listed = Channel::balance_list(addrs.iter().map(|a| endpoint(a)));
        let etcd_channel = ChannelBuilder::new(client.clone(), SERVICE).build().unwrap();
        etcd_channel
            .wait_for_endpoints(Duration::from_secs(5))
            .await
            .unwrap();
        let wait = Instant::now() + Duration::from_secs(5);
        while etcd_channel.endpoints() < 4 {
            assert!(Instant::now() < wait, "4 endpoints not discovered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let p2c = {
            let discover = Discover::builder(client.clone(), SERVICE).build().unwrap();
            let services = discover.map(|change| {
                Ok::<_, Infallible>(match change? {
                    Change::Insert(k, i) => Change::Insert(
                        k,
                        PendingRequests::new(
                            Endpoint::from_shared(i.uri("http")).unwrap().connect_lazy(),
                            CompleteOnResponse::default(),
                        ),
                    ),
                    Change::Remove(k) => Change::Remove(k),
                })
            });
            tower::buffer::Buffer::new(tower::balance::p2c::Balance::new(services), 1024)
        };

        let variants: Vec<(&str, Call)> = vec![
            ("plain (one server)", caller(plain)),
            ("balance_list", caller(listed)),
            ("etcd_channel", caller(etcd_channel.clone())),
            ("p2c_direct", caller(p2c)),
        ];

        // Warm-up: connections made, code paths hot.
        for (_, call) in &variants {
            load(call, Duration::from_millis(700)).await;
        }
        let mut totals: Vec<(usize, usize, Vec<Duration>, Duration)> =
            variants.iter().map(|_| (0, 0, Vec::new(), Duration::ZERO)).collect();
        for round in 0..rounds as usize {
            for k in 0..variants.len() {
                // Rotate the order each round.
                let i = (k + round) % variants.len();
                let t = Instant::now();
                let (n, failed, lat) = load(&variants[i].1, Duration::from_secs(secs)).await;
                let total = &mut totals[i];
                total.0 += n;
                total.1 += failed;
                total.2.extend(lat);
                total.3 += t.elapsed();
            }
        }

        let base = variants.iter().position(|(n, _)| *n == "balance_list").unwrap();
        let stats: Vec<(f64, Stats, usize)> = totals
            .into_iter()
            .map(|(n, failed, lat, took)| (n as f64 / took.as_secs_f64(), Stats::of(lat), failed))
            .collect();
        let (base_rate, base_stats, _) = stats[base];
        let mut rows = Vec::new();
        let mut json = serde_json::Map::new();
        for ((name, _), (rate, st, failed)) in variants.iter().zip(&stats) {
            let tput_ratio = rate / base_rate;
            let p99_ratio = st.p99.as_secs_f64() / base_stats.p99.as_secs_f64();
            rows.push(vec![
                name.to_string(),
                format!("{rate:.0}"),
                ms(st.p50),
                ms(st.p99),
                failed.to_string(),
                format!("{tput_ratio:.3}x"),
                format!("{p99_ratio:.2}x"),
            ]);
            let mut v = st.json();
            v["calls_per_s"] = (rate.round()).into();
            v["failed"] = (*failed).into();
            v["throughput_ratio_to_balance_list"] = ((tput_ratio * 1000.0).round() / 1000.0).into();
            v["p99_ratio_to_balance_list"] = ((p99_ratio * 1000.0).round() / 1000.0).into();
            json.insert(name.to_string(), v);
        }
        table(
            &format!("request_path ({CALLERS} callers, {rounds} rounds x {secs} s per variant; latency ms)"),
            &["variant", "calls/s", "p50", "p99", "failed", "tput vs list", "p99 vs list"],
            &rows,
        );
        write_json("request_path", &serde_json::Value::Object(json));
        drop(registrations);
    });
    drop(server_rt);
}
