//! What etcd pays for each thing a fleet holds open: a watch stream, a
//! watcher on a stream, a registration's lease (with its key and
//! keep-alive stream), a client process of this crate (one `Etcd`, five
//! Balancers, idle), and an event delivered to a watcher. The inputs of
//! the sizing guide (`docs/operations.md`, "Sizing").
//!
//! Each holding is measured on a fresh etcd (fsync on): its Go heap in use
//! and RSS, and its CPU while idle (all from etcd's own metrics), before
//! and after `count` of them are opened, divided by `count`;
//! `process_via_proxy` measures the same client processes at an etcd gRPC
//! proxy in front of etcd (the proxy's own metrics). An event's cost is etcd's CPU for the same
//! puts with and without `watchers` watching their prefix, divided by the
//! events delivered.
//!
//! `cargo bench --bench etcd_cost`; `BENCH_COST_STREAMS` (2,000),
//! `BENCH_COST_WATCHERS` (50,000), `BENCH_COST_LEASES` (1,000),
//! `BENCH_COST_PROCESSES` (200),
//! `BENCH_COST_EVENT_WATCHERS` (2,000), `BENCH_COST_PUTS` (200),
//! `BENCH_COST_IDLE_SECS` (20), `BENCH_SCENARIOS` (`stream`, `watcher`,
//! `lease`, `process`, `process_via_proxy`, `event`).

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::WatchOptions;
use support::{cpu_of, setting, table, write_json};

use tonic_etcd::testing::{metric, Etcd, EtcdProxy};

/// Connections the holdings are spread over (a fleet's are many; a few
/// keep one connection's stream limit out of the measurement).
const CONNECTIONS: usize = 4;
/// After opening, for etcd's first responses and GC to settle.
const SETTLE: Duration = Duration::from_secs(3);

fn main() {
    let idle = Duration::from_secs(setting("BENCH_COST_IDLE_SECS", 20, 1));
    let rt = support::runtime();
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    let holdings = [
        ("stream", setting("BENCH_COST_STREAMS", 2_000, 20)),
        ("watcher", setting("BENCH_COST_WATCHERS", 50_000, 100)),
        ("lease", setting("BENCH_COST_LEASES", 1_000, 10)),
        ("process", setting("BENCH_COST_PROCESSES", 200, 4)),
        ("process_via_proxy", setting("BENCH_COST_PROCESSES", 200, 4)),
    ];
    for (name, count) in holdings {
        if !support::selected(name) {
            continue;
        }
        let count = count as usize;
        let cost = rt.block_on(hold(name, count, idle));
        rows.push(vec![
            name.to_owned(),
            count.to_string(),
            format!("{:.0}", cost.heap_per),
            format!("{:.0}", cost.rss_per),
            format!("{:.2}", cost.cpu_us_s_per),
            format!("{:.1}", cost.idle_before_ms_s),
            format!("{:.1}", cost.idle_after_ms_s),
        ]);
        json.insert(
            name.to_owned(),
            serde_json::json!({
                "count": count,
                "etcd_heap_bytes_per": cost.heap_per,
                "etcd_rss_bytes_per": cost.rss_per,
                "etcd_idle_cpu_us_per_s_per": cost.cpu_us_s_per,
                "etcd_idle_cpu_ms_per_s_before": cost.idle_before_ms_s,
                "etcd_idle_cpu_ms_per_s_after": cost.idle_after_ms_s,
            }),
        );
    }
    let mut events = None;
    if support::selected("event") {
        let watchers = setting("BENCH_COST_EVENT_WATCHERS", 2_000, 20) as usize;
        let puts = setting("BENCH_COST_PUTS", 200, 10) as usize;
        let e = rt.block_on(event_cost(watchers, puts));
        json.insert(
            "event".into(),
            serde_json::json!({
                "watchers": watchers,
                "puts": puts,
                "delivered": e.delivered,
                "etcd_cpu_ms_puts_alone": e.alone_ms,
                "etcd_cpu_ms_puts_watched": e.watched_ms,
                "etcd_cpu_us_per_delivered_event": e.per_event_us,
            }),
        );
        events = Some((watchers, puts, e));
    }
    write_json("etcd_cost", &serde_json::Value::Object(json));
    table(
        &format!(
            "What etcd pays per holding (fresh etcd each, idle {idle:?}; \
             cargo bench --bench etcd_cost)"
        ),
        &[
            "holding",
            "count",
            "etcd heap B per",
            "etcd RSS B per",
            "etcd idle CPU µs/s per",
            "etcd idle ms/s before",
            "after",
        ],
        &rows,
    );
    if let Some((watchers, puts, e)) = events {
        table(
            "What etcd pays per event delivered",
            &[
                "watchers",
                "puts",
                "delivered",
                "etcd CPU ms, puts alone",
                "watched",
                "µs per delivered event",
            ],
            &[vec![
                watchers.to_string(),
                puts.to_string(),
                e.delivered.to_string(),
                format!("{:.0}", e.alone_ms),
                format!("{:.0}", e.watched_ms),
                format!("{:.2}", e.per_event_us),
            ]],
        );
    }
}

