//! Counters and gauges through the [`metrics`](https://docs.rs/metrics)
//! facade (feature `metrics`; without it these compile to nothing).
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `tonic_etcd_endpoints` | gauge | `prefix` | instances in a Discover's or Catalog's view |
//! | `tonic_etcd_changes_total` | counter | `prefix`, `kind` (`insert`/`remove`) | changes applied to a view |
//! | `tonic_etcd_watch_reconnects_total` | counter | `prefix` | watches re-established after a failure |
//! | `tonic_etcd_watch_resyncs_total` | counter | `prefix` | re-listings after compaction |
//! | `tonic_etcd_service_config_rejected` | gauge | `key` | 1 while etcd holds a service config the Balancers refused |
//! | `tonic_etcd_service_config_unknown_fields` | gauge | `key` | fields of the config in force with no effect |
//! | `tonic_etcd_refused_total` | counter | `prefix` | requests etcd refused for permissions (views and service config; asked again once a minute) |
//! | `tonic_etcd_skipped_entries_total` | counter | `prefix` | undecodable entries skipped |
//! | `tonic_etcd_lease_losses_total` | counter | `service` | leases lost and replaced |
//! | `tonic_etcd_registration_state` | gauge | `service` | 0 registering, 1 registered, 2 lost, 3 retrying, 4 deregistered |
//! | `tonic_etcd_balancer_endpoints` | gauge | `service`, `state` (`ready`/`ejected`/`unhealthy`/`drained`) | a Balancer's endpoints by state |
//! | `tonic_etcd_balancer_ejections_total` | counter | `service` | endpoints ejected by outlier detection |
//! | `tonic_etcd_balancer_connect_failures_total` | counter | `service` | failed connection attempts |
//! | `tonic_etcd_balancer_fail_fast` | gauge | `service` | 1 while the fail-fast gate is closed |
//! | `tonic_etcd_client_calls_total` | counter | `service`, `code` (`OK`, `UNAVAILABLE`, ...) | calls through a Balancer by final gRPC status; every code present at 0 from the start |
//! | `tonic_etcd_client_call_duration_seconds` | histogram | `service`, `code` | how long calls took, to their status (calls of [`stream_methods`](crate::balancer::BalancerBuilder::stream_methods) are counted but not timed: a stream's lifetime is no latency) |
//! | `tonic_etcd_client_attempts_total` | counter | `service` | attempts sent to an endpoint: first attempts, retries, hedges and transparent retries (over `calls_total`: what retries and hedges add) |
//! | `tonic_etcd_client_retries_total` | counter | `service`, `result` | `retried` for each retry made, `transparent` for each request no server processed that was sent again (not counted against the policy); otherwise why a retryable failure was not retried (`attempts used up`, `the server said not to`, `request body outgrew the replay buffer`, `throttled (retryThrottling)`, `retry budget spent`) |
//! | `tonic_etcd_client_hedges_total` | counter | `service`, `result` | `sent` for each hedge sent (beyond the first attempt); otherwise why no further hedge was sent (`no other endpoint`, `request body outgrew the replay buffer`, `throttled (retryThrottling)`, `retry budget spent`) |
//! | `tonic_etcd_balancer_endpoint_in_flight` | gauge | `service`, `endpoint` | calls in flight on an endpoint, open streams included |
//! | `tonic_etcd_balancer_endpoint_open_streams` | gauge | `service`, `endpoint` | of those, calls past their response headers (streams) |
//! | `tonic_etcd_balancer_endpoint_latency_seconds` | gauge | `service`, `endpoint` | the endpoint's latency estimate (time to response headers) |
//! | `tonic_etcd_balancer_endpoint_success_rate` | gauge | `service`, `endpoint` | share of recent calls that succeeded (EWMA, 0 to 1) |
//! | `tonic_etcd_balancer_endpoint_state` | gauge | `service`, `endpoint` | 0 connecting, 1 ready, 2 ejected, 3 unhealthy, 4 removed, 5 drained |
//! | `tonic_etcd_balancer_endpoint_ring_share` | gauge | `service`, `endpoint` | under ring hash, the share of keys the endpoint owns (set when the ring is built) |
//! | `tonic_etcd_balancer_subset_members` | gauge | `service` | under subsetting, instances connected to (the subset and its replacements) |
//! | `tonic_etcd_balancer_subset_clients` | gauge | `service` | under coordinated subsetting, the service's clients this one ranks among (0 while the random scheme stands in) |
//!
//! Every name is described (`describe_*`) when a view, registration or
//! Balancer is built, and a Balancer's series exist at 0 from the moment
//! it is built (per endpoint: from its first connection), so dashboards
//! see zeros rather than gaps. An endpoint removed from etcd keeps its
//! series with state 4 and zeros (the `metrics` facade cannot delete one).
//!
//! With [`metrics-exporter-prometheus`](https://docs.rs/metrics-exporter-prometheus)
//! (`examples/prometheus.rs` runs this against a real etcd and prints a
//! scrape):
//!
//! ```text
//! metrics_exporter_prometheus::PrometheusBuilder::new()
//!     .with_http_listener(([127, 0, 0, 1], 9000))
//!     .install()?;            // before building the Balancer
//! // curl 127.0.0.1:9000/metrics
//! // tonic_etcd_client_calls_total{service="greeter.v1.Greeter",code="OK"} 1234
//! // tonic_etcd_balancer_endpoint_open_streams{service="greeter.v1.Greeter",endpoint="10.0.0.7:50051"} 1
//! ```

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

    /// Whether etcd holds a refused document for `key`, and how many
    /// fields of the one in force have no effect.
    pub(crate) fn service_config(key: &str, rejected: bool, unknown_fields: usize) {
        metrics::gauge!("tonic_etcd_service_config_rejected", "key" => key.to_owned())
            .set(f64::from(u8::from(rejected)));
        metrics::gauge!("tonic_etcd_service_config_unknown_fields", "key" => key.to_owned())
            .set(unknown_fields as f64);
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
    pub(crate) fn balancer_endpoints(service: &str, state: &'static str, n: usize) {
        metrics::gauge!("tonic_etcd_balancer_endpoints", "service" => service.to_owned(), "state" => state)
            .set(n as f64);
    }

    pub(crate) fn ejection(service: &str) {
        metrics::counter!("tonic_etcd_balancer_ejections_total", "service" => service.to_owned())
            .increment(1);
    }

    pub(crate) fn connect_failure(service: &str) {
        metrics::counter!("tonic_etcd_balancer_connect_failures_total", "service" => service.to_owned())
            .increment(1);
    }

    pub(crate) fn retry(service: &str, result: &'static str) {
        metrics::counter!("tonic_etcd_client_retries_total", "service" => service.to_owned(), "result" => result)
            .increment(1);
    }

    pub(crate) fn hedge(service: &str, result: &'static str) {
        metrics::counter!("tonic_etcd_client_hedges_total", "service" => service.to_owned(), "result" => result)
            .increment(1);
    }

    pub(crate) fn fail_fast(service: &str, closed: bool) {
        metrics::gauge!("tonic_etcd_balancer_fail_fast", "service" => service.to_owned())
            .set(if closed { 1.0 } else { 0.0 });
    }

    pub(crate) fn subset(service: &str, members: usize, clients: usize) {
        metrics::gauge!("tonic_etcd_balancer_subset_members", "service" => service.to_owned())
            .set(members as f64);
        metrics::gauge!("tonic_etcd_balancer_subset_clients", "service" => service.to_owned())
            .set(clients as f64);
    }

    pub(crate) fn ring_share(service: &str, endpoint: &str, share: f64) {
        metrics::gauge!("tonic_etcd_balancer_endpoint_ring_share",
            "service" => service.to_owned(), "endpoint" => endpoint.to_owned())
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
            "tonic_etcd_client_calls_total",
            "calls through a Balancer by final gRPC status"
        );
        describe_histogram!(
            "tonic_etcd_client_call_duration_seconds",
            Unit::Seconds,
            "call duration to its final status (declared streams excluded)"
        );
        describe_counter!(
            "tonic_etcd_client_attempts_total",
            "attempts sent: first attempts, retries, hedges, transparent retries"
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

/// A Balancer's per-call series: handles made once, so a call costs two
/// atomic updates, not a registry lookup.
#[cfg(feature = "metrics")]
pub(crate) struct CallMetrics {
    service: String,
    calls: [metrics::Counter; 17],
    durations: [std::sync::OnceLock<metrics::Histogram>; 17],
}

#[cfg(feature = "metrics")]
impl CallMetrics {
    pub(crate) fn new(service: &str) -> Self {
        describe();
        let calls = CODES.map(|code| {
            let c = metrics::counter!("tonic_etcd_client_calls_total",
                "service" => service.to_owned(), "code" => code);
            c.increment(0);
            c
        });
        metrics::counter!("tonic_etcd_client_attempts_total", "service" => service.to_owned())
            .increment(0);
        Self {
            service: service.to_owned(),
            calls,
            durations: Default::default(),
        }
    }

    fn record(&self, code: tonic::Code, took: Option<std::time::Duration>) {
        let i = (code as usize).min(16);
        self.calls[i].increment(1);
        if let Some(took) = took {
            self.durations[i]
                .get_or_init(|| {
                    metrics::histogram!("tonic_etcd_client_call_duration_seconds",
                        "service" => self.service.clone(), "code" => CODES[i])
                })
                .record(took.as_secs_f64());
        }
    }
}

/// One call's record: reports its final status exactly once (a call
/// dropped before its status counts as `CANCELLED`, as grpc-go's do).
#[cfg(feature = "metrics")]
pub(crate) struct CallRecord {
    metrics: Option<std::sync::Arc<CallMetrics>>,
    started: tokio::time::Instant,
    timed: bool,
    /// A hedge's copy: it reports only if its attempt won.
    hedge: Option<(std::sync::Arc<std::sync::atomic::AtomicUsize>, usize)>,
}

#[cfg(feature = "metrics")]
impl CallRecord {
    /// A call that started at `started`; `timed` unless it is a declared stream.
    pub(crate) fn new(
        metrics: &std::sync::Arc<CallMetrics>,
        started: tokio::time::Instant,
        timed: bool,
    ) -> Self {
        Self {
            metrics: Some(metrics.clone()),
            started,
            timed,
            hedge: None,
        }
    }

    /// A copy for hedge `index` of the call: it reports only once
    /// `winner` holds `index` (the attempt whose response was taken).
    pub(crate) fn for_hedge(
        &self,
        winner: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
        index: usize,
    ) -> Self {
        Self {
            metrics: self.metrics.clone(),
            started: self.started,
            timed: self.timed,
            hedge: Some((winner.clone(), index)),
        }
    }

    /// Drops the record without reporting (a hedge reports instead).
    pub(crate) fn discard(mut self) {
        self.metrics = None;
    }

    /// A record that reports nothing.
    pub(crate) fn none() -> Self {
        Self {
            metrics: None,
            started: tokio::time::Instant::now(),
            timed: false,
            hedge: None,
        }
    }

    /// The call ended with `code`.
    pub(crate) fn finish(&mut self, code: tonic::Code) {
        if let Some((winner, index)) = &self.hedge {
            if winner.load(std::sync::atomic::Ordering::Acquire) != *index {
                self.metrics = None;
            }
        }
        if let Some(m) = self.metrics.take() {
            m.record(code, self.timed.then(|| self.started.elapsed()));
        }
    }
}

#[cfg(feature = "metrics")]
impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// One endpoint's gauges, made when it connects.
#[cfg(feature = "metrics")]
pub(crate) struct EndpointMetrics {
    attempts: metrics::Counter,
    in_flight: metrics::Gauge,
    open_streams: metrics::Gauge,
    latency: metrics::Gauge,
    success: metrics::Gauge,
}

#[cfg(feature = "metrics")]
impl EndpointMetrics {
    pub(crate) fn new(service: &str, addr: &str) -> Self {
        let labels = [
            ("service", service.to_owned()),
            ("endpoint", addr.to_owned()),
        ];
        let this = Self {
            attempts: metrics::counter!("tonic_etcd_client_attempts_total", "service" => service.to_owned()),
            in_flight: metrics::gauge!("tonic_etcd_balancer_endpoint_in_flight", &labels),
            open_streams: metrics::gauge!("tonic_etcd_balancer_endpoint_open_streams", &labels),
            latency: metrics::gauge!("tonic_etcd_balancer_endpoint_latency_seconds", &labels),
            success: metrics::gauge!("tonic_etcd_balancer_endpoint_success_rate", &labels),
        };
        // Registering makes the series (at 0); in-flight counts are left to
        // the increments, as calls on a previous connection of the same
        // endpoint may still end. A new connection starts a new estimate.
        this.success.set(1.0);
        this
    }

    pub(crate) fn started(&self) {
        self.attempts.increment(1);
        self.in_flight.increment(1.0);
    }

    pub(crate) fn headers(&self) {
        self.open_streams.increment(1.0);
    }

    pub(crate) fn ended(&self, had_headers: bool) {
        self.in_flight.decrement(1.0);
        if had_headers {
            self.open_streams.decrement(1.0);
        }
    }

    pub(crate) fn latency(&self, us: f64) {
        self.latency.set(us / 1e6);
    }

    pub(crate) fn success(&self, rate: f64) {
        self.success.set(rate);
    }
}

/// Where endpoint `addr` stands (0 connecting, 1 ready, 2 ejected,
/// 3 unhealthy, 4 removed, 5 drained).
#[cfg(feature = "metrics")]
pub(crate) fn endpoint_state(service: &str, addr: &str, state: u8) {
    metrics::gauge!("tonic_etcd_balancer_endpoint_state",
        "service" => service.to_owned(), "endpoint" => addr.to_owned())
    .set(f64::from(state));
}

#[cfg(not(feature = "metrics"))]
mod call_noop {
    /// Without the `metrics` feature: nothing, at no cost.
    pub(crate) struct CallMetrics;

    impl CallMetrics {
        pub(crate) fn new(_: &str) -> Self {
            Self
        }
    }

    pub(crate) struct CallRecord;

    impl CallRecord {
        pub(crate) fn new(
            _: &std::sync::Arc<CallMetrics>,
            _: tokio::time::Instant,
            _: bool,
        ) -> Self {
            Self
        }

        pub(crate) fn none() -> Self {
            Self
        }

        pub(crate) fn for_hedge(
            &self,
            _: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
            _: usize,
        ) -> Self {
            Self
        }

        pub(crate) fn discard(self) {}

        pub(crate) fn finish(&mut self, _: tonic::Code) {}
    }

    pub(crate) struct EndpointMetrics;

    impl EndpointMetrics {
        pub(crate) fn new(_: &str, _: &str) -> Self {
            Self
        }
        pub(crate) fn started(&self) {}
        pub(crate) fn headers(&self) {}
        pub(crate) fn ended(&self, _: bool) {}
        pub(crate) fn latency(&self, _: f64) {}
        pub(crate) fn success(&self, _: f64) {}
    }

    pub(crate) fn endpoint_state(_: &str, _: &str, _: u8) {}
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
    pub(crate) fn retry(_: &str, _: &'static str) {}
    pub(crate) fn hedge(_: &str, _: &'static str) {}
}

pub(crate) use balancer::*;

#[cfg(not(feature = "metrics"))]
mod imp {
    pub(crate) fn endpoints(_: &str, _: usize) {}
    pub(crate) fn changes(_: &str, _: u64, _: u64) {}
    pub(crate) fn reconnect(_: &str) {}
    pub(crate) fn refused(_: &str) {}
    pub(crate) fn service_config(_: &str, _: bool, _: usize) {}
    pub(crate) fn resync(_: &str) {}
    pub(crate) fn skipped(_: &str, _: u64) {}
    pub(crate) fn lease_lost(_: &[String]) {}
    pub(crate) fn registration_state(_: &[String], _: &crate::RegistrationState) {}
}

pub(crate) use imp::*;
