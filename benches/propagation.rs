//! How fast a change reaches the client, beside what etcd itself takes.
//!
//! Floors (etcd-client directly, one client writes, another watches):
//! put -> event, lease grant + put -> event, lease revoke -> delete event,
//! delete -> delete event. Library paths: register -> Discover Insert,
//! deregister -> Remove, metadata update -> Insert, and register -> first
//! successful RPC through the balanced channel to a real tonic server.
//! Everything runs in one process against one etcd (with fsync), series
//! interleaved sample by sample so machine noise hits all of them alike.
//!
//! `cargo bench --bench propagation` (`BENCH_SAMPLES`, default 500).

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, PutOptions, WatchOptions, WatchStream};
use support::{ms, samples, table, write_json, Stats};
use tokio_stream::StreamExt;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::Etcd;
use tonic_etcd::{ChannelBuilder, Discover, Metadata, Registration};
use tower::discover::Change;

const WAIT: Duration = Duration::from_secs(5);

/// Waits for the event of `kind` on `key`, skipping others.
async fn event(stream: &mut WatchStream, key: &str, kind: EventType) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let resp = tokio::time::timeout(left, stream.message())
            .await
            .expect("watch event within 5 s")
            .expect("watch ok")
            .expect("watch open");
        if resp
            .events()
            .iter()
            .any(|e| e.event_type() == kind && e.kv().is_some_and(|kv| kv.key() == key.as_bytes()))
        {
            return;
        }
    }
}

async fn change(d: &mut Discover) -> Change<String, tonic_etcd::Instance> {
    tokio::time::timeout(WAIT, d.next())
        .await
        .expect("discover change within 5 s")
        .expect("discover open")
        .expect("discover ok")
}

async fn watch(client: &Client, prefix: &str) -> WatchStream {
    let mut c = client.clone();
    let mut s = c
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    // The first message confirms the watch is created.
    s.message().await.unwrap();
    s
}

#[derive(Default)]
struct Series {
    put: Vec<Duration>,
    grant_put: Vec<Duration>,
    revoke: Vec<Duration>,
    delete: Vec<Duration>,
    register: Vec<Duration>,
    deregister: Vec<Duration>,
    metadata: Vec<Duration>,
    first_rpc: Vec<Duration>,
}

fn main() {
    let n = samples(500);
    let etcd = Etcd::options().fsync(true).start();
    let rt = support::runtime();
    let series = rt.block_on(run(&etcd, n));
    report(series);
}

