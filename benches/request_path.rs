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
//!   pending-request load, behind a `Buffer`;
//! * `balancer`: this crate's own `Balancer` (no buffer task, peak-EWMA p2c).
//!
//! Then, `balancer` against tonic's balanced channel fed by the same etcd
//! Discover (`etcd_channel`), each on a fresh set of four backends:
//!
//! * one backend adds 20 ms to every reply: mean and p99 latency;
//! * one backend dies (its runtime is shut down, closing every socket as a
//!   SIGKILL would; its etcd key stays alive): failed calls in the next
//!   10 s, their codes, and whether they name the address;
//! * one bidi stream open on one backend, unary calls from four callers
//!   beside it: the holder's share of the unary calls (fair: 25 %);
//! * no backend registered: how long a call takes to fail;
//! * one backend frozen (a proxy in front of it stops moving bytes, as a
//!   SIGSTOPped process would), every call with a 1 s deadline: how many
//!   calls end later than their deadline, and by how much;
//! * four healthy backends over TLS: throughput and latency.
//!
//! Variants run in interleaved rounds after a warm-up, so machine noise hits
//! them alike; figures are totals over the rounds. Ratios are to
//! `balance_list` from the same run.
//!
//! `cargo bench --bench request_path` (`BENCH_SECS` ms per variant and round,
//! default 2000; `BENCH_ROUNDS`, default 3; `BENCH_KILL_MS`, default 10000;
//! `BENCH_STREAM_CALLS`, default 8000, and `BENCH_STREAM_ROUNDS`, default 8,
//! for the stream scenario; `BENCH_SCENARIOS=one_stream,one_killed` runs only
//! those scenarios; `BENCH_PER_ROUND=1` prints each round's latency
//! quantiles per variant on stderr).

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

use std::convert::Infallible;
use std::time::{Duration, Instant};

use backends::{caller, Backends, Call, GrpcChannel, Setup};
use support::{ms, selected, setting, smoke, table, write_json, Stats};
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_etcd::balancer::TlsConfig;
use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Balancer, ChannelBuilder, Discover};
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PendingRequests};

const CALLERS: usize = 64;
const SERVICE: &str = "bench.request_path";

/// Runs `CALLERS` closed-loop callers for `length`; returns each call's
/// duration and whether it succeeded.
async fn outcomes(call: &Call, length: Duration) -> Vec<(Duration, bool)> {
    let end = Instant::now() + length;
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(4096);
            while Instant::now() < end {
                let t = Instant::now();
                let ok = call().await.is_ok();
                out.push((t.elapsed(), ok));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Runs `CALLERS` callers for `length`; returns calls, failures, latencies.
async fn load(call: &Call, length: Duration) -> (usize, usize, Vec<Duration>) {
    let all = outcomes(call, length).await;
    let lat: Vec<Duration> = all.iter().filter(|o| o.1).map(|o| o.0).collect();
    (lat.len(), all.len() - lat.len(), lat)
}

/// What one variant did over every round of [`interleaved`].
#[derive(Default)]
struct Totals {
    ok: usize,
    failed: usize,
    latencies: Vec<Duration>,
    took: Duration,
    /// The process's CPU time over the variant's rounds: the four servers'
    /// share is the same for every variant, the rest is the client's.
    cpu: Duration,
}

impl Totals {
    /// Process CPU per call, in µs.
    fn cpu_us_per_call(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / (self.ok + self.failed).max(1) as f64
    }
}

/// Warms every variant up, then runs `rounds` rounds of `millis` each,
/// rotating the order every round so that noise hits the variants alike.
async fn interleaved(variants: &[(&str, Call)], millis: u64, rounds: u64) -> Vec<Totals> {
    // Warm-up: connections made, code paths hot.
    for (_, call) in variants {
        load(call, Duration::from_millis(millis.min(700))).await;
    }
    let mut totals: Vec<Totals> = variants.iter().map(|_| Totals::default()).collect();
    let per_round = std::env::var_os("BENCH_PER_ROUND").is_some();
    for round in 0..rounds as usize {
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            let (t, cpu0) = (Instant::now(), cpu::cpu_time());
            let (n, failed, lat) = load(&variants[i].1, Duration::from_millis(millis)).await;
            let cpu = cpu::cpu_time().saturating_sub(cpu0);
            if per_round {
                print_round(round, variants[i].0, n, &lat);
            }
            let total = &mut totals[i];
            total.ok += n;
            total.failed += failed;
            total.latencies.extend(lat);
            total.took += t.elapsed();
            total.cpu += cpu;
        }
    }
    totals
}

/// One round of one variant's latency quantiles, on stderr: a tail that
/// comes from a few rounds (a pause) reads differently from one in every
/// round (the path itself).
fn print_round(round: usize, variant: &str, calls: usize, latencies: &[Duration]) {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| {
        let i = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
        sorted.get(i).map_or_else(|| "-".to_owned(), |d| ms(*d))
    };
    eprintln!(
        "round {round} {variant:<26} calls {calls:>6}  p50 {}  p99 {}  p99.9 {}  max {}",
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0)
    );
}

