//! Backends of unequal capacity: does each get calls in proportion to what
//! it can do? Weighted round robin on the servers' own load reports (ORCA,
//! gRFC A51/A58) against the Balancer's cost-weighted pick and tonic's
//! balanced channel, all fed by the same etcd discovery.
//!
//! Four greeter backends, each with a pool of workers: a call takes a
//! worker for 5 ms of work (a timer wait, which tokio rounds up: the bench
//! measures what it really takes and computes the capacity from that),
//! waiting in line when all are busy. Two have 8 workers, two have 4:
//! capacity shares 1/3, 1/3, 1/6, 1/6. Each server reports, as its
//! application utilization, the share of its workers' time spent working
//! over the last second or more, and its calls per second over the same
//! span: weighted round robin's weight, `qps / utilization`, is then its
//! capacity. (Over 200 ms windows the utilization was noisy enough that
//! the weights missed by 13 % and a small backend queued: p99 1 s.)
//!
//! Open loop at 80 % of the total capacity (`BENCH_LOAD_PERCENT`), each call
//! with a 1 s deadline, latency from its scheduled start. Variants run in
//! alternating short rounds (`BENCH_ROUNDS` × `BENCH_ROUND_MS`, default
//! 4 × 4,000 ms) after a warm-up of 4 s each (weighted round robin's
//! blackout is set to 2 s here, its default is 10 s); before each round the
//! backends' queues empty and their rate windows turn over, so that no
//! variant pays for the one before (tonic's even split overloads the small
//! backends), and 2 s of calls go unmeasured (`BENCH_LEAD_MS`): the servers'
//! rates are over windows of a second and more. Reported: each
//! backend's call share beside its capacity share, the largest relative
//! error, p50/p99 latency, failures, and the process's CPU per call (client
//! and the four servers: they share the process). Writes
//! `target/bench/capacity.json`.

#[path = "support/backends.rs"]
mod backends;
#[path = "../tests/common/cpu.rs"]
mod cpu;
#[path = "../tests/common/pki.rs"]
mod pki;
#[path = "../tests/common/proxy.rs"]
mod proxy;
#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use backends::{caller, round, Call};
use cpu::cpu_time;
use tokio::time::Instant;
use tonic_etcd::server::LoadReporter;
use tonic_etcd::testing::greeter::Greeter;
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Balancer, ChannelBuilder, Registration, ServiceConfig};

use support::{ms, setting, table, write_json};

const SERVICE: &str = "capacity.v1.Greeter";
const WORK: Duration = Duration::from_millis(5);
const WORKERS: [usize; 4] = [8, 8, 4, 4];
const DEADLINE: Duration = Duration::from_secs(1);

/// Serves a greeter with `workers` workers doing [`WORK`] per call on a
/// runtime of its own; its address, runtime and load reporter.
fn serve(id: String, workers: usize) -> (String, tokio::runtime::Runtime, LoadReporter) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap().to_string();
    let load = LoadReporter::new();
    let greeter = Greeter::new(id)
        .with_delay(WORK)
        .with_workers(workers, load.clone());
    let reporter = load.clone();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        tonic_etcd::server::builder_with_load(load)
            .add_service(greeter.into_service())
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
    });
    (addr, rt, reporter)
}

/// Waits until no backend has a call in flight (a variant that overloads
/// one leaves a queue the next would pay for), then for the servers' rate
/// windows (1 s) to turn over. Bounded: 10 s at most.
async fn settle(loads: &[LoadReporter]) {
    let until = Instant::now() + Duration::from_secs(10);
    while loads.iter().any(|l| l.in_flight() > 0) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
}

#[derive(Default)]
struct Totals {
    latencies: Vec<Duration>,
    by_backend: BTreeMap<String, u64>,
    failed: u64,
    cpu: Duration,
}

