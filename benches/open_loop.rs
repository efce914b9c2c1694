//! Latency under a fixed offered load: the Balancer against tonic's balanced
//! channel (`EtcdChannel`) fed by the same etcd discovery.
//!
//! Open loop: calls are issued on a fixed schedule (`BENCH_RATE` per second,
//! default 2,000) whatever happened to earlier ones, each with a 1 s
//! deadline, and each call's latency is counted from its *scheduled* start,
//! so queueing in the client is not hidden (closed-loop callers slow down
//! with the system and under-report it). The two variants run in alternating
//! short rounds (`BENCH_ROUNDS` × `BENCH_ROUND_MS`), so machine noise hits
//! them alike; figures are totals over the rounds.
//!
//! Scenarios, four backends unless said: healthy; one +5 ms; one +20 ms; two
//! +5 ms; one failing every call at once with `UNAVAILABLE`; one frozen (a
//! proxy in front of it stops moving bytes a fifth into each round, sockets
//! open); sixteen healthy; churn (every 200 ms one backend deregisters and
//! another registers); rolling kill (four backends with 20 ms of work per
//! call, `BENCH_KILL_RATE` calls/s, default 1,000; in every round one of them
//! is killed with calls in flight, its key left in etcd, and replaced),
//! where a third variant is the Balancer with a retry policy; random spikes
//! (every backend adds 50 ms to 2 % of its replies), where it is the
//! Balancer hedging after 10 ms; all failing (every call fails with
//! `UNAVAILABLE`), where it is the Balancer retrying up to 5 attempts. Reported: success rate, p50/p99/p99.9 of successful
//! calls, calls that ended past their deadline + 50 ms, and each backend's
//! share.
//!
//! `cargo bench --bench open_loop` (about 3 minutes); writes
//! `target/bench/open_loop.json`. `BENCH_SCENARIOS=healthy,frozen` runs only
//! the scenarios whose names contain one of those words.

#[path = "support/backends.rs"]
mod backends;
#[path = "../tests/common/pki.rs"]
mod pki;
#[path = "../tests/common/proxy.rs"]
mod proxy;
#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backends::{caller, round, Backends, Call, Outcome, Setup};
use support::counted::Counted;
use support::{ms, setting, table, write_json};
use tokio::time::Instant;
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Balancer, ChannelBuilder};

const DEADLINE: Duration = Duration::from_secs(1);
const MS5: Duration = Duration::from_millis(5);
const MS20: Duration = Duration::from_millis(20);
const LATE: Duration = Duration::from_millis(50);

/// Percentile `q` of sorted `v`.
fn at(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// A fault injected into each round: `start` a fifth into it, `end` after.
struct Fault<'a> {
    start: &'a (dyn Fn() + Sync),
    end: &'a (dyn Fn() + Sync),
}

