//! What an endpoint's server says about its own load (ORCA reports, gRFC
//! A51), turned into the weight weighted round robin gives it (gRFC A58):
//!
//! ```text
//! weight = qps / (utilization + eps / qps × errorUtilizationPenalty)
//! ```
//!
//! with the report's `application_utilization`, else its CPU utilization. A
//! report without calls or utilization leaves the weight as it was. The
//! weight counts only once reports have come in for the blackout period
//! (10 s) and while the last is younger than the expiration period (3 min);
//! before and after, it is unknown and the scheduler gives the endpoint the
//! mean weight. A reconnected endpoint is a new `Ready`: it starts over,
//! blackout included, as in grpc-go.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::endpoint::Ready;
use super::health::OnConnection;
use crate::backoff::Backoff;
use crate::orca::OrcaLoadReport;
use crate::service_config::{LoadBalancing, WeightedRoundRobinConfig};
use crate::ServiceConfigStatus;

/// One endpoint's reported weight (all µs on the pool's `Load` clock).
#[derive(Debug, Default)]
pub(crate) struct ReportedWeight {
    /// The weight from the last report (`f64` bits; 0: none yet).
    weight: AtomicU64,
    /// When the first report of the current run came (0: none).
    non_empty_since: AtomicU64,
    /// When the last report came.
    last_updated: AtomicU64,
}