/// How long set-up waits for the four backends to be discovered or ready.
const READY_LIMIT: Duration = Duration::from_secs(20);

async fn etcd_channel(client: &tonic_etcd::Etcd, service: &str) -> tonic_etcd::EtcdChannel {
    let c = ChannelBuilder::new(client.clone(), service)
        .build()
        .unwrap();
    // Generous: in the test suite this runs as a debug build on a busy
    // machine; the wait is set-up, not a measurement.
    let wait = Instant::now() + READY_LIMIT;
    while c.endpoints() < 4 {
        assert!(Instant::now() < wait, "4 endpoints not discovered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    c
}

async fn balancer(client: &tonic_etcd::Etcd, service: &str) -> Balancer {
    let b = Balancer::builder(client.clone(), service).build().unwrap();
    if let Err(e) = b.wait_for_ready(4, READY_LIMIT).await {
        let states: Vec<String> = b
            .endpoints()
            .iter()
            .map(|e| format!("{} {:?} {:?}", e.instance.addr, e.state, e.last_error))
            .collect();
        panic!("{e}; endpoints: {states:?}");
    }
    b
}

fn ratio(a: f64, b: f64) -> f64 {
    (a / b * 1000.0).round() / 1000.0
}

fn main() {
    let millis = setting("BENCH_SECS", 2000, 100);
    let rounds = setting("BENCH_ROUNDS", 3, 1);
    let etcd = Etcd::start();
    let rt = support::runtime();
    let mut json = serde_json::Map::new();
    rt.block_on(async {
        let client = etcd.client().await;
        if selected("healthy") {
            json.insert("healthy".into(), healthy(&client, millis, rounds).await);
        }
        if selected("one_slow") {
            json.insert("one_slow".into(), one_slow(&client, millis).await);
        }
        if selected("one_killed") {
            json.insert("one_killed".into(), one_killed(&client).await);
        }
        if selected("one_stream") {
            json.insert("one_stream".into(), one_stream(&client).await);
        }
        if selected("no_endpoints") {
            json.insert("no_endpoints".into(), no_endpoints(&client).await);
        }
        if selected("one_frozen") {
            json.insert("one_frozen".into(), one_frozen(&client).await);
        }
        if selected("healthy_tls") {
            json.insert(
                "healthy_tls".into(),
                healthy_tls(&client, millis, rounds).await,
            );
        }
    });
    write_json("request_path", &serde_json::Value::Object(json));
}

/// Four healthy backends: throughput and latency of every variant.
async fn healthy(client: &tonic_etcd::Etcd, millis: u64, rounds: u64) -> serde_json::Value {
    let backends = Backends::start(client, SERVICE, Setup::default()).await;
    let addrs = &backends.addrs;
    let endpoint = |a: &str| Endpoint::from_shared(format!("http://{a}")).unwrap();
    let plain = endpoint(&addrs[0]).connect_lazy();
    let listed = Channel::balance_list(addrs.iter().map(|a| endpoint(a)));
    let etcd_channel = etcd_channel(client, SERVICE).await;
    let balancer = balancer(client, SERVICE).await;
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
        ("plain (one server)", caller(plain, None)),
        ("balance_list", caller(listed, None)),
        ("etcd_channel", caller(etcd_channel, None)),
        ("p2c_direct", caller(p2c, None)),
        ("balancer", caller(balancer, None)),
    ];

    let totals = interleaved(&variants, millis, rounds).await;

    let base = variants
        .iter()
        .position(|(n, _)| *n == "balance_list")
        .unwrap();
    let stats: Vec<(f64, Stats, usize, f64)> = totals
        .into_iter()
        .map(|t| {
            let cpu = t.cpu_us_per_call();
            (
                t.ok as f64 / t.took.as_secs_f64(),
                Stats::of(t.latencies),
                t.failed,
                cpu,
            )
        })
        .collect();
    let (base_rate, base_stats, _, _) = stats[base];
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    for ((name, _), (rate, st, failed, cpu)) in variants.iter().zip(&stats) {
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
            format!("{cpu:.1}"),
        ]);
        let mut v = st.json();
        v["calls_per_s"] = rate.round().into();
        v["process_cpu_us_per_call"] = ((cpu * 10.0).round() / 10.0).into();
        v["failed"] = (*failed).into();
        v["throughput_ratio_to_balance_list"] = ratio(*rate, base_rate).into();
        v["p99_ratio_to_balance_list"] =
            ratio(st.p99.as_secs_f64(), base_stats.p99.as_secs_f64()).into();
        json.insert(name.to_string(), v);
    }
    table(
        &format!("request_path: four healthy backends ({CALLERS} callers, {rounds} rounds x {millis} ms per variant; latency ms)"),
        &[
            "variant",
            "calls/s",
            "p50",
            "p99",
            "failed",
            "tput vs list",
            "p99 vs list",
            "process CPU us/call",
        ],
        &rows,
    );
    serde_json::Value::Object(json)
}

