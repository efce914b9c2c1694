//! Servers self-register against a real etcd: exact bytes, lease loss,
//! repair, graceful deregistration, and the tonic server integration.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::time::{Duration, Instant};

use common::{absent, eventually, get, init_tracing, unique};
use tonic_etcd::server::RegisteredServer;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::{shared, Etcd, EtcdCluster};
use tonic_etcd::{ColonSchema, Error, Metadata, NamingSchema, Registration, RegistrationState};

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn writes_exact_bytes_for_both_schemas() {
    let client = shared().client().await;
    let svc = unique("exact");
    let reg = Registration::builder(client.clone())
        .service(&svc)
        .addr("127.0.0.1:7020")
        .register()
        .await
        .unwrap();
    let key = format!("{svc}/127.0.0.1:7020");
    assert_eq!(reg.keys(), std::slice::from_ref(&key));
    let (value, lease) = get(&client, &key).await.unwrap();
    assert_eq!(
        value,
        br#"{"Op":0,"Addr":"127.0.0.1:7020","Metadata":null}"#
    );
    assert_eq!(Some(lease), reg.lease_id());

    let ns = unique("apc-id-dev-services");
    let reg2 = Registration::builder(client.clone())
        .schema(ColonSchema::new(&ns).unwrap())
        .service("pb.ItemServer-0711")
        .addr("10.12.252.5:7020")
        .metadata(Metadata::new().with("version", "v1"))
        .register()
        .await
        .unwrap();
    let key2 = format!("{ns}:pb.ItemServer-0711:10.12.252.5:7020");
    let (value, _) = get(&client, &key2).await.unwrap();
    assert_eq!(value, br#"{"version":"v1"}"#);

    reg.deregister().await.unwrap();
    reg2.deregister().await.unwrap();
    assert!(absent(&client, &key).await && absent(&client, &key2).await);
}

#[tokio::test]
async fn one_lease_carries_several_services_and_metadata_updates() {
    let client = shared().client().await;
    let ns = unique("multi");
    let reg = Registration::builder(client.clone())
        .schema(NamingSchema::with_namespace(&ns).unwrap())
        .service("greeter.v1.Greeter")
        .service("grpc.health.v1.Health")
        .addr("[::1]:50051")
        .id("pod-1")
        .register()
        .await
        .unwrap();
    let lease = reg.lease_id().unwrap();
    for key in [
        format!("{ns}/greeter.v1.Greeter/pod-1"),
        format!("{ns}/grpc.health.v1.Health/pod-1"),
    ] {
        let (value, l) = get(&client, &key).await.unwrap();
        assert_eq!(l, lease);
        assert_eq!(value, br#"{"Op":0,"Addr":"[::1]:50051","Metadata":null}"#);
    }
    reg.update_metadata(Metadata::new().with("zone", "b"))
        .await
        .unwrap();
    let (value, l) = get(&client, &format!("{ns}/greeter.v1.Greeter/pod-1"))
        .await
        .unwrap();
    assert_eq!(l, lease);
    assert_eq!(
        value,
        br#"{"Op":0,"Addr":"[::1]:50051","Metadata":{"zone":"b"}}"#
    );
    reg.deregister().await.unwrap();
}

#[tokio::test]
async fn invalid_input_is_refused_with_a_clear_error() {
    let client = shared().client().await;
    let b = || Registration::builder(client.clone()).addr("127.0.0.1:1");
    let err = |r: Result<Registration, Error>| r.map(|_| ()).unwrap_err();

    let e = err(b().register().await);
    assert!(e.to_string().contains(".service("), "{e}");
    let e = err(b().service("").register().await);
    assert!(matches!(e, Error::InvalidServiceName { .. }), "{e}");
    let e = err(b()
        .schema(ColonSchema::new("ns").unwrap())
        .service("a:b")
        .register()
        .await);
    assert!(e.to_string().contains("separator"), "{e}");
    let e = err(b().service("s").addr("127.0.0.1").register().await);
    assert!(e.to_string().contains("no port"), "{e}");
    for unspecified in ["0.0.0.0:50051", "[::]:50051"] {
        let e = err(b().service("s").addr(unspecified).register().await);
        assert!(matches!(e, Error::UnspecifiedAddress { .. }), "{e}");
        assert!(e.to_string().contains("set an advertise address"), "{e}");
    }
    let e = err(b()
        .service("s")
        .ttl(Duration::from_secs(1))
        .register()
        .await);
    assert!(matches!(e, Error::TtlTooShort { .. }), "{e}");
    assert!(e.to_string().contains("at least 2 s"), "{e}");
    let e = err(b()
        .schema(ColonSchema::new("ns").unwrap())
        .service("s")
        .addr("[::1]:1")
        .register()
        .await);
    assert!(matches!(e, Error::Unrepresentable { .. }), "{e}");
    let e = err(Registration::builder(client.clone())
        .service("s")
        .register()
        .await);
    assert!(e.to_string().contains(".addr("), "{e}");
    let many = (0..65).fold(b(), |b, i| b.service(format!("s{i}")));
    let e = err(many.register().await);
    assert!(e.to_string().contains("at most 64"), "{e}");
    // Each mistake gets its own word, not a neighbour's.
    let e = err(b()
        .service("s")
        .addr("http://10.0.0.1:5000")
        .register()
        .await);
    assert!(matches!(e, Error::InvalidAddress { .. }), "{e}");
    assert!(e.to_string().contains("without a scheme"), "{e}");
    let e = err(b().service("s").id("a/b").register().await);
    assert!(matches!(e, Error::InvalidInstanceId { .. }), "{e}");
    assert!(e.to_string().contains("instance id"), "{e}");
    let e = err(b()
        .service("s")
        .ttl(Duration::from_millis(2500))
        .register()
        .await);
    assert!(e.to_string().contains("whole number of seconds"), "{e}");
}

#[tokio::test]
async fn a_crashed_process_disappears_within_ttl_plus_one_second() {
    let client = shared().client().await;
    let svc = unique("crash");
    let key = format!("{svc}/127.0.0.1:7021");
    // A runtime of its own stands in for the process: shutting it down
    // drops the keep-alive task without a revoke, as a crash would.
    let endpoints = shared().endpoints();
    let svc2 = svc.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let reg = rt.block_on(async move {
            let c = tonic_etcd::testing::connect(&endpoints).await;
            Registration::builder(c)
                .service(svc2)
                .addr("127.0.0.1:7021")
                .ttl(Duration::from_secs(2))
                .register()
                .await
                .unwrap()
        });
        std::mem::forget(reg);
        rt.shutdown_background();
    })
    .join()
    .unwrap();
    let crashed = Instant::now();
    assert!(get(&client, &key).await.is_some());
    eventually(
        Duration::from_secs(3),
        "key gone within TTL + 1 s",
        || async { absent(&client, &key).await.then_some(()) },
    )
    .await;
    eprintln!("crashed registration gone after {:?}", crashed.elapsed());
}

