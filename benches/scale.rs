//! Many endpoints and churn.
//!
//! * For 100, 1,000 and 10,000 instances of one service (written in batched
//!   transactions): time from starting a Discover to every Insert delivered,
//!   beside one raw etcd `Get` of the same prefix (the floor), and resident
//!   memory growth per 1,000 endpoints while the Discover holds them.
//! * Churn: 5,000 updates (half new registrations, half deregistrations)
//!   written by 16 concurrent writers as fast as etcd takes them; time until
//!   the Discover's view equals etcd's, beside a raw watch counting the same
//!   5,000 events, both running during the same churn.
//!
//! `cargo bench --bench scale`

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, Txn, TxnOp, WatchOptions};
use support::{ms, rss_bytes, smoke, table, write_json};
use tokio_stream::StreamExt;
use tonic_etcd::schema::Schema;
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Discover, Instance, NamingSchema};
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

async fn run(etcd: &Etcd) {
    let client = etcd.client().await;
    let mut json = serde_json::Map::new();
    let mut rows = Vec::new();
    let sizes: &[usize] = if smoke() {
        &[100]
    } else {
        &[100, 1_000, 10_000]
    };
    for &n in sizes {
        let service = format!("scale-{n}");
        write_all(&client, &service, 0..n).await;
        let prefix = format!("{service}/");

        // Floor: one raw Get of the prefix.
        let mut kv = client.kv_client().max_decoding_message_size(256 << 20);
        let t = Instant::now();
        let got = kv
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        let floor = t.elapsed();
        assert_eq!(got.kvs().len(), n);
        drop(got);

        let rss_before = rss_bytes();
        let t = Instant::now();
        let mut d = Discover::builder(client.clone(), &service).build().unwrap();
        let mut inserts = 0;
        while inserts < n {
            assert!(t.elapsed() < LIMIT, "discover too slow");
            match tokio::time::timeout(LIMIT, d.next()).await.unwrap() {
                Some(Ok(Change::Insert(..))) => inserts += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        let took = t.elapsed();
        let rss_growth = rss_bytes().saturating_sub(rss_before);
        let per_k = rss_growth as f64 / (n as f64 / 1000.0);
        rows.push(vec![
            n.to_string(),
            ms(floor),
            ms(took),
            format!("{:.2}x", took.as_secs_f64() / floor.as_secs_f64()),
            format!("{:.0}", took.as_nanos() as f64 / n as f64 / 1000.0),
            format!("{:.0}", per_k / 1024.0),
        ]);
        json.insert(
            format!("initial_{n}"),
            serde_json::json!({
                "endpoints": n,
                "raw_get_ms": floor.as_secs_f64() * 1000.0,
                "discover_all_inserts_ms": took.as_secs_f64() * 1000.0,
                "ratio_to_raw_get": took.as_secs_f64() / floor.as_secs_f64(),
                "us_per_endpoint": took.as_nanos() as f64 / n as f64 / 1000.0,
                "rss_growth_bytes": rss_growth,
                "rss_growth_kib_per_1000": per_k / 1024.0,
            }),
        );
        drop(d);
    }
    table(
        "scale: a Discover starting on n instances (etcd with fsync)",
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
    write_json("scale", &serde_json::Value::Object(json));
}
