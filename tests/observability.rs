//! Metrics through the `metrics` facade (feature `metrics`), read back from
//! an installed recorder while a real etcd loses its data.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use backend::Backend;
use common::eventually;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use tonic_etcd::balancer::OutlierDetection;
use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Discover, Registration};

const LIMIT: Duration = Duration::from_secs(10);

/// A recorder whose values can be read any number of times (metrics-util's
/// debugging recorder resets counters and gauges on every read).
#[derive(Clone)]
struct Metrics(Arc<Registry<Key, AtomicStorage>>);

impl Recorder for Metrics {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &metrics::Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &metrics::Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &metrics::Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

/// Whether `k` is `name` with every `labels` pair among its labels.
fn matches(k: &Key, name: &str, labels: &[(&str, &str)]) -> bool {
    k.name() == name
        && labels
            .iter()
            .all(|(lk, lv)| k.labels().any(|l| l.key() == *lk && l.value() == *lv))
}

impl Metrics {
    /// The samples of the histogram `name` with every `labels` pair.
    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Option<Vec<f64>> {
        self.0
            .get_histogram_handles()
            .into_iter()
            .find(|(k, _)| matches(k, name, labels))
            .map(|(_, h)| h.data())
    }

    /// How many samples the histogram `name` with every `labels` pair holds.
    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Option<usize> {
        self.histogram(name, labels).map(|d| d.len())
    }

    /// The sum of the samples of the histogram `name` with every `labels` pair.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.histogram(name, labels).map(|d| d.iter().sum())
    }

    /// Every series' name and labels, one string each.
    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .0
            .get_counter_handles()
            .into_keys()
            .chain(self.0.get_gauge_handles().into_keys())
            .chain(self.0.get_histogram_handles().into_keys())
            .map(|k| format!("{k:?}"))
            .collect();
        keys.sort();
        keys
    }

    /// The value of `name` whose labels include every `labels` pair.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matches = |k: &Key| matches(k, name, labels);
        let counter = self
            .0
            .get_counter_handles()
            .into_iter()
            .find(|(k, _)| matches(k))
            .map(|(_, c)| c.load(Ordering::SeqCst) as f64);
        counter.or_else(|| {
            self.0
                .get_gauge_handles()
                .into_iter()
                .find(|(k, _)| matches(k))
                .map(|(_, g)| f64::from_bits(g.load(Ordering::SeqCst)))
        })
    }
}

