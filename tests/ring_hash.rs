//! Ring hash through the Balancer, against real etcd and real tonic
//! servers, in the manner of grpc-go's `ringhash_e2e_test.go`: a key's calls
//! stay on one endpoint, in every Balancer; a down endpoint's keys go to the
//! next one and come back with it, the others stay; an instance that
//! re-registers at a new address keeps its keys; without the header calls
//! spread; bounded load spreads a hot key; a new weight resizes the ring;
//! a replica that leaves and rejoins moves only its own keys (1,000 keys,
//! 4 → 3 → 4); a retry stays on the key's home.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use backend::Backend;
use common::{eventually, unique};
use tonic_etcd::balancer::OutlierDetection;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata, Registration, ServiceConfig};

const LIMIT: Duration = Duration::from_secs(10);

fn ring_hash(extra: &str) -> ServiceConfig {
    ServiceConfig::from_json(&format!(
        r#"{{"loadBalancingConfig":[{{"ring_hash_experimental":
            {{"requestHashHeader":"x-key"{extra}}}}}]}}"#
    ))
    .unwrap()
}

async fn register(client: &etcd_client::Client, svc: &str, id: &str, addr: &str) -> Registration {
    Registration::builder(client.clone())
        .service(svc)
        .id(id)
        .addr(addr)
        .metadata(Metadata::new())
        .register()
        .await
        .unwrap()
}

/// `n` servers `g0..`, registered under `svc` as `i0..`.
async fn registered(
    client: &etcd_client::Client,
    svc: &str,
    n: usize,
) -> (Vec<Backend>, Vec<Registration>) {
    let backends: Vec<Backend> = (0..n).map(|i| Backend::start(&format!("g{i}"))).collect();
    let mut regs = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        regs.push(register(client, svc, &format!("i{i}"), &b.addr).await);
    }
    (backends, regs)
}

async fn balancer(
    client: &etcd_client::Client,
    svc: &str,
    config: ServiceConfig,
    n: usize,
) -> Balancer {
    let b = Balancer::builder(client.clone(), svc)
        .outlier_detection(OutlierDetection::disabled())
        .service_config(config)
        .build()
        .unwrap();
    b.wait_for_ready(n, LIMIT).await.unwrap();
    b
}

/// Which server answered a call with key `key` (`None`: no header).
async fn hello(b: &Balancer, key: Option<&str>) -> String {
    let mut request = tonic::Request::new(HelloRequest { name: "k".into() });
    request.set_timeout(LIMIT);
    if let Some(k) = key {
        request.metadata_mut().insert("x-key", k.parse().unwrap());
    }
    GreeterClient::new(b.clone())
        .say_hello(request)
        .await
        .unwrap()
        .into_inner()
        .server_id
}

