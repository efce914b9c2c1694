//! Metrics through the [`metrics`](https://docs.rs/metrics) facade
//! (feature `metrics`; without it these compile to nothing): gRPC's
//! standard client instruments, plus this crate's own series for what
//! gRPC's do not show (etcd, discovery, registration, endpoints).
//!
//! ## gRPC's client instruments (gRFC A66, A96)
//!
//! Named and labelled as in grpc-go and grpc-java, so dashboards made for
//! them work (a Prometheus exporter writes `grpc.client.call.duration` as
//! `grpc_client_call_duration`, `grpc.method` as `grpc_method`).
//!
//! | name | kind, unit | labels | meaning |
//! |---|---|---|---|
//! | `grpc.client.attempt.started` | counter | `grpc.method`, `grpc.target` | attempts started: first attempts, retries, hedges, transparent retries |
//! | `grpc.client.attempt.duration` | histogram, s | `grpc.method`, `grpc.target`, `grpc.status` | an attempt from before its endpoint is picked to its status |
//! | `grpc.client.call.duration` | histogram, s | `grpc.method`, `grpc.target`, `grpc.status` | a call from its start to the status its caller gets (streams included: split them by `grpc.method`) |
//! | `grpc.client.call.retries` | histogram | `grpc.method`, `grpc.target` | retries and hedges of a call, transparent retries excluded |
//! | `grpc.client.call.transparent_retries` | histogram | `grpc.method`, `grpc.target` | transparent retries of a call |
//! | `grpc.client.call.retry_delay` | histogram, s | `grpc.method`, `grpc.target` | time a call spent waiting to retry with no attempt running |
//!
//! `grpc.target` is `etcd:///<service>`. `grpc.method` is
//! `pkg.Service/Method` for calls made by a generated client (tonic marks
//! them with its `GrpcMethod` extension), and `other` for the rest and
//! beyond 256 methods per Balancer, so a caller cannot grow the scrape
//! (A66). `grpc.status` is the code's name (`OK`, `UNAVAILABLE`, …). One
//! difference from A96, which records its three retry histograms for every
//! call: here only calls that made a further attempt record them, so the
//! healthy path records one histogram per call and per attempt; their
//! `_count` is the number of calls that retried.
//!
//! Set A66's buckets in the exporter, or durations come out as summaries,
//! which cannot be added up across clients: [`LATENCY_BUCKETS`] for the
//! `duration` and `retry_delay` histograms, [`COUNT_BUCKETS`] for the
//! `retries` ones (see `examples/prometheus.rs`).
//!
//! ## This crate's series
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `tonic_etcd_client_retries_total` | counter | `grpc.method`, `grpc.target`, `result` | `retried` for each retry made, `transparent` for each request no server processed that was sent again; otherwise why a retryable failure was not retried (`attempts used up`, `the server said not to`, `request body outgrew the replay buffer`, `throttled (retryThrottling)`, `retry budget spent`) |
//! | `tonic_etcd_client_hedges_total` | counter | `grpc.method`, `grpc.target`, `result` | `sent` for each hedge sent (beyond the first attempt); otherwise why no further hedge was sent (`no other endpoint`, `request body outgrew the replay buffer`, `throttled (retryThrottling)`, `retry budget spent`) |
//! | `tonic_etcd_client_unkeyed_calls_total` | counter | `grpc.target` | calls under ring hash without the service config's `requestHashHeader` (they pick at random: check the header's name) |
//! | `tonic_etcd_balancer_endpoints` | gauge | `grpc.target`, `state` (`ready`/`ejected`/`unhealthy`/`drained`) | a Balancer's endpoints by state |
//! | `tonic_etcd_balancer_ejections_total` | counter | `grpc.target` | endpoints ejected by outlier detection |
//! | `tonic_etcd_balancer_connect_failures_total` | counter | `grpc.target` | failed connection attempts |
//! | `tonic_etcd_balancer_fail_fast` | gauge | `grpc.target` | 1 while the fail-fast gate is closed |
//! | `tonic_etcd_balancer_subset_members` | gauge | `grpc.target` | under subsetting, instances connected to (the subset and its replacements) |
//! | `tonic_etcd_balancer_subset_clients` | gauge | `grpc.target` | under coordinated subsetting, the service's clients this one ranks among (0 while the random scheme stands in) |
//! | `tonic_etcd_balancer_endpoint_state` | gauge | `grpc.target`, `endpoint` | 0 connecting, 1 ready, 2 ejected, 3 unhealthy, 4 removed, 5 drained |
//! | `tonic_etcd_balancer_endpoint_in_flight` | gauge | `grpc.target`, `endpoint` | calls in flight on an endpoint, open streams included |
//! | `tonic_etcd_balancer_endpoint_open_streams` | gauge | `grpc.target`, `endpoint` | of those, calls past their response headers (streams) |
//! | `tonic_etcd_balancer_endpoint_latency_seconds` | gauge | `grpc.target`, `endpoint` | the endpoint's latency estimate (time to response headers) |
//! | `tonic_etcd_balancer_endpoint_success_rate` | gauge | `grpc.target`, `endpoint` | share of recent calls that succeeded (EWMA, 0 to 1) |
//! | `tonic_etcd_balancer_endpoint_ring_share` | gauge | `grpc.target`, `endpoint` | under ring hash, the share of keys the endpoint owns |
//! | `tonic_etcd_service_config_revision` | gauge | `key` | etcd revision of the service config in force (0: the builder's) |
//! | `tonic_etcd_service_config_rejected` | gauge | `key` | 1 while etcd holds a service config the Balancers refused (the one in force stays) |
//! | `tonic_etcd_service_config_refused_total` | counter | `key` | documents refused, once per revision |
//! | `tonic_etcd_service_config_unknown_fields` | gauge | `key` | fields of the config in force with no effect |
//! | `tonic_etcd_endpoints` | gauge | `prefix` | instances in a Discover's or Catalog's view |
//! | `tonic_etcd_changes_total` | counter | `prefix`, `kind` (`insert`/`remove`) | changes applied to a view |
//! | `tonic_etcd_watch_reconnects_total` | counter | `prefix` | watches re-established after a failure |
//! | `tonic_etcd_watch_resyncs_total` | counter | `prefix` | re-listings after compaction |
//! | `tonic_etcd_refused_total` | counter | `prefix` | requests etcd refused for permissions (views and service config; asked again once a minute) |
//! | `tonic_etcd_skipped_entries_total` | counter | `prefix` | undecodable entries skipped |
//! | `tonic_etcd_lease_losses_total` | counter | `service` | leases lost and replaced (a server's) |
//! | `tonic_etcd_registration_state` | gauge | `service` | 0 registering, 1 registered, 2 lost, 3 retrying, 4 deregistered |
//!
//! ## Which series exist when
//!
//! From the moment a Balancer is built: its `tonic_etcd_balancer_*`
//! counters and gauges without `endpoint`, and its service config's
//! series. From a method's first call (or at build for the methods
//! [`stream_methods`](crate::balancer::BalancerBuilder::stream_methods)
//! and the builder's service config name): its `attempt.started`, and the
//! `retried`, `transparent` and `sent` results, at zero. The histograms
//! from their first sample, per status; the reasons a retry or hedge was
//! not made from their first occurrence.
//!
//! ## Series that go away
//!
//! The per-endpoint gauges are labelled by address, and the `metrics`
//! facade cannot delete a series. So that a fleet whose addresses change
//! with every deploy does not grow a long-lived client's scrape, a
//! Balancer sets every registered endpoint's gauges every
//! [`metrics_refresh`](crate::balancer::BalancerBuilder::metrics_refresh)
//! (10 s) and stops touching those of endpoints that left (their state
//! goes to 4 once). Give the exporter an idle timeout above that period
//! for gauges, and the series of departed endpoints disappear from the
//! scrape after it while live endpoints keep theirs:
//!
//! ```text
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//! use metrics_util::MetricKindMask;
//! PrometheusBuilder::new()
//!     .with_http_listener(([127, 0, 0, 1], 9000))
//!     .set_buckets_for_metric(Matcher::Suffix("duration".into()), &tonic_etcd::metrics::LATENCY_BUCKETS)?
//!     .set_buckets_for_metric(Matcher::Suffix("retry_delay".into()), &tonic_etcd::metrics::LATENCY_BUCKETS)?
//!     .set_buckets_for_metric(Matcher::Suffix("retries".into()), &tonic_etcd::metrics::COUNT_BUCKETS)?
//!     .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(120)))
//!     .install()?;            // before building the Balancer
//! // curl 127.0.0.1:9000/metrics
//! // grpc_client_call_duration_bucket{grpc_method="greeter.v1.Greeter/SayHello",grpc_target="etcd:///greeter.v1.Greeter",grpc_status="OK",le="0.001"} 1234
//! ```
//!
//! Counters and histograms are labelled by method and target only, which
//! a fleet's churn does not grow; leave them out of the idle timeout
//! (`MetricKindMask::GAUGE`), or a quiet method's counter restarts at 0.
//!
//! ## Upgrading from 0.1's names
//!
//! | was | now |
//! |---|---|
//! | `tonic_etcd_client_calls_total{service,code}` | `grpc_client_call_duration_count{grpc_target,grpc_method,grpc_status}` |
//! | `tonic_etcd_client_call_duration_seconds{service,code}` | `grpc_client_call_duration{…}` (streams now included) |
//! | `tonic_etcd_client_attempts_total{service}` | `grpc_client_attempt_started{grpc_target,grpc_method}` |
//! | `service` label on `tonic_etcd_balancer_*` and the retry and hedge counters | `grpc_target` = `etcd:///<service>` (plus `grpc_method` on the counters) |