/// One of four backends adds 20 ms: tonic's balanced channel against ours.
async fn one_slow(client: &tonic_etcd::Etcd, millis: u64) -> serde_json::Value {
    let service = "bench.one_slow";
    let _backends = Backends::start(
        client,
        service,
        Setup {
            delays: &[(3, Duration::from_millis(20))],
            ..Setup::default()
        },
    )
    .await;
    let variants: Vec<(&str, Call)> = vec![
        (
            "etcd_channel (tonic)",
            caller(etcd_channel(client, service).await, None),
        ),
        ("balancer", caller(balancer(client, service).await, None)),
    ];
    for (_, call) in &variants {
        load(call, Duration::from_millis(millis.min(500))).await;
    }
    let mut lats: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    for round in 0..2 {
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            lats[i].extend(load(&variants[i].1, Duration::from_millis(millis)).await.2);
        }
    }
    let stats: Vec<Stats> = lats.into_iter().map(Stats::of).collect();
    let mut json = serde_json::Map::new();
    let mut rows = Vec::new();
    for ((name, _), st) in variants.iter().zip(&stats) {
        rows.push(vec![
            name.to_string(),
            st.n.to_string(),
            ms(st.mean),
            ms(st.p50),
            ms(st.p99),
            format!("{:.2}x", st.p99.as_secs_f64() / stats[0].p99.as_secs_f64()),
        ]);
        json.insert(name.to_string(), st.json());
    }
    json.insert(
        "p99_ratio_balancer_to_tonic".into(),
        ratio(stats[1].p99.as_secs_f64(), stats[0].p99.as_secs_f64()).into(),
    );
    table(
        "request_path: one of four backends adds 20 ms (latency ms)",
        &["variant", "calls", "mean", "p50", "p99", "p99 vs tonic"],
        &rows,
    );
    serde_json::Value::Object(json)
}

/// One of four backends dies while its key stays in etcd: failed calls in
/// the next 10 s (`BENCH_KILL_SECS`).
async fn one_killed(client: &tonic_etcd::Etcd) -> serde_json::Value {
    let window = Duration::from_millis(setting("BENCH_KILL_MS", 10_000, 300));
    let mut json = serde_json::Map::new();
    let mut rows = Vec::new();
    for name in ["etcd_channel (tonic)", "balancer"] {
        let service = format!("bench.one_killed.{}", rows.len());
        let mut backends = Backends::start(client, &service, Setup::default()).await;
        let (call, call_status) = if name == "balancer" {
            let b = balancer(client, &service).await;
            (caller(b.clone(), None), status_caller(b))
        } else {
            let c = etcd_channel(client, &service).await;
            (caller(c.clone(), None), status_caller(c))
        };
        load(&call, Duration::from_millis(200)).await;
        backends.kill(3);
        let killed = backends.addrs[3].clone();
        let statuses = statuses(&call_status, window).await;
        let ok = statuses.iter().filter(|s| s.is_ok()).count();
        let failures: Vec<&tonic::Status> =
            statuses.iter().filter_map(|s| s.as_ref().err()).collect();
        let unavailable = failures
            .iter()
            .filter(|s| s.code() == tonic::Code::Unavailable)
            .count();
        let named = failures
            .iter()
            .filter(|s| s.message().contains(&killed))
            .count();
        rows.push(vec![
            name.to_string(),
            ok.to_string(),
            failures.len().to_string(),
            unavailable.to_string(),
            named.to_string(),
        ]);
        json.insert(
            name.to_string(),
            serde_json::json!({
                "ok": ok,
                "failed": failures.len(),
                "failed_unavailable": unavailable,
                "failed_naming_the_address": named,
                "failed_codes": failures.iter().map(|s| format!("{:?}", s.code())).collect::<Vec<_>>(),
                "window_ms": window.as_millis() as u64,
            }),
        );
    }
    table(
        &format!(
            "request_path: one of four backends killed, key still in etcd ({} ms after the kill)",
            window.as_millis()
        ),
        &[
            "variant",
            "ok calls",
            "failed calls",
            "of which UNAVAILABLE",
            "naming the address",
        ],
        &rows,
    );
    serde_json::Value::Object(json)
}

