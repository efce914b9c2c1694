//! gRPC's weighted round robin (gRFC A58): calls go to the endpoints in
//! proportion to the weights their servers' load reports give them (see
//! `pool::orca`), through grpc-go's and C-core's static stride scheduler.
//!
//! The scheduler is built from the ready set and the weights at most once
//! per `weightUpdatePeriod` (and when the ready set changes), on the call
//! that finds it stale: nothing runs while the client is idle. Building:
//! unknown weights (no report yet, blackout, expired) become the mean of the
//! known ones, all weights are capped at 10× their mean and floored at 1 %
//! of it (C-core's bounds, so that a pick takes a few rounds at most), and
//! each is multiplied by the endpoint's own factor (an operator's weight,
//! slow start: gRFC A100 applies it on top of A58's). Without any known
//! weight it is plain round robin by those factors.
//!
//! A pick takes the scheduler's next endpoint, passing over those the call
//! must avoid (a retry's previous endpoints) and those at their server's
//! stream limit, in scheduler order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::Pick;
use crate::balancer::pool::{Ready, ReadySet};
use crate::service_config::WeightedRoundRobinConfig;

/// The scheduler's weights are scaled so that the largest is this.
const MAX_WEIGHT: u64 = u16::MAX as u64;
/// Weights are capped at this many times their mean.
const MAX_RATIO: f64 = 10.0;
/// Weights are floored at this share of their mean.
const MIN_RATIO: f64 = 0.01;

/// One Balancer's scheduler, rebuilt as weights and endpoints change.
#[derive(Default)]
pub(crate) struct Wrr {
    current: RwLock<Option<Arc<Scheduler>>>,
    /// Picks so far (starts at a random point, so that clients built at
    /// the same time do not step in lockstep).
    sequence: AtomicU64,
}

impl std::fmt::Debug for Wrr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wrr").finish_non_exhaustive()
    }
}

struct Scheduler {
    /// The ready set it was built for.
    set: Arc<ReadySet>,
    weights: Vec<u16>,
    /// When it was built (µs, as `Load::now`).
    built: u64,
}

impl Wrr {
    pub(crate) fn new() -> Self {
        Self {
            current: RwLock::default(),
            sequence: AtomicU64::new(rand::random::<u32>().into()),
        }
    }

    /// The next endpoint of `set` by weight, never one of `avoid`, at `now`
    /// (µs, as `Load::now`).
    pub(crate) fn pick(
        &self,
        set: &Arc<ReadySet>,
        config: &WeightedRoundRobinConfig,
        avoid: &[Arc<Ready>],
        now: u64,
    ) -> Pick {
        let n = set.len();
        if n == 0 {
            return Pick::Empty;
        }
        let scheduler = self.scheduler(set, config, now);
        let mut full = false;
        // Each endpoint comes up once per round of about max/mean ≤ 10
        // steps; a few rounds find one that can take the call if any can.
        for _ in 0..n.saturating_mul(4).max(8) {
            let ep = &set[scheduler.next(&self.sequence)];
            if avoid.iter().any(|a| Arc::ptr_eq(a, ep)) {
                continue;
            }
            if !ep.has_capacity() {
                full = true;
                continue;
            }
            return Pick::Endpoint(ep.clone());
        }
        // Every endpoint the scheduler offered was avoided or full: any other.
        for ep in set.iter() {
            if avoid.iter().any(|a| Arc::ptr_eq(a, ep)) {
                continue;
            }
            if ep.has_capacity() {
                return Pick::Endpoint(ep.clone());
            }
            full = true;
        }
        if full {
            Pick::Full
        } else {
            Pick::Empty
        }
    }

    /// The scheduler for `set`, rebuilt when it is for another set or
    /// older than the update period.
    fn scheduler(
        &self,
        set: &Arc<ReadySet>,
        config: &WeightedRoundRobinConfig,
        now: u64,
    ) -> Arc<Scheduler> {
        let period = config.weight_update_period.as_micros() as u64;
        let fresh =
            |s: &Arc<Scheduler>| Arc::ptr_eq(&s.set, set) && now.saturating_sub(s.built) < period;
        if let Some(s) = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            if fresh(s) {
                return s.clone();
            }
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = current.as_ref() {
            if fresh(s) {
                return s.clone();
            }
        }
        let reported: Vec<f64> = set
            .iter()
            .map(|ep| ep.reported.weight(config, now))
            .collect();
        let factors: Vec<f64> = set.iter().map(|ep| ep.share_factor(now)).collect();
        let built = Arc::new(Scheduler {
            set: set.clone(),
            weights: scale(&reported, &factors),
            built: now,
        });
        *current = Some(built.clone());
        built
    }
}