/// gRFC A66's latency buckets, in seconds, for the `duration` and
/// `retry_delay` histograms.
pub const LATENCY_BUCKETS: [f64; 41] = [
    0.0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005,
    0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16,
    0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
];

/// gRFC A66's count buckets, for the `retries` and `transparent_retries`
/// histograms.
pub const COUNT_BUCKETS: [f64; 18] = [
    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0, 65536.0,
];

#[cfg(feature = "metrics")]
mod imp {
    pub(crate) fn endpoints(prefix: &str, n: usize) {
        metrics::gauge!("tonic_etcd_endpoints", "prefix" => prefix.to_owned()).set(n as f64);
    }

    pub(crate) fn changes(prefix: &str, inserts: u64, removes: u64) {
        if inserts > 0 {
            metrics::counter!("tonic_etcd_changes_total", "prefix" => prefix.to_owned(), "kind" => "insert")
                .increment(inserts);
        }
        if removes > 0 {
            metrics::counter!("tonic_etcd_changes_total", "prefix" => prefix.to_owned(), "kind" => "remove")
                .increment(removes);
        }
    }

    pub(crate) fn reconnect(prefix: &str) {
        metrics::counter!("tonic_etcd_watch_reconnects_total", "prefix" => prefix.to_owned())
            .increment(1);
    }