/// One greeter call that reports its whole status.
type StatusCall = std::sync::Arc<
    dyn Fn()
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>
        + Send
        + Sync,
>;

fn status_caller<T: GrpcChannel>(svc: T) -> StatusCall {
    std::sync::Arc::new(move || {
        let mut client = GreeterClient::new(svc.clone());
        Box::pin(async move {
            client
                .say_hello(HelloRequest {
                    name: "bench".into(),
                })
                .await
                .map(drop)
        })
    })
}

/// `CALLERS` closed-loop callers for `length`: every call's status.
async fn statuses(call: &StatusCall, length: Duration) -> Vec<Result<(), tonic::Status>> {
    let end = Instant::now() + length;
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                while Instant::now() < end {
                    out.push(call().await);
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// One long-lived bidi stream open on one of four backends, unary calls
/// from a few callers beside it: the holder's share of the unary calls
/// (fair: 25 %), in rounds with a new stream each, since at four callers
/// the shares of all four backends move by a few points between runs. An
/// estimate that took a stream's age for latency starved the replica
/// holding it (0.1 %).
async fn one_stream(client: &tonic_etcd::Etcd) -> serde_json::Value {
    let calls = setting("BENCH_STREAM_CALLS", 8_000, 200) as usize;
    let rounds = setting("BENCH_STREAM_ROUNDS", 8, 1) as usize;
    let callers = 4;
    let mut json = serde_json::Map::new();
    let mut rows = Vec::new();
    for name in ["etcd_channel (tonic)", "balancer"] {
        let service = format!("bench.one_stream.{}", rows.len());
        let backends = Backends::start(client, &service, Setup::default()).await;
        let mut held = Vec::new();
        if name == "balancer" {
            let b = balancer(client, &service).await;
            for _ in 0..rounds {
                held.push(stream_shares(b.clone(), calls, callers).await);
            }
        } else {
            let c = etcd_channel(client, &service).await;
            for _ in 0..rounds {
                held.push(stream_shares(c.clone(), calls, callers).await);
            }
        }
        drop(backends);
        let mean = held.iter().sum::<f64>() / held.len() as f64;
        let min = held.iter().copied().fold(f64::INFINITY, f64::min);
        let max = held.iter().copied().fold(0.0, f64::max);
        rows.push(vec![
            name.to_string(),
            format!("{:.1} %", mean * 100.0),
            format!("{:.1} %", min * 100.0),
            format!("{:.1} %", max * 100.0),
        ]);
        json.insert(
            name.to_string(),
            serde_json::json!({ "holder_share_mean": mean, "holder_share_min": min, "holder_share_max": max,
                "rounds": rounds, "calls_per_round": calls, "callers": callers }),
        );
    }
    table(
        &format!(
            "request_path: one bidi stream open on one of four backends, {rounds} rounds of {calls} unary calls from 4 callers"
        ),
        &["variant", "holder's unary share", "lowest round", "highest round"],
        &rows,
    );
    serde_json::Value::Object(json)
}

/// Opens a Chat stream through `svc`, then makes `calls` unary calls from
/// `callers` callers: the share of them that the stream's holder answered.
async fn stream_shares<T: GrpcChannel>(svc: T, calls: usize, callers: usize) -> f64 {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = GreeterClient::new(svc.clone())
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opened")
        .into_inner();
    tx.send(HelloRequest { name: "s".into() }).await.unwrap();
    let holder = replies.message().await.unwrap().expect("a reply").server_id;
    let call = caller(svc, None);
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(calls / callers);
                for _ in 0..calls / callers {
                    got.push(call().await.expect("unary call"));
                }
                got
            })
        })
        .collect();
    let mut held = 0;
    for t in tasks {
        held += t.await.unwrap().iter().filter(|id| **id == holder).count();
    }
    drop(tx);
    held as f64 / (calls / callers * callers) as f64
}