/// Each key's server, asked `times` times (all must agree).
async fn homes(b: &Balancer, keys: &[String], times: usize) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for k in keys {
        let mut seen = BTreeSet::new();
        for _ in 0..times {
            seen.insert(hello(b, Some(k)).await);
        }
        assert_eq!(seen.len(), 1, "key {k} went to {seen:?}");
        out.insert(k.clone(), seen.into_iter().next().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stay_home_move_only_with_their_endpoint_and_come_back() {
    let client = shared().client().await;
    let svc = unique("ring");
    let mut backends: Vec<Backend> = (0..4).map(|i| Backend::start(&format!("g{i}"))).collect();
    let mut regs = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        regs.push(register(&client, &svc, &format!("instance-{i}"), &b.addr).await);
    }
    let keys: Vec<String> = (0..40).map(|i| format!("item-{i}")).collect();
    let a = balancer(&client, &svc, ring_hash(""), 4).await;
    let before = homes(&a, &keys, 3).await;
    let used: BTreeSet<&String> = before.values().collect();
    assert_eq!(used.len(), 4, "40 keys reach every endpoint: {before:?}");
    // Another Balancer (another client) sends every key to the same place.
    let b = balancer(&client, &svc, ring_hash(""), 4).await;
    assert_eq!(homes(&b, &keys, 1).await, before);

    // g0 dies: only its keys move, each to one other endpoint.
    backends[0].kill();
    eventually(LIMIT, "g0 out of rotation", || async {
        (a.ready() == 3).then_some(())
    })
    .await;
    let during = homes(&a, &keys, 2).await;
    for (k, home) in &before {
        if home == "g0" {
            assert_ne!(during[k], "g0");
        } else {
            assert_eq!(
                &during[k], home,
                "key {k} moved although its endpoint is up"
            );
        }
    }
    // g0 comes back (same id, new address): its keys come home.
    backends[0] = Backend::start("g0");
    drop(regs.remove(0));
    regs.push(register(&client, &svc, "instance-0", &backends[0].addr).await);
    eventually(LIMIT, "g0 back in rotation", || async {
        a.ready_instances()
            .iter()
            .any(|i| i.addr == backends[0].addr)
            .then_some(())
    })
    .await;
    eventually(LIMIT, "a full ring", || async {
        (a.ready() == 4).then_some(())
    })
    .await;
    assert_eq!(homes(&a, &keys, 2).await, before);
    let shares: f64 = a.endpoints().iter().filter_map(|e| e.ring_share).sum();
    assert!(
        (shares - 1.0).abs() < 1e-6,
        "ring shares sum to 1: {shares}"
    );
}

/// A weight changed in etcd (the instance's metadata, or an operator's
/// override) resizes the endpoint's part of the ring at once, without a
/// membership change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_weight_resizes_the_ring() {
    let client = shared().client().await;
    let svc = unique("ring-weight");
    let (backends, regs) = registered(&client, &svc, 2).await;
    let a = balancer(&client, &svc, ring_hash(""), 2).await;
    let share_of = |b: &Balancer, addr: &str| {
        b.endpoints()
            .iter()
            .find(|e| e.instance.addr == addr)
            .and_then(|e| e.ring_share)
    };
    hello(&a, Some("k")).await;
    let before = share_of(&a, &backends[0].addr).unwrap_or(0.0);
    assert!((before - 0.5).abs() < 0.1, "equal weights: {before}");
    regs[0]
        .update_metadata(Metadata::new().with("weight", "3"))
        .await
        .unwrap();
    eventually(LIMIT, "g0 owning three quarters of the ring", || async {
        // A call builds the ring the Balancer routes by.
        hello(&a, Some("k")).await;
        let share = share_of(&a, &backends[0].addr)?;
        ((share - 0.75).abs() < 0.05).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_header_calls_spread() {
    let client = shared().client().await;
    let svc = unique("ring-spread");
    let (_backends, _regs) = registered(&client, &svc, 4).await;
    let a = balancer(&client, &svc, ring_hash(""), 4).await;
    let mut seen = BTreeMap::<String, u32>::new();
    for _ in 0..200 {
        *seen.entry(hello(&a, None).await).or_default() += 1;
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.values().all(|n| *n >= 20), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_load_spreads_a_hot_key() {
    let client = shared().client().await;
    let svc = unique("ring-hot");
    let greeters: Vec<Greeter> = (0..4)
        .map(|i| Greeter::new(format!("g{i}")).with_delay(Duration::from_millis(50)))
        .collect();
    let backends: Vec<Backend> = greeters
        .iter()
        .map(|g| Backend::start_with("127.0.0.1:0", g.clone(), false))
        .collect();
    let mut regs = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        regs.push(register(&client, &svc, &format!("i{i}"), &b.addr).await);
    }
    // 32 concurrent calls of one key, each held 50 ms by its server.
    let burst = |b: Balancer| async move {
        let calls: Vec<_> = (0..32)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { hello(&b, Some("hot")).await })
            })
            .collect();
        let mut per = BTreeMap::<String, u32>::new();
        for c in calls {
            *per.entry(c.await.unwrap()).or_default() += 1;
        }
        per
    };
    let plain = burst(balancer(&client, &svc, ring_hash(""), 4).await).await;
    assert_eq!(plain.len(), 1, "one key, one endpoint: {plain:?}");
    let bounded =
        burst(balancer(&client, &svc, ring_hash(r#","hashBalanceFactor":125"#), 4).await).await;
    // Each endpoint holds at most ceil(ceil(33 × 1.25) / 4) = 11 at once.
    let most = bounded.values().max().copied().unwrap_or(0);
    assert!(bounded.len() >= 3 && most <= 11, "{bounded:?}");
}

/// The session-cache case: 1,000 keys over 4 replicas; one leaves
/// (deregisters, as on SIGTERM or lease expiry) and joins again. Only its
/// keys move, each way; none moves between the three that stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_leaves_and_rejoins_moves_only_its_own_keys() {
    let client = shared().client().await;
    let svc = unique("ring-leave");
    let (backends, mut regs) = registered(&client, &svc, 4).await;
    let keys: Vec<String> = (0..1_000).map(|i| format!("session-{i}")).collect();
    let a = balancer(&client, &svc, ring_hash(""), 4).await;
    let four = homes(&a, &keys, 1).await;

    // i3 (g3) deregisters: 4 → 3.
    regs.pop().unwrap().deregister().await.unwrap();
    eventually(LIMIT, "i3 forgotten", || async {
        (a.registered() == 3).then_some(())
    })
    .await;
    let three = homes(&a, &keys, 1).await;
    let moved: Vec<&String> = keys.iter().filter(|k| four[*k] != three[*k]).collect();
    let between_survivors = moved.iter().filter(|k| four[**k] != "g3").count();
    assert_eq!(between_survivors, 0, "keys moved between survivors");
    let owned = four.values().filter(|h| *h == "g3").count();
    assert_eq!(moved.len(), owned, "exactly g3's keys moved");
    assert!(
        (150..=350).contains(&owned),
        "g3 held about a quarter: {owned}"
    );

    // It comes back under the same id: 3 → 4, and its keys come home.
    regs.push(register(&client, &svc, "i3", &backends[3].addr).await);
    a.wait_for_ready(4, LIMIT).await.unwrap();
    assert_eq!(homes(&a, &keys, 1).await, four);
}

/// A retry under ring hash goes back to the key's home while it is in
/// rotation: the cache there keeps its hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_stays_on_the_keys_home() {
    let client = shared().client().await;
    let svc = unique("ring-retry");
    let (backends, _regs) = registered(&client, &svc, 4).await;
    let config = ServiceConfig::from_json(
        r#"{"loadBalancingConfig":[{"ring_hash_experimental":{"requestHashHeader":"x-key"}}],
            "methodConfig":[{"name":[{}],
              "retryPolicy":{"maxAttempts":3,"initialBackoff":"0.01s","maxBackoff":"0.01s",
                             "backoffMultiplier":1,"retryableStatusCodes":["UNAVAILABLE"]}}]}"#,
    )
    .unwrap();
    let a = balancer(&client, &svc, config, 4).await;
    for k in 0..20 {
        let key = format!("item-{k}");
        let home = hello(&a, Some(&key)).await;
        let i: usize = home.trim_start_matches('g').parse().unwrap();
        // The home fails the next call once; the retry must find it again.
        backends[i].fail.fail_next(1, tonic::Code::Unavailable);
        assert_eq!(hello(&a, Some(&key)).await, home, "key {key} left its home");
    }
}