    pub(crate) fn refused(prefix: &str) {
        metrics::counter!("tonic_etcd_refused_total", "prefix" => prefix.to_owned()).increment(1);
    }

    /// The etcd revision of the document in force for `key` (0: the
    /// builder's), whether etcd holds a refused one, and how many fields of
    /// the one in force have no effect.
    pub(crate) fn service_config(key: &str, revision: i64, rejected: bool, unknown_fields: usize) {
        metrics::gauge!("tonic_etcd_service_config_revision", "key" => key.to_owned())
            .set(revision as f64);
        metrics::gauge!("tonic_etcd_service_config_rejected", "key" => key.to_owned())
            .set(f64::from(u8::from(rejected)));
        metrics::gauge!("tonic_etcd_service_config_unknown_fields", "key" => key.to_owned())
            .set(unknown_fields as f64);
    }

    fn refused_documents(key: &str) -> metrics::Counter {
        metrics::counter!("tonic_etcd_service_config_refused_total", "key" => key.to_owned())
    }

    /// A document in etcd was refused (counted once per revision).
    pub(crate) fn service_config_refused(key: &str) {
        refused_documents(key).increment(1);
    }

    /// The series of a service config watch, at zero from its start.
    pub(crate) fn service_config_watched(key: &str) {
        service_config(key, 0, false, 0);
        refused_documents(key).increment(0);
    }

    pub(crate) fn resync(prefix: &str) {
        metrics::counter!("tonic_etcd_watch_resyncs_total", "prefix" => prefix.to_owned())
            .increment(1);
    }

    pub(crate) fn skipped(prefix: &str, n: u64) {
        metrics::counter!("tonic_etcd_skipped_entries_total", "prefix" => prefix.to_owned())
            .increment(n);
    }

    pub(crate) fn lease_lost(services: &[String]) {
        for s in services {
            metrics::counter!("tonic_etcd_lease_losses_total", "service" => s.clone()).increment(1);
        }
    }

    pub(crate) fn registration_state(services: &[String], state: &crate::RegistrationState) {
        use crate::RegistrationState as S;
        let v = match state {
            S::Registering => 0.0,
            S::Registered { .. } => 1.0,
            S::Lost { .. } => 2.0,
            S::Retrying { .. } => 3.0,
            S::Deregistered => 4.0,
        };
        for s in services {
            metrics::gauge!("tonic_etcd_registration_state", "service" => s.clone()).set(v);
        }
    }
}

#[cfg(feature = "metrics")]
mod balancer {
    //! A Balancer's own series, labelled by `grpc.target` (`etcd:///<service>`).

    pub(crate) fn balancer_endpoints(target: &str, state: &'static str, n: usize) {
        metrics::gauge!("tonic_etcd_balancer_endpoints", "grpc.target" => target.to_owned(), "state" => state)
            .set(n as f64);
    }

    /// A Balancer's counter `name`.
    fn counter(name: &'static str, target: &str) -> metrics::Counter {
        metrics::counter!(name, "grpc.target" => target.to_owned())
    }

    const EJECTIONS: &str = "tonic_etcd_balancer_ejections_total";
    const CONNECT_FAILURES: &str = "tonic_etcd_balancer_connect_failures_total";
    const UNKEYED: &str = "tonic_etcd_client_unkeyed_calls_total";

    pub(crate) fn ejection(target: &str) {
        counter(EJECTIONS, target).increment(1);
    }

    pub(crate) fn connect_failure(target: &str) {
        counter(CONNECT_FAILURES, target).increment(1);
    }

    pub(crate) fn fail_fast(target: &str, closed: bool) {
        metrics::gauge!("tonic_etcd_balancer_fail_fast", "grpc.target" => target.to_owned())
            .set(if closed { 1.0 } else { 0.0 });
    }

    pub(crate) fn subset(target: &str, members: usize, clients: usize) {
        metrics::gauge!("tonic_etcd_balancer_subset_members", "grpc.target" => target.to_owned())
            .set(members as f64);
        metrics::gauge!("tonic_etcd_balancer_subset_clients", "grpc.target" => target.to_owned())
            .set(clients as f64);
    }

    /// A call under ring hash lacked the hash header.
    pub(crate) fn unkeyed(target: &str) {
        counter(UNKEYED, target).increment(1);
    }

    /// The series a Balancer has from the moment it is built.
    pub(crate) fn balancer_built(target: &str) {
        for name in [UNKEYED, EJECTIONS, CONNECT_FAILURES] {
            counter(name, target).increment(0);
        }
        for state in ["ready", "ejected", "unhealthy", "drained"] {
            balancer_endpoints(target, state, 0);
        }
        fail_fast(target, false);
    }

