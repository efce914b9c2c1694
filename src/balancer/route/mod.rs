//! The route layer: which endpoint takes an attempt. It never sends.
//!
//! A call hands down a [`Plan`] (its deadline, whether it waits for an
//! endpoint, and under ring hash its key: grpc-go's `PickInfo`); a policy
//! answers with a [`Pick`] and never blocks (grpc-go's `Picker`); only
//! [`Router::pick`] waits, when no endpoint can take the call, and always
//! within the call's deadline, the no-endpoint timeout or the fail-fast
//! gate ([`wait`]).
//!
//! The policies, one file each: the cost-weighted pick ([`weighted`], the
//! default) and ring hash ([`ring_hash`]). Subsetting, outlier ejection and
//! health checks decide which endpoints are in the ready set at all, so
//! they live in the pool (`super::pool`).
//!
//! Which endpoint a retry or hedge goes to is the caller's `avoid` list:
//! the weighted pick takes any endpoint not in it while one can take the
//! call; ring hash stays on the key's home and walks the ring past an
//! avoided or unusable one only.

pub(crate) mod ring_hash;
mod wait;
mod weighted;
mod wrr;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::time::Instant;

use super::error::BoxError;
use super::pool::{Ready, Shared};
use crate::service_config::{HashHeader, WeightedRoundRobinConfig};
pub(crate) use ring_hash::RingPlan;
pub(crate) use wait::WaitConfig;

/// What holds for one call's attempts: what the call layer tells the
/// policies (grpc-go's `PickInfo`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// The call's deadline, if any.
    pub(crate) deadline: Option<Instant>,
    /// Fail at once while no endpoint is in rotation (false: gRPC's
    /// wait-for-ready, until the deadline).
    pub(crate) fail_fast: bool,
    /// Under ring hash, the call's key and the ring's settings.
    pub(crate) ring: Option<RingPlan>,
    /// Under weighted round robin, its settings. Neither: the cost-weighted
    /// pick.
    pub(crate) wrr: Option<WeightedRoundRobinConfig>,
}

/// One policy's choice.
pub(crate) enum Pick {
    Endpoint(Arc<Ready>),
    /// Every usable endpoint is at its server's stream limit.
    Full,
    /// No usable endpoint.
    Empty,
}

/// The endpoint an attempt goes to, and when it was picked (µs, as
/// `Load::now`): the attempt starts its account there with the pick's clock
/// read rather than a second one.
pub(crate) struct Picked {
    pub(crate) ep: Arc<Ready>,
    pub(crate) at: u64,
}

/// The pool as calls see it, with how long they may wait on it.
pub(crate) struct Router {
    pub(crate) pool: Arc<Shared>,
    pub(crate) wait: WaitConfig,
    rings: ring_hash::Rings,
    wrr: wrr::Wrr,
    /// Calls under ring hash that lacked the configured hash header, and
    /// when that was last logged (ms since `since`, +1; 0: never).
    unkeyed: (AtomicU64, AtomicU64),
    since: Instant,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("service", &self.pool.service)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl Router {
    pub(crate) fn new(pool: Arc<Shared>, wait: WaitConfig) -> Self {
        Self {
            pool,
            wait,
            rings: ring_hash::Rings::default(),
            wrr: wrr::Wrr::new(),
            unkeyed: Default::default(),
            since: Instant::now(),
        }
    }

    /// A call's key under ring hash: the hash of its `header` values.
    /// Without them the key is random (A76), so the call has no affinity:
    /// a header name nobody sends (a typo, a header set by a proxy this
    /// client is not behind) would make ring hash a random pick in
    /// silence. Each such call is counted, and logged at most once a
    /// minute with the header's name.
    pub(crate) fn key(&self, headers: &http::HeaderMap, header: &HashHeader) -> u64 {
        if let Some(hash) = ring_hash::request_hash(headers, header) {
            return hash;
        }
        if let Some(name) = &header.0 {
            let n = self.unkeyed.0.fetch_add(1, Ordering::Relaxed) + 1;
            crate::metrics::unkeyed(&self.pool.target);
            let now = self.since.elapsed().as_millis() as u64 + 1;
            let last = self.unkeyed.1.load(Ordering::Relaxed);
            if (last == 0 || now.saturating_sub(last) >= 60_000)
                && self
                    .unkeyed
                    .1
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(service = %self.pool.service, header = %name, calls = n,
                    "calls carry no value of the service config's requestHashHeader: \
                     ring hash picks at random for them (no affinity)");
            }
        }
        rand::random()
    }

    /// An endpoint for the next attempt, never one of `avoid` while another
    /// can take it, waiting (within the plan's deadline) while none can.
    pub(crate) async fn pick(&self, plan: Plan, avoid: &[Arc<Ready>]) -> Result<Picked, BoxError> {
        let pool = &*self.pool;
        let deadline = plan.deadline;
        loop {
            let now = pool.policy.load.now();
            let ready = pool.ready();
            let found = match (&plan.ring, &plan.wrr) {
                (Some(r), _) => self.rings.ring(pool, &ready, r.config).pick(
                    r.hash,
                    r.config.hash_balance_factor,
                    avoid,
                ),
                (None, Some(w)) => self.wrr.pick(&ready, w, avoid, now),
                (None, None) => weighted::pick(&ready, ready.local, avoid, now),
            };
            match found {
                Pick::Endpoint(ep) => return Ok(Picked { ep, at: now }),
                Pick::Full => wait::for_capacity(pool, &self.wait, deadline).await?,
                Pick::Empty => match avoid {
                    // Only the endpoint the request just failed on is left: wait
                    // for its connector to act instead of spinning.
                    [bad] if ready.iter().any(|e| Arc::ptr_eq(e, bad)) => {
                        wait::for_removal(pool, bad, deadline).await?
                    }
                    _ => wait::for_endpoint(pool, &self.wait, plan).await?,
                },
            }
        }
    }

    /// Under ring hash, each endpoint's share of the keys (by registry key)
    /// on the ring last built.
    pub(crate) fn ring_shares(&self) -> std::collections::HashMap<String, f64> {
        ring_hash::shares(&self.pool)
    }
}
