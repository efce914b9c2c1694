//! Operator overrides against real etcd and real tonic servers: a drained
//! instance gets no new calls but finishes the one in flight, undrained it
//! gets calls again, a weight override shows and moves traffic, the
//! registering process's key check never undoes an override, and the
//! override ends with the registration.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use backend::Backend;
use common::{eventually, unique};
use tonic_etcd::balancer::{EndpointState, OutlierDetection};
use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata, NamingSchema, Override, OverrideStore, Registration};

const LIMIT: Duration = Duration::from_secs(10);

async fn register(client: &etcd_client::Client, svc: &str, id: &str, addr: &str) -> Registration {
    Registration::builder(client.clone())
        .service(svc)
        .id(id)
        .addr(addr)
        .ttl(Duration::from_secs(3))
        .metadata(Metadata::new())
        .register()
        .await
        .unwrap()
}

/// Which servers answered `n` calls, with their counts.
async fn spread(b: &Balancer, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let mut request = tonic::Request::new(HelloRequest { name: "o".into() });
        request.set_timeout(LIMIT);
        let id = GreeterClient::new(b.clone())
            .say_hello(request)
            .await
            .unwrap()
            .into_inner()
            .server_id;
        *out.entry(id).or_default() += 1;
    }
    out
}

fn state_of(b: &Balancer, id: &str) -> Option<EndpointState> {
    b.endpoints()
        .into_iter()
        .find(|e| e.instance.id == id)
        .map(|e| e.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_instance_gets_no_new_calls_and_comes_back_when_undrained() {
    let etcd = shared();
    let client = etcd.client().await;
    let svc = unique("overrides");
    let (a, b_) = (Backend::start("a"), Backend::start("b"));
    let slow = Backend::start_slow("127.0.0.1:0", "c", Duration::from_millis(800));
    let _ra = register(&client, &svc, "a", &a.addr).await;
    let _rb = register(&client, &svc, "b", &b_.addr).await;
    let _rc = register(&client, &svc, "c", &slow.addr).await;
    let b = Balancer::builder(client.clone(), &svc)
        .outlier_detection(OutlierDetection::disabled())
        .build()
        .unwrap();
    b.wait_for_ready(3, LIMIT).await.unwrap();
    let store = OverrideStore::new(client.clone(), NamingSchema::new());

    // A call in flight on c when it is drained still finishes.
    let in_flight = {
        let b = b.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
                request.set_timeout(LIMIT);
                let r = GreeterClient::new(b.clone()).say_hello(request).await;
                if r.is_ok_and(|r| r.get_ref().server_id == "c") {
                    return true;
                }
            }
            false
        })
    };
    eventually(LIMIT, "a call in flight on c", || async {
        b.endpoints()
            .iter()
            .any(|e| e.instance.id == "c" && e.in_flight > 0)
            .then_some(())
    })
    .await;
    store
        .set(&svc, "c", &Override::drain("test"))
        .await
        .unwrap();
    eventually(LIMIT, "c drained in the Balancer", || async {
        (state_of(&b, "c") == Some(EndpointState::Drained)).then_some(())
    })
    .await;
    assert!(in_flight.await.unwrap(), "the call in flight on c finished");
    let seen = spread(&b, 60).await;
    assert!(!seen.contains_key("c"), "drained c got calls: {seen:?}");
    let listed = store.list(Some(&svc)).await.unwrap();
    assert!(listed[&(svc.clone(), "c".to_owned())].drain);

    assert!(store.remove(&svc, "c").await.unwrap());
    eventually(LIMIT, "c back in rotation", || async {
        (state_of(&b, "c") == Some(EndpointState::Ready)).then_some(())
    })
    .await;
    eventually(LIMIT, "c gets calls again", || async {
        spread(&b, 30).await.contains_key("c").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_override_applies_live_and_the_override_ends_with_the_registration() {
    let etcd = shared();
    let client = etcd.client().await;
    let svc = unique("overrides-weight");
    let (a, b_) = (Backend::start("a"), Backend::start("b"));
    let ra = register(&client, &svc, "a", &a.addr).await;
    let _rb = register(&client, &svc, "b", &b_.addr).await;
    let b = Balancer::builder(client.clone(), &svc)
        .outlier_detection(OutlierDetection::disabled())
        .build()
        .unwrap();
    b.wait_for_ready(2, LIMIT).await.unwrap();
    let store = OverrideStore::new(client.clone(), NamingSchema::new());

    let unknown = store
        .set(&svc, "nobody", &Override::drain("test"))
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, tonic_etcd::Error::UnknownInstance { .. }),
        "{unknown}"
    );

    store
        .set(&svc, "a", &Override::weight(20, "test").unwrap())
        .await
        .unwrap();
    eventually(LIMIT, "a's weight overridden", || async {
        b.endpoints()
            .iter()
            .any(|e| e.instance.id == "a" && e.weight == 20)
            .then_some(())
    })
    .await;
    let seen = spread(&b, 200).await;
    let (on_a, on_b) = (
        seen.get("a").copied().unwrap_or(0),
        seen.get("b").copied().unwrap_or(0),
    );
    assert!(on_a > 3 * on_b, "weight 20 vs 1: {seen:?}");

    // Outlives several key checks of the registering process.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(store.list(Some(&svc)).await.unwrap().len(), 1);

    // The registration ends: so does its override.
    ra.deregister().await.unwrap();
    eventually(LIMIT, "the override gone with the lease", || async {
        store.list(Some(&svc)).await.ok()?.is_empty().then_some(())
    })
    .await;
}
