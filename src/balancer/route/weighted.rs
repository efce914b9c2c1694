//! Choosing an endpoint for a call.
//!
//! Power of two choices has a floor: with half of four endpoints slow, both
//! random picks land on the slow half a sixth of the time, whatever the load
//! signal says (brpc measured p99 7.7 ms for best-of-2 against 0.3 ms for
//! best-of-4 in that setup). So the pick looks at every endpoint when there
//! are few (up to [`FULL_SCAN`]), else at [`SAMPLE`] random ones, and draws
//! among them at random with a probability proportional to
//!
//! ```text
//! weight × slow-start ramp × health² × min(1, TOLERANCE × reference cost / cost)⁴
//! ```
//!
//! where the reference is the first quartile of the candidates' costs (the
//! cheapest, with four or fewer): against the minimum of many noisy
//! estimates, healthy endpoints would look costly by chance.
//!
//! where an endpoint's cost is its latency × (calls in flight / weight + 1)
//! (see [`crate::balancer::pool::load`]).
//!
//! Endpoints within `TOLERANCE` of the reference share calls by weight alone
//! (so weights hold exactly between equal backends, as with gRPC's weighted
//! round robin); a costlier one's share falls with the fourth power of the
//! excess, so one 10× slower gets about 0.4% of the share of a fast one: enough to
//! keep sampling it, too little to hurt the tail. An endpoint idle for the
//! probe interval is given the call outright (see [`crate::balancer::pool::load`]).
//!
//! Locality: the endpoints of the client's zone come first in the ready set;
//! the pick stays among them while any of them can take the call, and falls
//! back to all endpoints otherwise.

use std::sync::Arc;

use rand::Rng;

use super::Pick;
use crate::balancer::pool::Ready;

/// Up to this many endpoints, every one is a candidate.
pub(crate) const FULL_SCAN: usize = 16;
/// Beyond [`FULL_SCAN`], this many random candidates.
pub(crate) const SAMPLE: usize = 8;
/// Endpoints whose cost is within this factor of the cheapest are alike.
const TOLERANCE: f64 = 2.5;

/// Picks from `set`, whose first `local` entries are in the client's zone,
/// never one of `avoid`, judging costs at `now` (µs, as `Load::now`).
pub(crate) fn pick(set: &[Arc<Ready>], local: usize, avoid: &[Arc<Ready>], now: u64) -> Pick {
    if local > 0 && local < set.len() {
        if let found @ Pick::Endpoint(_) = pick_in(&set[..local], avoid, now) {
            return found;
        }
    }
    pick_in(set, avoid, now)
}

fn pick_in(set: &[Arc<Ready>], avoid: &[Arc<Ready>], now: u64) -> Pick {
    let n = set.len();
    if n == 0 {
        return Pick::Empty;
    }
    let mut rng = rand::rng();
    let mut idx = [0usize; FULL_SCAN];
    let count = if n <= FULL_SCAN {
        for (i, slot) in idx.iter_mut().enumerate().take(n) {
            *slot = i;
        }
        n
    } else {
        for (slot, i) in idx
            .iter_mut()
            .zip(rand::seq::index::sample(&mut rng, n, SAMPLE))
        {
            *slot = i;
        }
        SAMPLE
    };
    let usable = |e: &Arc<Ready>| !avoid.iter().any(|bad| Arc::ptr_eq(e, bad));

    // Candidates that can take a call, their cost; a due probe wins at once.
    let mut cost = [0f64; FULL_SCAN];
    let mut open = [false; FULL_SCAN];
    let mut any_usable = false;
    let mut cheapest = f64::INFINITY;
    for k in 0..count {
        let e = &set[idx[k]];
        if !usable(e) {
            continue;
        }
        any_usable = true;
        if !e.has_capacity() {
            continue;
        }
        if e.load.claim_probe(now) {
            return Pick::Endpoint(e.clone());
        }
        open[k] = true;
        cost[k] = e.load.cost(now, f64::from(e.weight()));
        cheapest = cheapest.min(cost[k]);
    }
    if !cheapest.is_finite() {
        // Sampled candidates were all full or excluded: any open endpoint.
        if let Some(e) = set.iter().find(|e| usable(e) && e.has_capacity()) {
            return Pick::Endpoint(e.clone());
        }
        return if any_usable || set.iter().any(usable) {
            Pick::Full
        } else {
            Pick::Empty
        };
    }

    // The reference: the first quartile of the open candidates' costs (the
    // cheapest, with four or fewer). Against the minimum of many noisy
    // estimates, healthy endpoints would look costly by chance.
    let mut sorted = [0f64; FULL_SCAN];
    let mut open_count = 0;
    for k in 0..count {
        if open[k] {
            sorted[open_count] = cost[k];
            open_count += 1;
        }
    }
    let quartile = (open_count - 1) / 4;
    let (_, reference, _) =
        sorted[..open_count].select_nth_unstable_by(quartile, |a, b| a.total_cmp(b));
    let cheapest = *reference;

    let mut share = [0f64; FULL_SCAN];
    let mut total = 0.0;
    for k in 0..count {
        if !open[k] {
            continue;
        }
        let e = &set[idx[k]];
        let relative = (TOLERANCE * cheapest / cost[k]).min(1.0);
        let health = e.load.health().max(0.01);
        share[k] = e.share_factor(now) * health * health * relative.powi(4);
        total += share[k];
    }
    let mut draw = if total > 0.0 && total.is_finite() {
        rng.random::<f64>() * total
    } else {
        0.0
    };
    let mut last = None;
    for k in 0..count {
        if !open[k] {
            continue;
        }
        last = Some(k);
        if draw < share[k] {
            return Pick::Endpoint(set[idx[k]].clone());
        }
        draw -= share[k];
    }
    // Rounding left the draw past the end: the last open candidate.
    match last {
        Some(k) => Pick::Endpoint(set[idx[k]].clone()),
        None => Pick::Full,
    }
}