/// No backend registered: how long a call takes to fail. tonic's plain
/// balanced channel waits forever; it is cut off at 5 s and reported so.
/// Each variant is built just before its call, so each starts with the
/// fail-fast gate open; the last row is the Balancer once the gate closed.
async fn no_endpoints(client: &tonic_etcd::Etcd) -> serde_json::Value {
    let limit = Duration::from_millis(if smoke() { 500 } else { 5000 });
    let service = "bench.none";
    let call_deadline = Duration::from_millis(200);
    let balancer = || Balancer::builder(client.clone(), service).build().unwrap();
    type Make<'a> = Box<dyn Fn() -> Call + 'a>;
    let rows_spec: Vec<(&str, Make)> = vec![
        (
            "tonic balance_channel",
            Box::new(|| {
                let plain = ChannelBuilder::new(client.clone(), service)
                    .build()
                    .unwrap()
                    .tonic_channel();
                caller(plain, None)
            }),
        ),
        (
            "etcd_channel (3 s no-endpoint wait)",
            Box::new(|| {
                caller(
                    ChannelBuilder::new(client.clone(), service)
                        .build()
                        .unwrap(),
                    None,
                )
            }),
        ),
        (
            "balancer (3 s no-endpoint wait)",
            Box::new(move || caller(balancer(), None)),
        ),
        (
            "balancer, call deadline 200 ms",
            Box::new(move || caller(balancer(), Some(call_deadline))),
        ),
    ];
    let mut json = serde_json::Map::new();
    let mut rows = Vec::new();
    let mut measure = |name: &str, ms_taken: Duration, outcome: String| {
        rows.push(vec![name.to_string(), ms(ms_taken), outcome.clone()]);
        json.insert(
            name.to_string(),
            serde_json::json!({ "ms": ms_taken.as_secs_f64() * 1000.0, "outcome": outcome }),
        );
    };
    let once = |call: Call| async move {
        let t = Instant::now();
        let outcome = match tokio::time::timeout(limit, call()).await {
            Err(_) => "still waiting (hangs)".to_string(),
            Ok(Ok(_)) => "succeeded?".to_string(),
            Ok(Err(code)) => format!("{code:?}"),
        };
        (t.elapsed(), outcome)
    };
    for (name, make) in &rows_spec {
        let (took, outcome) = once(make()).await;
        measure(name, took, outcome);
    }
    // The gate: once a call has waited the no-endpoint timeout, the next ones
    // fail at once.
    let gated = caller(
        Balancer::builder(client.clone(), service)
            .no_endpoint_timeout(Duration::from_millis(100))
            .build()
            .unwrap(),
        None,
    );
    once(gated.clone()).await;
    let (took, outcome) = once(gated).await;
    measure("balancer, after the fail-fast gate closed", took, outcome);
    table(
        &format!("request_path: no backend registered (one call each, cut off at {limit:?})"),
        &["variant", "ms", "outcome"],
        &rows,
    );
    serde_json::Value::Object(json)
}

