//! The crate's own balancer against real etcd and real tonic servers.

#[path = "common/backend.rs"]
mod backend;
mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::Backend;
use common::{eventually, register_with as register, unique};
use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata};

const LIMIT: Duration = Duration::from_secs(10);

/// Calls from `workers` tasks until `stop` is set; counts replies per server
/// and failures with the time they happened.
/// Replies per server, and when each failed call failed.
type Tally = (HashMap<String, usize>, Vec<Instant>);

struct Load {
    counts: Vec<tokio::task::JoinHandle<Tally>>,
    stop: Arc<AtomicUsize>,
}

impl Load {
    fn start(balancer: &Balancer, workers: usize) -> Self {
        Self::start_until(balancer, workers, usize::MAX)
    }

    /// Stops by itself once `calls` calls were made in all: a share
    /// measured over a count of calls does not depend on how fast a busy
    /// machine runs them.
    fn start_until(balancer: &Balancer, workers: usize, calls: usize) -> Self {
        let made = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicUsize::new(0));
        let counts = (0..workers)
            .map(|_| {
                let mut client = GreeterClient::new(balancer.clone());
                let (stop, made) = (stop.clone(), made.clone());
                tokio::spawn(async move {
                    let mut counts: HashMap<String, usize> = HashMap::new();
                    let mut failures = Vec::new();
                    let end = Instant::now() + LIMIT;
                    while stop.load(Ordering::Relaxed) == 0
                        && Instant::now() < end
                        && made.fetch_add(1, Ordering::Relaxed) < calls
                    {
                        match client.say_hello(HelloRequest { name: "x".into() }).await {
                            Ok(r) => *counts.entry(r.into_inner().server_id).or_default() += 1,
                            Err(_) => failures.push(Instant::now()),
                        }
                        tokio::task::yield_now().await;
                    }
                    (counts, failures)
                })
            })
            .collect();
        Self { counts, stop }
    }

    async fn finish(self) -> Tally {
        self.stop.store(1, Ordering::Relaxed);
        self.finish_by_itself().await
    }

    async fn finish_by_itself(self) -> Tally {
        let mut all: HashMap<String, usize> = HashMap::new();
        let mut failures = Vec::new();
        for t in self.counts {
            let (c, f) = t.await.unwrap();
            for (k, v) in c {
                *all.entry(k).or_default() += v;
            }
            failures.extend(f);
        }
        (all, failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_gets_a_clearly_smaller_share() {
    let client = shared().client().await;
    let svc = unique("slow");
    let fast1 = Backend::start("fast1");
    let fast2 = Backend::start("fast2");
    let slow = Backend::start_slow("127.0.0.1:0", "slow", Duration::from_millis(20));
    let mut regs = Vec::new();
    for b in [&fast1, &fast2, &slow] {
        regs.push(register(&client, &svc, &b.addr, Metadata::new()).await);
    }
    let balancer = Balancer::builder(client.clone(), &svc).build().unwrap();
    balancer.wait_for_ready(3, LIMIT).await.unwrap();
    // Four callers: the fast backends are not saturated, so the slow one is
    // clearly the costlier (with every backend saturated, sending it some
    // calls is right: it adds throughput).
    let load = Load::start_until(&balancer, 4, 1000);
    let (counts, failures) = load.finish_by_itself().await;
    let total: usize = counts.values().sum();
    let slow_share = counts.get("slow").copied().unwrap_or(0) as f64 / total as f64;
    eprintln!("shares over {total} calls: {counts:?}");
    assert!(failures.is_empty());
    // Picking at random would give it a third; the margin holds on a busy
    // machine (measured idle: about 1 %).
    assert!(
        slow_share < 0.10,
        "slow backend got {:.1}% of calls",
        slow_share * 100.0
    );
    assert!(counts.get("fast1").copied().unwrap_or(0) > total / 4);
    assert!(counts.get("fast2").copied().unwrap_or(0) > total / 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_costs_at_most_the_calls_in_flight_and_comes_back() {
    let client = shared().client().await;
    let svc = unique("killed");
    let a = Backend::start("a");
    let b = Backend::start("b");
    let mut victim = Backend::start("victim");
    let victim_addr = victim.addr.clone();
    let mut regs = Vec::new();
    for be in [&a, &b, &victim] {
        regs.push(register(&client, &svc, &be.addr, Metadata::new()).await);
    }
    let balancer = Balancer::builder(client.clone(), &svc)
        .reconnect_backoff_max(Duration::from_millis(200))
        .build()
        .unwrap();
    balancer.wait_for_ready(3, LIMIT).await.unwrap();

    let workers = 8;
    let load = Load::start(&balancer, workers);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    victim.kill();
    // Its key stays in etcd (the lease lives on); only the connection tells.
    eventually(LIMIT, "victim out of rotation", || async {
        (balancer.ready() == 2).then_some(())
    })
    .await;
    let detected = killed_at.elapsed();
    assert_eq!(balancer.registered(), 3, "etcd still lists it");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (counts, failures) = load.finish().await;
    eprintln!(
        "detected after {detected:?}; {} failures; {counts:?}",
        failures.len()
    );
    assert!(
        failures.len() <= workers,
        "{} failed calls, more than the {workers} that can be in flight",
        failures.len()
    );
    let late: Vec<_> = failures
        .iter()
        .filter(|t| t.duration_since(killed_at) > detected + Duration::from_millis(50))
        .collect();
    assert!(
        late.is_empty(),
        "{} calls failed after the kill was detected",
        late.len()
    );
    assert!(counts.values().sum::<usize>() > 100);

    // The server comes back on the same address: the endpoint rejoins.
    let _back = Backend::start_on(&victim_addr, "victim", false);
    balancer.wait_for_ready(3, LIMIT).await.unwrap();
}

#[tokio::test]
async fn with_no_endpoint_a_call_fails_within_the_deadline_saying_why() {
    let client = shared().client().await;
    let svc = unique("none");
    let balancer = Balancer::builder(client.clone(), &svc)
        .no_endpoint_timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let mut greeter = GreeterClient::new(balancer.clone());
    let t = Instant::now();
    let status = greeter
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("no instance") && status.message().contains(&svc),
        "{status}"
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // Registered, but nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let _reg = register(&client, &svc, &dead, Metadata::new()).await;
    // The gate closed after the first call, so calls now fail at once; the
    // reason changes once the connector has tried the address.
    let status = eventually(LIMIT, "the reason names the dead address", || {
        let mut greeter = greeter.clone();
        let dead = dead.clone();
        async move {
            let status = greeter
                .say_hello(HelloRequest { name: "x".into() })
                .await
                .unwrap_err();
            status.message().contains(&dead).then_some(status)
        }
    })
    .await;
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("none is reachable"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_filter_routes_only_to_matching_instances() {
    let client = shared().client().await;
    let svc = unique("filter");
    let v1 = Backend::start("v1");
    let v2a = Backend::start("v2a");
    let v2b = Backend::start("v2b");
    let _r = [
        register(
            &client,
            &svc,
            &v1.addr,
            Metadata::new().with("version", "v1"),
        )
        .await,
        register(
            &client,
            &svc,
            &v2a.addr,
            Metadata::new().with("version", "v2"),
        )
        .await,
        register(
            &client,
            &svc,
            &v2b.addr,
            Metadata::new().with("version", "v2"),
        )
        .await,
    ];
    let balancer = Balancer::builder(client.clone(), &svc)
        .filter(|i| i.metadata.get("version").as_deref() == Some("v2"))
        .build()
        .unwrap();
    balancer.wait_for_ready(2, LIMIT).await.unwrap();
    let mut greeter = GreeterClient::new(balancer.clone());
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        let r = greeter
            .say_hello(HelloRequest { name: "x".into() })
            .await
            .unwrap();
        *counts.entry(r.into_inner().server_id).or_default() += 1;
    }
    assert_eq!(counts.get("v1"), None, "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 100);
    assert_eq!(balancer.ready(), 2);
    let mut ready: Vec<_> = balancer
        .ready_instances()
        .into_iter()
        .map(|i| i.addr)
        .collect();
    ready.sort();
    let mut want = vec![v2a.addr.clone(), v2b.addr.clone()];
    want.sort();
    assert_eq!(ready, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_apply_without_traffic_and_a_removed_connection_closes() {
    let client = shared().client().await;
    let svc = unique("notraffic");
    let backend = Backend::start("b");
    let proxy = proxy::Proxy::start(backend.addr.clone()).await;
    let reg = register(&client, &svc, &proxy.addr.to_string(), Metadata::new()).await;
    let balancer = Balancer::builder(client.clone(), &svc).build().unwrap();
    // Connected ahead of any call.
    balancer.wait_for_ready(1, LIMIT).await.unwrap();
    eventually(LIMIT, "one connection through the proxy", || async {
        (proxy.active() == 1).then_some(())
    })
    .await;
    reg.deregister().await.unwrap();
    // No call is made: the removal alone closes the connection.
    eventually(LIMIT, "connection closed after removal", || async {
        (proxy.active() == 0).then_some(())
    })
    .await;
    assert_eq!(balancer.ready(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_calls_on_a_removed_endpoint_finish() {
    let client = shared().client().await;
    let svc = unique("inflight");
    let slow = Backend::start_slow("127.0.0.1:0", "slow", Duration::from_millis(300));
    let reg = register(&client, &svc, &slow.addr, Metadata::new()).await;
    let balancer = Balancer::builder(client.clone(), &svc).build().unwrap();
    balancer.wait_for_ready(1, LIMIT).await.unwrap();
    let mut greeter = GreeterClient::new(balancer.clone());
    let call =
        tokio::spawn(async move { greeter.say_hello(HelloRequest { name: "x".into() }).await });
    eventually(LIMIT, "the call in flight", || async {
        (balancer
            .endpoints()
            .iter()
            .map(|e| e.in_flight)
            .sum::<usize>()
            == 1)
            .then_some(())
    })
    .await;
    reg.deregister().await.unwrap();
    eventually(LIMIT, "removed", || async {
        (balancer.ready() == 0).then_some(())
    })
    .await;
    let reply = tokio::time::timeout(LIMIT, call).await.unwrap().unwrap();
    assert_eq!(
        reply
            .expect("the in-flight call completes")
            .into_inner()
            .server_id,
        "slow"
    );
}
