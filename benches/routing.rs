//! Routing for caches and large fleets, against real etcd and real servers
//! (every client a real Balancer, every instance a tonic server on this
//! process's runtime):
//!
//! 1. **Connections per instance**: `BENCH_CLIENTS` clients (default 100)
//!    over `BENCH_INSTANCES` instances (100), subset size 10: A68 random
//!    subsets against coordinated ones (through etcd's client registry);
//!    a full mesh is every client to every instance. Then one instance
//!    joins: connections that moved.
//! 2. **Keys moved when an instance joins**: a ring-hash Balancer over 20
//!    instances, 2,000 keys, each of five new instances joining in turn
//!    (and leaving again); against modulo hashing of the same keys.
//! 3. **A hot key**: four instances that each serve 2 calls at a time
//!    (4 ms of work), 1,200 calls/s offered open loop, half of them for one
//!    key: plain ring hash against bounded load (`hashBalanceFactor` 125),
//!    beside the p99 of uniform keys.
//!
//! `cargo bench --bench routing`; writes `target/bench/routing.json`.
//! `BENCH_SCENARIOS=subsets,keys,hot` runs only some.

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

use backends::{round, Call, Outcome};
use support::{setting, table, write_json};
use tokio::time::Instant;
use tonic_etcd::balancer::OutlierDetection;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Balancer, Metadata, Registration, ServiceConfig};
use xxhash_rust::xxh64::xxh64;

/// Serves `n` greeters (`g0`, ...) on this runtime, each serving `limit`
/// calls at a time with `delay` of work, registered as `instance-<i>`.
async fn instances(
    client: &tonic_etcd::Etcd,
    svc: &str,
    n: usize,
    delay: Duration,
    limit: Option<usize>,
) -> (Vec<String>, Vec<Registration>) {
    let mut addrs = Vec::new();
    let mut regs = Vec::new();
    for i in 0..n {
        let (addr, reg) = instance(client, svc, i, delay, limit).await;
        addrs.push(addr);
        regs.push(reg);
    }
    (addrs, regs)
}

async fn instance(
    client: &tonic_etcd::Etcd,
    svc: &str,
    i: usize,
    delay: Duration,
    limit: Option<usize>,
) -> (String, Registration) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut server = tonic_etcd::server::builder();
    if let Some(l) = limit {
        server = server.concurrency_limit_per_connection(l);
    }
    let router = server.add_service(
        Greeter::new(format!("g{i}"))
            .with_delay(delay)
            .into_service(),
    );
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let reg = Registration::builder(client.clone())
        .service(svc)
        .id(format!("instance-{i:03}"))
        .addr(&addr)
        .metadata(Metadata::new())
        .register()
        .await
        .unwrap();
    (addr, reg)
}

fn config(json: &str) -> ServiceConfig {
    ServiceConfig::from_json(json).unwrap()
}

fn balancer(client: &tonic_etcd::Etcd, svc: &str, config: ServiceConfig) -> Balancer {
    Balancer::builder(client.clone(), svc)
        .outlier_detection(OutlierDetection::disabled())
        .service_config(config)
        .build()
        .unwrap()
}

/// Connections per instance address over `clients`.
fn connections(clients: &[Balancer]) -> BTreeMap<String, usize> {
    let mut per = BTreeMap::new();
    for b in clients {
        for e in b.endpoints() {
            *per.entry(e.instance.addr).or_default() += 1;
        }
    }
    per
}

