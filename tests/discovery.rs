//! Clients find services: the Discover, the catalog and the balanced
//! channel, against real etcd and real tonic servers on loopback.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{eventually, init_tracing, unique};
use etcd_client::{CompactionOptions, PutOptions};
use tokio_stream::StreamExt;
use tonic_etcd::server::RegisteredServer;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::{shared, Etcd, EtcdCluster};
use tonic_etcd::{
    Catalog, CatalogEvent, ChannelBuilder, Discover, Instance, Metadata, NamingSchema, Registration,
};
use tower::discover::Change;

const LIMIT: Duration = Duration::from_secs(10);

/// The next change, within `LIMIT`.
async fn next(d: &mut Discover) -> Change<String, Instance> {
    tokio::time::timeout(LIMIT, d.next())
        .await
        .expect("a change within the limit")
        .expect("the stream never ends")
        .expect("the stream never fails")
}

/// Asserts that no change arrives for a short while.
async fn quiet(d: &mut Discover) {
    if let Ok(c) = tokio::time::timeout(Duration::from_millis(300), d.next()).await {
        panic!("unexpected change: {c:?}");
    }
}

fn inserted(c: &Change<String, Instance>) -> &Instance {
    match c {
        Change::Insert(_, i) => i,
        Change::Remove(k) => panic!("expected an insert, got remove {k}"),
    }
}

async fn register(client: &etcd_client::Client, svc: &str, addr: &str) -> Registration {
    Registration::builder(client.clone())
        .service(svc)
        .addr(addr)
        .register()
        .await
        .unwrap()
}

/// Registers each `(service, addr)` under `schema`.
async fn register_all(
    client: &etcd_client::Client,
    schema: NamingSchema,
    regs: &[(&str, &str)],
) -> Vec<Registration> {
    let mut held = Vec::new();
    for (svc, addr) in regs {
        held.push(
            Registration::builder(client.clone())
                .schema(schema.clone())
                .service(*svc)
                .addr(*addr)
                .register()
                .await
                .unwrap(),
        );
    }
    held
}

