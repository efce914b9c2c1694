//! The no-endpoint paths on tokio's paused clock: no etcd and no backend
//! are involved (the discovery stream never yields an endpoint).

use super::*;
use tower::discover::Change;

type NoChange = Result<Change<String, Instance>, std::convert::Infallible>;

async fn balancer(configure: impl FnOnce(BalancerBuilder) -> BalancerBuilder) -> Balancer {
    // Never dialled: etcd-client connects lazily, and `build_with`
    // replaces etcd as the source of endpoints.
    let client = etcd_client::Client::connect(["http://127.0.0.1:1"], None)
        .await
        .unwrap();
    let never = tokio_stream::pending::<NoChange>();
    configure(Balancer::builder(client, "svc"))
        .build_with(never)
        .unwrap()
}

/// Calls once; how long it took and the gRPC status it failed with.
async fn call(b: &Balancer, deadline: Option<&str>) -> (Duration, tonic::Status) {
    call_path(b, "/svc.S/M", deadline).await
}

/// Calls method `path` once; how long it took and the status.
async fn call_path(b: &Balancer, path: &str, deadline: Option<&str>) -> (Duration, tonic::Status) {
    let mut req = http::Request::builder().uri(format!("http://svc{path}"));
    if let Some(d) = deadline {
        req = req.header("grpc-timeout", d);
    }
    let req = req.body(tonic::body::Body::empty()).unwrap();
    let t0 = Instant::now();
    let err = b.clone().call(req).await.unwrap_err();
    let status = tonic::Status::from_error(err);
    (t0.elapsed(), status)
}

#[tokio::test]
async fn stream_methods_are_named_by_method_or_service() {
    let b = balancer(|b| b.stream_methods(["pkg.S/Watch", "/pkg.T"])).await;
    let is = |p| b.calls.is_stream(p);
    assert!(is("/pkg.S/Watch"));
    assert!(!is("/pkg.S/Get"));
    assert!(is("/pkg.T/Anything"));
    assert!(!is("/pkg.TT/Anything"), "a service name is no prefix match");
    assert!(!balancer(|b| b).await.calls.is_stream("/pkg.S/Watch"));
}

#[tokio::test(start_paused = true)]
async fn a_method_config_sets_the_deadline_and_wait_for_ready() {
    let config = crate::ServiceConfig::from_json(
        r#"{"methodConfig":[
          {"name":[{"service":"svc.S","method":"M"}],"timeout":"0.5s"},
          {"name":[{"service":"svc.W"}],"timeout":"10s","waitForReady":true}]}"#,
    )
    .unwrap();
    let b = balancer(|b| {
        b.no_endpoint_timeout(Duration::from_secs(3))
            .call_timeout(Duration::from_secs(60))
            .service_config(config)
    })
    .await;
    // The method's timeout replaces call_timeout...
    let (took, status) = call_path(&b, "/svc.S/M", None).await;
    assert_eq!(took, Duration::from_millis(500));
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    // ...and the call's own deadline wins when earlier.
    let (took, _) = call_path(&b, "/svc.S/M", Some("200m")).await;
    assert_eq!(took, Duration::from_millis(200));
    // Once the fail-fast gate has closed, an unconfigured method fails
    // at once, and a waitForReady one waits for its deadline.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (took, _) = call_path(&b, "/svc.Other/X", None).await;
    assert_eq!(took, Duration::ZERO);
    let (took, status) = call_path(&b, "/svc.W/X", None).await;
    assert_eq!(took, Duration::from_secs(10));
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn without_endpoints_calls_wait_then_fail_fast() {
    let b = balancer(|b| b.no_endpoint_timeout(Duration::from_secs(3))).await;
    // A call without a deadline waits out the no-endpoint timeout.
    let (took, status) = call(&b, None).await;
    assert_eq!(took, Duration::from_secs(3));
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(b.failing_fast());
    // From then on, at once, saying why.
    let (took, status) = call(&b, Some("10S")).await;
    assert_eq!(took, Duration::ZERO);
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("failing fast"), "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn a_deadline_shorter_than_the_gate_ends_the_wait() {
    let b = balancer(|b| b.no_endpoint_timeout(Duration::from_secs(3))).await;
    let (took, status) = call(&b, Some("500m")).await;
    assert_eq!(took, Duration::from_millis(500));
    // The deadline ended the wait, so the call says so (as grpc-go's pick
    // does), and why there was no endpoint.
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status
            .message()
            .contains("waiting for an endpoint: no instance"),
        "{status:?}"
    );
    assert!(!b.failing_fast());
}

#[tokio::test(start_paused = true)]
async fn wait_for_ready_waits_for_the_deadline() {
    let b = balancer(|b| {
        b.no_endpoint_timeout(Duration::from_secs(3))
            .fail_fast(false)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (took, _) = call(&b, Some("10S")).await;
    assert_eq!(took, Duration::from_secs(10));
    // Without a deadline, the no-endpoint timeout bounds the wait.
    let (took, _) = call(&b, None).await;
    assert_eq!(took, Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn waiting_calls_are_bounded() {
    let b = balancer(|b| b.max_waiting_calls(2)).await;
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { call(&b, Some("1S")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (took, status) = call(&b, Some("1S")).await;
    assert_eq!(took, Duration::ZERO);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    for w in waiting {
        assert_eq!(w.await.unwrap().0, Duration::from_secs(1));
    }
}

/// An endpoint that stays unreachable is tried less and less, up to the
/// reconnect cap (what a registered but dead instance costs an idle
/// client), and tried at once when its registration changes.
#[tokio::test(start_paused = true)]
async fn an_unreachable_endpoint_is_tried_less_and_less_and_at_once_when_it_changes() {
    let client = etcd_client::Client::connect(["http://127.0.0.1:1"], None)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<NoChange>();
    let b = Balancer::builder(client, "svc")
        .build_with(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .unwrap();
    // Port 1 on loopback refuses at once: attempts take no time.
    let dead = Instance::new("svc", "127.0.0.1:1");
    tx.send(Ok(Change::Insert("a".into(), dead.clone())))
        .unwrap();
    let attempts = |b: &Balancer| b.endpoints().first().map_or(0, |e| e.failed_attempts);
    tokio::time::sleep(Duration::from_secs(600)).await;
    let n = attempts(&b);
    // 50 ms doubling to the 30 s cap, each pause from its upper half: about
    // 10 attempts in the first 25-51 s, then one every 15-30 s (a 5 s cap
    // made over 120).
    assert!((28..=50).contains(&n), "{n} attempts in 10 minutes");

    let mut changed = dead;
    changed.metadata.insert("zone", "b");
    tx.send(Ok(Change::Insert("a".into(), changed))).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        attempts(&b),
        n + 1,
        "a changed registration is tried at once"
    );
}
