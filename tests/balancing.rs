//! How the Balancer weighs what backends really do, against real etcd and
//! real tonic servers: a frozen backend, failing backends (unary and
//! streaming), weights, zones, and active health checking.

#[path = "common/backend.rs"]
mod backend;
mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::Backend;
use common::{eventually, unique};
use tokio_stream::StreamExt;
use tonic_etcd::balancer::{EndpointState, OutlierDetection};
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata, Registration};

const LIMIT: Duration = Duration::from_secs(10);

async fn register(svc: &str, addr: &str, meta: Metadata) -> Registration {
    common::register_with(&*shared().client().await, svc, addr, meta).await
}

/// One finished call: when it started, how long it took, who answered (or
/// the error code).
type Call = (Instant, Duration, Result<String, tonic::Code>);

/// Closed-loop callers until `stop` is set or `LIMIT` passes.
fn callers(
    balancer: &Balancer,
    n: usize,
    deadline: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Call>>> {
    (0..n)
        .map(|_| {
            let mut client = GreeterClient::new(balancer.clone());
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut calls = Vec::new();
                let end = Instant::now() + LIMIT;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                    let mut r = tonic::Request::new(HelloRequest { name: "x".into() });
                    r.set_timeout(deadline);
                    let t = Instant::now();
                    let result = client
                        .say_hello(r)
                        .await
                        .map(|r| r.into_inner().server_id)
                        .map_err(|s| s.code());
                    calls.push((t, t.elapsed(), result));
                }
                calls
            })
        })
        .collect()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<Call>>>) -> Vec<Call> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_backend_loses_its_share_and_gets_calls_again_after_it_thaws() {
    let svc = unique("frozen");
    let backends: Vec<Backend> = (0..4).map(|i| Backend::start(&format!("b{i}"))).collect();
    let proxy = proxy::Proxy::start(backends[3].addr.clone()).await;
    let mut regs = Vec::new();
    for b in &backends[..3] {
        regs.push(register(&svc, &b.addr, Metadata::new()).await);
    }
    regs.push(register(&svc, &proxy.addr.to_string(), Metadata::new()).await);
    let balancer = Balancer::builder(shared().client().await, &svc)
        .build()
        .unwrap();
    balancer.wait_for_ready(4, LIMIT).await.unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = callers(&balancer, 16, Duration::from_secs(1), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await; // warm up
    let before = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let frozen_at = Instant::now();
    proxy.freeze();
    // As in the issue: 6 s; the calls in flight at the freeze (about a
    // quarter of the callers, 1 s each) are a fixed cost that a shorter
    // freeze would weigh more.
    let freeze = Duration::from_secs(6);
    tokio::time::sleep(freeze).await;
    proxy.thaw();
    let thawed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let calls = collect(tasks).await;

    let ok_in = |from: Instant, to: Instant| {
        calls
            .iter()
            .filter(|(t, d, r)| r.is_ok() && *t >= from && *t + *d <= to)
            .count()
    };
    let rate_before = ok_in(before, frozen_at) as f64;
    let rate_during = ok_in(frozen_at, thawed_at) as f64 / freeze.as_secs_f64();
    // Callers' time spent waiting on the frozen backend: the calls that hit
    // their deadline.
    let stuck: Duration = calls
        .iter()
        .filter(|(t, _, r)| {
            *t >= frozen_at && *t < thawed_at && *r == Err(tonic::Code::DeadlineExceeded)
        })
        .map(|(_, d, _)| *d)
        .sum();
    let stuck_share = stuck.as_secs_f64() / (16.0 * freeze.as_secs_f64());
    eprintln!(
        "ok/s before {rate_before:.0}, during {rate_during:.0}; time on the frozen one {:.1}%",
        stuck_share * 100.0
    );
    assert!(
        stuck_share < 0.10,
        "{:.1}% of callers' time",
        stuck_share * 100.0
    );
    assert!(
        rate_during >= 0.6 * rate_before,
        "throughput during the freeze {rate_during:.0}/s against {rate_before:.0}/s"
    );
    let back = calls
        .iter()
        .filter(|(t, d, r)| *t + *d >= thawed_at && r.as_deref() == Ok("b3"))
        .map(|(t, d, _)| (*t + *d).saturating_duration_since(thawed_at))
        .min();
    assert!(
        back.is_some_and(|b| b <= Duration::from_secs(1)),
        "first answer from the thawed backend after {back:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_ejected_and_rejoins_when_it_recovers() {
    let svc = unique("failing");
    let backends: Vec<Backend> = (0..4).map(|i| Backend::start(&format!("b{i}"))).collect();
    let mut regs = Vec::new();
    for b in &backends {
        regs.push(register(&svc, &b.addr, Metadata::new()).await);
    }
    let balancer = Balancer::builder(shared().client().await, &svc)
        .outlier_detection(
            OutlierDetection::new()
                .consecutive_failures(5)
                .ejection_time(Duration::from_secs(2), Duration::from_secs(2)),
        )
        .build()
        .unwrap();
    balancer.wait_for_ready(4, LIMIT).await.unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = callers(&balancer, 8, Duration::from_secs(1), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failing_since = Instant::now();
    backends[0].fail.set(Some(tonic::Code::Unavailable));
    eventually(LIMIT, "the failing backend ejected", || async {
        balancer
            .endpoints()
            .iter()
            .any(|e| e.instance.addr == backends[0].addr && e.state == EndpointState::Ejected)
            .then_some(())
    })
    .await;
    // Back from its first ejection (2 s), it fails once on probation and is
    // ejected again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let recovered_at = Instant::now();
    backends[0].fail.set(None);
    eventually(LIMIT, "the recovered backend in rotation", || async {
        balancer
            .endpoints()
            .iter()
            .any(|e| e.instance.addr == backends[0].addr && e.state == EndpointState::Ready)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let calls = collect(tasks).await;

    let settled: Vec<&Call> = calls
        .iter()
        // From one second after it starts failing until its first ejection
        // (2 s) ends; each return from ejection then costs one probe on
        // probation (the open-loop benchmark measures the long run).
        .filter(|(t, _, _)| {
            *t >= failing_since + Duration::from_secs(1)
                && *t < failing_since + Duration::from_millis(1900)
        })
        .collect();
    let failed = settled.iter().filter(|(_, _, r)| r.is_err()).count();
    let success = 1.0 - failed as f64 / settled.len() as f64;
    let when: Vec<Duration> = settled
        .iter()
        .filter(|(_, _, r)| r.is_err())
        .map(|(t, _, _)| t.duration_since(failing_since))
        .collect();
    eprintln!(
        "{failed} of {} calls failed between 1 s and 1.9 s, at {when:?}",
        settled.len()
    );
    assert!(success >= 0.999, "success rate {:.4}", success);
    let rejoined = calls
        .iter()
        .any(|(t, _, r)| *t > recovered_at && r.as_deref() == Ok("b0"));
    assert!(rejoined, "the recovered backend gets calls again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_of_four_failing_at_most_half_are_ejected() {
    let svc = unique("mostly-failing");
    let backends: Vec<Backend> = (0..4).map(|i| Backend::start(&format!("b{i}"))).collect();
    let mut regs = Vec::new();
    for b in &backends {
        regs.push(register(&svc, &b.addr, Metadata::new()).await);
    }
    let balancer = Balancer::builder(shared().client().await, &svc)
        .build()
        .unwrap();
    balancer.wait_for_ready(4, LIMIT).await.unwrap();
    for b in &backends[..3] {
        b.fail.set(Some(tonic::Code::Internal));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = callers(&balancer, 4, Duration::from_secs(1), stop.clone());
    let end = Instant::now() + Duration::from_millis(1500);
    let mut most = 0;
    while Instant::now() < end {
        let ejected = balancer
            .endpoints()
            .iter()
            .filter(|e| e.state == EndpointState::Ejected)
            .count();
        most = most.max(ejected);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let calls = collect(tasks).await;
    assert_eq!(most, 2, "two of four ejected at most, and two were");
    let ok = calls.iter().filter(|c| c.2.is_ok()).count();
    assert!(
        ok > calls.len() / 2,
        "the healthy one takes most calls: {ok} of {}",
        calls.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_in_the_trailers_of_a_stream_counts() {
    let svc = unique("stream-fail");
    let good = Backend::start("good");
    let bad = Backend::start("bad");
    bad.fail.set(Some(tonic::Code::Unavailable));
    let _r1 = register(&svc, &good.addr, Metadata::new()).await;
    let _r2 = register(&svc, &bad.addr, Metadata::new()).await;
    let balancer = Balancer::builder(shared().client().await, &svc)
        .outlier_detection(OutlierDetection::new().consecutive_failures(3))
        .build()
        .unwrap();
    balancer.wait_for_ready(2, LIMIT).await.unwrap();
    let mut client = GreeterClient::new(balancer.clone());
    let mut bad_streams = 0;
    for _ in 0..200 {
        let mut stream = client
            .say_hello_stream(HelloRequest { name: "x".into() })
            .await
            .unwrap()
            .into_inner();
        let mut messages = 0;
        let mut failed = false;
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => messages += 1,
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::Unavailable);
                    failed = true;
                }
            }
        }
        assert_eq!(messages, 2, "data came before the status");
        bad_streams += usize::from(failed);
        let states = balancer.endpoints();
        if states
            .iter()
            .any(|e| e.instance.addr == bad.addr && e.state == EndpointState::Ejected)
        {
            // Ejected by failures that only the trailers carried. With a
            // share that dropped after the first failure, more than the
            // three in a row may have been needed; never many.
            assert!((3..=20).contains(&bad_streams), "{bad_streams}");
            return;
        }
    }
    panic!("not ejected after {bad_streams} failed streams");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_set_the_shares_of_equal_backends() {
    let svc = unique("weights");
    // A fixed 20 ms per call, large against the CPU time of a call: latency
    // that does not grow with a backend's load, i.e. backends whose capacity
    // matches their weights (two single-threaded servers on two busy cores
    // would otherwise make the heavier one measurably slower, and the
    // balancer rightly sends it less).
    let greeter = |id: &str| Greeter::new(id).with_delay(Duration::from_millis(20));
    let light = Backend::start_with("127.0.0.1:0", greeter("light"), false);
    let heavy = Backend::start_with("127.0.0.1:0", greeter("heavy"), false);
    let _r1 = register(&svc, &light.addr, Metadata::new().with("weight", "1")).await;
    let _r2 = register(&svc, &heavy.addr, Metadata::new().with("weight", "3")).await;
    let balancer = Balancer::builder(shared().client().await, &svc)
        .build()
        .unwrap();
    balancer.wait_for_ready(2, LIMIT).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let mut client = GreeterClient::new(balancer.clone());
        tasks.push(tokio::spawn(async move {
            let mut counts: HashMap<String, usize> = HashMap::new();
            for _ in 0..250 {
                let id = client
                    .say_hello(HelloRequest { name: "x".into() })
                    .await
                    .unwrap()
                    .into_inner()
                    .server_id;
                *counts.entry(id).or_default() += 1;
            }
            counts
        }));
    }
    let mut heavy_calls = 0;
    for t in tasks {
        heavy_calls += t.await.unwrap().get("heavy").copied().unwrap_or(0);
    }
    let share = heavy_calls as f64 / 10_000.0;
    eprintln!("heavy share {:.1}%", share * 100.0);
    assert!(
        (share - 0.75).abs() <= 0.03,
        "heavy got {:.1}%",
        share * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stay_in_zone_fall_back_when_it_is_gone_and_return() {
    let svc = unique("zones");
    let mut local = Backend::start("local");
    let local_addr = local.addr.clone();
    let remote1 = Backend::start("remote1");
    let remote2 = Backend::start("remote2");
    let _r0 = register(&svc, &local.addr, Metadata::new().with("zone", "a")).await;
    let _r1 = register(&svc, &remote1.addr, Metadata::new().with("zone", "b")).await;
    let _r2 = register(&svc, &remote2.addr, Metadata::new().with("zone", "b")).await;
    let balancer = Balancer::builder(shared().client().await, &svc)
        .prefer_zone("zone", "a")
        .reconnect_backoff_max(Duration::from_millis(200))
        .build()
        .unwrap();
    balancer.wait_for_ready(3, LIMIT).await.unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = callers(&balancer, 4, Duration::from_secs(1), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    local.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted_at = Instant::now();
    let _local_again = Backend::start_on(&local_addr, "local", false);
    eventually(LIMIT, "the local endpoint back", || async {
        (balancer.ready() == 3).then_some(())
    })
    .await;
    let back_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let calls = collect(tasks).await;

    let answered = |from: Instant, to: Instant| -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (t, _, r) in &calls {
            if let (true, Ok(id)) = (*t >= from && *t < to, r) {
                *m.entry(id.clone()).or_default() += 1;
            }
        }
        m
    };
    // Calls that ended before the kill: one still in flight when the local
    // server died may be sent again elsewhere if it never left the client
    // (the transparent retry), and answered by a remote.
    let mut before = HashMap::new();
    for (t, took, r) in &calls {
        if let (true, Ok(id)) = (
            *t >= killed_at - Duration::from_millis(400) && *t + *took < killed_at,
            r,
        ) {
            *before.entry(id.clone()).or_insert(0usize) += 1;
        }
    }
    assert!(
        before.len() == 1 && before.contains_key("local"),
        "{before:?}"
    );
    let failed = calls.iter().filter(|c| c.2.is_err()).count();
    assert!(
        failed <= 4,
        "{failed} failed calls; 4 were in flight at most"
    );
    let away = answered(killed_at + Duration::from_millis(50), restarted_at);
    assert!(!away.contains_key("local") && !away.is_empty(), "{away:?}");
    let after = answered(back_at + Duration::from_millis(50), Instant::now());
    assert!(after.len() == 1 && after.contains_key("local"), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_not_serving_gets_no_new_calls() {
    let svc = unique("health");
    let a = Backend::start_on("127.0.0.1:0", "a", true);
    let b = Backend::start_on("127.0.0.1:0", "b", true);
    let _r1 = register(&svc, &a.addr, Metadata::new()).await;
    let _r2 = register(&svc, &b.addr, Metadata::new()).await;
    let balancer = Balancer::builder(shared().client().await, &svc)
        .health_check("")
        .build()
        .unwrap();
    balancer.wait_for_ready(2, LIMIT).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = callers(&balancer, 4, Duration::from_secs(1), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let flipped_at = Instant::now();
    a.health
        .as_ref()
        .unwrap()
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let calls = collect(tasks).await;
    let late = calls
        .iter()
        .filter(|(t, _, r)| {
            *t >= flipped_at + Duration::from_millis(100) && r.as_deref() == Ok("a")
        })
        .count();
    assert_eq!(late, 0, "calls to a backend that said NOT_SERVING");
    assert!(calls
        .iter()
        .any(|(t, _, r)| *t < flipped_at && r.as_deref() == Ok("a")));
    let states = balancer.endpoints();
    let a_state = states.iter().find(|e| e.instance.addr == a.addr).unwrap();
    assert_eq!(a_state.state, EndpointState::Unhealthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_server_reports_not_serving_before_its_key_goes() {
    let svc = unique("health-shutdown");
    let etcd = shared();
    // The server reaches etcd through a proxy that the test freezes, so its
    // deregistration waits while the health change must already be out.
    let proxy = proxy::Proxy::start(etcd.endpoint().trim_start_matches("http://").into()).await;
    let server_client =
        etcd_client::Client::connect([proxy.endpoint()], Some(tonic_etcd::connect_options()))
            .await
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let router = tonic_etcd::server::builder().add_service(Greeter::new("s").into_service());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic_etcd::server::RegisteredServer::new(
            Registration::builder(server_client)
                .service(&svc)
                .request_timeout(Duration::from_secs(3)),
        )
        .grace(Duration::ZERO)
        .serve_with_shutdown(router, listener, async {
            let _ = stopped.await;
        }),
    );
    let balancer = Balancer::builder(etcd.client().await, &svc)
        .health_check(&svc)
        .build()
        .unwrap();
    balancer.wait_for_ready(1, LIMIT).await.unwrap();
    // Frozen, not cut: a refused connection can fail the revoke at once,
    // and the server would be gone before its health change is seen.
    proxy.freeze();
    stop.send(()).unwrap();
    eventually(LIMIT, "NOT_SERVING seen by the client", || async {
        balancer
            .endpoints()
            .iter()
            .any(|e| e.state == EndpointState::Unhealthy)
            .then_some(())
    })
    .await;
    let mut reader = etcd.client().await;
    let key_present = reader
        .get(
            svc.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap()
        .count();
    assert_eq!(key_present, 1, "the key is still there: health went first");
    proxy.heal();
    let _ = tokio::time::timeout(LIMIT, server).await;
}
