//! gRFC A6 retries and hedging through the Balancer, against real etcd and
//! real tonic servers, in the manner of grpc-go's `test/retry_test.go`: what
//! is retried and what is not, the attempt count the server sees, pushback,
//! the replay buffer's limit, the one deadline, retries landing on another
//! endpoint; hedges on distinct endpoints, the first answer winning and the
//! others cancelled on their servers.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::Backend;
use common::unique;
use tonic::Code;
use tonic_etcd::balancer::OutlierDetection;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata, Registration, ServiceConfig};

const LIMIT: Duration = Duration::from_secs(10);

fn policy(max_attempts: u32, initial: &str, codes: &str) -> ServiceConfig {
    ServiceConfig::from_json(&format!(
        r#"{{"methodConfig":[{{"name":[{{"service":"greeter.v1.Greeter"}}],
          "retryPolicy":{{"maxAttempts":{max_attempts},"initialBackoff":"{initial}",
          "maxBackoff":"{initial}","backoffMultiplier":1,"retryableStatusCodes":[{codes}]}}}}]}}"#
    ))
    .unwrap()
}

/// Backends serving `greeters`, registered, and a Balancer over them.
struct Setup {
    backends: Vec<Backend>,
    greeters: Vec<Greeter>,
    _regs: Vec<Registration>,
    balancer: Balancer,
}

async fn setup(n: usize, config: Option<ServiceConfig>) -> Setup {
    setup_with(
        (0..n).map(|i| Greeter::new(format!("g{i}"))).collect(),
        config,
    )
    .await
}

async fn setup_with(greeters: Vec<Greeter>, config: Option<ServiceConfig>) -> Setup {
    let n = greeters.len();
    let client = shared().client().await;
    let svc = unique("retries");
    let backends: Vec<Backend> = greeters
        .iter()
        .map(|g| Backend::start_with("127.0.0.1:0", g.clone(), false))
        .collect();
    let mut regs = Vec::new();
    for b in &backends {
        regs.push(common::register_with(&client, &svc, &b.addr, Metadata::new()).await);
    }
    let mut builder =
        Balancer::builder(client, &svc).outlier_detection(OutlierDetection::disabled());
    if let Some(c) = config {
        builder = builder.service_config(c);
    }
    let balancer = builder.build().unwrap();
    balancer.wait_for_ready(n, LIMIT).await.unwrap();
    Setup {
        backends,
        greeters,
        _regs: regs,
        balancer,
    }
}