/// The scheduler's integer weights for reported weights `reported` (0:
/// unknown) and the endpoints' own factors.
fn scale(reported: &[f64], factors: &[f64]) -> Vec<u16> {
    let known: Vec<f64> = reported.iter().copied().filter(|w| *w > 0.0).collect();
    let mean_known = if known.is_empty() {
        1.0
    } else {
        known.iter().sum::<f64>() / known.len() as f64
    };
    let raw: Vec<f64> = reported
        .iter()
        .zip(factors)
        .map(|(w, f)| if *w > 0.0 { *w } else { mean_known } * f.max(0.0))
        .collect();
    let mean = raw.iter().sum::<f64>() / raw.len().max(1) as f64;
    if !(mean > 0.0 && mean.is_finite()) {
        return vec![1; raw.len()];
    }
    let (low, high) = (mean * MIN_RATIO, mean * MAX_RATIO);
    let capped: Vec<f64> = raw.iter().map(|w| w.clamp(low, high)).collect();
    let max = capped.iter().copied().fold(0.0, f64::max);
    capped
        .iter()
        .map(|w| ((w / max * MAX_WEIGHT as f64).round() as u64).clamp(1, MAX_WEIGHT) as u16)
        .collect()
}

impl Scheduler {
    /// The next index: each endpoint comes up `weight` times in
    /// [`MAX_WEIGHT`] rounds, spread across them (C-core's
    /// `StaticStrideScheduler::Pick`).
    fn next(&self, sequence: &AtomicU64) -> usize {
        let n = self.weights.len() as u64;
        // At most max/mean ≤ 10 steps on average (weights are capped); the
        // bound only guards against a pathological case.
        for _ in 0..n.saturating_mul(MAX_RATIO as u64 * 100).max(1_000) {
            let seq = sequence.fetch_add(1, Ordering::Relaxed);
            let index = seq % n;
            let generation = seq / n;
            let weight = u64::from(self.weights[index as usize]);
            let offset = index * (MAX_WEIGHT / 2);
            if (weight * generation + offset) % MAX_WEIGHT >= MAX_WEIGHT - weight {
                return index as usize;
            }
        }
        (sequence.fetch_add(1, Ordering::Relaxed) % n) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scheduler(weights: Vec<u16>) -> Scheduler {
        Scheduler {
            set: Arc::new(ReadySet::default()),
            weights,
            built: 0,
        }
    }

    /// How often each index comes up in `picks` picks.
    fn counts(s: &Scheduler, picks: usize, start: u64) -> Vec<usize> {
        let seq = AtomicU64::new(start);
        let mut c = vec![0; s.weights.len()];
        for _ in 0..picks {
            c[s.next(&seq)] += 1;
        }
        c
    }

    #[test]
    fn unknown_weights_are_the_mean_and_extremes_are_bounded() {
        assert_eq!(
            scale(&[0.0, 0.0], &[1.0, 1.0]),
            [65535, 65535],
            "round robin"
        );
        let w = scale(&[100.0, 0.0, 300.0], &[1.0, 1.0, 1.0]);
        assert_eq!(w, [21845, 43690, 65535], "the unknown one gets 200");
        // An operator's weight 2 doubles an endpoint's share.
        let w = scale(&[100.0, 100.0], &[2.0, 1.0]);
        assert_eq!(w, [65535, 32768]);
        // 1,000× the others: capped at 10× the mean.
        let w = scale(&[1.0, 1.0, 1.0, 1000.0], &[1.0; 4]);
        assert!(w[3] == 65535 && w[0] > 65535 / 1000, "{w:?}");
    }

    proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(64))]

        /// For any weights, over whole cycles of the scheduler each endpoint
        /// gets calls in proportion to its weight (within one call per
        /// endpoint and cycle), from any starting point of the sequence.
        #[test]
        fn shares_follow_the_weights(
            weights in proptest::collection::vec(1u16..=u16::MAX, 1..6),
            start in 0u64..1_000_000,
        ) {
            let s = scheduler(weights.clone());
            let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
            // A few thousand picks: shares within 2 percentage points.
            let picks = 4_000;
            let c = counts(&s, picks, start);
            for (i, w) in weights.iter().enumerate() {
                let want = f64::from(*w) / total as f64;
                let got = c[i] as f64 / picks as f64;
                prop_assert!(
                    (got - want).abs() < 0.005,
                    "endpoint {i}: share {got:.4}, weight share {want:.4} ({weights:?}, {c:?})"
                );
            }
        }
    }

    #[test]
    fn a_pick_takes_a_few_steps_at_most() {
        // Max/mean is capped at 10, so a pick skips about 10 steps at most.
        let w = scale(&[1.0, 1.0, 1.0, 1000.0], &[1.0; 4]);
        let s = scheduler(w);
        let seq = AtomicU64::new(0);
        for _ in 0..1_000 {
            s.next(&seq);
        }
        let steps = seq.load(Ordering::Relaxed);
        assert!(steps < 1_000 * 12, "{steps} steps for 1,000 picks");
    }
}