fn main() {
    let rounds = setting("BENCH_ROUNDS", 4, 1) as usize;
    let round_ms = setting("BENCH_ROUND_MS", 4_000, 300);
    let warm_ms = setting("BENCH_WARM_MS", 4_000, 300);
    let lead_ms = setting("BENCH_LEAD_MS", 2_000, 100);
    let percent = setting("BENCH_LOAD_PERCENT", 80, 80);
    let etcd = Etcd::start();
    let rt = support::runtime();
    // The work is a timer wait, which tokio rounds up to its next 1 ms
    // tick: the capacity is what the workers really do, measured.
    let work = rt.block_on(async {
        let started = Instant::now();
        for _ in 0..100 {
            tokio::time::sleep(WORK).await;
        }
        started.elapsed() / 100
    });
    let capacity: f64 = WORKERS.iter().map(|w| *w as f64 / work.as_secs_f64()).sum();
    let rate = (capacity * percent as f64 / 100.0) as u64;
    let shares: Vec<f64> = WORKERS
        .iter()
        .map(|w| *w as f64 / WORKERS.iter().sum::<usize>() as f64)
        .collect();
    let (servers, loads, _registrations, variants) = rt.block_on(async {
        let client = etcd.client().await;
        let mut servers = Vec::new();
        let mut loads = Vec::new();
        let mut registrations = Vec::new();
        for (i, w) in WORKERS.iter().enumerate() {
            let (addr, server_rt, load) = serve(format!("b{i}-{w}w"), *w);
            loads.push(load);
            registrations.push(
                Registration::builder(client.clone())
                    .service(SERVICE)
                    .addr(&addr)
                    .register()
                    .await
                    .unwrap(),
            );
            servers.push(server_rt);
        }
        let wrr = ServiceConfig::from_json(
            r#"{"loadBalancingConfig":[{"weighted_round_robin":{"blackoutPeriod":"2s"}}]}"#,
        )
        .unwrap();
        let weighted = Balancer::builder(client.clone(), SERVICE)
            .service_config(wrr)
            .build()
            .unwrap();
        let cost = Balancer::builder(client.clone(), SERVICE).build().unwrap();
        let tonic_channel = ChannelBuilder::new(client.clone(), SERVICE)
            .build()
            .unwrap();
        weighted
            .wait_for_ready(4, Duration::from_secs(30))
            .await
            .unwrap();
        cost.wait_for_ready(4, Duration::from_secs(30))
            .await
            .unwrap();
        let variants: Vec<(&str, Call)> = vec![
            (
                "balancer, weighted_round_robin",
                caller(weighted, Some(DEADLINE)),
            ),
            (
                "balancer, cost-weighted (default)",
                caller(cost, Some(DEADLINE)),
            ),
            (
                "etcd_channel (tonic)",
                caller(tonic_channel, Some(DEADLINE)),
            ),
        ];
        (servers, loads, registrations, variants)
    });
    // Warm-up: connections, estimates, and weighted round robin's blackout.
    rt.block_on(async {
        for (_, call) in &variants {
            round(call, rate, Duration::from_millis(warm_ms), None).await;
            settle(&loads).await;
        }
    });
    let mut totals: Vec<Totals> = variants.iter().map(|_| Totals::default()).collect();
    for _ in 0..rounds {
        for (i, (_, call)) in variants.iter().enumerate() {
            rt.block_on(async {
                settle(&loads).await;
                // Unmeasured lead-in: the servers' reports cover windows of
                // a second and more, which the pause emptied.
                round(call, rate, Duration::from_millis(lead_ms), None).await;
            });
            let cpu = cpu_time();
            let results = rt.block_on(round(call, rate, Duration::from_millis(round_ms), None));
            let t = &mut totals[i];
            t.cpu += cpu_time().saturating_sub(cpu);
            for (latency, outcome) in results {
                t.latencies.push(latency);
                match outcome {
                    Ok(id) => *t.by_backend.entry(id).or_default() += 1,
                    Err(_) => t.failed += 1,
                }
            }
        }
    }
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    for ((name, _), t) in variants.iter().zip(totals.iter_mut()) {
        t.latencies.sort();
        let n = t.latencies.len().max(1);
        let at = |q: f64| t.latencies[((t.latencies.len() - 1) as f64 * q).round() as usize];
        let answered: u64 = t.by_backend.values().sum();
        let got: Vec<f64> = (0..WORKERS.len())
            .map(|i| {
                let id = format!("b{i}-{}w", WORKERS[i]);
                *t.by_backend.get(&id).unwrap_or(&0) as f64 / answered.max(1) as f64
            })
            .collect();
        let worst = got
            .iter()
            .zip(&shares)
            .map(|(g, s)| (g - s).abs() / s)
            .fold(0.0, f64::max);
        let cpu_us_per_call = t.cpu.as_secs_f64() * 1e6 / n as f64;
        rows.push(vec![
            name.to_string(),
            got.iter()
                .map(|g| format!("{:.1}", g * 100.0))
                .collect::<Vec<_>>()
                .join(" / "),
            format!("{:.1} %", worst * 100.0),
            ms(at(0.5)),
            ms(at(0.99)),
            t.failed.to_string(),
            format!("{cpu_us_per_call:.0}"),
        ]);
        json.insert(
            name.to_string(),
            serde_json::json!({
                "shares": got,
                "capacity_shares": shares,
                "worst_share_error": worst,
                "p50_ms": at(0.5).as_secs_f64() * 1e3,
                "p99_ms": at(0.99).as_secs_f64() * 1e3,
                "failed": t.failed,
                "calls": n,
                "process_cpu_us_per_call": cpu_us_per_call,
            }),
        );
    }
    table(
        &format!(
            "capacity: four backends of 8, 8, 4 and 4 workers ({:.2} ms of work a call; capacity \
             shares 33.3 / 33.3 / 16.7 / 16.7 %), open loop at {percent} % of capacity ({rate} \
             calls/s), {rounds} rounds x {round_ms} ms per variant",
            work.as_secs_f64() * 1e3
        ),
        &[
            "variant",
            "call shares %",
            "worst share error",
            "p50 ms",
            "p99 ms",
            "failed",
            "process CPU us/call",
        ],
        &rows,
    );
    json.insert("rate".into(), rate.into());
    json.insert("work_ms".into(), (work.as_secs_f64() * 1e3).into());
    json.insert("load_percent".into(), percent.into());
    write_json("capacity", &serde_json::Value::Object(json));
    drop(variants);
    for s in servers {
        s.shutdown_background();
    }
}