struct Cost {
    heap_per: f64,
    rss_per: f64,
    cpu_us_s_per: f64,
    idle_before_ms_s: f64,
    idle_after_ms_s: f64,
}

/// A Go process's CPU seconds, heap in use and RSS, from its own metrics.
fn usage(metrics: &str) -> (f64, f64, f64) {
    (
        metric(metrics, "process_cpu_seconds_total").unwrap_or(0.0),
        metric(metrics, "go_memstats_heap_inuse_bytes").unwrap_or(0.0),
        metric(metrics, "process_resident_memory_bytes").unwrap_or(0.0),
    )
}

/// Heap and RSS now, and CPU in ms/s over `span` of idling.
async fn idle_usage(metrics: impl Fn() -> String, span: Duration) -> (f64, f64, f64) {
    let (c0, t0) = (usage(&metrics()).0, Instant::now());
    tokio::time::sleep(span).await;
    let (c1, heap, rss) = usage(&metrics());
    ((c1 - c0) * 1e3 / t0.elapsed().as_secs_f64(), heap, rss)
}

async fn clients(etcd: &Etcd) -> Vec<tonic_etcd::Etcd> {
    let mut out = Vec::new();
    for _ in 0..CONNECTIONS {
        out.push(etcd.client().await);
    }
    out
}

/// Opens `count` of `name` on a fresh etcd and measures what they cost it
/// (for `process_via_proxy`: what they cost the proxy in front of it).
async fn hold(name: &str, count: usize, idle: Duration) -> Cost {
    let etcd = Etcd::options().fsync(true).start();
    let proxy = (name == "process_via_proxy").then(|| EtcdProxy::start(&[etcd.endpoint()]));
    let clients = clients(&etcd).await;
    let metrics = || {
        proxy
            .as_ref()
            .map_or_else(|| etcd.metrics(), EtcdProxy::metrics)
    };
    tokio::time::sleep(SETTLE).await;
    let (before, heap0, rss0) = idle_usage(metrics, idle).await;
    let held: Box<dyn std::any::Any + Send> = match name {
        "stream" => Box::new(streams(&clients, count).await),
        "watcher" => Box::new(watchers(&clients[0], count).await),
        "lease" => Box::new(leases(&clients, count).await),
        _ => {
            let endpoint = proxy
                .as_ref()
                .map_or_else(|| etcd.endpoint(), EtcdProxy::endpoint);
            Box::new(processes(&endpoint, count).await)
        }
    };
    tokio::time::sleep(SETTLE).await;
    let (after, heap1, rss1) = idle_usage(metrics, idle).await;
    drop(held);
    let n = count.max(1) as f64;
    Cost {
        heap_per: (heap1 - heap0) / n,
        rss_per: (rss1 - rss0) / n,
        cpu_us_s_per: (after - before) * 1e3 / n,
        idle_before_ms_s: before,
        idle_after_ms_s: after,
    }
}

/// `count` watch streams, one watcher each (on keys nobody writes), spread
/// over the connections.
async fn streams(clients: &[tonic_etcd::Etcd], count: usize) -> Vec<etcd_client::WatchStream> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let mut w = clients[i % clients.len()].watch_client();
        let mut s = w
            .watch(format!("cost/stream/{i}"), None)
            .await
            .expect("open a watch stream");
        let created = tokio::time::timeout(Duration::from_secs(10), s.message()).await;
        assert!(
            matches!(created, Ok(Ok(Some(ref r))) if r.created()),
            "watch {i} not created: {created:?}"
        );
        out.push(s);
    }
    out
}