/// The recorder of this test binary, installed on first use.
fn recorder() -> Metrics {
    static RECORDER: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();
    RECORDER
        .get_or_init(|| {
            let metrics = Metrics(Arc::new(Registry::atomic()));
            metrics::set_global_recorder(metrics.clone())
                .expect("the only recorder in this test binary");
            metrics
        })
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_discovery_report_what_they_do() {
    let metrics = recorder();

    let etcd = Etcd::start();
    let client = etcd.client().await;
    let _discover = Discover::builder(client.clone(), "observed")
        .build()
        .unwrap();
    let reg = Registration::builder(client)
        .service("observed")
        .addr("127.0.0.1:7401")
        .ttl(Duration::from_secs(2))
        .register()
        .await
        .unwrap();
    let prefix = [("prefix", "observed/")];
    eventually(LIMIT, "endpoints gauge at 1", || async {
        (metrics.value("tonic_etcd_endpoints", &prefix) == Some(1.0)).then_some(())
    })
    .await;
    let inserts = metrics.value(
        "tonic_etcd_changes_total",
        &[("prefix", "observed/"), ("kind", "insert")],
    );
    assert_eq!(inserts, Some(1.0));
    let service = [("service", "observed")];
    assert_eq!(
        metrics.value("tonic_etcd_registration_state", &service),
        Some(1.0)
    );

    // A Balancer over it: nothing listens at the address, so connections
    // fail and nothing is ready.
    let balancer = tonic_etcd::Balancer::builder(etcd.client().await, "observed")
        .no_endpoint_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let target = [("grpc.target", "etcd:///observed")];

    eventually(LIMIT, "balancer connect failures counted", || async {
        metrics
            .value("tonic_etcd_balancer_connect_failures_total", &target)
            .filter(|v| *v >= 1.0)
    })
    .await;
    assert_eq!(
        metrics.value(
            "tonic_etcd_balancer_endpoints",
            &[("grpc.target", "etcd:///observed"), ("state", "ready")]
        ),
        Some(0.0)
    );
    let mut greeter = tonic_etcd::testing::greeter::GreeterClient::new(balancer.clone());
    let request = || tonic_etcd::testing::greeter::HelloRequest { name: "x".into() };
    let _ = greeter.say_hello(request()).await;
    let _ = greeter.say_hello(request()).await;
    assert!(balancer.failing_fast());
    assert_eq!(
        metrics.value("tonic_etcd_balancer_fail_fast", &target),
        Some(1.0)
    );

    // etcd loses every lease: the loss, the watch reconnect and the
    // re-registration all show.
    etcd.wipe_and_restart();
    eventually(LIMIT, "lease loss counted", || async {
        metrics
            .value("tonic_etcd_lease_losses_total", &service)
            .filter(|v| *v >= 1.0)
    })
    .await;
    eventually(LIMIT, "watch reconnect counted", || async {
        metrics
            .value("tonic_etcd_watch_reconnects_total", &prefix)
            .filter(|v| *v >= 1.0)
    })
    .await;
    eventually(LIMIT, "registered again", || async {
        (metrics.value("tonic_etcd_registration_state", &service) == Some(1.0)).then_some(())
    })
    .await;
    reg.deregister().await.unwrap();
    assert_eq!(
        metrics.value("tonic_etcd_registration_state", &service),
        Some(4.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_reports_grpc_client_metrics_by_method_status_and_endpoint() {
    let metrics = recorder();
    let (client, svc, target) = common::metered_service("metered").await;
    let target = target.as_str();
    let ok = Backend::start("ok");
    let failing = Backend::start("failing");
    failing.fail.set(Some(tonic::Code::Unavailable));
    let _regs = [
        common::register_with(&client, &svc, &ok.addr, tonic_etcd::Metadata::new()).await,
        common::register_with(&client, &svc, &failing.addr, tonic_etcd::Metadata::new()).await,
    ];
    let balancer = tonic_etcd::Balancer::builder(client, &svc)
        .stream_methods(["greeter.v1.Greeter/Chat"])
        .outlier_detection(OutlierDetection::disabled())
        .metrics_refresh(Duration::from_millis(50))
        .build()
        .unwrap();
    const HELLO: &str = "greeter.v1.Greeter/SayHello";
    const CHAT: &str = "greeter.v1.Greeter/Chat";
    // Present at zero before any call: the Balancer's own series, and the
    // counters of the method the builder names.
    let chat = [("grpc.method", CHAT), ("grpc.target", target)];
    assert_eq!(
        metrics.value("grpc.client.attempt.started", &chat),
        Some(0.0)
    );
    for (name, result) in [
        ("tonic_etcd_client_retries_total", "retried"),
        ("tonic_etcd_client_retries_total", "transparent"),
        ("tonic_etcd_client_hedges_total", "sent"),
    ] {
        let labels = [
            ("grpc.method", CHAT),
            ("grpc.target", target),
            ("result", result),
        ];
        assert_eq!(metrics.value(name, &labels), Some(0.0), "{name} {result}");
    }
    for state in ["ready", "ejected", "unhealthy", "drained"] {
        let labels = [("grpc.target", target), ("state", state)];
        assert!(
            metrics
                .value("tonic_etcd_balancer_endpoints", &labels)
                .is_some(),
            "{state}"
        );
    }
    let hello = [("grpc.method", HELLO), ("grpc.target", target)];
    assert_eq!(metrics.value("grpc.client.attempt.started", &hello), None);
    balancer.wait_for_ready(2, LIMIT).await.unwrap();
    for addr in [&ok.addr, &failing.addr] {
        let endpoint = [("grpc.target", target), ("endpoint", addr.as_str())];
        assert_eq!(
            metrics.value("tonic_etcd_balancer_endpoint_state", &endpoint),
            Some(1.0)
        );
        assert_eq!(
            metrics.value("tonic_etcd_balancer_endpoint_in_flight", &endpoint),
            Some(0.0)
        );
        assert_eq!(
            metrics.value("tonic_etcd_balancer_endpoint_open_streams", &endpoint),
            Some(0.0)
        );
    }
    let mut greeter = GreeterClient::new(balancer.clone());
    let (mut oks, mut failures) = (0, 0);
    for _ in 0..40 {
        match greeter.say_hello(HelloRequest { name: "m".into() }).await {
            Ok(_) => oks += 1,
            Err(s) if s.code() == tonic::Code::Unavailable => failures += 1,
            Err(s) => panic!("{s:?}"),
        }
    }
    assert!(oks > 0 && failures > 0, "{oks} {failures}");
    let calls = |method, status| {
        metrics.samples(
            "grpc.client.call.duration",
            &[
                ("grpc.method", method),
                ("grpc.target", target),
                ("grpc.status", status),
            ],
        )
    };
    let attempts = |method, status| {
        metrics.samples(
            "grpc.client.attempt.duration",
            &[
                ("grpc.method", method),
                ("grpc.target", target),
                ("grpc.status", status),
            ],
        )
    };
    assert_eq!(calls(HELLO, "OK"), Some(oks));
    assert_eq!(calls(HELLO, "UNAVAILABLE"), Some(failures));
    assert_eq!(attempts(HELLO, "OK"), Some(oks));
    assert_eq!(attempts(HELLO, "UNAVAILABLE"), Some(failures));
    assert_eq!(
        metrics.value("grpc.client.attempt.started", &hello),
        Some((oks + failures) as f64)
    );
    // No retry policy: no call made a further attempt.
    assert_eq!(metrics.samples("grpc.client.call.retries", &hello), Some(0));
    let failing_ep = [("grpc.target", target), ("endpoint", failing.addr.as_str())];
    let rate = metrics
        .value("tonic_etcd_balancer_endpoint_success_rate", &failing_ep)
        .unwrap();
    let seen = balancer
        .endpoints()
        .into_iter()
        .find(|e| e.instance.addr == failing.addr)
        .unwrap()
        .success_rate;
    assert!(
        rate < 1.0 && rate == seen,
        "the failing endpoint's success rate: {rate}, {seen}"
    );
    let ok_ep = [("grpc.target", target), ("endpoint", ok.addr.as_str())];
    let latency = metrics
        .value("tonic_etcd_balancer_endpoint_latency_seconds", &ok_ep)
        .unwrap();
    assert!(latency > 0.0 && latency < 1.0, "{latency}");

    // A stream: in flight and open on its endpoint while it lives; its
    // call timed when it ends, under its own method.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = greeter
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(HelloRequest { name: "s".into() }).await.unwrap();
    let holder = replies.message().await.unwrap().expect("a reply").server_id;
    let addr = if holder == "ok" {
        &ok.addr
    } else {
        &failing.addr
    };
    let ep = [("grpc.target", target), ("endpoint", addr.as_str())];
    // Exactly one, however the calls and the refresh interleave (they once
    // summed to 2 when both wrote the gauge), and stays so.
    let counts = || {
        (
            metrics.value("tonic_etcd_balancer_endpoint_open_streams", &ep),
            metrics.value("tonic_etcd_balancer_endpoint_in_flight", &ep),
        )
    };
    eventually(LIMIT, "one open stream", || async {
        (counts() == (Some(1.0), Some(1.0))).then_some(())
    })
    .await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(counts(), (Some(1.0), Some(1.0)), "after a refresh");
    }
    assert_eq!(calls(CHAT, "OK"), None, "not before it ends");
    drop(tx);
    while let Ok(Some(_)) = replies.message().await {}
    eventually(LIMIT, "the stream's end counted", || async {
        (metrics.value("tonic_etcd_balancer_endpoint_open_streams", &ep) == Some(0.0)).then_some(())
    })
    .await;
    assert_eq!(
        calls(CHAT, "OK"),
        Some(1),
        "the stream is timed under its method"
    );
    assert_eq!(calls(HELLO, "OK"), Some(oks));

    // A call no generated client named counts as `other` (A66): a caller
    // cannot grow the scrape with made-up paths.
    let mut raw = tonic::client::Grpc::new(balancer.clone());
    raw.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/made.up.Service/Anything");
    let codec =
        tonic_prost::ProstCodec::<HelloRequest, tonic_etcd::testing::greeter::HelloReply>::default(
        );
    let _ = raw
        .unary(
            tonic::Request::new(HelloRequest { name: "r".into() }),
            path,
            codec,
        )
        .await;
    let other = [("grpc.method", "other"), ("grpc.target", target)];
    assert_eq!(
        metrics.value("grpc.client.attempt.started", &other),
        Some(1.0)
    );
    assert!(
        metrics
            .keys()
            .iter()
            .all(|k| !k.contains("made.up.Service")),
        "an unnamed method is never a label"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_hedges_are_counted_per_method_with_their_delay() {
    let metrics = recorder();
    let (client, svc, target) = common::metered_service("retried").await;
    let target = target.as_str();
    let failing = Backend::start("failing");
    failing.fail.set(Some(tonic::Code::Unavailable));
    let _reg =
        common::register_with(&client, &svc, &failing.addr, tonic_etcd::Metadata::new()).await;
    let config: tonic_etcd::ServiceConfig = r#"{"methodConfig":[{"name":[{"service":"greeter.v1.Greeter","method":"SayHello"}],
        "retryPolicy":{"maxAttempts":3,"initialBackoff":"0.01s","maxBackoff":"0.02s","backoffMultiplier":2,
        "retryableStatusCodes":["UNAVAILABLE"]}}]}"#
        .parse()
        .unwrap();
    let balancer = tonic_etcd::Balancer::builder(client, &svc)
        .service_config(config)
        .outlier_detection(OutlierDetection::disabled())
        .build()
        .unwrap();
    const HELLO: &str = "greeter.v1.Greeter/SayHello";
    let hello = [("grpc.method", HELLO), ("grpc.target", target)];
    let result = |r| {
        metrics.value(
            "tonic_etcd_client_retries_total",
            &[
                ("grpc.method", HELLO),
                ("grpc.target", target),
                ("result", r),
            ],
        )
    };
    assert_eq!(
        result("retried"),
        Some(0.0),
        "named by the service config: at zero from build"
    );
    balancer.wait_for_ready(1, LIMIT).await.unwrap();
    let mut greeter = GreeterClient::new(balancer.clone());
    let calls = 5;
    for _ in 0..calls {
        let status = greeter
            .say_hello(HelloRequest { name: "r".into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
    // Three attempts per call: two retries each, then the policy's limit.
    assert_eq!(
        metrics.value("grpc.client.attempt.started", &hello),
        Some(3.0 * calls as f64)
    );
    assert_eq!(result("retried"), Some(2.0 * calls as f64));
    assert_eq!(result("attempts used up"), Some(calls as f64));
    assert_eq!(
        metrics.samples("grpc.client.call.retries", &hello),
        Some(calls)
    );
    assert_eq!(
        metrics.sum("grpc.client.call.retries", &hello),
        Some(2.0 * calls as f64)
    );
    assert_eq!(
        metrics.sum("grpc.client.call.transparent_retries", &hello),
        Some(0.0)
    );
    let delay = metrics.sum("grpc.client.call.retry_delay", &hello).unwrap();
    assert!(delay > 0.0 && delay <= 0.03 * calls as f64, "{delay}");
    let attempts = metrics.samples(
        "grpc.client.attempt.duration",
        &[
            ("grpc.method", HELLO),
            ("grpc.target", target),
            ("grpc.status", "UNAVAILABLE"),
        ],
    );
    assert_eq!(attempts, Some(3 * calls));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_ring_hash_header_are_counted() {
    let metrics = recorder();
    let (client, svc, target) = common::metered_service("hashed").await;
    let backend = Backend::start("b");
    let _reg =
        common::register_with(&client, &svc, &backend.addr, tonic_etcd::Metadata::new()).await;
    // The config names `x-sesion`; the callers send `x-session`.
    let config: tonic_etcd::ServiceConfig =
        r#"{"loadBalancingConfig":[{"ring_hash_experimental":{"requestHashHeader":"x-sesion"}}]}"#
            .parse()
            .unwrap();
    let balancer = tonic_etcd::Balancer::builder(client, &svc)
        .service_config(config)
        .build()
        .unwrap();
    let unkeyed = || {
        metrics.value(
            "tonic_etcd_client_unkeyed_calls_total",
            &[("grpc.target", &target)],
        )
    };
    assert_eq!(unkeyed(), Some(0.0), "at zero from build");
    balancer.wait_for_ready(1, LIMIT).await.unwrap();
    let mut greeter = GreeterClient::new(balancer.clone());
    for header in ["x-session", "x-session", "x-sesion", "x-session"] {
        let mut request = tonic::Request::new(HelloRequest { name: "k".into() });
        request
            .metadata_mut()
            .insert(header, "user-7".parse().unwrap());
        greeter.say_hello(request).await.unwrap();
    }
    assert_eq!(
        unkeyed(),
        Some(3.0),
        "the three calls without the configured header"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedges_are_counted_as_further_attempts_of_their_call() {
    let metrics = recorder();
    let (client, svc, target) = common::metered_service("hedged").await;
    let target = target.as_str();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    a.fail.set(Some(tonic::Code::Unavailable));
    b.fail.set(Some(tonic::Code::Unavailable));
    let _regs = [
        common::register_with(&client, &svc, &a.addr, tonic_etcd::Metadata::new()).await,
        common::register_with(&client, &svc, &b.addr, tonic_etcd::Metadata::new()).await,
    ];
    let config: tonic_etcd::ServiceConfig = r#"{"methodConfig":[{"name":[{"service":"greeter.v1.Greeter"}],
        "hedgingPolicy":{"maxAttempts":2,"hedgingDelay":"0s","nonFatalStatusCodes":["UNAVAILABLE"]}}]}"#
        .parse()
        .unwrap();
    let balancer = tonic_etcd::Balancer::builder(client, &svc)
        .service_config(config)
        .outlier_detection(OutlierDetection::disabled())
        .build()
        .unwrap();
    balancer.wait_for_ready(2, LIMIT).await.unwrap();
    let mut greeter = GreeterClient::new(balancer.clone());
    let calls = 4;
    for _ in 0..calls {
        let status = greeter
            .say_hello(HelloRequest { name: "h".into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
    // Each call: its first attempt and one hedge, both failing; the call
    // ends with the last status, and its record counts the hedge.
    let hello = [
        ("grpc.method", "greeter.v1.Greeter/SayHello"),
        ("grpc.target", target),
    ];
    assert_eq!(
        metrics.value("grpc.client.attempt.started", &hello),
        Some(2.0 * calls as f64)
    );
    assert_eq!(
        metrics.samples("grpc.client.call.retries", &hello),
        Some(calls)
    );
    assert_eq!(
        metrics.sum("grpc.client.call.retries", &hello),
        Some(calls as f64)
    );
    let sent = [
        ("grpc.method", "greeter.v1.Greeter/SayHello"),
        ("grpc.target", target),
        ("result", "sent"),
    ];
    assert_eq!(
        metrics.value("tonic_etcd_client_hedges_total", &sent),
        Some(calls as f64)
    );
}
