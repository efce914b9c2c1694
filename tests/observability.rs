//! Metrics through the `metrics` facade (feature `metrics`), read back from
//! an installed recorder while a real etcd loses its data.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::eventually;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
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

impl Metrics {
    /// The value of `name` whose labels include every `labels` pair.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matches = |k: &Key| {
            k.name() == name
                && labels
                    .iter()
                    .all(|(lk, lv)| k.labels().any(|l| l.key() == *lk && l.value() == *lv))
        };
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_discovery_report_what_they_do() {
    let metrics = Metrics(Arc::new(Registry::atomic()));
    metrics::set_global_recorder(metrics.clone()).expect("the only recorder in this test binary");

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

    eventually(LIMIT, "balancer connect failures counted", || async {
        metrics
            .value("tonic_etcd_balancer_connect_failures_total", &service)
            .filter(|v| *v >= 1.0)
    })
    .await;
    assert_eq!(
        metrics.value(
            "tonic_etcd_balancer_endpoints",
            &[("service", "observed"), ("state", "ready")]
        ),
        Some(0.0)
    );
    let mut greeter = tonic_etcd::testing::greeter::GreeterClient::new(balancer.clone());
    let request = || tonic_etcd::testing::greeter::HelloRequest { name: "x".into() };
    let _ = greeter.say_hello(request()).await;
    let _ = greeter.say_hello(request()).await;
    assert!(balancer.failing_fast());
    assert_eq!(
        metrics.value("tonic_etcd_balancer_fail_fast", &service),
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
