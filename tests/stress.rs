//! The Balancer under stress, against real etcd and real tonic servers:
//! storms of calls cancelled at their deadline must fail alone, with
//! `DEADLINE_EXCEEDED`, and never cost the connection they ran on; a
//! deadline shorter than the timer tick is never sent.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backend::Backend;
use common::unique;
use tonic_etcd::balancer::OutlierDetection;
use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata};

const LIMIT: Duration = Duration::from_secs(10);

/// 64 callers, each call with a 5 ms deadline against a backend that
/// answers in 20 ms: every call expires, the server's answers keep
/// arriving for streams the client already reset (which h2, by default,
/// counts toward closing the connection after 1,024). Every call must end
/// as `DEADLINE_EXCEEDED`, and the one connection must live through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_expired_calls_fails_alone_and_keeps_the_connection() {
    let client = shared().client().await;
    let svc = unique("storm");
    let backend = Backend::start_slow("127.0.0.1:0", "slow", Duration::from_millis(20));
    let _reg = common::register_with(&client, &svc, &backend.addr, Metadata::new()).await;
    let b = Balancer::builder(client.clone(), &svc)
        .outlier_detection(OutlierDetection::disabled())
        .build()
        .unwrap();
    b.wait_for_ready(1, LIMIT).await.unwrap();

    const CALLERS: usize = 64;
    const CALLS: usize = 6_000; // several times h2's default limit of 1,024
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(CALLS));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let (b, left) = (b.clone(), left.clone());
        tasks.spawn(async move {
            let mut codes = BTreeMap::<String, usize>::new();
            let mut greeter = GreeterClient::new(b);
            let started = tokio::time::Instant::now();
            while left
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |n| n.checked_sub(1),
                )
                .is_ok()
                && started.elapsed() < Duration::from_secs(60)
            {
                let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
                request.set_timeout(Duration::from_millis(5));
                let code = match greeter.say_hello(request).await {
                    Ok(_) => "Ok".to_owned(),
                    Err(s) => format!("{:?}: {}", s.code(), s.message()),
                };
                // Group messages by their words, without numbers.
                let key: String = code
                    .chars()
                    .filter(|c| !c.is_ascii_digit())
                    .take(90)
                    .collect();
                *codes.entry(key).or_default() += 1;
            }
            codes
        });
    }
    let mut codes = BTreeMap::<String, usize>::new();
    while let Some(done) = tasks.join_next().await {
        for (k, n) in done.unwrap() {
            *codes.entry(k).or_default() += n;
        }
    }
    let total: usize = codes.values().sum();
    assert_eq!(total, CALLS, "{codes:?}");
    let not_deadline: BTreeMap<&String, &usize> = codes
        .iter()
        .filter(|(k, _)| !k.starts_with("DeadlineExceeded"))
        .collect();
    assert!(
        not_deadline.is_empty(),
        "every call expired, so every call must say DEADLINE_EXCEEDED: {codes:?}"
    );
    // The connection lived: a call with room to finish succeeds at once on
    // the endpoint still in rotation, which never had to reconnect.
    let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
    request.set_timeout(Duration::from_secs(2));
    GreeterClient::new(b.clone())
        .say_hello(request)
        .await
        .unwrap();
    let endpoints = b.endpoints();
    assert_eq!(endpoints.len(), 1);
    assert!(
        endpoints[0].last_error.is_none(),
        "{:?}",
        endpoints[0].last_error
    );
}

/// A deadline shorter than tokio's 1 ms timer tick (a service config
/// `timeout` of 1 µs, as an operator might write by mistake) must still stop
/// every call: none is sent past its deadline, none succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_shorter_than_the_timer_tick_is_never_sent() {
    let client = shared().client().await;
    let svc = unique("tiny-deadline");
    let backend = Backend::start("fast");
    let _reg = common::register_with(&client, &svc, &backend.addr, Metadata::new()).await;
    let config = tonic_etcd::ServiceConfig::from_json(
        r#"{"methodConfig":[{"name":[{}],"timeout":"0.000001s"}]}"#,
    )
    .unwrap();
    let b = Balancer::builder(client.clone(), &svc)
        .service_config(config)
        .service_config_from_etcd(false)
        .build()
        .unwrap();
    b.wait_for_ready(1, LIMIT).await.unwrap();
    let mut codes = BTreeMap::<String, usize>::new();
    for _ in 0..50 {
        let request = tonic::Request::new(HelloRequest { name: "x".into() });
        let code = match GreeterClient::new(b.clone()).say_hello(request).await {
            Ok(_) => "Ok".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        *codes.entry(code).or_default() += 1;
    }
    assert_eq!(
        codes,
        BTreeMap::from([("DeadlineExceeded".to_owned(), 50)]),
        "a call whose deadline passed must never be sent"
    );
}
