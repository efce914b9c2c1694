//! Many endpoints and churn.
//!
//! * For 100, 1,000 and 10,000 instances of one service (written in batched
//!   transactions): time from starting a Discover to every Insert delivered,
//!   beside one raw etcd `Get` of the same prefix (the floor): medians of 7
//!   rounds that alternate the two. Resident memory growth per 1,000
//!   endpoints while the first Discover holds them.
//! * Churn: 5,000 updates (half new registrations, half deregistrations)
//!   written by 16 concurrent writers as fast as etcd takes them; time until
//!   the Discover's view equals etcd's, beside a raw watch counting the same
//!   5,000 events, both running during the same churn.
//!
//! `cargo bench --bench scale`; `BENCH_SCENARIOS=initial` (or `churn`,
//! `held`) runs only those parts.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, Txn, TxnOp, WatchOptions};
use support::{cpu_of, ms, rss_bytes, selected, setting, smoke, table, write_json};
use tokio_stream::StreamExt;
use tonic_etcd::schema::Schema;
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Discover, Instance, NamingSchema, Registration};
use tower::discover::Change;

const LIMIT: Duration = Duration::from_secs(60);

fn entry(service: &str, i: usize) -> (String, Vec<u8>) {
    let addr = format!(
        "10.{}.{}.{}:50051",
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    );
    let e = NamingSchema::new()
        .encode(&Instance::new(service, addr))
        .unwrap();
    (e.key, e.value)
}

async fn write_all(client: &Client, service: &str, range: std::ops::Range<usize>) {
    let mut c = client.clone();
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|&i| {
                let (k, v) = entry(service, i);
                TxnOp::put(k, v, None)
            })
            .collect();
        c.txn(Txn::new().and_then(ops)).await.unwrap();
    }
}