#[tokio::test]
async fn inserts_replaces_and_removes_follow_registrations() {
    let client = shared().client().await;
    let svc = unique("follow");
    let a = register(&client, &svc, "127.0.0.1:8001").await;
    let mut d = Discover::builder(client.clone(), &svc).build().unwrap();
    assert_eq!(inserted(&next(&mut d).await).addr, "127.0.0.1:8001");

    let b = register(&client, &svc, "127.0.0.1:8002").await;
    let c = next(&mut d).await;
    assert_eq!(inserted(&c).addr, "127.0.0.1:8002");

    // Changed metadata: Insert again under the same key (a replace).
    b.update_metadata(Metadata::new().with("version", "v2"))
        .await
        .unwrap();
    let c2 = next(&mut d).await;
    assert!(matches!(&c2, Change::Insert(k, i)
        if *k == b.keys()[0] && i.metadata.get("version").as_deref() == Some("v2")));

    // The identical value written again: nothing.
    let mut raw = client.clone();
    let (value, lease) = common::get(&client, &a.keys()[0]).await.unwrap();
    raw.put(
        a.keys()[0].as_str(),
        value,
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    quiet(&mut d).await;

    let key_a = a.keys()[0].clone();
    a.deregister().await.unwrap();
    assert!(matches!(next(&mut d).await, Change::Remove(k) if k == key_a));
    assert_eq!(d.instances().len(), 1);
    b.deregister().await.unwrap();
    assert!(matches!(next(&mut d).await, Change::Remove(_)));
    assert!(d.status().borrow().synced);
}

#[tokio::test]
async fn the_prefix_boundary_holds() {
    let client = shared().client().await;
    let ns = unique("boundary");
    let schema = || NamingSchema::with_namespace(&ns).unwrap();
    let regs = [
        ("pb.Item", "127.0.0.1:8101"),
        ("pb.ItemServer", "127.0.0.1:8102"),
        ("pb.Item/nested", "127.0.0.1:8103"),
    ];
    let _held = register_all(&client, schema(), &regs).await;
    let mut d = Discover::builder(client.clone(), "pb.Item")
        .schema(schema())
        .build()
        .unwrap();
    let c = next(&mut d).await;
    assert_eq!(inserted(&c).addr, "127.0.0.1:8101");
    quiet(&mut d).await;
    assert_eq!(d.instances().len(), 1);
}

#[tokio::test]
async fn malformed_entries_are_skipped_without_disturbing_others() {
    let client = shared().client().await;
    let svc = unique("malformed");
    let good = register(&client, &svc, "127.0.0.1:8201").await;
    let mut raw = client.clone();
    raw.put(format!("{svc}/bad-json"), "{nope", None)
        .await
        .unwrap();
    let mut d = Discover::builder(client.clone(), &svc).build().unwrap();
    assert_eq!(inserted(&next(&mut d).await).addr, "127.0.0.1:8201");
    quiet(&mut d).await;
    assert_eq!(d.status().borrow().skipped, 1);

    // While watching: garbage values, a bad address, non-UTF-8 keys.
    raw.put(format!("{svc}/x"), r#"{"Addr":"h:99999"}"#, None)
        .await
        .unwrap();
    raw.put(format!("{svc}/y").into_bytes(), vec![0xff, 0xfe], None)
        .await
        .unwrap();
    let mut bad_key = format!("{svc}/").into_bytes();
    bad_key.push(0xff);
    raw.put(bad_key, r#"{"Addr":"h:1"}"#, None).await.unwrap();
    quiet(&mut d).await;
    eventually(LIMIT, "skips counted", || async {
        (d.status().borrow().skipped == 4).then_some(())
    })
    .await;
    assert_eq!(d.instances().len(), 1, "the good instance is untouched");

    // A valid key that turns invalid is removed.
    raw.put(format!("{svc}/z"), r#"{"Addr":"127.0.0.1:8202"}"#, None)
        .await
        .unwrap();
    assert_eq!(inserted(&next(&mut d).await).addr, "127.0.0.1:8202");
    raw.put(format!("{svc}/z"), "garbage", None).await.unwrap();
    assert!(matches!(next(&mut d).await, Change::Remove(k) if k == format!("{svc}/z")));
    assert_eq!(d.instances()[0].addr, "127.0.0.1:8201");
    drop(good);
}

#[tokio::test]
async fn reads_what_a_go_client_writes() {
    // Written as etcd's Go `endpoints.Manager.AddEndpoint` writes, and as
    // etcd's docs show (`{"Addr":"1.2.3.4","Metadata":"..."}` without Op).
    let client = shared().client().await;
    let svc = unique("go");
    let mut raw = client.clone();
    raw.put(
        format!("{svc}/127.0.0.1:8301"),
        r#"{"Op":0,"Addr":"127.0.0.1:8301","Metadata":"zone-a"}"#,
        None,
    )
    .await
    .unwrap();
    raw.put(
        format!("{svc}/1.2.3.4"),
        r#"{"Addr":"1.2.3.4","Metadata":"..."}"#,
        None,
    )
    .await
    .unwrap();
    let mut d = Discover::builder(client.clone(), &svc).build().unwrap();
    let mut addrs = vec![
        inserted(&next(&mut d).await).addr.clone(),
        inserted(&next(&mut d).await).addr.clone(),
    ];
    addrs.sort();
    assert_eq!(addrs, ["1.2.3.4:443", "127.0.0.1:8301"]);
}

#[tokio::test]
async fn an_unread_discover_still_drains_its_watch() {
    let client = shared().client().await;
    let svc = unique("unread");
    let d = Discover::builder(client.clone(), &svc).build().unwrap();
    let mut raw = client.clone();
    let value = format!(
        r#"{{"Addr":"127.0.0.1:1","Metadata":"{}"}}"#,
        "x".repeat(1000)
    );
    for batch in 0..40 {
        // etcd allows 128 operations per transaction by default.
        let ops: Vec<_> = (0..100)
            .map(|i| etcd_client::TxnOp::put(format!("{svc}/{batch}-{i}"), value.clone(), None))
            .collect();
        raw.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap();
    }
    // Never polled, yet the view is current and the shared connection healthy.
    common::init_tracing();
    eventually(LIMIT, "4000 endpoints in the unread view", || async {
        (d.status().borrow().endpoints == 4000).then_some(())
    })
    .await;
    raw.get("anything", None)
        .await
        .expect("the shared connection survives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_during_an_etcd_restart_is_not_missed() {
    init_tracing();
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let a = register(&client, "gap", "127.0.0.1:8401").await;
    let mut d = Discover::builder(client.clone(), "gap").build().unwrap();
    assert_eq!(inserted(&next(&mut d).await).addr, "127.0.0.1:8401");

    etcd.kill();
    etcd.restart();
    // Registered before the Discover's watch is back.
    let writer = etcd.client().await;
    let b = register(&writer, "gap", "127.0.0.1:8402").await;
    assert_eq!(inserted(&next(&mut d).await).addr, "127.0.0.1:8402");
    let mut addrs: Vec<_> = d.instances().into_iter().map(|i| i.addr).collect();
    addrs.sort();
    assert_eq!(addrs, ["127.0.0.1:8401", "127.0.0.1:8402"]);
    eventually(LIMIT, "a reconnect is counted", || async {
        (d.status().borrow().reconnects >= 1).then_some(())
    })
    .await;
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_revision_is_relisted_and_only_the_difference_emitted() {
    init_tracing();
    let etcd = Etcd::start();
    let writer = etcd.client().await;
    let proxy = proxy::Proxy::start(etcd.endpoint().trim_start_matches("http://").into()).await;
    let client = tonic_etcd::testing::connect(&[proxy.endpoint()]).await;
    let svc = "compacted";
    let keep = register(&writer, svc, "127.0.0.1:8501").await;
    let gone = register(&writer, svc, "127.0.0.1:8502").await;
    let mut d = Discover::builder(client, svc)
        .request_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    next(&mut d).await;
    next(&mut d).await;

    // Cut the Discover off, change things, compact past its revision.
    proxy.cut();
    gone.deregister().await.unwrap();
    let added = register(&writer, svc, "127.0.0.1:8503").await;
    let mut raw = writer.clone();
    let rev = raw
        .put("unrelated", "x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    raw.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    proxy.resume();

    let mut changes = [next(&mut d).await, next(&mut d).await];
    quiet(&mut d).await;
    changes.sort_by_key(|c| matches!(c, Change::Insert(..)));
    assert!(matches!(&changes[0], Change::Remove(k) if k.ends_with("127.0.0.1:8502")));
    assert_eq!(inserted(&changes[1]).addr, "127.0.0.1:8503");
    assert!(
        d.status().borrow().resyncs >= 1,
        "{:?}",
        *d.status().borrow()
    );
    drop((keep, added));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_last_endpoints_while_etcd_is_unreachable() {
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let reg = register(&client, "static", "127.0.0.1:8601").await;
    let mut d = Discover::builder(client.clone(), "static").build().unwrap();
    next(&mut d).await;
    etcd.stop();
    // etcd is gone; the instance stays known and nothing is removed.
    quiet(&mut d).await;
    assert_eq!(d.instances().len(), 1);
    eventually(LIMIT, "the failure is reported", || async {
        d.status()
            .borrow()
            .last_error
            .as_ref()
            .map(ToString::to_string)
    })
    .await;
    etcd.restart();
    drop(reg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_losing_the_member_it_watches_through() {
    init_tracing();
    let cluster = EtcdCluster::start();
    let client = cluster.client().await;
    let mut d = Discover::builder(client, "clustered")
        .request_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    eventually(LIMIT, "synced", || async {
        d.status().borrow().synced.then_some(())
    })
    .await;
    // Kill each member in turn: one of them carries the watch.
    let mut held = Vec::new();
    for i in 0..cluster.len() {
        cluster.kill_member(i);
        let writer = cluster.member_client((i + 1) % cluster.len()).await;
        let addr = format!("127.0.0.1:87{i:02}");
        let t = Instant::now();
        held.push(register(&writer, "clustered", &addr).await);
        let c = next(&mut d).await;
        assert_eq!(inserted(&c).addr, addr);
        eprintln!("member {i} down: registration seen after {:?}", t.elapsed());
        cluster.restart_member(i);
    }
    assert_eq!(d.instances().len(), 3);
}

#[tokio::test]
async fn the_catalog_lists_every_service() {
    let client = shared().client().await;
    let ns = unique("catalog");
    let schema = || NamingSchema::with_namespace(&ns).unwrap();
    let regs = [
        ("a", "127.0.0.1:1"),
        ("a", "127.0.0.1:2"),
        ("b/c", "127.0.0.1:3"),
    ];
    let mut held = register_all(&client, schema(), &regs).await;
    let mut catalog = Catalog::builder(client.clone())
        .schema(schema())
        .build()
        .unwrap();
    catalog.synced(LIMIT).await.unwrap();
    let snap = catalog.snapshot();
    assert_eq!(snap.keys().collect::<Vec<_>>(), ["a", "b/c"]);
    assert_eq!(snap["a"].len(), 2);
    // The stream goes on after the snapshot: nothing it showed is replayed
    // (a replay would be ready at once; a zero timeout polls once).
    let replay = tokio::time::timeout(Duration::ZERO, catalog.next()).await;
    assert!(replay.is_err(), "replayed after the snapshot: {replay:?}");
    held.pop().unwrap().deregister().await.unwrap();
    let e = tokio::time::timeout(LIMIT, catalog.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(e, CatalogEvent::Remove { instance, .. } if instance.service == "b/c"));
    assert!(!catalog.snapshot().contains_key("b/c"));

    // Without snapshots, the stream alone starts with every instance.
    let mut fresh = Catalog::builder(client.clone())
        .schema(schema())
        .build()
        .unwrap();
    for _ in 0..2 {
        let e = tokio::time::timeout(LIMIT, fresh.next())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(e, CatalogEvent::Insert { instance, .. } if instance.service == "a"));
    }
}

/// A greeter served and registered on a free loopback port.
struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic_etcd::Error>>,
}

impl Server {
    async fn start(client: &etcd_client::Client, svc: &str, id: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let router = tonic_etcd::server::builder().add_service(Greeter::new(id).into_service());
        let task = tokio::spawn(
            RegisteredServer::new(Registration::builder(client.clone()).service(svc))
                .grace(Duration::from_millis(200))
                .serve_with_shutdown(router, listener, async {
                    let _ = stop_rx.await;
                }),
        );
        Self {
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(LIMIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn spread(
    client: &mut GreeterClient<tonic_etcd::EtcdChannel>,
    calls: usize,
) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..calls {
        let reply = client
            .say_hello(HelloRequest { name: "x".into() })
            .await
            .unwrap();
        *counts.entry(reply.into_inner().server_id).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_spreads_calls_and_follows_deregistration() {
    let client = shared().client().await;
    let svc = unique("spread");
    let servers = [
        Server::start(&client, &svc, "s1").await,
        Server::start(&client, &svc, "s2").await,
        Server::start(&client, &svc, "s3").await,
    ];
    let channel = ChannelBuilder::new(client.clone(), &svc).build().unwrap();
    eventually(LIMIT, "three endpoints", || async {
        (channel.endpoints() == 3).then_some(())
    })
    .await;
    let mut greeter = GreeterClient::new(channel.clone());
    let counts = spread(&mut greeter, 300).await;
    for id in ["s1", "s2", "s3"] {
        let n = counts.get(id).copied().unwrap_or(0);
        assert!(n >= 60, "{id} got {n} of 300: {counts:?}");
    }

    let [s1, s2, s3] = servers;
    s1.shutdown().await;
    eventually(LIMIT, "two endpoints", || async {
        (channel.endpoints() == 2).then_some(())
    })
    .await;
    let counts = spread(&mut greeter, 100).await;
    assert_eq!(
        counts.get("s1"),
        None,
        "a deregistered server got calls: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 100);
    drop((s2, s3));
}

#[tokio::test]
async fn with_no_endpoints_a_call_fails_unavailable_within_the_deadline() {
    let client = shared().client().await;
    let svc = unique("empty");
    let channel = ChannelBuilder::new(client, &svc)
        .no_endpoint_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let mut greeter = GreeterClient::new(channel.clone());
    let t = Instant::now();
    let status = greeter
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(status.message().contains(&svc), "{status}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let err = channel
        .wait_for_endpoints(Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, tonic_etcd::Error::NoEndpoints { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_an_endpoint_goes_through_when_one_registers() {
    let client = shared().client().await;
    let svc = unique("late");
    let channel = ChannelBuilder::new(client.clone(), &svc)
        .no_endpoint_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut greeter = GreeterClient::new(channel);
    let call =
        tokio::spawn(async move { greeter.say_hello(HelloRequest { name: "x".into() }).await });
    // No server exists yet, so a reply can only come from waiting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!call.is_finished(), "the call ended instead of waiting");
    let server = Server::start(&client, &svc, "late").await;
    let t = Instant::now();
    let reply = tokio::time::timeout(LIMIT, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.into_inner().server_id, "late");
    eprintln!(
        "queued call answered {:?} after the server started",
        t.elapsed()
    );
    drop(server);
}

/// Applies changes from `d` to `view` until `done(view)` or `LIMIT`.
async fn follow_until(
    d: &mut Discover,
    view: &mut HashMap<String, Instance>,
    what: &str,
    done: impl Fn(&HashMap<String, Instance>) -> bool,
) {
    let deadline = Instant::now() + LIMIT;
    while !done(view) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, d.next()).await {
            Ok(Some(Ok(Change::Insert(k, i)))) => {
                view.insert(k, i);
            }
            Ok(Some(Ok(Change::Remove(k)))) => {
                view.remove(&k);
            }
            other => panic!("{what}: no change in time ({other:?}); view {view:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_discover_follows_an_etcd_that_lost_its_data() {
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let svc = unique("wiped");
    // Revisions well above what the wiped etcd will be at.
    for i in 0..50 {
        client
            .clone()
            .put(format!("other/{i}"), "x", None)
            .await
            .unwrap();
    }
    let a = Registration::builder(client.clone())
        .service(&svc)
        .addr("127.0.0.1:7201")
        .ttl(Duration::from_secs(2))
        .register()
        .await
        .unwrap();
    let mut d = Discover::builder(client.clone(), &svc).build().unwrap();
    let mut view = HashMap::new();
    follow_until(&mut d, &mut view, "a listed", |v| v.len() == 1).await;

    etcd.wipe_and_restart();
    // The registration puts itself back on the empty etcd, at a revision far
    // below the one the watch resumes from.
    eventually(LIMIT, "a re-registered", || async {
        matches!(a.state(), tonic_etcd::RegistrationState::Registered { .. })
            .then_some(())
            .filter(|_| a.lease_id().is_some())
    })
    .await;
    let b = register(&client, &svc, "127.0.0.1:7202").await;
    let t = Instant::now();
    follow_until(&mut d, &mut view, "b seen after the wipe", |v| {
        v.values().any(|i| i.addr == "127.0.0.1:7202")
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    a.deregister().await.unwrap();
    let t = Instant::now();
    follow_until(&mut d, &mut view, "a's removal seen", |v| {
        !v.values().any(|i| i.addr == "127.0.0.1:7201")
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(b);
}

#[tokio::test]
async fn a_key_that_is_not_utf8_never_touches_a_valid_one() {
    let client = shared().client().await;
    let svc = unique("bytes");
    // A valid instance whose key ends in U+FFFD, the character a lossy
    // conversion would turn the byte 0xFF into.
    let valid_key = format!("{svc}/\u{FFFD}");
    let value = r#"{"Op":0,"Addr":"127.0.0.1:7301","Metadata":null}"#;
    client
        .clone()
        .put(valid_key.as_str(), value, None)
        .await
        .unwrap();
    let mut d = Discover::builder(client.clone(), &svc).build().unwrap();
    let mut view = HashMap::new();
    follow_until(&mut d, &mut view, "the valid instance", |v| v.len() == 1).await;

    let mut raw = format!("{svc}/").into_bytes();
    raw.push(0xff);
    client.clone().put(raw.clone(), value, None).await.unwrap();
    client.clone().delete(raw, None).await.unwrap();
    quiet(&mut d).await;
    assert!(view.contains_key(&valid_key));
    assert!(
        d.status().borrow().skipped >= 2,
        "both events skipped and counted"
    );
    client
        .clone()
        .delete(valid_key.as_str(), None)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tonic_channel_stays_fed_after_its_etcd_channel_is_dropped() {
    let client = shared().client().await;
    let svc = unique("plain");
    let plain = ChannelBuilder::new(client.clone(), &svc)
        .build()
        .unwrap()
        .tonic_channel();
    // The EtcdChannel is gone; the instance registers only now.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(
        tonic_etcd::server::builder()
            .add_service(Greeter::new("late").into_service())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let _reg = register(&client, &svc, &addr).await;
    let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
    request.set_timeout(Duration::from_secs(5));
    let reply = tokio::time::timeout(LIMIT, GreeterClient::new(plain).say_hello(request))
        .await
        .expect("no hang")
        .expect("the channel learned the instance");
    assert_eq!(reply.into_inner().server_id, "late");
    server.abort();
}

/// More instances than one page of a listing holds: every one is found, at
/// one revision, by a Discover and by `catalog::list`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_of_several_pages_finds_every_instance() {
    let client = shared().client().await;
    let svc = unique("paged");
    let n = 12_000;
    let schema = NamingSchema::new();
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                let addr = format!("10.1.{}.{}:1", i / 256, i % 256);
                let e = tonic_etcd::Schema::encode(&schema, &Instance::new(&svc, addr)).unwrap();
                etcd_client::TxnOp::put(e.key, e.value, None)
            })
            .collect();
        client
            .clone()
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap();
    }
    let listing = tonic_etcd::catalog::list(&client, &schema, Some(&svc), LIMIT)
        .await
        .unwrap();
    assert_eq!(listing.services[&svc].len(), n);
    let mut d = Discover::builder(client.clone(), &svc).build().unwrap();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < n {
        match next(&mut d).await {
            Change::Insert(k, _) => assert!(seen.insert(k), "an instance twice"),
            Change::Remove(k) => panic!("removed {k}"),
        }
    }
    assert_eq!(d.instances().len(), n);
    client
        .clone()
        .delete(
            format!("{svc}/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
}