/// Connections per instance once `settled` holds, every client has `size`
/// endpoints and two readings 300 ms apart agree (at most two minutes).
async fn stable(
    clients: &[Balancer],
    size: usize,
    settled: impl Fn(&[Balancer]) -> bool,
) -> BTreeMap<String, usize> {
    let limit = Instant::now() + Duration::from_secs(120);
    let mut last = BTreeMap::new();
    loop {
        let ready = settled(clients) && clients.iter().all(|b| b.endpoints().len() == size);
        let now = connections(clients);
        if (ready && now == last) || Instant::now() > limit {
            if !ready {
                eprintln!("warning: subsets did not settle within two minutes");
            }
            return now;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// min / mean / max of connections per instance (instances without any
/// count as 0).
fn spread(per: &BTreeMap<String, usize>, instances: usize) -> (usize, f64, usize) {
    let mut v: Vec<usize> = per.values().copied().collect();
    v.resize(instances.max(v.len()), 0);
    let total: usize = v.iter().sum();
    let min = v.iter().copied().min().unwrap_or(0);
    let max = v.iter().copied().max().unwrap_or(0);
    (min, total as f64 / v.len().max(1) as f64, max)
}

async fn subsets(client: &tonic_etcd::Etcd, rows: &mut Vec<Vec<String>>) -> serde_json::Value {
    let n_clients = setting("BENCH_CLIENTS", 100, 8) as usize;
    let n_instances = setting("BENCH_INSTANCES", 100, 8) as usize;
    let size = setting("BENCH_SUBSET", 10, 2) as usize;
    let svc = "bench.routing.subsets";
    let (_addrs, mut regs) = instances(client, svc, n_instances, Duration::ZERO, None).await;
    let mut json = serde_json::Map::new();
    rows.push(vec![
        "full mesh".into(),
        format!("{n_clients} x {n_instances}"),
        n_clients.to_string(),
        format!("{n_clients:.1}"),
        n_clients.to_string(),
        "1.00".into(),
        "-".into(),
        "-".into(),
    ]);
    for (name, scheme) in [
        ("A68 random", "random_subsetting_experimental"),
        ("coordinated", "tonic_etcd_coordinated_subsetting"),
    ] {
        let cfg = config(&format!(
            r#"{{"loadBalancingConfig":[{{"{scheme}":{{"subsetSize":{size},
                "childPolicy":[{{"round_robin":{{}}}}]}}}}]}}"#
        ));
        let t0 = Instant::now();
        let clients: Vec<Balancer> = (0..n_clients)
            .map(|_| balancer(client, svc, cfg.clone()))
            .collect();
        let coordinated = scheme.starts_with("tonic");
        let settled = |clients: &[Balancer]| {
            clients.iter().all(|b| {
                b.subset().is_some_and(|s| {
                    s.members == size
                        && s.instances == n_instances
                        && (!coordinated || s.rank.is_some_and(|(_, n)| n == clients.len()))
                })
            })
        };
        let before = stable(&clients, size, settled).await;
        let took = t0.elapsed();
        let (min, mean, max) = spread(&before, n_instances);
        // One more instance joins.
        let (new_addr, reg) = instance(client, svc, n_instances, Duration::ZERO, None).await;
        regs.push(reg);
        let after = stable(&clients, size, |clients: &[Balancer]| {
            clients
                .iter()
                .all(|b| b.subset().is_some_and(|s| s.instances == n_instances + 1))
        })
        .await;
        let moved: usize = clients.len() * size
            - before
                .iter()
                .map(|(addr, n)| (*n).min(after.get(addr).copied().unwrap_or(0)))
                .sum::<usize>();
        let to_new = after.get(&new_addr).copied().unwrap_or(0);
        rows.push(vec![
            name.into(),
            format!("{n_clients} x {n_instances}, {size} each"),
            min.to_string(),
            format!("{mean:.1}"),
            max.to_string(),
            format!("{:.2}", max as f64 / min.max(1) as f64),
            format!("{took:.1?}"),
            format!("{moved} ({to_new} to the new one)"),
        ]);
        json.insert(
            name.into(),
            serde_json::json!({
                "min": min, "mean": mean, "max": max, "settled_s": took.as_secs_f64(),
                "moved_on_join": moved, "to_new": to_new,
            }),
        );
        regs.pop();
        drop(clients);
        // The coordinated clients' keys go with their leases' revocation.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(regs);
    serde_json::Value::Object(json)
}

/// Calls `b` once with key `key`: which instance answered.
async fn call_key(b: &Balancer, key: &str) -> String {
    let mut request = tonic::Request::new(HelloRequest { name: "k".into() });
    request.metadata_mut().insert("x-key", key.parse().unwrap());
    request.set_timeout(Duration::from_secs(5));
    GreeterClient::new(b.clone())
        .say_hello(request)
        .await
        .map(|r| r.into_inner().server_id)
        .unwrap_or_default()
}

