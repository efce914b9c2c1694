//! Waiting for an endpoint or a free stream, always bounded: by the call's
//! deadline, the no-endpoint timeout, or the fail-fast gate; and at most
//! `max_waiting_calls` calls wait at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Plan;
use crate::balancer::error::{deadline_exceeded, BoxError};
use crate::balancer::pool::{PoolInfo, Ready, Shared};
use crate::time::{deadline_after, wait_until, Waited};
use crate::Error;

/// How long calls may wait for an endpoint, and how many at once.
#[derive(Debug, Clone)]
pub(crate) struct WaitConfig {
    pub(crate) no_endpoint_timeout: Duration,
    /// The default of a call's [`Plan::fail_fast`] (a method's
    /// `waitForReady` overrides it).
    pub(crate) fail_fast: bool,
    pub(crate) max_waiting: usize,
}

impl WaitConfig {
    /// When the fail-fast gate closes, for a balancer without endpoints
    /// since `empty_since`.
    pub(crate) fn gate(&self, empty_since: Instant) -> Instant {
        deadline_after(empty_since, self.no_endpoint_timeout)
    }
}

/// Counts a call waiting in the balancer; refuses it when too many do.
pub(crate) struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(shared: &'a Shared, cfg: &WaitConfig) -> Result<Self, BoxError> {
        let before = shared.waiting.fetch_add(1, Ordering::Relaxed);
        let guard = Waiting(&shared.waiting);
        if before >= cfg.max_waiting {
            return Err(Box::new(tonic::Status::resource_exhausted(format!(
                "{} calls to service {:?} are already waiting for an endpoint \
                 (max_waiting_calls)",
                cfg.max_waiting, shared.service
            ))));
        }
        Ok(guard)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Only the endpoint a request just failed on is left: waits for its
/// connector to act instead of spinning.
pub(super) async fn for_removal(
    shared: &Shared,
    bad: &Arc<Ready>,
    deadline: Option<Instant>,
) -> Result<(), BoxError> {
    let listed = || shared.ready().iter().any(|e| Arc::ptr_eq(e, bad));
    // Subscribe first, then look again, so no change is missed.
    let mut info = shared.info.subscribe();
    if !listed() {
        return Ok(());
    }
    let changed = match deadline {
        Some(d) => tokio::time::timeout_at(d, info.changed()).await.is_ok(),
        None => info.changed().await.is_ok(),
    };
    if changed {
        return Ok(());
    }
    Err(Box::new(tonic::Status::unavailable(format!(
        "no endpoint of service {:?} could take the call: the connection to {} \
         closed before the request was sent",
        shared.service,
        bad.addr()
    ))))
}

/// Every endpoint is at its stream limit: waits for a free stream, until the
/// call's deadline (calls without one: the no-endpoint timeout).
pub(super) async fn for_capacity(
    shared: &Shared,
    cfg: &WaitConfig,
    deadline: Option<Instant>,
) -> Result<(), BoxError> {
    let _waiting = Waiting::enter(shared, cfg)?;
    let notified = shared.policy.capacity.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    // A stream may have been freed between the pick and `enable`.
    if shared.ready().iter().any(|e| e.has_capacity()) {
        return Ok(());
    }
    let limit = deadline.unwrap_or_else(|| deadline_after(Instant::now(), cfg.no_endpoint_timeout));
    // An endpoint joining or leaving also changes the picture.
    let mut info = shared.info.subscribe();
    tokio::select! {
        () = notified => Ok(()),
        _ = info.changed() => Ok(()),
        () = tokio::time::sleep_until(limit) => {
            let n = shared.ready().len();
            let status = tonic::Status::resource_exhausted(format!(
                "all {n} endpoint(s) of service {:?} are at their servers' concurrent stream limit",
                shared.service
            ));
            Err(Box::new(if deadline.is_some() {
                deadline_exceeded(format_args!("waiting for a free stream: {}", status.message()))
            } else {
                status
            }))
        }
    }
}

/// Waits for an endpoint to join the rotation, or fails saying why there is
/// none: `DEADLINE_EXCEEDED` when the call's deadline ended the wait (as
/// grpc-go's pick does), `UNAVAILABLE` otherwise. Fails at once while the
/// fail-fast gate is closed: no endpoint for longer than the no-endpoint
/// timeout.
pub(super) async fn for_endpoint(
    shared: &Shared,
    cfg: &WaitConfig,
    plan: Plan,
) -> Result<(), BoxError> {
    let Plan {
        deadline,
        fail_fast,
        ..
    } = plan;
    let now = Instant::now();
    let Some(empty_since) = shared.info.borrow().empty_since else {
        return Ok(()); // one joined since the pick
    };
    let gate = cfg.gate(empty_since);
    let limit = if fail_fast {
        deadline.map_or(gate, |d| d.min(gate))
    } else {
        deadline.unwrap_or_else(|| deadline_after(now, cfg.no_endpoint_timeout))
    };
    if limit > now {
        let _waiting = Waiting::enter(shared, cfg)?;
        let mut info = shared.info.subscribe();
        match wait_until(&mut info, limit, |i| i.ready > 0).await {
            Waited::Ready => return Ok(()),
            Waited::Gone => return Err(Box::new(Error::TaskGone("balancer"))),
            Waited::TimedOut => {}
        }
    }
    let PoolInfo {
        registered,
        filtered_out,
        last_error,
        empty_since,
        ..
    } = shared.info.borrow().clone();
    let service = &shared.service;
    let etcd = shared.etcd.as_ref().map(|s| s.borrow().clone());
    let reason = match (registered, filtered_out) {
        (0, 0) => match etcd {
            // Discovery never reached etcd: say so, not "not registered".
            Some(s) if !s.synced => format!(
                "etcd unreachable ({}); no instance known for service {service:?}",
                s.last_error
                    .map_or_else(|| "no answer yet".into(), |e| e.to_string())
            ),
            Some(crate::WatchStatus {
                last_error: Some(e),
                ..
            }) => format!(
                "no instance of service {service:?} was registered when etcd was last \
                 reached (etcd failing now: {e})"
            ),
            _ => format!("no instance of service {service:?} is registered in etcd"),
        },
        (0, n) => format!(
            "{n} instance(s) of service {service:?} are registered but none passes the filter"
        ),
        (n, _) => format!(
            "{n} instance(s) of service {service:?} are registered but none is reachable \
             (last error: {})",
            last_error.as_deref().unwrap_or("none yet")
        ),
    };
    let empty_for = empty_since.map_or(Duration::ZERO, |t| t.elapsed());
    let now = Instant::now();
    if deadline.is_some_and(|d| d <= now && (!fail_fast || d <= gate)) {
        return Err(Box::new(deadline_exceeded(format_args!(
            "waiting for an endpoint: {reason}; no endpoint in rotation for {} ms",
            empty_for.as_millis()
        ))));
    }
    let gate_closed = fail_fast && now >= gate;
    if gate_closed {
        crate::metrics::fail_fast(&shared.target, true);
    }
    Err(Box::new(tonic::Status::unavailable(format!(
        "{reason}; no endpoint in rotation for {} ms{}",
        empty_for.as_millis(),
        if gate_closed {
            " (failing fast until one is ready)"
        } else {
            ""
        }
    ))))
}
