//! Idle costs nothing: every background task of the registration, the
//! discovery, the catalog and the Balancer waits on a timer or an event
//! when nothing happens. An idle Balancer once burned a whole core (a health
//! branch polled on a closed channel) and passed every other test; these
//! guards measure this process's CPU time (`getrusage`) over idle periods,
//! with a wide margin: 5 % of one core, where a spin costs 100 %.

mod common;

use std::time::{Duration, Instant};

use common::cpu::cpu_time;
use common::eventually;
use tonic_etcd::server::RegisteredServer;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Balancer, Catalog, Discover, Registration};

const LIMIT: Duration = Duration::from_secs(10);
const IDLE: Duration = Duration::from_secs(2);
/// The most CPU an idle period may use: 5 % of one core.
const BUDGET: f64 = 0.05;

/// Sleeps `IDLE` and returns the share of one core this process used.
async fn idle_share(what: &str) -> f64 {
    let (cpu0, t0) = (cpu_time(), Instant::now());
    tokio::time::sleep(IDLE).await;
    let (cpu, wall) = (cpu_time() - cpu0, t0.elapsed());
    let share = cpu.as_secs_f64() / wall.as_secs_f64();
    eprintln!(
        "idle {what}: {cpu:?} of CPU in {wall:?} ({:.2} %)",
        share * 100.0
    );
    share
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_servers_views_and_balancer_cost_almost_no_cpu() {
    common::init_tracing();
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let svc = "idle.v1.Idle";

    // Four registered servers, in this process.
    let mut stops = Vec::new();
    for i in 0..4 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let router =
            tonic_etcd::server::builder().add_service(Greeter::new(format!("s{i}")).into_service());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            RegisteredServer::new(Registration::builder(client.clone()).service(svc))
                .grace(Duration::ZERO)
                .serve_with_shutdown(router, listener, async {
                    let _ = stopped.await;
                }),
        );
        stops.push(stop);
    }
    let discover = Discover::builder(client.clone(), svc).build().unwrap();
    eventually(LIMIT, "four servers registered", || async {
        (discover.instances().len() == 4).then_some(())
    })
    .await;
    let share = idle_share("4 registered servers").await;
    assert!(
        share < BUDGET,
        "idle registered servers use {:.1} % of a core",
        share * 100.0
    );

    let mut catalog = Catalog::builder(client.clone()).build().unwrap();
    catalog.synced(LIMIT).await.unwrap();
    assert_eq!(catalog.snapshot().get(svc).map(Vec::len), Some(4));
    let share = idle_share("+ Discover and Catalog").await;
    assert!(
        share < BUDGET,
        "idle views use {:.1} % of a core",
        share * 100.0
    );

    // A Balancer with every endpoint connected and used once.
    let balancer = Balancer::builder(client.clone(), svc).build().unwrap();
    balancer.wait_for_ready(4, LIMIT).await.unwrap();
    let mut greeter = GreeterClient::new(balancer.clone());
    for _ in 0..8 {
        greeter
            .say_hello(HelloRequest { name: "x".into() })
            .await
            .unwrap();
    }
    let share = idle_share("+ Balancer with 4 connected endpoints").await;
    assert!(
        share < BUDGET,
        "an idle Balancer uses {:.1} % of a core",
        share * 100.0
    );

    // Balancers under each subsetting scheme and ring hash (their pool
    // tasks wait on more sources: the config, the client registry, the
    // members' states).
    let mut more = Vec::new();
    for policy in [
        r#"{"random_subsetting_experimental":{"subsetSize":2,"childPolicy":[{"round_robin":{}}]}}"#,
        r#"{"tonic_etcd_coordinated_subsetting":{"subsetSize":2,"childPolicy":[{"ring_hash_experimental":{}}]}}"#,
    ] {
        let config = tonic_etcd::ServiceConfig::from_json(&format!(
            r#"{{"loadBalancingConfig":[{policy}]}}"#
        ))
        .unwrap();
        let b = Balancer::builder(client.clone(), svc)
            .service_config(config)
            .build()
            .unwrap();
        b.wait_for_ready(2, LIMIT).await.unwrap();
        GreeterClient::new(b.clone())
            .say_hello(HelloRequest { name: "x".into() })
            .await
            .unwrap();
        more.push(b);
    }
    eventually(LIMIT, "the coordinated client ranked", || async {
        more[1].subset().and_then(|s| s.rank).map(|_| ())
    })
    .await;
    let share = idle_share("+ Balancers with subsets and ring hash").await;
    assert!(
        share < BUDGET,
        "idle subsetting Balancers use {:.1} % of a core",
        share * 100.0
    );

    // An operator drained one instance (every Balancer applies it), and
    // the console runs with no page open.
    let id = discover.instances()[0].id.clone();
    tonic_etcd::OverrideStore::new(client.clone(), tonic_etcd::NamingSchema::new())
        .set(svc, &id, &tonic_etcd::Override::drain("idle-test"))
        .await
        .unwrap();
    eventually(LIMIT, "the drain applied", || async {
        balancer
            .endpoints()
            .iter()
            .any(|e| e.state == tonic_etcd::balancer::EndpointState::Drained)
            .then_some(())
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop_console, console_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tonic_etcd::console::serve(
        client.clone(),
        std::sync::Arc::new(tonic_etcd::NamingSchema::new()),
        tonic_etcd::console::ConsoleOptions::new(),
        listener,
        async {
            let _ = console_stopped.await;
        },
    ));
    let share = idle_share("+ a drain and the console").await;
    assert!(
        share < BUDGET,
        "an idle console and overrides use {:.1} % of a core",
        share * 100.0
    );
    drop(stop_console);
    drop(stops);
}