async fn keys_moved(client: &tonic_etcd::Etcd, rows: &mut Vec<Vec<String>>) -> serde_json::Value {
    let n = setting("BENCH_RING_INSTANCES", 20, 4) as usize;
    let n_keys = setting("BENCH_KEYS", 2_000, 100) as usize;
    let joiners = setting("BENCH_JOINERS", 5, 1) as usize;
    let svc = "bench.routing.keys";
    let (_addrs, _regs) = instances(client, svc, n, Duration::ZERO, None).await;
    let b = balancer(
        client,
        svc,
        config(
            r#"{"loadBalancingConfig":[{"ring_hash_experimental":{"requestHashHeader":"x-key"}}]}"#,
        ),
    );
    b.wait_for_ready(n, Duration::from_secs(30)).await.unwrap();
    let keys: Vec<String> = (0..n_keys).map(|i| format!("item-{i}")).collect();
    let homes = |b: Balancer| {
        let keys = keys.clone();
        async move {
            let mut out = Vec::with_capacity(keys.len());
            for k in &keys {
                out.push(call_key(&b, k).await);
            }
            out
        }
    };
    let before = homes(b.clone()).await;
    let mut moved = 0;
    for j in 0..joiners {
        let (_, reg) = instance(client, svc, 1_000 + j, Duration::ZERO, None).await;
        b.wait_for_ready(n + 1, Duration::from_secs(30))
            .await
            .unwrap();
        let after = homes(b.clone()).await;
        moved += before.iter().zip(&after).filter(|(a, b)| a != b).count();
        reg.deregister().await.unwrap();
        let limit = Instant::now() + Duration::from_secs(30);
        while b.ready() != n && Instant::now() < limit {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let ring = moved as f64 / (joiners * n_keys) as f64;
    let modulo = keys
        .iter()
        .filter(|k| {
            let h = xxh64(k.as_bytes(), 0);
            h % n as u64 != h % (n as u64 + 1)
        })
        .count() as f64
        / n_keys as f64;
    let ideal = 1.0 / (n + 1) as f64;
    rows.push(vec![
        format!("ring hash ({n} + 1, mean of {joiners} joins)"),
        format!("{:.2} %", ring * 100.0),
        format!("{:.2}x", ring / ideal),
    ]);
    rows.push(vec![
        format!("modulo hashing ({n} + 1)"),
        format!("{:.2} %", modulo * 100.0),
        format!("{:.2}x", modulo / ideal),
    ]);
    serde_json::json!({"instances": n, "keys": n_keys, "joins": joiners,
        "ring_hash_moved": ring, "modulo_moved": modulo, "ideal": ideal})
}

/// A call with a key: the hot one for `hot` of them, else a random one.
fn keyed_caller(b: Balancer, hot: f64) -> Call {
    Arc::new(move || {
        let key = if rand::random::<f64>() < hot {
            "hot".to_owned()
        } else {
            format!("k{}", rand::random::<u32>())
        };
        let b = b.clone();
        Box::pin(async move {
            let mut request = tonic::Request::new(HelloRequest { name: "k".into() });
            request.metadata_mut().insert("x-key", key.parse().unwrap());
            request.set_timeout(Duration::from_secs(1));
            GreeterClient::new(b)
                .say_hello(request)
                .await
                .map(|r| r.into_inner().server_id)
                .map_err(|s| s.code())
        })
    })
}

async fn hot_key(client: &tonic_etcd::Etcd, rows: &mut Vec<Vec<String>>) -> serde_json::Value {
    let rate = setting("BENCH_RATE", 1_200, 200);
    let length = Duration::from_millis(setting("BENCH_ROUND_MS", 2_000, 300));
    let rounds = setting("BENCH_ROUNDS", 3, 1);
    let svc = "bench.routing.hot";
    let (_addrs, _regs) = instances(client, svc, 4, Duration::from_millis(4), Some(2)).await;
    let plain = balancer(
        client,
        svc,
        config(
            r#"{"loadBalancingConfig":[{"ring_hash_experimental":{"requestHashHeader":"x-key"}}]}"#,
        ),
    );
    let bounded = balancer(
        client,
        svc,
        config(
            r#"{"loadBalancingConfig":[{"ring_hash_experimental":{"requestHashHeader":"x-key",
                "hashBalanceFactor":125}}]}"#,
        ),
    );
    for b in [&plain, &bounded] {
        b.wait_for_ready(4, Duration::from_secs(30)).await.unwrap();
    }
    let variants: [(&str, Call); 3] = [
        ("uniform keys, ring hash", keyed_caller(plain.clone(), 0.0)),
        ("hot key, ring hash", keyed_caller(plain.clone(), 0.5)),
        (
            "hot key, bounded load 125",
            keyed_caller(bounded.clone(), 0.5),
        ),
    ];
    for (_, call) in &variants {
        round(call, rate, Duration::from_millis(200), None).await;
    }
    let mut results: Vec<Vec<(Duration, Outcome)>> = vec![Vec::new(); 3];
    for r in 0..rounds as usize {
        for j in 0..3 {
            let i = (j + r) % 3;
            results[i].extend(round(&variants[i].1, rate, length, None).await);
        }
    }
    let mut json = serde_json::Map::new();
    let mut uniform_p99 = Duration::ZERO;
    for (i, (name, _)) in variants.iter().enumerate() {
        let calls = results[i].len();
        let mut ok: Vec<Duration> = results[i]
            .iter()
            .filter(|(_, o)| o.is_ok())
            .map(|(d, _)| *d)
            .collect();
        ok.sort();
        let at = |q: f64| {
            ok.get(((ok.len().max(1) - 1) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(Duration::ZERO)
        };
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        for (_, o) in &results[i] {
            if let Ok(id) = o {
                *per.entry(id.clone()).or_default() += 1;
            }
        }
        let busiest = per.values().max().copied().unwrap_or(0) as f64 * 100.0 / calls.max(1) as f64;
        let p99 = at(0.99);
        if i == 0 {
            uniform_p99 = p99;
        }
        rows.push(vec![
            (*name).into(),
            calls.to_string(),
            format!("{:.2}", ok.len() as f64 * 100.0 / calls.max(1) as f64),
            support::ms(at(0.50)),
            support::ms(p99),
            format!(
                "{:.2}x",
                p99.as_secs_f64() / uniform_p99.as_secs_f64().max(1e-9)
            ),
            format!("{busiest:.0}"),
        ]);
        json.insert(
            (*name).into(),
            serde_json::json!({"calls": calls, "ok": ok.len(), "p50_ms": at(0.5).as_secs_f64() * 1e3,
                "p99_ms": p99.as_secs_f64() * 1e3, "busiest_share_pct": busiest}),
        );
    }
    serde_json::Value::Object(json)
}

fn main() {
    let rt = support::runtime();
    rt.block_on(async {
        let etcd = Etcd::start();
        let client = etcd.client().await;
        let mut json = serde_json::Map::new();
        if support::selected("subsets") {
            let mut rows = Vec::new();
            json.insert("subsets".into(), subsets(&client, &mut rows).await);
            table(
                "routing: connections per instance (real Balancers and etcd)",
                &["scheme", "clients x instances", "min", "mean", "max", "max/min", "settled in", "moved on a join"],
                &rows,
            );
        }
        if support::selected("keys") {
            let mut rows = Vec::new();
            json.insert("keys_moved".into(), keys_moved(&client, &mut rows).await);
            table(
                "routing: keys moved when one instance joins",
                &["hashing", "keys moved", "vs 1/(n+1)"],
                &rows,
            );
        }
        if support::selected("hot") {
            let mut rows = Vec::new();
            json.insert("hot_key".into(), hot_key(&client, &mut rows).await);
            table(
                "routing: one hot key (half the calls), 4 instances x 2 calls at a time, open loop (ms)",
                &["variant", "calls", "success %", "p50", "p99", "p99 vs uniform", "busiest %"],
                &rows,
            );
        }
        write_json("routing", &serde_json::Value::Object(json));
    });
}