#[tokio::test]
async fn a_key_deleted_by_someone_else_is_put_back() {
    let mut client = shared().client().await;
    let svc = unique("repair");
    let reg = Registration::builder(client.clone())
        .service(&svc)
        .addr("127.0.0.1:7022")
        .ttl(Duration::from_secs(3))
        .key_check_interval(Duration::from_secs(1))
        .register()
        .await
        .unwrap();
    let key = &reg.keys()[0];
    client.delete(key.as_str(), None).await.unwrap();
    let t = Instant::now();
    // Checked every second, at keep-alive ticks (TTL/3 = 1 s).
    let (_, lease) = eventually(Duration::from_secs(3), "key restored", || async {
        get(&client, key).await
    })
    .await;
    assert_eq!(Some(lease), reg.lease_id());
    eprintln!("deleted key restored after {:?}", t.elapsed());
    reg.deregister().await.unwrap();
}

#[tokio::test]
async fn deregister_removes_the_keys_at_once() {
    let client = shared().client().await;
    let svc = unique("dereg");
    let reg = Registration::builder(client.clone())
        .service(&svc)
        .addr("127.0.0.1:7023")
        .register()
        .await
        .unwrap();
    let key = reg.keys()[0].clone();
    let state = reg.watch_state();
    let t = Instant::now();
    reg.deregister().await.unwrap();
    let took = t.elapsed();
    assert!(
        absent(&client, &key).await,
        "key gone when deregister returns"
    );
    assert_eq!(*state.borrow(), RegistrationState::Deregistered);
    eprintln!("deregister() returned after {took:?} with the key gone");

    // Dropping revokes too, in the background.
    let reg = Registration::builder(client.clone())
        .service(&svc)
        .addr("127.0.0.1:7024")
        .register()
        .await
        .unwrap();
    let key = reg.keys()[0].clone();
    drop(reg);
    eventually(
        Duration::from_secs(2),
        "dropped registration revoked",
        || async { absent(&client, &key).await.then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_etcd_wiped_and_etcd_down_longer_than_the_ttl() {
    init_tracing();
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let reg = Registration::builder(client.clone())
        .service("wiped")
        .addr("127.0.0.1:7025")
        .ttl(Duration::from_secs(2))
        .register()
        .await
        .unwrap();
    let key = reg.keys()[0].clone();
    let first_lease = reg.lease_id().unwrap();

    // Every lease gone: a new lease and the keys are written again.
    etcd.wipe_and_restart();
    let t = Instant::now();
    let (_, lease) = eventually(LIMIT, "registration restored after wipe", || async {
        get(&client, &key).await
    })
    .await;
    eprintln!(
        "registration restored {:?} after etcd came back wiped",
        t.elapsed()
    );
    assert_ne!(lease, first_lease, "a new lease after the wipe");
    eventually(LIMIT, "state Registered on the new lease", || async {
        (reg.lease_id() == Some(lease)).then_some(())
    })
    .await;

    // Down for longer than the TTL, data kept.
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        matches!(
            reg.state(),
            RegistrationState::Retrying { .. } | RegistrationState::Lost { .. }
        ),
        "state while etcd is down: {:?}",
        reg.state()
    );
    etcd.restart();
    let t = Instant::now();
    eventually(LIMIT, "registration back after a long outage", || async {
        get(&client, &key).await
    })
    .await;
    eprintln!("registration back {:?} after a 3 s outage", t.elapsed());
    // And it stays: the lease is kept alive past its TTL.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        get(&client, &key).await.is_some(),
        "registration kept alive"
    );
    reg.deregister().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_losing_the_cluster_member_it_talks_to() {
    init_tracing();
    let cluster = EtcdCluster::start();
    // Connected to member 0 first; member 1 and 2 are its way out.
    let client = tonic_etcd::testing::connect(&cluster.endpoints()).await;
    let observer = cluster.member_client(2).await;
    let reg = Registration::builder(client)
        .service("clustered")
        .addr("127.0.0.1:7026")
        .ttl(Duration::from_secs(2))
        .register()
        .await
        .unwrap();
    let key = reg.keys()[0].clone();
    cluster.kill_member(0);
    // Two TTLs later the key must still be there: the lease is kept alive
    // through the surviving members.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        get(&observer, &key).await.is_some(),
        "registration lost with member 0; state {:?}",
        reg.state()
    );
    reg.deregister().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_deregisters_before_the_server_stops() {
    init_tracing();
    let client = shared().client().await;
    let svc = unique("graceful");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let key = format!("{svc}/{addr}");
    let router = tonic_etcd::server::builder().add_service(Greeter::new("g1").into_service());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        RegisteredServer::new(Registration::builder(client.clone()).service(&svc))
            .grace(Duration::from_millis(500))
            .serve_with_shutdown(router, listener, async {
                let _ = stop_rx.await;
            }),
    );
    eventually(LIMIT, "registered", || async { get(&client, &key).await }).await;
    let mut greeter = GreeterClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    greeter
        .say_hello(HelloRequest { name: "a".into() })
        .await
        .unwrap();

    stop_tx.send(()).unwrap();
    eventually(
        Duration::from_secs(2),
        "key removed on shutdown",
        || async { absent(&client, &key).await.then_some(()) },
    )
    .await;
    // The key is gone and the server still answers.
    let reply = greeter
        .say_hello(HelloRequest { name: "b".into() })
        .await
        .expect("server answers after deregistration");
    assert_eq!(reply.into_inner().server_id, "g1");
    tokio::time::timeout(LIMIT, server)
        .await
        .expect("server returns after the grace period")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn server_refuses_to_advertise_an_unspecified_listener() {
    let client = shared().client().await;
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let router = tonic_etcd::server::builder().add_service(Greeter::new("g").into_service());
    let err = RegisteredServer::new(Registration::builder(client).service("s"))
        .serve_with_shutdown(router, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnspecifiedAddress { .. }), "{err}");
}

#[tokio::test]
async fn startup_fails_clearly_when_etcd_stays_unreachable() {
    // Nothing listens on this port: the registration keeps failing.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = etcd_client::Client::connect(
        [format!("http://127.0.0.1:{port}")],
        Some(tonic_etcd::connect_options()),
    )
    .await
    .unwrap();
    let t = Instant::now();
    let err = Registration::builder(client)
        .service("s")
        .addr("127.0.0.1:1")
        .startup_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_millis(300))
        .register()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StartupDeadline { .. }), "{err}");
    let cause = std::error::Error::source(&err).expect("the last failure is kept as the source");
    assert!(
        cause.to_string().contains("etcd") || cause.to_string().contains("timed out"),
        "{cause}"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_registrations_cost_etcd_no_raft_writes_and_deleted_keys_still_come_back() {
    // An etcd of its own: nothing else writes to it during the measurement.
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let svc = unique("idle");
    let mut regs = Vec::new();
    for i in 0..3 {
        regs.push(
            Registration::builder(client.clone())
                .service(&svc)
                .addr(format!("127.0.0.1:{}", 7100 + i))
                .ttl(Duration::from_secs(2))
                .key_check_interval(Duration::from_millis(500))
                .register()
                .await
                .unwrap(),
        );
    }
    let raft_index = || {
        let mut c = client.clone();
        async move { c.status().await.unwrap().raft_index() }
    };
    // Let the writes of the start settle, then watch etcd's Raft log while
    // three registrations keep their leases alive and check their keys
    // (every keep-alive tick here, TTL/3, so about 13 checks in all).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = raft_index().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = raft_index().await;
    assert_eq!(before, after, "Raft proposals from idle registrations");

    // The read-only check still notices a deleted key and puts it back.
    let key = regs[0].keys()[0].clone();
    client.clone().delete(key.as_str(), None).await.unwrap();
    eventually(LIMIT, "the deleted key restored", || async {
        get(&client, &key).await.map(|_| ())
    })
    .await;
    assert!(raft_index().await > after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_start_up_returns_at_once_and_leaves_no_key() {
    let etcd = shared();
    let proxy = proxy::Proxy::start(etcd.endpoint().trim_start_matches("http://").into()).await;
    let client =
        etcd_client::Client::connect([proxy.endpoint()], Some(tonic_etcd::connect_options()))
            .await
            .unwrap();
    let svc = unique("early-stop");
    // etcd answers nothing: the registration hangs in its lease grant.
    proxy.freeze();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let router = tonic_etcd::server::builder().add_service(Greeter::new("s").into_service());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        RegisteredServer::new(Registration::builder(client).service(&svc))
            .grace(Duration::ZERO)
            .serve_with_shutdown(router, listener, async {
                let _ = stopped.await;
            }),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("shutdown honoured during start-up, not after the 30 s start-up window");
    assert!(result.unwrap().is_ok());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    proxy.thaw();
    // Whatever the abandoned attempt wrote is revoked.
    let reader = etcd.client().await;
    eventually(LIMIT, "no key under the service", || async {
        let mut c = reader.clone();
        let n = c
            .get(
                svc.as_str(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .ok()?
            .count();
        (n == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_during_a_leader_election_completes_soon_after_the_new_leader() {
    let cluster = EtcdCluster::start();
    let mut leader = None;
    for i in 0..cluster.len() {
        let status = cluster.member_client(i).await.status().await.unwrap();
        let me = status.header().map(|h| h.member_id());
        if Some(status.leader()) == me {
            leader = Some((i, status.leader()));
        }
    }
    let (leader, old_id) = leader.expect("a leader");
    let follower = (leader + 1) % cluster.len();
    let client = cluster.member_client(follower).await;
    let watcher = cluster.member_client(follower).await;
    cluster.kill_member(leader);
    // As measured in the issue: a registration started half a second after
    // the leader died (a proposal then is dropped silently).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let registration = tokio::spawn(
        Registration::builder(client)
            .service(unique("election"))
            .addr("127.0.0.1:7501")
            .register(),
    );
    let new_leader_at = eventually(LIMIT, "a new leader", || {
        let mut w = watcher.clone();
        async move {
            let status = w.status().await.ok()?;
            (status.leader() != 0 && status.leader() != old_id).then(Instant::now)
        }
    })
    .await;
    let reg = tokio::time::timeout(LIMIT, registration)
        .await
        .expect("registered")
        .unwrap()
        .unwrap();
    let done = Instant::now();
    let after = done.saturating_duration_since(new_leader_at);
    assert!(
        after <= Duration::from_millis(1500),
        "registered {after:?} after the new leader"
    );
    reg.deregister().await.unwrap();
}