async fn hello(
    b: &Balancer,
    name: String,
    deadline: Option<Duration>,
) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(HelloRequest { name });
    if let Some(d) = deadline {
        request.set_timeout(d);
    }
    GreeterClient::new(b.clone())
        .say_hello(request)
        .await
        .map(|r| r.into_inner().server_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_retried_on_another_endpoint() {
    // ABORTED does not lower an endpoint's health, so the pick alone would
    // send about half of the retries back to the failing endpoint.
    let s = setup(2, Some(policy(3, "0.001s", r#""ABORTED""#))).await;
    s.backends[1].fail.set(Some(Code::Aborted));
    for _ in 0..60 {
        let answered = hello(&s.balancer, "r".into(), Some(LIMIT)).await.unwrap();
        assert_eq!(answered, "g0");
    }
    let tried = s.greeters[1].previous_attempts();
    assert!(
        !tried.is_empty(),
        "the failing endpoint was tried first sometimes"
    );
    assert!(
        tried.iter().all(|a| *a == 0),
        "and never retried on: {tried:?}"
    );
    let retried = s.greeters[0].previous_attempts();
    assert_eq!(
        retried.iter().filter(|a| **a == 1).count(),
        tried.len(),
        "each failure retried once, on the other endpoint, saying so: {retried:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_nothing_that_reached_a_server_is_retried() {
    let s = setup(1, None).await;
    s.backends[0].fail.fail_next(1, Code::Unavailable);
    let status = hello(&s.balancer, "r".into(), None).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(s.greeters[0].previous_attempts(), [0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_stop_at_max_attempts_capped_at_five() {
    let s = setup(1, Some(policy(3, "0.001s", r#""UNAVAILABLE""#))).await;
    s.backends[0].fail.set(Some(Code::Unavailable));
    let status = hello(&s.balancer, "r".into(), None).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "the last attempt's status"
    );
    assert_eq!(s.greeters[0].previous_attempts(), [0, 1, 2]);

    let s = setup(1, Some(policy(9, "0.001s", "14"))).await;
    s.backends[0].fail.set(Some(Code::Unavailable));
    hello(&s.balancer, "r".into(), None).await.unwrap_err();
    assert_eq!(s.greeters[0].previous_attempts(), [0, 1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_succeeds_after_transient_failures() {
    let s = setup(1, Some(policy(4, "0.001s", r#""UNAVAILABLE""#))).await;
    s.backends[0].fail.fail_next(2, Code::Unavailable);
    assert_eq!(hello(&s.balancer, "r".into(), None).await.unwrap(), "g0");
    assert_eq!(s.greeters[0].previous_attempts(), [0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_not_listed_are_not_retried() {
    let s = setup(1, Some(policy(4, "0.001s", r#""UNAVAILABLE""#))).await;
    s.backends[0].fail.fail_next(1, Code::Internal);
    let status = hello(&s.balancer, "r".into(), None).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(s.greeters[0].previous_attempts(), [0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushback_is_obeyed() {
    let s = setup(1, Some(policy(4, "0.001s", r#""UNAVAILABLE""#))).await;
    let fail = &s.backends[0].fail;
    // Negative: stop at once.
    fail.fail_next(3, Code::Unavailable);
    fail.pushback(Some("-1"));
    hello(&s.balancer, "r".into(), None).await.unwrap_err();
    assert_eq!(s.greeters[0].previous_attempts(), [0]);
    // Malformed: stop too.
    fail.fail_next(3, Code::Unavailable);
    fail.pushback(Some("soon"));
    hello(&s.balancer, "r".into(), None).await.unwrap_err();
    assert_eq!(s.greeters[0].previous_attempts(), [0, 0]);
    // A delay: waited exactly, then retried.
    fail.fail_next(1, Code::Unavailable);
    fail.pushback(Some("300"));
    let t0 = Instant::now();
    assert_eq!(hello(&s.balancer, "r".into(), None).await.unwrap(), "g0");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(s.greeters[0].previous_attempts(), [0, 0, 0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deadline_bounds_every_attempt_and_wait() {
    let s = setup(1, Some(policy(5, "10s", r#""UNAVAILABLE""#))).await;
    s.backends[0].fail.set(Some(Code::Unavailable));
    let t0 = Instant::now();
    let status = hello(&s.balancer, "r".into(), Some(Duration::from_millis(300)))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(took < Duration::from_millis(600), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_larger_than_the_replay_buffer_is_not_retried() {
    let s = setup(1, Some(policy(4, "0.001s", r#""UNAVAILABLE""#))).await;
    s.backends[0].fail.fail_next(1, Code::Unavailable);
    let big = "x".repeat(300 * 1024);
    let status = hello(&s.balancer, big, None).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(s.greeters[0].previous_attempts(), [0], "256 KiB per call");
    // A small one is.
    s.backends[0].fail.fail_next(1, Code::Unavailable);
    hello(&s.balancer, "small".into(), None).await.unwrap();
    assert_eq!(s.greeters[0].previous_attempts(), [0, 0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_response_headers_is_not_retried() {
    let s = setup(1, Some(policy(4, "0.001s", r#""UNAVAILABLE""#))).await;
    // The stream sends two replies, then UNAVAILABLE in its trailers.
    s.backends[0].fail.set(Some(Code::Unavailable));
    let mut stream = GreeterClient::new(s.balancer.clone())
        .say_hello_stream(HelloRequest { name: "s".into() })
        .await
        .unwrap()
        .into_inner();
    let mut replies = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => replies += 1,
            Ok(None) => panic!("no status"),
            Err(s) => break s,
        }
    };
    assert_eq!((replies, status.code()), (2, Code::Unavailable));
    assert_eq!(
        s.greeters[0].calls(),
        1,
        "committed at the response headers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_throttling_stops_retries_when_most_calls_fail() {
    let config = ServiceConfig::from_json(
        r#"{"methodConfig":[{"name":[{"service":"greeter.v1.Greeter"}],
          "retryPolicy":{"maxAttempts":5,"initialBackoff":"0.001s","maxBackoff":"0.001s",
          "backoffMultiplier":1,"retryableStatusCodes":["UNAVAILABLE"]}}],
          "retryThrottling":{"maxTokens":10,"tokenRatio":0.1}}"#,
    )
    .unwrap();
    let s = setup(1, Some(config)).await;
    s.backends[0].fail.set(Some(Code::Unavailable));
    for _ in 0..20 {
        hello(&s.balancer, "r".into(), None).await.unwrap_err();
    }
    // Tokens 10 -> 9, 8, 7, 6 (four retries), 5: throttled from then on.
    assert_eq!(s.greeters[0].previous_attempts().len(), 5 + 19);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_bounds_retries_when_every_call_fails() {
    let s = setup(1, Some(policy(5, "0.001s", r#""UNAVAILABLE""#))).await;
    s.backends[0].fail.set(Some(Code::Unavailable));
    let t0 = Instant::now();
    let calls = 300;
    for _ in 0..calls {
        hello(&s.balancer, "r".into(), None).await.unwrap_err();
    }
    let attempts = s.greeters[0].previous_attempts().len() as f64;
    // 20 % of calls, plus 10 per second, plus the 100 it starts with.
    // Unbounded: 5 per call.
    let bound = calls as f64 * 1.2 + 100.0 + 10.0 * t0.elapsed().as_secs_f64();
    assert!(
        attempts <= bound,
        "{attempts} attempts for {calls} calls (bound {bound})"
    );
    assert!(attempts > calls as f64, "some retries were made");
}

fn hedging(max_attempts: u32, delay: &str, non_fatal: &str) -> ServiceConfig {
    ServiceConfig::from_json(&format!(
        r#"{{"methodConfig":[{{"name":[{{"service":"greeter.v1.Greeter"}}],
          "hedgingPolicy":{{"maxAttempts":{max_attempts},"hedgingDelay":"{delay}",
          "nonFatalStatusCodes":[{non_fatal}]}}}}]}}"#
    ))
    .unwrap()
}

/// Waits until `check` holds (cancellations reach servers asynchronously).
async fn until(what: &str, check: impl Fn() -> bool) {
    common::eventually(LIMIT, what, || {
        let ok = check();
        async move { ok.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_answer_wins_and_the_slow_attempt_is_cancelled() {
    let greeters = vec![
        Greeter::new("slow").with_delay(Duration::from_secs(3)),
        Greeter::new("fast"),
    ];
    let s = setup_with(greeters, Some(hedging(2, "0.05s", ""))).await;
    for _ in 0..20 {
        let t0 = Instant::now();
        let answered = hello(&s.balancer, "h".into(), Some(LIMIT)).await.unwrap();
        assert_eq!(answered, "fast");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }
    let slow = &s.greeters[0];
    let tried = slow.previous_attempts().len() as u64;
    assert!(tried >= 1, "a new endpoint's first call is a probe");
    until("every attempt on the slow server cancelled", || {
        slow.cancelled() == tried
    })
    .await;
    // Those calls' hedges reached the fast server, saying so.
    let hedged = s.greeters[1]
        .previous_attempts()
        .iter()
        .filter(|a| **a == 1)
        .count();
    assert_eq!(hedged as u64, tried);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedges_land_on_distinct_endpoints() {
    let greeters = (0..3)
        .map(|i| Greeter::new(format!("g{i}")).with_delay(Duration::from_millis(300)))
        .collect();
    // Hedges 100 ms apart: each loser still has 100 ms or more to run when
    // the winner answers, so its cancellation is seen on a loaded machine.
    let s = setup_with(greeters, Some(hedging(3, "0.1s", ""))).await;
    for _ in 0..4 {
        hello(&s.balancer, "h".into(), Some(LIMIT)).await.unwrap();
    }
    for g in &s.greeters {
        assert_eq!(g.previous_attempts().len(), 4, "one attempt of each call");
    }
    until("the two losers of each call cancelled", || {
        s.greeters.iter().map(Greeter::cancelled).sum::<u64>() == 8
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_status_ends_the_call_and_cancels_the_others() {
    let greeters = vec![
        Greeter::new("failing").with_delay(Duration::from_millis(100)),
        Greeter::new("slow").with_delay(Duration::from_secs(3)),
    ];
    let s = setup_with(greeters, Some(hedging(2, "0s", r#""UNAVAILABLE""#))).await;
    s.backends[0].fail.set(Some(Code::Internal));
    let t0 = Instant::now();
    let status = hello(&s.balancer, "h".into(), Some(LIMIT))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    let slow = &s.greeters[1];
    until("the other attempt cancelled", || slow.cancelled() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_fatal_status_sends_the_next_hedge_at_once() {
    let s = setup(2, Some(hedging(2, "10s", r#""UNAVAILABLE""#))).await;
    s.backends[0].fail.set(Some(Code::Unavailable));
    for _ in 0..20 {
        let t0 = Instant::now();
        assert_eq!(
            hello(&s.balancer, "h".into(), Some(LIMIT)).await.unwrap(),
            "g1"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "not after the 10 s delay"
        );
    }
}

// Transparent retries: a request no server processed is sent again on
// another endpoint whatever the policy, without counting as an attempt.

/// An HTTP/2 server (no gRPC) that answers every stream with
/// `RST_STREAM(REFUSED_STREAM)`. Counts the streams it refused.
async fn refusing_server() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let refused = Arc::new(AtomicUsize::new(0));
    let count = refused.clone();
    // Ends with the test's runtime.
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, refused)
}

/// An HTTP/2 server written frame by frame, for what h2's server cannot
/// do: once `goaway` is notified, it sends `GOAWAY(NO_ERROR)` naming the
/// first stream it received as the last it processes, although later
/// streams arrived (as when streams cross a graceful shutdown's `GOAWAY` on
/// the wire), and closes the connection. It never answers a stream. Counts
/// the streams it received.
async fn goaway_server(goaway: Arc<tokio::sync::Notify>) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    const SETTINGS_ACK: [u8; 9] = [0, 0, 0, 4, 1, 0, 0, 0, 0];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let streams = Arc::new(AtomicUsize::new(0));
    let count = streams.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (count, goaway) = (count.clone(), goaway.clone());
            tokio::spawn(async move {
                socket.write_all(&SETTINGS).await?;
                let mut preface = [0u8; 24];
                socket.read_exact(&mut preface).await?;
                let mut first = None;
                let told = goaway.notified();
                tokio::pin!(told);
                loop {
                    let mut header = [0u8; 9];
                    tokio::select! {
                        r = socket.read_exact(&mut header) => { r?; }
                        () = &mut told => {
                            let last: u32 = first.unwrap_or(0);
                            let mut frame = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
                            frame.extend_from_slice(&last.to_be_bytes());
                            frame.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
                            socket.write_all(&frame).await?;
                            // Then it dies: the first stream, which it
                            // may have processed, fails.
                            return Ok::<(), std::io::Error>(());
                        }
                    }
                    let len = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    let mut payload = vec![0u8; len];
                    socket.read_exact(&mut payload).await?;
                    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                        & 0x7fff_ffff;
                    match header[3] {
                        1 => {
                            first.get_or_insert(stream);
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        4 if header[4] & 1 == 0 => socket.write_all(&SETTINGS_ACK).await?,
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, streams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_again_elsewhere_whatever_the_policy() {
    let client = shared().client().await;
    let svc = unique("refused");
    let (refuser, refused) = refusing_server().await;
    let greeter = Greeter::new("g");
    let backend = Backend::start_with("127.0.0.1:0", greeter.clone(), false);
    let _regs = [
        common::register_with(&client, &svc, &refuser, Metadata::new()).await,
        common::register_with(&client, &svc, &backend.addr, Metadata::new()).await,
    ];
    // No retry policy; outlier detection off so the refuser stays in rotation.
    let b = Balancer::builder(client, &svc)
        .outlier_detection(OutlierDetection::disabled())
        .build()
        .unwrap();
    b.wait_for_ready(2, LIMIT).await.unwrap();
    for _ in 0..100 {
        if refused.load(Ordering::SeqCst) >= 3 {
            break;
        }
        assert_eq!(hello(&b, "r".into(), Some(LIMIT)).await.unwrap(), "g");
        // The refuser's share falls with its success rate; its idle probe
        // (every second) still reaches it.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused.load(Ordering::SeqCst) >= 3, "the refuser was tried");
    assert!(
        greeter.previous_attempts().iter().all(|a| *a == 0),
        "a transparent retry is no attempt of a policy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_above_a_goaways_last_stream_are_sent_again() {
    let client = shared().client().await;
    let svc = unique("goaway");
    let goaway = Arc::new(tokio::sync::Notify::new());
    let (server, received) = goaway_server(goaway.clone()).await;
    let reg = common::register_with(&client, &svc, &server, Metadata::new()).await;
    let b = Balancer::builder(client.clone(), &svc)
        .outlier_detection(OutlierDetection::disabled())
        .build()
        .unwrap();
    b.wait_for_ready(1, LIMIT).await.unwrap();
    // Four calls on the only endpoint: the server holds the first, the
    // others are on the wire beside it.
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { hello(&b, "g".into(), Some(LIMIT)).await })
        })
        .collect();
    common::eventually(LIMIT, "four streams at the server", || async {
        (received.load(Ordering::SeqCst) == 4).then_some(())
    })
    .await;
    // A real backend to go to, then the GOAWAY for streams 3, 5 and 7.
    let backend = Backend::start_with("127.0.0.1:0", Greeter::new("g"), false);
    let _backend_reg = common::register_with(&client, &svc, &backend.addr, Metadata::new()).await;
    b.wait_for_ready(2, LIMIT).await.unwrap();
    drop(reg);
    goaway.notify_one();
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(id) => {
                assert_eq!(id, "g");
                ok += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}")
            }
        }
    }
    assert_eq!(
        ok, 3,
        "the three streams above the GOAWAY's last one were sent again"
    );
}