/// `count` watchers on one stream. Its answers are read as the creates go
/// out, as a client does (etcd ends a stream whose reader stalls).
async fn watchers(client: &tonic_etcd::Etcd, count: usize) -> impl Send {
    let mut w = client.watch_client();
    let s = w
        .watch("cost/watcher/0", None)
        .await
        .expect("open a watch stream");
    let (mut sender, mut responses) = s.split();
    let (created_tx, mut created_rx) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let mut created = 0;
        while let Ok(Some(r)) = responses.message().await {
            created += usize::from(r.created());
            created_tx.send_replace(created);
        }
    });
    for i in 1..count {
        sender
            .watch(format!("cost/watcher/{i}"), None)
            .await
            .expect("add a watcher");
    }
    let all = tokio::time::timeout(
        Duration::from_secs(120),
        created_rx.wait_for(|n| *n >= count),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(all, "{} of {count} watchers created", *created_rx.borrow());
    (sender, AbortOnDrop(reader))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `count` registrations as servers make them: a lease (TTL 10 s) with one
/// key, its keep-alive stream and key check.
async fn leases(clients: &[tonic_etcd::Etcd], count: usize) -> Vec<tonic_etcd::Registration> {
    let mut out = Vec::with_capacity(count);
    let mut batch = tokio::task::JoinSet::new();
    for i in 0..count {
        let builder = tonic_etcd::Registration::builder(clients[i % clients.len()].clone())
            .service("cost.v1.Lease")
            .addr(format!("127.0.{}.{}:1", i / 250, i % 250 + 1));
        batch.spawn(builder.register());
        if batch.len() >= 50 || i + 1 == count {
            while let Some(r) = batch.join_next().await {
                out.push(r.expect("join").expect("register"));
            }
        }
    }
    out
}

/// Balancers per client process in the `process` holding, each of its own
/// service.
const BALANCERS_PER_PROCESS: usize = 5;

/// `count` client processes as this crate makes them: one `Etcd` (its own
/// connection, HTTP/2 pings, one watch stream) with five Balancers of
/// five services (instances, service config and overrides: 15 watchers),
/// idle.
async fn processes(endpoint: &str, count: usize) -> Vec<tonic_etcd::Balancer> {
    let mut out = Vec::with_capacity(count * BALANCERS_PER_PROCESS);
    for p in 0..count {
        let client = tonic_etcd::testing::connect(&[endpoint.to_owned()]).await;
        for b in 0..BALANCERS_PER_PROCESS {
            let service = format!("cost.v1.S{}", (p + b) % 50);
            out.push(
                tonic_etcd::Balancer::builder(client.clone(), service)
                    .build()
                    .expect("a Balancer"),
            );
        }
    }
    out
}

struct EventCost {
    delivered: u64,
    alone_ms: f64,
    watched_ms: f64,
    per_event_us: f64,
}

/// etcd's CPU for `puts` puts at 50/s, alone and then with `watchers`
/// watchers (over the connections, 100 per stream) on their prefix.
async fn event_cost(watchers: usize, puts: usize) -> EventCost {
    let etcd = Etcd::options().fsync(true).start();
    let clients = clients(&etcd).await;
    tokio::time::sleep(SETTLE).await;
    let pid = etcd.pid().unwrap_or(0);
    let put_all = |round: &'static str| {
        let mut kv = clients[0].kv_client();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for i in 0..puts {
                tick.tick().await;
                kv.put(format!("cost/event/{round}-{i}"), "x", None)
                    .await
                    .expect("put");
            }
        }
    };
    let c0 = cpu_of(pid);
    put_all("alone").await;
    let alone_ms = (cpu_of(pid) - c0).as_secs_f64() * 1e3;
    let delivered = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    let per_stream = 100;
    for (n, first) in (0..watchers).step_by(per_stream).enumerate() {
        let mut w = clients[n % clients.len()].watch_client();
        let prefix = Some(WatchOptions::new().with_prefix());
        let mut s = w.watch("cost/event/", prefix.clone()).await.expect("watch");
        for _ in first + 1..(first + per_stream).min(watchers) {
            s.watch("cost/event/", prefix.clone()).await.expect("watch");
        }
        let count = delivered.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(Some(r)) = s.message().await {
                count.fetch_add(r.events().len() as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(SETTLE).await;
    let c0 = cpu_of(pid);
    put_all("watched").await;
    let expected = (watchers * puts) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Up to the last delivery: some were still in flight when the puts ended.
    let watched_ms = (cpu_of(pid) - c0).as_secs_f64() * 1e3;
    for r in readers {
        r.abort();
    }
    let got = delivered.load(Ordering::Relaxed);
    assert_eq!(got, expected, "events delivered");
    EventCost {
        delivered: got,
        alone_ms,
        watched_ms,
        per_event_us: (watched_ms - alone_ms) * 1e3 / got.max(1) as f64,
    }
}