    pub(crate) fn ring_share(target: &str, endpoint: &str, share: f64) {
        metrics::gauge!(
            "tonic_etcd_balancer_endpoint_ring_share",
            &super::endpoint_labels(target, endpoint)
        )
        .set(share);
    }
}

#[cfg(feature = "metrics")]
use crate::service_config::CODE_NAMES as CODES;

/// Describes every metric once per process.
#[cfg(feature = "metrics")]
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        describe_gauge!(
            "tonic_etcd_endpoints",
            "instances in a Discover's or Catalog's view"
        );
        describe_counter!("tonic_etcd_changes_total", "changes applied to a view");
        describe_counter!(
            "tonic_etcd_watch_reconnects_total",
            "watches re-established after a failure"
        );
        describe_counter!(
            "tonic_etcd_watch_resyncs_total",
            "re-listings after compaction or a revision regression"
        );
        describe_gauge!(
            "tonic_etcd_service_config_rejected",
            "1 while etcd holds a service config the Balancers refused (the previous one stays in force)"
        );
        describe_gauge!(
            "tonic_etcd_service_config_unknown_fields",
            "fields of the service config in force that have no effect (misspelled or unused)"
        );
        describe_counter!(
            "tonic_etcd_refused_total",
            "requests etcd refused for the user's permissions (asked again once a minute)"
        );
        describe_counter!(
            "tonic_etcd_skipped_entries_total",
            "undecodable entries skipped"
        );
        describe_counter!("tonic_etcd_lease_losses_total", "leases lost and replaced");
        describe_gauge!(
            "tonic_etcd_registration_state",
            "0 registering, 1 registered, 2 lost, 3 retrying, 4 deregistered"
        );
        describe_gauge!(
            "tonic_etcd_balancer_endpoints",
            "a Balancer's endpoints by state"
        );
        describe_counter!(
            "tonic_etcd_balancer_ejections_total",
            "endpoints ejected by outlier detection"
        );
        describe_counter!(
            "tonic_etcd_balancer_connect_failures_total",
            "failed connection attempts"
        );
        describe_gauge!(
            "tonic_etcd_balancer_fail_fast",
            "1 while the fail-fast gate is closed"
        );
        describe_counter!(
            "grpc.client.attempt.started",
            "attempts started: first attempts, retries, hedges, transparent retries"
        );
        describe_histogram!(
            "grpc.client.attempt.duration",
            Unit::Seconds,
            "an attempt from before its endpoint is picked to its status"
        );
        describe_histogram!(
            "grpc.client.call.duration",
            Unit::Seconds,
            "a call from its start to the status its caller gets"
        );
        describe_histogram!(
            "grpc.client.call.retries",
            "retries and hedges of a call (calls that made a further attempt)"
        );
        describe_histogram!(
            "grpc.client.call.transparent_retries",
            "transparent retries of a call (calls that made a further attempt)"
        );
        describe_histogram!(
            "grpc.client.call.retry_delay",
            Unit::Seconds,
            "time a call waited to retry with no attempt running"
        );
        describe_counter!(
            "tonic_etcd_client_unkeyed_calls_total",
            "calls under ring hash without the configured hash header (random pick)"
        );
        describe_gauge!(
            "tonic_etcd_service_config_revision",
            "etcd revision of the service config in force (0: the builder's)"
        );
        describe_counter!(
            "tonic_etcd_service_config_refused_total",
            "service config documents in etcd refused, once per revision"
        );
        describe_counter!(
            "tonic_etcd_client_hedges_total",
            "hedges sent, and why no further hedge was sent"
        );
        describe_counter!(
            "tonic_etcd_client_retries_total",
            "retries made, and retryable failures not retried, by reason"
        );
        describe_gauge!(
            "tonic_etcd_balancer_endpoint_in_flight",
            "calls in flight on an endpoint, open streams included"
        );
        describe_gauge!(
            "tonic_etcd_balancer_endpoint_open_streams",
            "calls on an endpoint past their response headers"
        );
        describe_gauge!(
            "tonic_etcd_balancer_endpoint_latency_seconds",
            Unit::Seconds,
            "an endpoint's latency estimate (time to response headers)"
        );
        describe_gauge!(
            "tonic_etcd_balancer_endpoint_success_rate",
            "share of an endpoint's recent calls that succeeded"
        );
        describe_gauge!(
            "tonic_etcd_balancer_endpoint_ring_share",
            "under ring hash, the share of keys an endpoint owns"
        );
        describe_gauge!(
            "tonic_etcd_balancer_subset_members",
            "under subsetting, instances connected to"
        );
        describe_gauge!(
            "tonic_etcd_balancer_subset_clients",
            "under coordinated subsetting, the clients this one ranks among"
        );
        describe_gauge!(
            "tonic_etcd_balancer_endpoint_state",
            "0 connecting, 1 ready, 2 ejected, 3 unhealthy, 4 removed, 5 drained"
        );
    });
}

#[cfg(not(feature = "metrics"))]
pub(crate) fn describe() {}