impl ReportedWeight {
    /// Takes `report`, received at `now`.
    pub(crate) fn update(&self, report: &OrcaLoadReport, penalty: f64, now: u64) {
        let utilization = if report.application_utilization > 0.0 {
            report.application_utilization
        } else {
            report.cpu_utilization
        };
        let qps = report.rps_fractional;
        if !(utilization > 0.0 && qps > 0.0) {
            return;
        }
        let error_rate = report.eps.max(0.0) / qps;
        let weight = qps / (utilization + error_rate * penalty);
        if !weight.is_finite() || weight <= 0.0 {
            return;
        }
        // `now` is at least 1: the pool's clock starts at 1 µs.
        let now = now.max(1);
        self.weight.store(weight.to_bits(), Ordering::Relaxed);
        self.last_updated.store(now, Ordering::Relaxed);
        let _ = self
            .non_empty_since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The weight to schedule by at `now`: 0 while unknown (no report yet,
    /// still in the blackout period, or the last report expired; an expired
    /// run starts over, blackout included).
    pub(crate) fn weight(&self, config: &WeightedRoundRobinConfig, now: u64) -> f64 {
        let last = self.last_updated.load(Ordering::Relaxed);
        if last == 0 {
            return 0.0;
        }
        if now.saturating_sub(last) >= config.weight_expiration_period.as_micros() as u64 {
            self.non_empty_since.store(0, Ordering::Relaxed);
            return 0.0;
        }
        let since = self.non_empty_since.load(Ordering::Relaxed);
        let blackout = config.blackout_period.as_micros() as u64;
        if blackout > 0 && (since == 0 || now.saturating_sub(since) < blackout) {
            return 0.0;
        }
        f64::from_bits(self.weight.load(Ordering::Relaxed))
    }
}

/// Out-of-band reports (A58's `enableOobLoadReport`): while the service
/// config asks for them, one `StreamCoreMetrics` stream on `ep`'s
/// connection, at `oobReportingPeriod`, feeds its weight. Otherwise it
/// waits for the config to change, costing nothing. A stream that ends is
/// opened again with back-off (reset by every report); a server without
/// the service (`UNIMPLEMENTED`) is not asked again until the config
/// changes. Runs until aborted (the connection's end).
pub(crate) async fn follow(ep: Arc<Ready>, mut config: watch::Receiver<ServiceConfigStatus>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let wanted = match &config.borrow_and_update().config.load_balancing {
            LoadBalancing::WeightedRoundRobin(w) if w.enable_oob_load_report => Some(*w),
            _ => None,
        };
        let Some(wrr) = wanted else {
            if config.changed().await.is_err() {
                return;
            }
            continue;
        };
        let status = tokio::select! {
            status = stream(&ep, &wrr, &mut backoff) => status,
            changed = config.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        if status.code() == tonic::Code::Unimplemented {
            tracing::warn!(addr = %ep.addr(),
                "the server does not stream its load reports (weighted_round_robin \
                 with enableOobLoadReport): its weight stays unknown");
            if config.changed().await.is_err() {
                return;
            }
            continue;
        }
        tracing::debug!(addr = %ep.addr(), %status, "load report stream ended");
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            changed = config.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// One out-of-band stream: feeds `ep`'s weight until the stream ends.
async fn stream(
    ep: &Arc<Ready>,
    wrr: &WeightedRoundRobinConfig,
    backoff: &mut Backoff,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(OnConnection(ep.clone()));
    if let Err(e) = grpc.ready().await {
        return tonic::Status::unavailable(e.to_string());
    }
    let mut reports = match crate::orca::open(&mut grpc, wrr.oob_reporting_period).await {
        Ok(reports) => reports,
        Err(status) => return status,
    };
    loop {
        match reports.message().await {
            Ok(Some(report)) => {
                backoff.reset();
                ep.reported
                    .update(&report, wrr.error_utilization_penalty, ep.load.now());
            }
            Ok(None) => return tonic::Status::unavailable("the load report stream ended"),
            Err(status) => return status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: u64 = 1_000_000;

    fn report(qps: f64, cpu: f64, app: f64, eps: f64) -> OrcaLoadReport {
        OrcaLoadReport {
            rps_fractional: qps,
            cpu_utilization: cpu,
            application_utilization: app,
            eps,
            ..OrcaLoadReport::default()
        }
    }

    #[test]
    fn weight_is_qps_over_utilization_with_errors_penalised() {
        let c = WeightedRoundRobinConfig::default();
        let w = ReportedWeight::default();
        w.update(&report(100.0, 0.5, 0.0, 0.0), 1.0, S);
        assert_eq!(w.weight(&c, 12 * S), 200.0, "qps / cpu");
        // The application's utilization wins over the CPU's.
        w.update(&report(100.0, 0.5, 0.25, 0.0), 1.0, 12 * S);
        assert_eq!(w.weight(&c, 12 * S), 400.0);
        // Half the calls failing, penalty 1: utilization + 0.5.
        w.update(&report(100.0, 0.5, 0.0, 50.0), 1.0, 12 * S);
        assert_eq!(w.weight(&c, 12 * S), 100.0);
        // A report without calls or utilization changes nothing.
        w.update(&report(0.0, 0.5, 0.0, 0.0), 1.0, 13 * S);
        w.update(&report(100.0, 0.0, 0.0, 0.0), 1.0, 13 * S);
        assert_eq!(w.weight(&c, 13 * S), 100.0);
    }

    #[test]
    fn blackout_then_weight_then_expiry_and_a_new_blackout() {
        let c = WeightedRoundRobinConfig {
            blackout_period: Duration::from_secs(10),
            weight_expiration_period: Duration::from_secs(180),
            ..WeightedRoundRobinConfig::default()
        };
        let w = ReportedWeight::default();
        assert_eq!(w.weight(&c, S), 0.0, "no report yet");
        w.update(&report(10.0, 1.0, 0.0, 0.0), 1.0, S);
        assert_eq!(w.weight(&c, 10 * S), 0.0, "in the blackout");
        assert_eq!(w.weight(&c, 11 * S), 10.0, "after it");
        assert_eq!(w.weight(&c, 181 * S), 0.0, "expired");
        // Reports again: a new blackout.
        w.update(&report(10.0, 1.0, 0.0, 0.0), 1.0, 200 * S);
        assert_eq!(w.weight(&c, 205 * S), 0.0);
        assert_eq!(w.weight(&c, 210 * S), 10.0);
        // No blackout configured: at once.
        let none = WeightedRoundRobinConfig {
            blackout_period: Duration::ZERO,
            ..c
        };
        let fresh = ReportedWeight::default();
        fresh.update(&report(10.0, 1.0, 0.0, 0.0), 1.0, S);
        assert_eq!(fresh.weight(&none, S), 10.0);
    }
}