/// Alternating rounds of each variant, each with `fault` if any.
async fn run_rounds(
    variants: &[(&str, Call)],
    tallies: &mut [Tally],
    rate: u64,
    length: Duration,
    rounds: u64,
    fault: Option<Fault<'_>>,
) {
    for r in 0..rounds as usize {
        for j in 0..variants.len() {
            let i = (j + r) % variants.len();
            let start = fault.as_ref().map(|f| f.start);
            tallies[i].add(round(&variants[i].1, rate, length, start).await);
            if let Some(f) = &fault {
                (f.end)();
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    calls: usize,
    failed: usize,
    late: usize,
    shares: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, results: Vec<(Duration, Outcome)>) {
        for (latency, outcome) in results {
            self.calls += 1;
            if latency > DEADLINE + LATE {
                self.late += 1;
            }
            match outcome {
                Ok(id) => {
                    self.latencies.push(latency);
                    *self.shares.entry(id).or_default() += 1;
                }
                Err(_) => self.failed += 1,
            }
        }
    }

    fn success(&self) -> f64 {
        1.0 - self.failed as f64 / self.calls.max(1) as f64
    }
}

struct Scenario {
    name: &'static str,
    setup: Setup<'static>,
    failing: Option<usize>,
    churn: bool,
}

fn main() {
    let rate = setting("BENCH_RATE", 2_000, 500);
    let rounds = setting("BENCH_ROUNDS", 3, 1);
    let kill_rate = setting("BENCH_KILL_RATE", 1_000, 200);
    let length = Duration::from_millis(setting("BENCH_ROUND_MS", 2_000, 200));
    let scenarios = [
        Scenario {
            name: "healthy",
            setup: Setup::default(),
            failing: None,
            churn: false,
        },
        Scenario {
            name: "one +5 ms",
            setup: Setup {
                delays: &[(3, MS5)],
                ..Setup::default()
            },
            failing: None,
            churn: false,
        },
        Scenario {
            name: "one +20 ms",
            setup: Setup {
                delays: &[(3, MS20)],
                ..Setup::default()
            },
            failing: None,
            churn: false,
        },
        Scenario {
            name: "two +5 ms",
            setup: Setup {
                delays: &[(2, MS5), (3, MS5)],
                ..Setup::default()
            },
            failing: None,
            churn: false,
        },
        Scenario {
            name: "one failing fast",
            setup: Setup::default(),
            failing: Some(3),
            churn: false,
        },
        Scenario {
            name: "one frozen",
            setup: Setup {
                proxied: Some(3),
                ..Setup::default()
            },
            failing: None,
            churn: false,
        },
        Scenario {
            name: "sixteen healthy",
            setup: Setup {
                n: 16,
                ..Setup::default()
            },
            failing: None,
            churn: false,
        },
        Scenario {
            name: "churn",
            setup: Setup {
                n: 5,
                ..Setup::default()
            },
            failing: None,
            churn: true,
        },
    ];
    // Before any Balancer: their retry and hedge counters register here.
    let counted = Counted::install();
    let etcd = Etcd::start();
    let rt = support::runtime();
    let mut json = serde_json::Map::new();
    let mut rows = Vec::new();
    rt.block_on(async {
        let client = etcd.client().await;
        for (k, scenario) in scenarios.iter().enumerate() {
            if !support::selected(scenario.name) {
                continue;
            }
            let service = format!("bench.open_loop.{k}");
            let mut backends = Backends::start(&client, &service, scenario.setup).await;
            if scenario.churn {
                // Four of five registered; the churn task rotates them.
                backends.deregister(4).await;
            }
            if let Some(i) = scenario.failing {
                backends.fail[i].set(Some(tonic::Code::Unavailable));
            }
            let ready = scenario.setup.n - usize::from(scenario.churn);
            let (tonic_channel, balancer) = dial(&client, &service, ready).await;
            let variants: [(&str, Call); 2] = [
                ("tonic", caller(tonic_channel, Some(DEADLINE))),
                ("balancer", caller(balancer, Some(DEADLINE))),
            ];
            // Warm-up: connections made, estimates seeded.
            for (_, call) in &variants {
                round(call, rate, Duration::from_millis(300), None).await;
            }
            let mut tallies: Vec<Tally> = variants.iter().map(|_| Tally::default()).collect();
            if scenario.churn {
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let stop2 = stop.clone();
                let churn = tokio::spawn(async move {
                    let mut out = 4;
                    let mut tick = tokio::time::interval(Duration::from_millis(200));
                    tick.tick().await;
                    while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                        tick.tick().await;
                        let leaving = (out + 1) % 5;
                        backends.register(out).await;
                        backends.deregister(leaving).await;
                        out = leaving;
                    }
                    backends
                });
                run_rounds(&variants, &mut tallies, rate, length, rounds, None).await;
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                drop(churn.await.expect("churn task"));
            } else {
                let proxy = backends.proxy.as_ref();
                let freeze = || proxy.iter().for_each(|p| p.freeze());
                let thaw = || proxy.iter().for_each(|p| p.thaw());
                let fault = proxy.map(|_| Fault {
                    start: &freeze,
                    end: &thaw,
                });
                run_rounds(&variants, &mut tallies, rate, length, rounds, fault).await;
            }
            let scenario_json = report(scenario.name, &variants, &mut tallies, &mut rows);
            json.insert(
                scenario.name.to_string(),
                serde_json::Value::Object(scenario_json),
            );
        }
        // The scenarios with a third variant: a retry or hedging policy.
        for (name, rate) in [
            ("rolling kill", kill_rate),
            ("all failing", rate),
            ("random spikes", rate),
        ] {
            if !support::selected(name) {
                continue;
            }
            let pace = Pace {
                rate,
                rounds,
                length,
            };
            let scenario_json = match name {
                "rolling kill" => rolling_kill(&client, &counted, pace, &mut rows).await,
                "all failing" => all_failing(&client, &counted, pace, &mut rows).await,
                _ => random_spikes(&client, &counted, pace, &mut rows).await,
            };
            json.insert(name.into(), serde_json::Value::Object(scenario_json));
        }
    });
    table(
        &format!(
            "open_loop: {rate} calls/s offered (rolling kill: {kill_rate}), 1 s deadline, {rounds} rounds x {} ms per variant (latency ms from the scheduled start)",
            length.as_millis()
        ),
        &["scenario", "variant", "calls", "success %", "p50", "p99", "p99.9", "late", "shares %"],
        &rows,
    );
    write_json("open_loop", &serde_json::Value::Object(json));
}

/// One table row and one JSON entry per variant of `scenario`.
fn report(
    scenario: &str,
    variants: &[(&str, Call)],
    tallies: &mut [Tally],
    rows: &mut Vec<Vec<String>>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut scenario_json = serde_json::Map::new();
    for ((name, _), t) in variants.iter().zip(tallies.iter_mut()) {
        t.latencies.sort();
        let total: usize = t.shares.values().sum();
        let percent = |n: usize| n as f64 * 100.0 / total.max(1) as f64;
        let shares = if t.shares.len() <= 5 {
            t.shares
                .iter()
                .map(|(id, n)| format!("{id} {:.1}", percent(*n)))
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            let min = t.shares.values().min().copied().unwrap_or(0);
            let max = t.shares.values().max().copied().unwrap_or(0);
            format!(
                "{} backends, {:.1} to {:.1}",
                t.shares.len(),
                percent(min),
                percent(max)
            )
        };
        let (p50, p99, p999) = (
            at(&t.latencies, 0.5),
            at(&t.latencies, 0.99),
            at(&t.latencies, 0.999),
        );
        rows.push(vec![
            scenario.to_string(),
            name.to_string(),
            t.calls.to_string(),
            format!("{:.3}", t.success() * 100.0),
            ms(p50),
            ms(p99),
            ms(p999),
            t.late.to_string(),
            shares,
        ]);
        scenario_json.insert(
            name.to_string(),
            serde_json::json!({
                "calls": t.calls,
                "success_rate": t.success(),
                "p50_us": support::us(p50),
                "p99_us": support::us(p99),
                "p999_us": support::us(p999),
                "past_deadline_plus_50ms": t.late,
                "shares_percent": t.shares.iter().map(|(id, n)| (id.clone(), *n as f64 * 100.0 / total.max(1) as f64)).collect::<BTreeMap<_, _>>(),
            }),
        );
    }
    scenario_json
}

/// Retries (`tonic_etcd_client_retries_total{result="retried"}`) counted so far.
fn retried(counted: &Counted) -> u64 {
    counted.total(
        "tonic_etcd_client_retries_total",
        Some(("result", "retried")),
    )
}

/// Hedges (`tonic_etcd_client_hedges_total{result="sent"}`) counted so far.
fn hedged(counted: &Counted) -> u64 {
    counted.total("tonic_etcd_client_hedges_total", Some(("result", "sent")))
}

/// Four backends doing 20 ms of work per call; in each round, a fifth into
/// it, one of them (in turn) is killed with calls in flight (its key stays
/// in etcd, as after a SIGKILL) and a replacement joins. tonic's channel,
/// the Balancer, and the Balancer with a retry policy for the method.
async fn rolling_kill(
    client: &tonic_etcd::Etcd,
    counted: &Counted,
    pace: Pace,
    rows: &mut Vec<Vec<String>>,
) -> serde_json::Map<String, serde_json::Value> {
    let service = "bench.open_loop.rolling";
    let setup = Setup {
        delays: &[(0, MS20), (1, MS20), (2, MS20), (3, MS20)],
        ..Setup::default()
    };
    let backends = Arc::new(tokio::sync::Mutex::new(
        Backends::start(client, service, setup).await,
    ));
    let variants = three_variants(
        client,
        service,
        "balancer + retry",
        r#""retryPolicy":{"maxAttempts":3,"initialBackoff":"0.01s","maxBackoff":"0.1s",
          "backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}"#,
    )
    .await;
    let generation = std::sync::atomic::AtomicUsize::new(0);
    let kill = || {
        let n = generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let backends = backends.clone();
        tokio::spawn(async move {
            backends
                .lock()
                .await
                .replace(n % 4, format!("s{}-{}", n % 4, n / 4 + 1), MS20)
                .await;
        });
    };
    let nothing = || {};
    let fault = Fault {
        start: &kill,
        end: &nothing,
    };
    let (json, _, _) = measure_policy(
        "rolling kill",
        &variants,
        "retries",
        || retried(counted),
        pace,
        Some(fault),
        rows,
    )
    .await;
    drop(backends);
    json
}

/// tonic's balanced channel and a Balancer over `service`, once both see
/// `ready` endpoints.
async fn dial(
    client: &tonic_etcd::Etcd,
    service: &str,
    ready: usize,
) -> (tonic_etcd::EtcdChannel, Balancer) {
    let tonic_channel = ChannelBuilder::new(client.clone(), service)
        .build()
        .unwrap();
    tonic_channel
        .wait_for_endpoints(Duration::from_secs(5))
        .await
        .unwrap();
    let balancer = Balancer::builder(client.clone(), service).build().unwrap();
    balancer
        .wait_for_ready(ready, Duration::from_secs(5))
        .await
        .unwrap();
    (tonic_channel, balancer)
}

/// Every one of four backends fails every call with `UNAVAILABLE`: a retry
/// policy (`maxAttempts` 5) must not multiply the load, which the budget
/// bounds to about 1.2 attempts per call plus 10 retries per second.
async fn all_failing(
    client: &tonic_etcd::Etcd,
    counted: &Counted,
    pace: Pace,
    rows: &mut Vec<Vec<String>>,
) -> serde_json::Map<String, serde_json::Value> {
    let service = "bench.open_loop.failing";
    let backends = Backends::start(client, service, Setup::default()).await;
    for f in &backends.fail {
        f.set(Some(tonic::Code::Unavailable));
    }
    let variants = three_variants(
        client,
        service,
        "balancer + retry",
        r#""retryPolicy":{"maxAttempts":5,"initialBackoff":"0.01s","maxBackoff":"0.1s",
          "backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}"#,
    )
    .await;
    let (json, calls, took) = measure_policy(
        "all failing",
        &variants,
        "retries",
        || retried(counted),
        pace,
        None,
        rows,
    )
    .await;
    let _ = (calls, took);
    // The budget's floor is 10 retries per second of wall time, whether or
    // not this variant is the one running, so the interleaved rounds above
    // allow it about three times its share. Its bound is checked on the
    // policy variant alone.
    let (name, call) = &variants[2];
    // A second alone first spends what the budget saved up while the other
    // variants ran (at most 10 s of its floor).
    round(call, pace.rate, Duration::from_secs(1), None).await;
    let before = retried(counted);
    let t0 = Instant::now();
    let check = Duration::from_secs(setting("BENCH_BUDGET_S", BUDGET_CHECK_S, 1));
    let outcomes = round(call, pace.rate, check, None).await;
    let seconds = t0.elapsed().as_secs_f64();
    let retries = retried(counted) - before;
    let calls = outcomes.len();
    let bound = 0.2 * calls as f64 + 10.0 * seconds;
    println!(
        "{name}, alone for {seconds:.1} s: {retries} retries for {calls} calls \
         ({:.3} attempts per call); budget bound 0.2 x calls + 10/s = {bound:.0} retries",
        (calls as f64 + retries as f64) / calls.max(1) as f64
    );
    let mut json = json;
    json.insert(
        "budget_check".into(),
        serde_json::json!({
            "seconds": seconds, "calls": calls, "retries": retries, "bound": bound,
        }),
    );
    drop(backends);
    json
}

/// How long (s) the all-failing scenario's policy variant runs alone (the
/// budget saves up at most 10 s of its floor); 1 s in a smoke run.
const BUDGET_CHECK_S: u64 = 20;

/// Every one of four backends adds 50 ms to 2 % of its replies at random:
/// no backend is worse than another, so picking cannot help. tonic's
/// channel, the Balancer, and the Balancer hedging after 10 ms.
async fn random_spikes(
    client: &tonic_etcd::Etcd,
    counted: &Counted,
    pace: Pace,
    rows: &mut Vec<Vec<String>>,
) -> serde_json::Map<String, serde_json::Value> {
    let service = "bench.open_loop.spikes";
    let setup = Setup {
        spikes: Some((0.02, Duration::from_millis(50))),
        ..Setup::default()
    };
    let backends = Backends::start(client, service, setup).await;
    let variants = three_variants(
        client,
        service,
        "balancer + hedging",
        r#""hedgingPolicy":{"maxAttempts":2,"hedgingDelay":"0.01s"}"#,
    )
    .await;
    let (json, _, _) = measure_policy(
        "random spikes",
        &variants,
        "hedges",
        || hedged(counted),
        pace,
        None,
        rows,
    )
    .await;
    drop(backends);
    json
}

/// tonic's channel, the Balancer, and a Balancer named `name` whose
/// service config gives `SayHello` the `policy` (a JSON member).
async fn three_variants(
    client: &tonic_etcd::Etcd,
    service: &str,
    name: &'static str,
    policy: &str,
) -> [(&'static str, Call); 3] {
    let (tonic_channel, balancer) = dial(client, service, 4).await;
    let config = tonic_etcd::ServiceConfig::from_json(&format!(
        r#"{{"methodConfig":[{{"name":[{{"service":"greeter.v1.Greeter","method":"SayHello"}}],{policy}}}]}}"#
    ))
    .expect("a valid service config");
    let with_policy = Balancer::builder(client.clone(), service)
        .service_config(config)
        .build()
        .unwrap();
    with_policy
        .wait_for_ready(4, Duration::from_secs(5))
        .await
        .unwrap();
    [
        ("tonic", caller(tonic_channel, Some(DEADLINE))),
        ("balancer", caller(balancer, Some(DEADLINE))),
        (name, caller(with_policy, Some(DEADLINE))),
    ]
}

/// Prints and records the `n` extra attempts (`what`: retries or hedges)
/// that `variant` made for its `calls`.
fn extra_attempts(
    json: &mut serde_json::Map<String, serde_json::Value>,
    variant: &str,
    what: &str,
    n: u64,
    calls: usize,
) {
    println!(
        "{variant}: {n} {what} for {calls} calls ({:.2} % extra attempts)",
        n as f64 * 100.0 / calls.max(1) as f64
    );
    if let Some(v) = json.get_mut(variant).and_then(|v| v.as_object_mut()) {
        v.insert(what.into(), n.into());
    }
}

/// How a scenario's variants are driven.
#[derive(Clone, Copy)]
struct Pace {
    rate: u64,
    rounds: u64,
    length: Duration,
}

/// Warms the three `variants` up, runs their rounds (with `fault`), reports
/// them, and the extra attempts (`what`) the third made in the measured
/// rounds, as `count` tells. Returns the scenario's JSON, the third
/// variant's calls, and how long the measured rounds took.
async fn measure_policy(
    name: &str,
    variants: &[(&'static str, Call); 3],
    what: &str,
    count: impl Fn() -> u64,
    pace: Pace,
    fault: Option<Fault<'_>>,
    rows: &mut Vec<Vec<String>>,
) -> (serde_json::Map<String, serde_json::Value>, usize, Duration) {
    for (_, call) in variants {
        round(call, pace.rate, Duration::from_millis(300), None).await;
    }
    let before = count();
    let mut tallies: Vec<Tally> = variants.iter().map(|_| Tally::default()).collect();
    let t0 = Instant::now();
    run_rounds(
        variants,
        &mut tallies,
        pace.rate,
        pace.length,
        pace.rounds,
        fault,
    )
    .await;
    let took = t0.elapsed();
    let mut json = report(name, variants, &mut tallies, rows);
    let calls = tallies[2].calls;
    extra_attempts(&mut json, variants[2].0, what, count() - before, calls);
    (json, calls, took)
}