/// A Balancer's per-call instruments (gRFC A66/A96), per method: handles
/// made once per method, so a call costs a map read and a few atomic
/// updates, not a registry lookup.
#[cfg(feature = "metrics")]
pub(crate) struct CallMetrics {
    target: String,
    methods: std::sync::RwLock<std::collections::HashMap<Box<str>, std::sync::Arc<MethodMetrics>>>,
    /// Methods no generated client named, and those past [`MAX_METHODS`]:
    /// one series, as A66 says, so a caller cannot grow the scrape.
    other: std::sync::Arc<MethodMetrics>,
}

/// The most methods one Balancer labels by name; further ones count as
/// `other` (a guard: generated clients name a fixed set).
#[cfg(feature = "metrics")]
const MAX_METHODS: usize = 256;

#[cfg(feature = "metrics")]
impl CallMetrics {
    /// The instruments of `target` (`etcd:///<service>`), with the series
    /// of `known` methods (`/pkg.Service/Method`) made at zero now.
    pub(crate) fn new<'a>(target: &str, known: impl IntoIterator<Item = &'a str>) -> Self {
        describe();
        let this = Self {
            target: target.to_owned(),
            methods: Default::default(),
            other: std::sync::Arc::new(MethodMetrics::new(target, "other")),
        };
        for path in known {
            this.named(path);
        }
        this
    }

    /// The instruments of the method `request` calls: by name when a
    /// generated client named it (tonic's `GrpcMethod` extension), else
    /// `other`.
    pub(crate) fn method<B>(&self, request: &http::Request<B>) -> std::sync::Arc<MethodMetrics> {
        if request
            .extensions()
            .get::<tonic::GrpcMethod<'static>>()
            .is_none()
        {
            return self.other.clone();
        }
        let path = request.uri().path();
        let found = self
            .methods
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
            .cloned();
        found.unwrap_or_else(|| self.named(path))
    }

    fn named(&self, path: &str) -> std::sync::Arc<MethodMetrics> {
        let name = path.strip_prefix('/').unwrap_or(path);
        if !name.contains('/') {
            return self.other.clone();
        }
        let mut methods = self.methods.write().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = methods.get(path) {
            return m.clone();
        }
        if methods.len() >= MAX_METHODS {
            return self.other.clone();
        }
        let m = std::sync::Arc::new(MethodMetrics::new(&self.target, name));
        methods.insert(path.into(), m.clone());
        m
    }
}

/// One method's instruments.
#[cfg(feature = "metrics")]
pub(crate) struct MethodMetrics {
    target: String,
    method: String,
    attempts: metrics::Counter,
    attempt_duration: [std::sync::OnceLock<metrics::Histogram>; 17],
    call_duration: [std::sync::OnceLock<metrics::Histogram>; 17],
    retries: metrics::Histogram,
    transparent: metrics::Histogram,
    retry_delay: metrics::Histogram,
}

#[cfg(feature = "metrics")]
impl MethodMetrics {
    fn new(target: &str, method: &str) -> Self {
        let labels = [
            ("grpc.method", method.to_owned()),
            ("grpc.target", target.to_owned()),
        ];
        let attempts = metrics::counter!("grpc.client.attempt.started", &labels);
        attempts.increment(0);
        // The series rate queries divide by: present at zero.
        for (name, result) in [
            (RETRIES, "retried"),
            (RETRIES, "transparent"),
            (HEDGES, "sent"),
        ] {
            result_counter(name, target, method, result).increment(0);
        }
        Self {
            target: target.to_owned(),
            method: method.to_owned(),
            attempts,
            attempt_duration: Default::default(),
            call_duration: Default::default(),
            retries: metrics::histogram!("grpc.client.call.retries", &labels),
            transparent: metrics::histogram!("grpc.client.call.transparent_retries", &labels),
            retry_delay: metrics::histogram!("grpc.client.call.retry_delay", &labels),
        }
    }

    fn duration<'a>(
        &'a self,
        name: &'static str,
        slots: &'a [std::sync::OnceLock<metrics::Histogram>; 17],
        code: tonic::Code,
    ) -> &'a metrics::Histogram {
        let i = (code as usize).min(16);
        slots[i].get_or_init(|| {
            metrics::histogram!(name,
                "grpc.method" => self.method.clone(),
                "grpc.target" => self.target.clone(),
                "grpc.status" => CODES[i])
        })
    }
}

#[cfg(feature = "metrics")]
const RETRIES: &str = "tonic_etcd_client_retries_total";
#[cfg(feature = "metrics")]
const HEDGES: &str = "tonic_etcd_client_hedges_total";

/// A method's retry (`RETRIES`) or hedge (`HEDGES`) counter of `result`.
#[cfg(feature = "metrics")]
fn result_counter(
    name: &'static str,
    target: &str,
    method: &str,
    result: &'static str,
) -> metrics::Counter {
    metrics::counter!(name,
        "grpc.method" => method.to_owned(), "grpc.target" => target.to_owned(), "result" => result)
}

/// What the attempts of a hedged call share for its record: which attempt
/// won, and how many hedges were sent.
#[derive(Default)]
pub(crate) struct Hedged {
    #[cfg(feature = "metrics")]
    winner: std::sync::atomic::AtomicUsize,
    #[cfg(feature = "metrics")]
    sent: std::sync::atomic::AtomicU32,
}