async fn run(etcd: &Etcd, n: usize) -> Series {
    // Separate connections for writer and watcher, as two processes would have.
    let writer = etcd.client().await;
    let reader = etcd.client().await;
    let mut w = writer.clone();
    let mut floor_watch = watch(&reader, "floor/").await;

    let mut discover = Discover::builder(reader.clone(), "bench.reg")
        .build()
        .unwrap();

    // A real server, registered and deregistered once per sample.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rpc_addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic_etcd::server::builder()
            .add_service(Greeter::new("rpc").into_service())
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    let channel = ChannelBuilder::new(reader.clone(), "bench.rpc")
        .no_endpoint_timeout(WAIT)
        .build()
        .unwrap();

    let mut s = Series::default();
    let deadline = Instant::now() + Duration::from_secs(150);
    for i in 0..n {
        assert!(
            Instant::now() < deadline,
            "propagation bench over its time budget at sample {i}"
        );

        // Floor: put -> event.
        let key = format!("floor/put/{i}");
        let t = Instant::now();
        w.put(key.as_str(), "v", None).await.unwrap();
        event(&mut floor_watch, &key, EventType::Put).await;
        s.put.push(t.elapsed());

        // Floor: delete -> event.
        let t = Instant::now();
        w.delete(key.as_str(), None).await.unwrap();
        event(&mut floor_watch, &key, EventType::Delete).await;
        s.delete.push(t.elapsed());

        // Floor: grant + put with the lease -> event.
        let key = format!("floor/lease/{i}");
        let t = Instant::now();
        let lease = w.lease_grant(10, None).await.unwrap().id();
        w.put(key.as_str(), "v", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
        event(&mut floor_watch, &key, EventType::Put).await;
        s.grant_put.push(t.elapsed());

        // Floor: revoke -> delete event.
        let t = Instant::now();
        w.lease_revoke(lease).await.unwrap();
        event(&mut floor_watch, &key, EventType::Delete).await;
        s.revoke.push(t.elapsed());

        // Library: register -> Insert.
        let t = Instant::now();
        let reg = Registration::builder(writer.clone())
            .service("bench.reg")
            .addr("127.0.0.1:9")
            .register()
            .await
            .unwrap();
        assert!(matches!(change(&mut discover).await, Change::Insert(..)));
        s.register.push(t.elapsed());

        // Library: metadata update -> Insert (replace).
        let t = Instant::now();
        reg.update_metadata(Metadata::new().with("sample", i.to_string()))
            .await
            .unwrap();
        assert!(matches!(change(&mut discover).await, Change::Insert(..)));
        s.metadata.push(t.elapsed());

        // Library: deregister -> Remove.
        let t = Instant::now();
        reg.deregister().await.unwrap();
        assert!(matches!(change(&mut discover).await, Change::Remove(..)));
        s.deregister.push(t.elapsed());

        // Library: register -> first successful RPC. The call is made first
        // and waits for an instance, as a client starting with its server would.
        let mut greeter = GreeterClient::new(channel.clone());
        let call = tokio::spawn(async move {
            greeter
                .say_hello(HelloRequest { name: "b".into() })
                .await
                .map(|_| Instant::now())
        });
        let t = Instant::now();
        let reg = Registration::builder(writer.clone())
            .service("bench.rpc")
            .addr(&rpc_addr)
            .register()
            .await
            .unwrap();
        let answered = tokio::time::timeout(WAIT, call)
            .await
            .expect("first RPC within 5 s")
            .unwrap()
            .expect("first RPC succeeds");
        s.first_rpc.push(answered.saturating_duration_since(t));
        reg.deregister().await.unwrap();
        let gone = Instant::now() + WAIT;
        while channel.endpoints() > 0 {
            assert!(Instant::now() < gone, "endpoint not removed");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    s
}

fn report(s: Series) {
    let put = Stats::of(s.put);
    let grant_put = Stats::of(s.grant_put);
    let revoke = Stats::of(s.revoke);
    let delete = Stats::of(s.delete);
    // (series, its stats, the floor it is compared with)
    type Row<'a> = (&'a str, Stats, Option<(&'a str, Stats)>);
    let rows_in: Vec<Row> = vec![
        ("floor: put -> watch event", put, None),
        ("floor: grant + put -> watch event", grant_put, None),
        ("floor: revoke -> delete event", revoke, None),
        ("floor: delete -> delete event", delete, None),
        (
            "register -> Insert",
            Stats::of(s.register),
            Some(("grant + put", grant_put)),
        ),
        (
            "deregister -> Remove",
            Stats::of(s.deregister),
            Some(("revoke", revoke)),
        ),
        (
            "metadata update -> Insert",
            Stats::of(s.metadata),
            Some(("put", put)),
        ),
        (
            "register -> first RPC",
            Stats::of(s.first_rpc),
            Some(("grant + put", grant_put)),
        ),
    ];
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    for (name, st, floor) in &rows_in {
        let ratio = floor.map(|(_, f)| st.p50.as_secs_f64() / f.p50.as_secs_f64());
        rows.push(vec![
            name.to_string(),
            st.n.to_string(),
            ms(st.p50),
            ms(st.p90),
            ms(st.p99),
            ms(st.max),
            floor.map_or(String::new(), |(f, _)| f.to_string()),
            ratio.map_or(String::new(), |r| format!("{r:.2}x")),
        ]);
        let mut v = st.json();
        if let (Some((fname, f)), Some(r)) = (floor, ratio) {
            v["floor"] = fname.to_string().into();
            v["p50_ratio_to_floor"] = ((r * 1000.0).round() / 1000.0).into();
            v["p50_over_floor_us"] = support::us(st.p50.saturating_sub(f.p50)).into();
        }
        json.insert(name.to_string(), v);
    }
    table(
        "propagation (ms; etcd with fsync, one process, interleaved samples)",
        &[
            "series",
            "n",
            "p50",
            "p90",
            "p99",
            "max",
            "floor",
            "p50/floor",
        ],
        &rows,
    );
    write_json("propagation", &serde_json::Value::Object(json));
}