fn main() {
    let etcd = Etcd::options().fsync(true).start();
    let rt = support::runtime();
    rt.block_on(run(&etcd));
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Every Insert of a fresh Discover on `service`, `n` of them.
async fn discover_all(client: &Client, service: &str, n: usize) -> (Duration, Discover) {
    let t = Instant::now();
    let mut d = Discover::builder(client.clone(), service).build().unwrap();
    let mut inserts = 0;
    while inserts < n {
        assert!(t.elapsed() < LIMIT, "discover too slow");
        match tokio::time::timeout(LIMIT, d.next()).await.unwrap() {
            Some(Ok(Change::Insert(..))) => inserts += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    (t.elapsed(), d)
}

async fn raw_get(client: &Client, prefix: &str, n: usize) -> Duration {
    let mut kv = client.kv_client().max_decoding_message_size(256 << 20);
    let t = Instant::now();
    let got = kv
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let took = t.elapsed();
    assert_eq!(got.kvs().len(), n);
    took
}

async fn run(etcd: &Etcd) {
    let client = etcd.client().await;
    let mut json = serde_json::Map::new();
    if selected("initial") {
        initial(&client, &mut json).await;
    }
    if selected("churn") {
        churn(etcd, &mut json).await;
    }
    if selected("held") {
        json.insert("registrations_held".into(), held(etcd).await);
    }
    write_json("scale", &serde_json::Value::Object(json));
}

/// A Discover starting on n instances, beside a raw Get of the prefix:
/// rounds alternate the two, so noise hits them alike; medians.
async fn initial(client: &Client, json: &mut serde_json::Map<String, serde_json::Value>) {
    let mut rows = Vec::new();
    let sizes: &[usize] = if smoke() {
        &[100]
    } else {
        &[100, 1_000, 10_000]
    };
    let rounds = setting("BENCH_ROUNDS", 7, 1) as usize;
    for &n in sizes {
        let service = format!("scale-{n}");
        write_all(client, &service, 0..n).await;
        let prefix = format!("{service}/");
        // Warm both paths once (connections, etcd's caches); memory is
        // measured on this first Discover, before later rounds reuse what
        // it freed.
        raw_get(client, &prefix, n).await;
        let rss_before = rss_bytes();
        let (_, d) = discover_all(client, &service, n).await;
        let rss_growth = rss_bytes().saturating_sub(rss_before);
        drop(d);

        let (mut gets, mut discovers, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let floor = raw_get(client, &prefix, n).await;
            let (took, d) = discover_all(client, &service, n).await;
            drop(d);
            gets.push(floor);
            discovers.push(took);
            ratios.push(took.as_secs_f64() / floor.as_secs_f64());
        }
        ratios.sort_by(f64::total_cmp);
        let ratio = ratios[ratios.len() / 2];
        let (floor, took) = (median(gets), median(discovers));
        let per_k = rss_growth as f64 / (n as f64 / 1000.0);
        rows.push(vec![
            n.to_string(),
            ms(floor),
            ms(took),
            format!("{ratio:.2}x"),
            format!("{:.0}", took.as_nanos() as f64 / n as f64 / 1000.0),
            format!("{:.0}", per_k / 1024.0),
        ]);
        json.insert(
            format!("initial_{n}"),
            serde_json::json!({
                "endpoints": n,
                "rounds": rounds,
                "raw_get_ms_median": floor.as_secs_f64() * 1000.0,
                "discover_all_inserts_ms_median": took.as_secs_f64() * 1000.0,
                "ratio_to_raw_get_median": ratio,
                "us_per_endpoint": took.as_nanos() as f64 / n as f64 / 1000.0,
                "rss_growth_bytes": rss_growth,
                "rss_growth_kib_per_1000": per_k / 1024.0,
            }),
        );
    }
    table(
        &format!("scale: a Discover starting on n instances (etcd with fsync; medians of {rounds} interleaved rounds)"),
        &[
            "n",
            "raw Get ms",
            "all Inserts ms",
            "vs Get",
            "us/endpoint",
            "RSS KiB/1k",
        ],
        &rows,
    );
}

async fn churn(etcd: &Etcd, json: &mut serde_json::Map<String, serde_json::Value>) {
    let client = etcd.client().await;
    // Churn: 3,000 instances, then 2,500 new ones and 2,500 of the old ones
    // deregistered, interleaved, from 16 writers.
    let service = "churn";
    let (initial, updates) = if smoke() { (300, 500) } else { (3_000, 5_000) };
    write_all(&client, service, 0..initial).await;
    let mut d = Discover::builder(client.clone(), service).build().unwrap();
    let mut view: HashSet<String> = HashSet::new();
    while view.len() < initial {
        if let Some(Ok(Change::Insert(k, _))) = tokio::time::timeout(LIMIT, d.next()).await.unwrap()
        {
            view.insert(k);
        }
    }
    let mut expected: HashSet<String> = (0..initial).map(|i| entry(service, i).0).collect();
    let ops: Vec<(bool, String, Vec<u8>)> = (0..updates)
        .map(|i| {
            if i % 2 == 0 {
                let (k, v) = entry(service, initial + i / 2);
                (true, k, v)
            } else {
                (false, entry(service, i / 2).0, Vec::new())
            }
        })
        .collect();
    for (put, k, _) in &ops {
        if *put {
            expected.insert(k.clone());
        } else {
            expected.remove(k);
        }
    }
    let mut raw_client = client.clone();
    let start_rev = raw_client
        .get("churn-rev", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    // Its own connection, as another process would have.
    let mut raw = etcd.client().await;
    let mut raw_watch = raw
        .watch(
            format!("{service}/"),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start_rev + 1),
            ),
        )
        .await
        .unwrap();

    let t = Instant::now();
    let writers: Vec<_> = ops
        .chunks(updates / 16 + 1)
        .map(|chunk| {
            let mut c = client.clone();
            let chunk = chunk.to_vec();
            tokio::spawn(async move {
                for (put, k, v) in chunk {
                    if put {
                        c.put(k, v, None).await.unwrap();
                    } else {
                        c.delete(k, None).await.unwrap();
                    }
                }
            })
        })
        .collect();
    let raw_task = tokio::spawn(async move {
        let mut seen = 0;
        while seen < updates {
            let resp = tokio::time::timeout(LIMIT, raw_watch.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            seen += resp.events().len();
        }
        Instant::now()
    });
    let view_task = tokio::spawn(async move {
        while view != expected {
            match tokio::time::timeout(LIMIT, d.next()).await.unwrap() {
                Some(Ok(Change::Insert(k, _))) => {
                    view.insert(k);
                }
                Some(Ok(Change::Remove(k))) => {
                    view.remove(&k);
                }
                _ => unreachable!(),
            }
        }
        Instant::now()
    });
    for w in writers {
        w.await.unwrap();
    }
    let written = t.elapsed();
    let raw_done = raw_task.await.unwrap().duration_since(t);
    let view_done = view_task.await.unwrap().duration_since(t);
    let rate = |d: Duration| updates as f64 / d.as_secs_f64();
    table(
        &format!(
            "churn: {updates} updates from 16 writers while a Discover and a raw watch follow"
        ),
        &["measure", "ms", "updates/s"],
        &[
            vec![
                "all writes acknowledged".into(),
                ms(written),
                format!("{:.0}", rate(written)),
            ],
            vec![
                "raw watch saw every event".into(),
                ms(raw_done),
                format!("{:.0}", rate(raw_done)),
            ],
            vec![
                "Discover view equals etcd".into(),
                ms(view_done),
                format!("{:.0}", rate(view_done)),
            ],
        ],
    );
    json.insert(
        "churn".into(),
        serde_json::json!({
            "updates": updates,
            "writes_ms": written.as_secs_f64() * 1000.0,
            "raw_watch_ms": raw_done.as_secs_f64() * 1000.0,
            "discover_view_ms": view_done.as_secs_f64() * 1000.0,
            "raw_watch_events_per_s": rate(raw_done),
            "discover_events_per_s": rate(view_done),
            "discover_ratio_to_raw_watch": view_done.as_secs_f64() / raw_done.as_secs_f64(),
        }),
    );
}

/// CPU seconds (user + system) that process `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    cpu_of(pid).as_secs_f64()
}

/// Registrations held against one etcd: what a fleet costs etcd in steady
/// state (Raft proposals, etcd CPU) and what each registration costs its
/// process (CPU, memory). TTL 10 s: a keep-alive every 3.3 s, a key check
/// every 30 s (spread over the first 15 to 30 s); at 10,000 also with a key
/// check on every keep-alive tick, as before `key_check_interval`.
async fn held(etcd: &Etcd) -> serde_json::Value {
    let every_tick = Duration::from_millis(3_334);
    let default_checks = Duration::from_secs(30);
    let sizes: &[(usize, Duration)] = if smoke() {
        &[(100, default_checks)]
    } else {
        &[
            (1_000, default_checks),
            (10_000, default_checks),
            (10_000, every_tick),
        ]
    };
    let window = Duration::from_millis(setting("BENCH_HELD_MS", 30_000, 1_000));
    let etcd_pid = etcd.pid().expect("etcd runs");
    let client = etcd.client().await;
    let mut json = serde_json::Map::new();
    let mut rows = Vec::new();
    for &(n, checks) in sizes {
        let service = format!("held-{n}-{}", checks.as_millis());
        let rss_before = rss_bytes();
        let mut regs = Vec::with_capacity(n);
        let started = Instant::now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
            let batch = chunk.iter().map(|i| {
                Registration::builder(client.clone())
                    .service(&service)
                    .addr(format!(
                        "10.{}.{}.{}:7000",
                        i >> 16 & 255,
                        i >> 8 & 255,
                        i & 255
                    ))
                    .ttl(Duration::from_secs(10))
                    .key_check_interval(checks)
                    .register()
            });
            for r in futures_join(batch).await {
                regs.push(r.expect("registered"));
            }
        }
        let registering = started.elapsed();
        // Steady state: let the first keep-alives pass (one to two
        // keep-alive intervals after each grant).
        tokio::time::sleep(Duration::from_secs(if smoke() { 0 } else { 7 })).await;
        let mut status = client.clone();
        let raft0 = status.status().await.unwrap().raft_index();
        let (etcd0, me0) = (cpu_seconds(etcd_pid), cpu_seconds(std::process::id()));
        tokio::time::sleep(window).await;
        let raft1 = status.status().await.unwrap().raft_index();
        let (etcd1, me1) = (cpu_seconds(etcd_pid), cpu_seconds(std::process::id()));
        let secs = window.as_secs_f64();
        let proposals = (raft1 - raft0) as f64 / secs;
        let etcd_cpu = (etcd1 - etcd0) / secs;
        let my_cpu = (me1 - me0) / secs;
        let rss_per = rss_bytes().saturating_sub(rss_before) as f64 / n as f64;
        rows.push(vec![
            n.to_string(),
            format!("{:.1}", checks.as_secs_f64()),
            format!("{:.1}", registering.as_secs_f64()),
            format!("{proposals:.2}"),
            format!("{:.3}", etcd_cpu),
            format!("{:.3}", etcd_cpu * 1000.0 / n as f64),
            format!("{:.1}", my_cpu * 1e6 / n as f64),
            format!("{:.1}", rss_per / 1024.0),
        ]);
        json.insert(
            format!("{n}/checks-every-{}ms", checks.as_millis()),
            serde_json::json!({
                "key_check_interval_s": checks.as_secs_f64(),
                "register_all_s": registering.as_secs_f64(),
                "raft_proposals_per_s": proposals,
                "etcd_cpu_s_per_s": etcd_cpu,
                "etcd_cpu_s_per_s_per_1000": etcd_cpu * 1000.0 / n as f64,
                "client_cpu_us_per_s_per_registration": my_cpu * 1e6 / n as f64,
                "client_rss_kib_per_registration": rss_per / 1024.0,
                "window_s": secs,
            }),
        );
        // Deregister in batches so the next size starts from a quiet etcd.
        let mut regs = regs.into_iter();
        loop {
            let batch: Vec<_> = regs.by_ref().take(256).collect();
            if batch.is_empty() {
                break;
            }
            for r in futures_join(batch.into_iter().map(|r| r.deregister())).await {
                r.expect("deregistered");
            }
        }
    }
    table(
        &format!(
            "scale: registrations held against one etcd (TTL 10 s, {} s in steady state)",
            window.as_secs()
        ),
        &[
            "n",
            "key check every s",
            "register s",
            "Raft proposals/s",
            "etcd CPU s/s",
            "etcd CPU s/s per 1k",
            "client CPU us/s each",
            "client KiB each",
        ],
        &rows,
    );
    serde_json::Value::Object(json)
}

/// Runs every future of `futures` concurrently (spawned), in order.
async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}