impl Hedged {
    pub(crate) fn new() -> std::sync::Arc<Self> {
        #[cfg(feature = "metrics")]
        {
            std::sync::Arc::new(Self {
                winner: std::sync::atomic::AtomicUsize::new(usize::MAX),
                sent: std::sync::atomic::AtomicU32::new(0),
            })
        }
        #[cfg(not(feature = "metrics"))]
        std::sync::Arc::new(Self {})
    }

    /// A hedge (an attempt beyond the first) was sent.
    pub(crate) fn sent(&self) {
        #[cfg(feature = "metrics")]
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Attempt `index` is the one whose response the call took.
    pub(crate) fn won(&self, _index: usize) {
        #[cfg(feature = "metrics")]
        self.winner
            .store(_index, std::sync::atomic::Ordering::Release);
    }
}

/// One call's record: reports its final status, duration and further
/// attempts exactly once (a call dropped before its status counts as
/// `CANCELLED`, as grpc-go's do).
#[cfg(feature = "metrics")]
pub(crate) struct CallRecord {
    metrics: Option<std::sync::Arc<MethodMetrics>>,
    /// `None` in a record that reports nothing: it reads no clock.
    started: Option<tokio::time::Instant>,
    /// An attempt has started: the first one starts when the call does,
    /// with the call's clock read.
    attempted: std::sync::atomic::AtomicBool,
    retries: u32,
    transparent: u32,
    delay: std::time::Duration,
    /// Under a hedging policy: what the attempts share, and for a hedge's
    /// copy its index (it reports only if its attempt won).
    hedge: Option<(std::sync::Arc<Hedged>, Option<usize>)>,
}

#[cfg(feature = "metrics")]
impl CallRecord {
    /// A call of `method` that started at `started`.
    pub(crate) fn new(
        method: std::sync::Arc<MethodMetrics>,
        started: tokio::time::Instant,
    ) -> Self {
        Self {
            metrics: Some(method),
            started: Some(started),
            attempted: std::sync::atomic::AtomicBool::new(false),
            retries: 0,
            transparent: 0,
            delay: std::time::Duration::ZERO,
            hedge: None,
        }
    }

    /// An attempt starts (before its endpoint is picked, as A66 times it).
    pub(crate) fn attempt(&self) -> AttemptRecord {
        if let Some(m) = &self.metrics {
            m.attempts.increment(1);
        }
        let first = !self
            .attempted
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        AttemptRecord {
            timed: self.metrics.clone().map(|m| {
                let started = match self.started {
                    Some(call) if first => call,
                    _ => tokio::time::Instant::now(),
                };
                (m, started)
            }),
        }
    }

    /// A retry follows after `delay` with no attempt running.
    pub(crate) fn retried(&mut self, delay: std::time::Duration) {
        self.retries += 1;
        self.delay += delay;
        self.retry_result("retried");
    }

    /// A transparent retry follows.
    pub(crate) fn transparent(&mut self) {
        self.transparent += 1;
        self.retry_result("transparent");
    }

    /// Counts `result` of the call's retry policy: `retried`,
    /// `transparent`, or why a retryable failure was not retried.
    pub(crate) fn retry_result(&self, result: &'static str) {
        if let Some(m) = &self.metrics {
            result_counter(RETRIES, &m.target, &m.method, result).increment(1);
        }
    }

    /// Counts `result` of the call's hedging policy: `sent`, or why no
    /// further hedge was sent.
    pub(crate) fn hedge_result(&self, result: &'static str) {
        if let Some(m) = &self.metrics {
            result_counter(HEDGES, &m.target, &m.method, result).increment(1);
        }
    }

    /// A copy for hedge `index` of the call: it reports only once
    /// `hedged` says `index` won (the attempt whose response was taken).
    pub(crate) fn for_hedge(&self, hedged: &std::sync::Arc<Hedged>, index: usize) -> Self {
        Self {
            metrics: self.metrics.clone(),
            started: self.started,
            attempted: std::sync::atomic::AtomicBool::new(true),
            retries: 0,
            transparent: self.transparent,
            delay: self.delay,
            hedge: Some((hedged.clone(), Some(index))),
        }
    }

    /// The call hedges: its hedges are counted in `hedged`, whichever
    /// record reports.
    pub(crate) fn hedging(&mut self, hedged: &std::sync::Arc<Hedged>) {
        self.hedge = Some((hedged.clone(), None));
    }

    /// Drops the record without reporting (a hedge reports instead).
    pub(crate) fn discard(mut self) {
        self.metrics = None;
    }

    /// A record that reports nothing.
    pub(crate) fn none() -> Self {
        Self {
            metrics: None,
            started: None,
            attempted: std::sync::atomic::AtomicBool::new(true),
            retries: 0,
            transparent: 0,
            delay: std::time::Duration::ZERO,
            hedge: None,
        }
    }

    /// The call ended with `code`.
    pub(crate) fn finish(&mut self, code: tonic::Code) {
        self.finish_at(code, None);
    }