/// One of four backends freezes (its proxy stops moving bytes; sockets stay
/// open, as with SIGSTOP), every call with a 1 s deadline: calls that end
/// later than the deadline + 50 ms, and the latest.
async fn one_frozen(client: &tonic_etcd::Etcd) -> serde_json::Value {
    let window = Duration::from_millis(setting("BENCH_FREEZE_MS", 5_000, 1_500));
    let deadline = Duration::from_secs(1);
    let late_by = Duration::from_millis(50);
    let mut json = serde_json::Map::new();
    let mut rows = Vec::new();
    for name in ["etcd_channel (tonic)", "balancer"] {
        let service = format!("bench.one_frozen.{}", rows.len());
        let setup = Setup {
            proxied: Some(3),
            ..Setup::default()
        };
        let backends = Backends::start(client, &service, setup).await;
        let call = if name == "balancer" {
            caller(balancer(client, &service).await, Some(deadline))
        } else {
            caller(etcd_channel(client, &service).await, Some(deadline))
        };
        load(&call, Duration::from_millis(200)).await;
        let proxy = backends.proxy.as_ref().expect("a proxied backend");
        proxy.freeze();
        let all = outcomes(&call, window).await;
        proxy.thaw();
        let ok = all.iter().filter(|o| o.1).count();
        let late = all.iter().filter(|o| o.0 > deadline + late_by).count();
        let longest = all.iter().map(|o| o.0).max().unwrap_or_default();
        rows.push(vec![
            name.to_string(),
            ok.to_string(),
            (all.len() - ok).to_string(),
            late.to_string(),
            ms(longest),
        ]);
        json.insert(
            name.to_string(),
            serde_json::json!({
                "ok": ok,
                "failed": all.len() - ok,
                "past_deadline_plus_50ms": late,
                "longest_ms": longest.as_secs_f64() * 1000.0,
                "window_ms": window.as_millis() as u64,
            }),
        );
    }
    table(
        &format!(
            "request_path: one of four backends frozen, 1 s deadline per call ({CALLERS} callers, {} ms)",
            window.as_millis()
        ),
        &["variant", "ok", "failed", "past deadline+50ms", "longest ms"],
        &rows,
    );
    serde_json::Value::Object(json)
}

/// Four healthy backends over TLS: tonic's balanced channel against ours.
async fn healthy_tls(client: &tonic_etcd::Etcd, millis: u64, rounds: u64) -> serde_json::Value {
    let service = "bench.healthy_tls";
    let pki = pki::Pki::new("bench");
    let setup = Setup {
        tls: Some(&pki),
        ..Setup::default()
    };
    let _backends = Backends::start(client, service, setup).await;
    let tonic_tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca));
    let channel = ChannelBuilder::new(client.clone(), service)
        .scheme("https")
        .endpoint(move |e| e.tls_config(tonic_tls.clone()).unwrap())
        .build()
        .unwrap();
    channel.wait_for_endpoints(READY_LIMIT).await.unwrap();
    let balancer = Balancer::builder(client.clone(), service)
        .tls(TlsConfig::new().ca_certificate(&pki.ca))
        .build()
        .unwrap();
    balancer.wait_for_ready(4, READY_LIMIT).await.unwrap();
    let variants: Vec<(&str, Call)> = vec![
        ("etcd_channel (tonic, TLS)", caller(channel, None)),
        ("balancer (TLS)", caller(balancer, None)),
    ];
    let stats: Vec<(f64, Stats, f64)> = interleaved(&variants, millis, rounds)
        .await
        .into_iter()
        .map(|t| {
            let calls = t.ok + t.failed;
            let cpu = t.cpu_us_per_call();
            (
                calls as f64 / t.took.as_secs_f64(),
                Stats::of(t.latencies),
                cpu,
            )
        })
        .collect();
    let (base_rate, base, _) = stats[0];
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    for ((name, _), (rate, st, cpu)) in variants.iter().zip(&stats) {
        rows.push(vec![
            name.to_string(),
            format!("{rate:.0}"),
            ms(st.p50),
            ms(st.p99),
            format!("{:.3}x", rate / base_rate),
            format!("{:.2}x", st.p99.as_secs_f64() / base.p99.as_secs_f64()),
            format!("{cpu:.1}"),
        ]);
        let mut v = st.json();
        v["calls_per_s"] = rate.round().into();
        v["process_cpu_us_per_call"] = ((cpu * 10.0).round() / 10.0).into();
        json.insert(name.to_string(), v);
    }
    json.insert(
        "throughput_ratio_balancer_to_tonic".into(),
        ratio(stats[1].0, base_rate).into(),
    );
    json.insert(
        "p99_ratio_balancer_to_tonic".into(),
        ratio(stats[1].1.p99.as_secs_f64(), base.p99.as_secs_f64()).into(),
    );
    table(
        &format!("request_path: four healthy backends over TLS ({CALLERS} callers, {rounds} rounds x {millis} ms; latency ms)"),
        &[
            "variant",
            "calls/s",
            "p50",
            "p99",
            "tput vs tonic",
            "p99 vs tonic",
            "process CPU us/call",
        ],
        &rows,
    );
    serde_json::Value::Object(json)
}
