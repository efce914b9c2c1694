//! Counters and gauges through the [`metrics`](https://docs.rs/metrics)
//! facade (feature `metrics`; without it these compile to nothing).
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `tonic_etcd_endpoints` | gauge | `prefix` | instances in a Discover's or Catalog's view |
//! | `tonic_etcd_changes_total` | counter | `prefix`, `kind` (`insert`/`remove`) | changes applied to a view |
//! | `tonic_etcd_watch_reconnects_total` | counter | `prefix` | watches re-established after a failure |
//! | `tonic_etcd_watch_resyncs_total` | counter | `prefix` | re-listings after compaction |
//! | `tonic_etcd_skipped_entries_total` | counter | `prefix` | undecodable entries skipped |
//! | `tonic_etcd_lease_losses_total` | counter | `service` | leases lost and replaced |
//! | `tonic_etcd_registration_state` | gauge | `service` | 0 registering, 1 registered, 2 lost, 3 retrying, 4 deregistered |
//! | `tonic_etcd_balancer_endpoints` | gauge | `service`, `state` (`ready`/`ejected`/`unhealthy`) | a Balancer's endpoints by state |
//! | `tonic_etcd_balancer_ejections_total` | counter | `service` | endpoints ejected by outlier detection |
//! | `tonic_etcd_balancer_connect_failures_total` | counter | `service` | failed connection attempts |
//! | `tonic_etcd_balancer_fail_fast` | gauge | `service` | 1 while the fail-fast gate is closed |

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

    pub(crate) fn fail_fast(service: &str, closed: bool) {
        metrics::gauge!("tonic_etcd_balancer_fail_fast", "service" => service.to_owned())
            .set(if closed { 1.0 } else { 0.0 });
    }
}

#[cfg(not(feature = "metrics"))]
mod balancer {
    pub(crate) fn balancer_endpoints(_: &str, _: &'static str, _: usize) {}
    pub(crate) fn ejection(_: &str) {}
    pub(crate) fn connect_failure(_: &str) {}
    pub(crate) fn fail_fast(_: &str, _: bool) {}
}

pub(crate) use balancer::*;

#[cfg(not(feature = "metrics"))]
mod imp {
    pub(crate) fn endpoints(_: &str, _: usize) {}
    pub(crate) fn changes(_: &str, _: u64, _: u64) {}
    pub(crate) fn reconnect(_: &str) {}
    pub(crate) fn resync(_: &str) {}
    pub(crate) fn skipped(_: &str, _: u64) {}
    pub(crate) fn lease_lost(_: &[String]) {}
    pub(crate) fn registration_state(_: &[String], _: &crate::RegistrationState) {}
}

pub(crate) use imp::*;