    /// The call ended with `code` at `now` (read here when `None`): one
    /// clock read can end a call, its attempt and its endpoint's account.
    pub(crate) fn finish_at(&mut self, code: tonic::Code, now: Option<tokio::time::Instant>) {
        use std::sync::atomic::Ordering;
        if let Some((hedged, index)) = &self.hedge {
            if index.is_some_and(|i| hedged.winner.load(Ordering::Acquire) != i) {
                self.metrics = None;
            }
            self.retries = hedged.sent.load(Ordering::Relaxed);
        }
        let (Some(m), Some(started)) = (self.metrics.take(), self.started) else {
            return;
        };
        let now = now.unwrap_or_else(tokio::time::Instant::now);
        m.duration("grpc.client.call.duration", &m.call_duration, code)
            .record(now.saturating_duration_since(started).as_secs_f64());
        // A96 per call; here only for calls that made a further attempt,
        // so the healthy path records one histogram, not four.
        if self.retries + self.transparent > 0 {
            m.retries.record(f64::from(self.retries));
            m.transparent.record(f64::from(self.transparent));
            m.retry_delay.record(self.delay.as_secs_f64());
        }
    }
}

#[cfg(feature = "metrics")]
impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// One attempt's record: its status and duration, reported once (an
/// attempt dropped before its status counts as `CANCELLED`).
#[cfg(feature = "metrics")]
pub(crate) struct AttemptRecord {
    /// The method's instruments and when the attempt started; `None` in a
    /// record that reports nothing (it reads no clock).
    timed: Option<(std::sync::Arc<MethodMetrics>, tokio::time::Instant)>,
}

#[cfg(feature = "metrics")]
impl AttemptRecord {
    /// A record that reports nothing.
    pub(crate) fn none() -> Self {
        Self { timed: None }
    }

    /// The attempt ended with `code`.
    pub(crate) fn finish(&mut self, code: tonic::Code) {
        self.finish_at(code, None);
    }

    /// The attempt ended with `code` at `now` (read here when `None`).
    pub(crate) fn finish_at(&mut self, code: tonic::Code, now: Option<tokio::time::Instant>) {
        if let Some((m, started)) = self.timed.take() {
            let now = now.unwrap_or_else(tokio::time::Instant::now);
            m.duration("grpc.client.attempt.duration", &m.attempt_duration, code)
                .record(now.saturating_duration_since(started).as_secs_f64());
        }
    }
}

#[cfg(feature = "metrics")]
impl Drop for AttemptRecord {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// One connection's gauges, made when it connects and set from its own
/// counts by its calls; [`endpoint_status`] sets them from the endpoint
/// itself every refresh. Every writer sets a count read from the
/// connection (never increments), so a refresh racing a call cannot leave
/// a sum that was never true, and a connection that is gone stops writing:
/// the calls still ending on it do not overwrite its successor's counts.
#[cfg(feature = "metrics")]
pub(crate) struct EndpointMetrics {
    in_flight: metrics::Gauge,
    open_streams: metrics::Gauge,
    latency: metrics::Gauge,
    success: metrics::Gauge,
    retired: std::sync::atomic::AtomicBool,
}

#[cfg(feature = "metrics")]
fn endpoint_labels(target: &str, addr: &str) -> [(&'static str, String); 2] {
    [
        ("grpc.target", target.to_owned()),
        ("endpoint", addr.to_owned()),
    ]
}

#[cfg(feature = "metrics")]
impl EndpointMetrics {
    /// The gauges of endpoint `addr` (made if the recorder has none).
    fn handles(target: &str, addr: &str) -> Self {
        let labels = endpoint_labels(target, addr);
        Self {
            in_flight: metrics::gauge!("tonic_etcd_balancer_endpoint_in_flight", &labels),
            open_streams: metrics::gauge!("tonic_etcd_balancer_endpoint_open_streams", &labels),
            latency: metrics::gauge!("tonic_etcd_balancer_endpoint_latency_seconds", &labels),
            success: metrics::gauge!("tonic_etcd_balancer_endpoint_success_rate", &labels),
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn new(target: &str, addr: &str) -> Self {
        let this = Self::handles(target, addr);
        // A new connection starts with nothing in flight and a new estimate.
        this.in_flight.set(0.0);
        this.open_streams.set(0.0);
        this.success.set(1.0);
        this
    }

    fn live(&self) -> bool {
        !self.retired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The connection is gone: its calls stop writing the endpoint's series.
    pub(crate) fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A call started or ended: the connection's counts now.
    pub(crate) fn in_flight(&self, in_flight: usize, open_streams: usize) {
        if self.live() {
            self.in_flight.set(in_flight as f64);
            self.open_streams.set(open_streams as f64);
        }
    }

    pub(crate) fn latency(&self, us: f64) {
        if self.live() {
            self.latency.set(us / 1e6);
        }
    }

    pub(crate) fn success(&self, rate: f64) {
        if self.live() {
            self.success.set(rate);
        }
    }
}

/// The number an [`EndpointState`](crate::balancer::EndpointState) is
/// reported as (4: removed).
#[cfg(feature = "metrics")]
fn state_number(state: crate::balancer::EndpointState) -> f64 {
    use crate::balancer::EndpointState as S;
    match state {
        S::Connecting => 0.0,
        S::Ready => 1.0,
        S::Ejected => 2.0,
        S::Unhealthy => 3.0,
        S::Drained => 5.0,
    }
}

/// Where endpoint `addr` stands now (`None`: it was removed, 4).
#[cfg(feature = "metrics")]
pub(crate) fn endpoint_state(
    target: &str,
    addr: &str,
    state: Option<crate::balancer::EndpointState>,
) {
    metrics::gauge!(
        "tonic_etcd_balancer_endpoint_state",
        &endpoint_labels(target, addr)
    )
    .set(state.map_or(4.0, state_number));
}

/// Sets every gauge of a registered endpoint from what it is now. Run for
/// each one every refresh, so that a live endpoint's series never look
/// idle to an exporter that drops idle series (and are made again if it
/// did), while those of removed endpoints are left to expire.
#[cfg(feature = "metrics")]
pub(crate) fn endpoint_status(target: &str, e: &crate::balancer::EndpointStatus) {
    let addr = &e.instance.addr;
    endpoint_state(target, addr, Some(e.state));
    if let Some(latency) = e.latency {
        let gauges = EndpointMetrics::handles(target, addr);
        gauges.in_flight.set(e.in_flight as f64);
        gauges.open_streams.set(e.open_streams as f64);
        gauges.latency.set(latency.as_secs_f64());
        gauges.success.set(e.success_rate);
    }
    if let Some(share) = e.ring_share {
        ring_share(target, addr, share);
    }
}

#[cfg(not(feature = "metrics"))]
mod call_noop {
    //! Without the `metrics` feature: nothing, at no cost.
    use std::sync::Arc;

    use super::Hedged;

    pub(crate) struct CallMetrics;
    pub(crate) struct MethodMetrics;

    impl CallMetrics {
        pub(crate) fn new<'a>(_: &str, _: impl IntoIterator<Item = &'a str>) -> Self {
            Self
        }
        pub(crate) fn method<B>(&self, _: &http::Request<B>) -> MethodMetrics {
            MethodMetrics
        }
    }

    pub(crate) struct CallRecord;

    impl CallRecord {
        pub(crate) fn new(_: MethodMetrics, _: tokio::time::Instant) -> Self {
            Self
        }
        pub(crate) fn none() -> Self {
            Self
        }
        pub(crate) fn attempt(&self) -> AttemptRecord {
            AttemptRecord
        }
        pub(crate) fn retried(&mut self, _: std::time::Duration) {}
        pub(crate) fn transparent(&mut self) {}
        pub(crate) fn retry_result(&self, _: &'static str) {}
        pub(crate) fn hedge_result(&self, _: &'static str) {}
        pub(crate) fn for_hedge(&self, _: &Arc<Hedged>, _: usize) -> Self {
            Self
        }
        pub(crate) fn hedging(&mut self, _: &Arc<Hedged>) {}
        pub(crate) fn discard(self) {}
        pub(crate) fn finish(&mut self, _: tonic::Code) {}
        pub(crate) fn finish_at(&mut self, _: tonic::Code, _: Option<tokio::time::Instant>) {}
    }

    pub(crate) struct AttemptRecord;

    impl AttemptRecord {
        pub(crate) fn none() -> Self {
            Self
        }
        pub(crate) fn finish(&mut self, _: tonic::Code) {}
        pub(crate) fn finish_at(&mut self, _: tonic::Code, _: Option<tokio::time::Instant>) {}
    }

    pub(crate) struct EndpointMetrics;

    impl EndpointMetrics {
        pub(crate) fn new(_: &str, _: &str) -> Self {
            Self
        }
        pub(crate) fn retire(&self) {}
        pub(crate) fn in_flight(&self, _: usize, _: usize) {}
        pub(crate) fn latency(&self, _: f64) {}
        pub(crate) fn success(&self, _: f64) {}
    }

    pub(crate) fn endpoint_state(_: &str, _: &str, _: Option<crate::balancer::EndpointState>) {}
    pub(crate) fn endpoint_status(_: &str, _: &crate::balancer::EndpointStatus) {}
}

#[cfg(not(feature = "metrics"))]
pub(crate) use call_noop::*;

#[cfg(not(feature = "metrics"))]
mod balancer {
    pub(crate) fn balancer_endpoints(_: &str, _: &'static str, _: usize) {}
    pub(crate) fn ejection(_: &str) {}
    pub(crate) fn connect_failure(_: &str) {}
    pub(crate) fn fail_fast(_: &str, _: bool) {}
    pub(crate) fn subset(_: &str, _: usize, _: usize) {}
    pub(crate) fn ring_share(_: &str, _: &str, _: f64) {}
    pub(crate) fn balancer_built(_: &str) {}
    pub(crate) fn unkeyed(_: &str) {}
}

pub(crate) use balancer::*;

#[cfg(not(feature = "metrics"))]
mod imp {
    pub(crate) fn endpoints(_: &str, _: usize) {}
    pub(crate) fn changes(_: &str, _: u64, _: u64) {}
    pub(crate) fn reconnect(_: &str) {}
    pub(crate) fn refused(_: &str) {}
    pub(crate) fn service_config(_: &str, _: i64, _: bool, _: usize) {}
    pub(crate) fn service_config_refused(_: &str) {}
    pub(crate) fn service_config_watched(_: &str) {}
    pub(crate) fn resync(_: &str) {}
    pub(crate) fn skipped(_: &str, _: u64) {}
    pub(crate) fn lease_lost(_: &[String]) {}
    pub(crate) fn registration_state(_: &[String], _: &crate::RegistrationState) {}
}

pub(crate) use imp::*;
