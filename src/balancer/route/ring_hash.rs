//! Ring hash (gRFC A42, A76), with optional bounded load: the same key goes
//! to the same endpoint while it is in rotation, from every client, and a
//! change of one endpoint moves only the keys that must move.
//!
//! * **The key**: `XXH64` of the request header named by
//!   `requestHashHeader` (several values joined by `,`), or a random key
//!   when there is no such header (A76).
//! * **The home**: weighted rendezvous hashing (highest random weight,
//!   Thaler and Ravishankar; the weighted form of Schindelhauer and
//!   Schomaker): for every registered endpoint, `u = XXH64(key hash ‖
//!   XXH64(id))` mapped to (0, 1), and the key's home is the endpoint with
//!   the largest `weight / −ln u`. The id is the instance's metadata
//!   `hash_key` when set (A76), else its instance id, not its address: an
//!   instance that re-registers at another address keeps its keys. Every
//!   client computes the same homes from the same instances, whatever
//!   order it learnt them in.
//! * **Only what must move, moves**: an endpoint's score for a key depends
//!   on that endpoint alone, so a join takes keys only for the newcomer, a
//!   leave, drain or ejection moves only the leaver's keys, and a weight
//!   change moves keys only to or from the endpoint whose weight changed.
//!   No key ever moves between two endpoints that stay (property-tested
//!   over random fleets of 1–200 endpoints with weights). Each endpoint's
//!   expected share is exactly its weight's share.
//! * **Why not a ring of points**: A42 sizes its ring from `minRingSize` and
//!   `maxRingSize` and gives each endpoint a number of entries that depends
//!   on the whole fleet; every join or leave then re-draws the survivors'
//!   entries and moves keys between them (4 → 3 replicas moved 48 % of the
//!   keys, 24 % between survivors, in the version before this one). A ring
//!   whose entry count per endpoint is fixed (Ketama) keeps keys but needs
//!   a reference weight, which the fleet again defines. Rendezvous hashing
//!   needs neither, at O(n) hashes per pick (about 10 ns each: 2 µs for 200
//!   endpoints, nothing for the usual handful). `minRingSize` and
//!   `maxRingSize` are still parsed and validated as A42 says, so a config
//!   written for grpc-go is accepted, but they size nothing here: there is
//!   no ring to size. grpc-go, grpc-java and Envoy map keys to other
//!   endpoints than this crate does (they hash addresses onto a ring), so
//!   clients of different stacks do not share homes.
//! * **Out of rotation** (connecting, ejected, drained, unhealthy): the key
//!   goes to its next-ranked endpoint and comes back when it returns; an
//!   endpoint at its stream limit is passed over the same way. Unlike a
//!   ring, whose neighbour takes all of an absent endpoint's keys, its keys
//!   spread over all the others by weight.
//! * **Retries and hedges**: a retry goes back to the key's home while it
//!   is in rotation (after its back-off: a cache keeps its hit), and only a
//!   transparent retry (the request never reached a server) moves on to the
//!   next-ranked endpoint. A hedge goes to an endpoint the call has not
//!   used, i.e. the next-ranked: under ring hash a hedge is a cache miss by
//!   design, useful only where a miss is cheaper than the tail it cuts.
//! * **Bounded load** (`hashBalanceFactor` c %, beyond A42; Envoy's
//!   `hash_balance_factor`, Mirrokni et al.): an endpoint may hold
//!   `ceil(ceil((calls in flight + 1) × c / 100) × its share of the weight)`
//!   calls. When the key's home is full, the key tries its own ranking in
//!   order (different keys of a hot endpoint overflow to different
//!   endpoints, no cascade onto one neighbour) until one has room, else the
//!   least loaded endpoint takes it.
//!
//! Locality ([`prefer_zone`](crate::BalancerBuilder::prefer_zone)), slow
//! start and the cost-weighted shares do not apply: a key's home is the
//! point of the policy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::HeaderMap;
use xxhash_rust::xxh64::xxh64;

use super::Pick;
use crate::balancer::pool::{Ready, ReadySet, Shared};
use crate::service_config::{HashHeader, RingHashConfig};
use crate::Instance;

/// One call's ring-hash routing: the key's hash and the ring's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingPlan {
    pub(crate) hash: u64,
    pub(crate) config: RingHashConfig,
}

/// The hash of a request's key: its `header` values joined by `,` (`None`
/// without them: the caller picks a random one, as A76 says).
pub(crate) fn request_hash(headers: &HeaderMap, header: &HashHeader) -> Option<u64> {
    let mut values = headers.get_all(header.0.as_ref()?).iter();
    let first = values.next()?;
    Some(match values.next() {
        None => xxh64(first.as_bytes(), 0),
        Some(second) => {
            let mut joined = first.as_bytes().to_vec();
            for v in std::iter::once(second).chain(values) {
                joined.push(b',');
                joined.extend_from_slice(v.as_bytes());
            }
            xxh64(&joined, 0)
        }
    })
}

/// A ring with the ready set and settings it was built from. It lives in
/// the pool's route cache, which the pool empties on every change: a ring
/// holds its endpoints' connections and must not outlive a change.
struct CachedRing {
    set: Arc<ReadySet>,
    config: RingHashConfig,
    ring: Arc<Ring>,
}

/// A balancer's rings: the scores of the last membership (kept while only
/// the ready set or the settings change: scores depend on neither), and
/// the lock that lets one call at a time build a ring.
#[derive(Default)]
pub(crate) struct Rings {
    points: Mutex<Option<CachedPoints>>,
}

/// A ring's scores with the members they were built for.
type CachedPoints = (Vec<Member>, Arc<Points>);

impl Rings {
    /// The ring of every registered endpoint of `pool` with `config`, and
    /// those of `set` in rotation: built once per ready set and membership,
    /// its scores once per membership.
    pub(crate) fn ring(
        &self,
        pool: &Shared,
        set: &Arc<ReadySet>,
        config: RingHashConfig,
    ) -> Arc<Ring> {
        let fresh = |cached: Option<Arc<CachedRing>>| match cached {
            Some(c) if Arc::ptr_eq(&c.set, set) && c.config == config => Some(c.ring.clone()),
            _ => None,
        };
        if let Some(ring) = fresh(pool.route_cache()) {
            return ring;
        }
        // One builder at a time; the others find its ring.
        let mut points = self.points.lock().unwrap_or_else(|p| p.into_inner());
        let cached = pool.route_cache::<CachedRing>();
        if let Some(ring) = fresh(cached.clone()) {
            return ring;
        }
        let instances = pool.instances();
        let members = members(instances.iter().map(|(key, instance)| {
            (
                key.clone(),
                stable_id(instance),
                pool.policy.weight_of(instance),
            )
        }));
        let points = match &*points {
            Some((m, p)) if *m == members => p.clone(),
            _ => {
                let p = self::points(&members);
                *points = Some((members.clone(), p.clone()));
                p
            }
        };
        let fresh_points = !matches!(&cached, Some(c) if c.ring.same_points(&points));
        let ring = Arc::new(Ring::new(points, &members, set));
        if fresh_points {
            let addrs: HashMap<&str, &str> = instances
                .iter()
                .map(|(key, i)| (key.as_str(), i.addr.as_str()))
                .collect();
            for (key, share) in ring.shares() {
                if let Some(addr) = addrs.get(key.as_str()) {
                    crate::metrics::ring_share(&pool.target, addr, share);
                }
            }
        }
        pool.set_route_cache(Arc::new(CachedRing {
            set: set.clone(),
            config,
            ring: ring.clone(),
        }));
        ring
    }
}

/// Each endpoint's share of the keys (by endpoint key) on the ring last
/// built, while it is in force.
pub(crate) fn shares(pool: &Shared) -> HashMap<String, f64> {
    pool.route_cache::<CachedRing>()
        .map(|c| c.ring.shares().into_iter().collect())
        .unwrap_or_default()
}

/// One registered endpoint as the ring sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    /// The endpoint's key in the balancer (its discovery key).
    pub(crate) key: String,
    /// What its scores are keyed by (see [`stable_id`]).
    pub(crate) id: String,
    pub(crate) weight: u32,
}

/// The members of a ring, sorted by id so that every client builds the
/// same ring from the same instances whatever order it learnt them in.
pub(crate) fn members(registered: impl Iterator<Item = (String, String, u32)>) -> Vec<Member> {
    let mut members: Vec<Member> = registered
        .map(|(key, id, weight)| Member { key, id, weight })
        .collect();
    members.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| a.key.cmp(&b.key)));
    members
}

/// The scores for `members` (built once per membership; see [`Ring`]).
pub(crate) fn points(members: &[Member]) -> Arc<Points> {
    let ids: Vec<(&str, u32)> = members.iter().map(|m| (m.id.as_str(), m.weight)).collect();
    Arc::new(Points::new(&ids))
}

/// The ring of every registered endpoint (as A42 builds it over every
/// address, whatever its state), with those in rotation now: an endpoint
/// out of rotation keeps its score and is passed over, so no other key
/// moves while it is away.
pub(crate) struct Ring {
    points: Arc<Points>,
    keys: Vec<String>,
    /// Each member's connection while it is in rotation.
    ready: Vec<Option<Arc<Ready>>>,
}

impl Ring {
    /// The ring of `members` over `points`, with the endpoints of `set` in
    /// rotation.
    pub(crate) fn new(points: Arc<Points>, members: &[Member], set: &[Arc<Ready>]) -> Self {
        let in_rotation: std::collections::HashMap<&str, &Arc<Ready>> =
            set.iter().map(|e| (e.key.as_str(), e)).collect();
        Self {
            points,
            keys: members.iter().map(|m| m.key.clone()).collect(),
            ready: members
                .iter()
                .map(|m| in_rotation.get(m.key.as_str()).map(|e| (*e).clone()))
                .collect(),
        }
    }

    /// The endpoint for `hash`, never one of `avoid` (endpoints the call
    /// already used), with bounded load when `factor` is set.
    pub(crate) fn pick(&self, hash: u64, factor: Option<u32>, avoid: &[Arc<Ready>]) -> Pick {
        let usable = |i: usize| {
            self.ready[i]
                .as_ref()
                .is_some_and(|e| !avoid.iter().any(|bad| Arc::ptr_eq(e, bad)))
        };
        let open = |i: usize| self.ready[i].as_ref().is_some_and(|e| e.has_capacity());
        let in_flight: Vec<usize> = match factor {
            Some(_) => self
                .ready
                .iter()
                .map(|e| e.as_ref().map_or(0, |e| e.load.pending()))
                .collect(),
            None => Vec::new(),
        };
        match self.points.choose(hash, factor, &usable, &open, &in_flight) {
            Choice::Endpoint(i) => match &self.ready[i] {
                Some(e) => Pick::Endpoint(e.clone()),
                None => Pick::Empty,
            },
            Choice::Full => Pick::Full,
            Choice::Empty => Pick::Empty,
        }
    }

    /// Whether this ring uses `points`.
    pub(crate) fn same_points(&self, points: &Arc<Points>) -> bool {
        Arc::ptr_eq(&self.points, points)
    }

    /// The share of the hash space each member owns, by endpoint key.
    pub(crate) fn shares(&self) -> Vec<(String, f64)> {
        self.keys
            .iter()
            .cloned()
            .zip(self.points.shares())
            .collect()
    }
}

/// What [`Points::choose`] found.
#[derive(Debug, PartialEq)]
enum Choice {
    Endpoint(usize),
    /// Every usable endpoint is at its stream limit.
    Full,
    /// No usable endpoint.
    Empty,
}

/// The scores of endpoints known by index: each one's id hash and share
/// of the weight (the "points" of a ring, without a ring).
pub(crate) struct Points {
    /// `XXH64(id)` of each endpoint.
    ids: Vec<u64>,
    /// Each endpoint's share of the weight, summing to 1.
    weights: Vec<f64>,
    /// Every weight is the same: the raw hash ranks, no logarithm needed.
    uniform: bool,
}

impl Points {
    /// The scores of `members` (stable id, weight). Depends on nothing but
    /// each member's own id and weight: no fleet-wide sizing.
    fn new(members: &[(&str, u32)]) -> Self {
        let total: f64 = members.iter().map(|(_, w)| f64::from((*w).max(1))).sum();
        let weights: Vec<f64> = members
            .iter()
            .map(|(_, w)| f64::from((*w).max(1)) / total)
            .collect();
        let uniform = members.windows(2).all(|w| w[0].1.max(1) == w[1].1.max(1));
        Self {
            ids: members
                .iter()
                .map(|(id, _)| xxh64(id.as_bytes(), 0))
                .collect(),
            weights,
            uniform,
        }
    }

    /// Endpoint `i`'s score for the key `hash`: larger wins. Uniformly
    /// random per (key, endpoint), independent of every other endpoint.
    fn score(&self, hash: u64, i: usize) -> f64 {
        let mut input = [0u8; 16];
        input[..8].copy_from_slice(&hash.to_le_bytes());
        input[8..].copy_from_slice(&self.ids[i].to_le_bytes());
        let h = xxh64(&input, 0);
        if self.uniform {
            return h as f64;
        }
        // u in (0, 1); weight / −ln u: the largest wins with probability
        // weight / total (the minimum of exponentials of rate weight).
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        self.weights[i] / -u.ln()
    }

    /// The endpoints in the key's order of preference.
    fn ranking(&self, hash: u64) -> Vec<usize> {
        let mut scored: Vec<(f64, usize)> = (0..self.ids.len())
            .map(|i| (self.score(hash, i), i))
            .collect();
        scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.into_iter().map(|(_, i)| i).collect()
    }

    /// The endpoint for `hash` among those `usable` says the call may use:
    /// the best-ranked that is `open` (below its stream limit); with
    /// bounded load (`factor` %, `in_flight` per endpoint) one with room.
    fn choose(
        &self,
        hash: u64,
        factor: Option<u32>,
        usable: &dyn Fn(usize) -> bool,
        open: &dyn Fn(usize) -> bool,
        in_flight: &[usize],
    ) -> Choice {
        let n = self.weights.len();
        let Some(home) = self.best(hash, |i| usable(i) && open(i)) else {
            return if (0..n).any(usable) {
                Choice::Full
            } else {
                Choice::Empty
            };
        };
        let Some(factor) = factor else {
            return Choice::Endpoint(home);
        };
        // Bounded load: the key's endpoint if it has room, else the next in
        // the key's own ranking, else the least loaded. Shares among the
        // endpoints in rotation, as Envoy weighs healthy hosts only.
        let total: usize = in_flight.iter().sum();
        let allowed = ((total + 1) as f64 * f64::from(factor) / 100.0).ceil();
        let weight: f64 = (0..n).filter(|&i| usable(i)).map(|i| self.weights[i]).sum();
        let room = |i: usize| {
            usable(i)
                && open(i)
                && (in_flight[i] as f64) < (allowed * self.weights[i] / weight).ceil()
        };
        if room(home) {
            return Choice::Endpoint(home);
        }
        if let Some(i) = self.ranking(hash).into_iter().find(|&i| room(i)) {
            return Choice::Endpoint(i);
        }
        let least = (0..n).filter(|&i| usable(i) && open(i)).min_by(|&a, &b| {
            let load = |i: usize| in_flight[i] as f64 / self.weights[i];
            load(a).total_cmp(&load(b))
        });
        Choice::Endpoint(least.unwrap_or(home))
    }

    /// The best-ranked endpoint for `hash` that `ok` accepts.
    fn best(&self, hash: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<(f64, usize)> = None;
        for i in 0..self.ids.len() {
            if !ok(i) {
                continue;
            }
            let score = self.score(hash, i);
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// The share of the keys each endpoint owns while all are in rotation:
    /// its share of the weight (exact in expectation).
    fn shares(&self) -> Vec<f64> {
        self.weights.clone()
    }
}

/// What an instance's scores are keyed by: metadata `hash_key`
/// (A76), else the instance id.
pub(crate) fn stable_id(instance: &Instance) -> String {
    instance
        .metadata
        .get("hash_key")
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| instance.id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("instance-{i}")).collect()
    }

    fn points(ids: &[String], weights: &[u32]) -> Points {
        let members: Vec<(&str, u32)> = ids
            .iter()
            .zip(weights)
            .map(|(id, w)| (id.as_str(), *w))
            .collect();
        Points::new(&members)
    }

    fn home(p: &Points, hash: u64) -> usize {
        match p.choose(hash, None, &|_| true, &|_| true, &[]) {
            Choice::Endpoint(i) => i,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shares_follow_weights() {
        let ids = ids(4);
        let weights = [1, 1, 2, 4];
        let p = points(&ids, &weights);
        let want = [0.125, 0.125, 0.25, 0.5];
        assert_eq!(p.shares(), want);
        // Keys drawn at random land by the same shares.
        let mut hits = [0u32; 4];
        for k in 0..40_000u64 {
            hits[home(&p, xxh64(&k.to_le_bytes(), 7))] += 1;
        }
        for (h, want) in hits.iter().zip(want) {
            let got = f64::from(*h) / 40_000.0;
            assert!((got / want - 1.0).abs() < 0.05, "{hits:?}");
        }
    }

    /// One endpoint of a fleet, as the property test changes it.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Change {
        Join(u32),
        Leave(usize),
        Weight(usize, u32),
    }

    /// Every key's home in a fleet of (id, weight).
    fn homes(fleet: &[(String, u32)], keys: &[u64]) -> Vec<String> {
        let members: Vec<(&str, u32)> = fleet.iter().map(|(id, w)| (id.as_str(), *w)).collect();
        let p = Points::new(&members);
        keys.iter().map(|k| fleet[home(&p, *k)].0.clone()).collect()
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(32))]

        /// The property users rely on: one endpoint's join, leave (a drain
        /// or an ejection moves keys the same way) or weight change moves
        /// only keys to or from that endpoint, never between two that
        /// stay, and no more than its fair share (with the binomial spread
        /// of the keys sampled).
        #[test]
        fn only_the_changed_endpoints_keys_move(
            weights in proptest::collection::vec(1u32..=10, 1..=200),
            change in prop_oneof![
                (1u32..=10).prop_map(Change::Join),
                (0usize..200).prop_map(Change::Leave),
                ((0usize..200), (1u32..=10)).prop_map(|(i, w)| Change::Weight(i, w)),
            ],
            seed in any::<u64>(),
        ) {
            let fleet: Vec<(String, u32)> = weights
                .iter()
                .enumerate()
                .map(|(i, w)| (format!("instance-{i}-{seed:x}"), *w))
                .collect();
            let mut after = fleet.clone();
            let changed = match change {
                Change::Join(w) => {
                    after.push((format!("joiner-{seed:x}"), w));
                    after.last().map(|(id, _)| id.clone())
                }
                Change::Leave(i) if fleet.len() > 1 => Some(after.remove(i % fleet.len()).0),
                Change::Leave(_) => None,
                Change::Weight(i, w) => {
                    let i = i % fleet.len();
                    after[i].1 = w;
                    Some(after[i].0.clone())
                }
            };
            prop_assume!(changed.is_some());
            let changed = changed.unwrap_or_default();
            let keys: Vec<u64> = (0..4_000u64).map(|k| xxh64(&k.to_le_bytes(), seed)).collect();
            let (before, now) = (homes(&fleet, &keys), homes(&after, &keys));
            let mut moved = 0usize;
            for (b, a) in before.iter().zip(&now) {
                if b != a {
                    moved += 1;
                    prop_assert!(
                        *b == changed || *a == changed,
                        "{:?}: a key moved from {} to {}, neither the changed {}", change, b, a, changed
                    );
                }
            }
            // The fair share: what the changed endpoint owned or owns.
            let total = |f: &[(String, u32)]| f.iter().map(|(_, w)| f64::from(*w)).sum::<f64>();
            let share = |f: &[(String, u32)]| {
                f.iter()
                    .find(|(id, _)| *id == changed)
                    .map_or(0.0, |(_, w)| f64::from(*w) / total(f))
            };
            let fair = (share(&fleet) - share(&after)).abs() * keys.len() as f64;
            let bound = 1.2 * fair + 4.0 * fair.sqrt() + 2.0;
            prop_assert!(moved as f64 <= bound, "{:?}: {} moved, fair {:.1}", change, moved, fair);
        }
    }

    #[test]
    fn one_join_moves_about_one_key_in_n() {
        // Each of ten different instances joining n: the average share a
        // newcomer takes is 1/(n+1). (With A42's exact ring sizing, 20 → 21
        // moved 2.3 times that.)
        for n in [20, 100] {
            let keys = 10_000u64;
            let before_ids = ids(n);
            let before = points(&before_ids, &vec![1; n]);
            let mut moved = 0;
            for joiner in 0..10 {
                let mut after_ids = before_ids.clone();
                after_ids.push(format!("joiner-{joiner}"));
                let after = points(&after_ids, &vec![1; n + 1]);
                // Same ids in the same order, the new one last.
                moved += (0..keys)
                    .filter(|k| {
                        let h = xxh64(&k.to_le_bytes(), 0);
                        home(&before, h) != home(&after, h)
                    })
                    .count();
            }
            let share = moved as f64 / (10 * keys) as f64;
            // Modulo hashing would move n/(n+1) of them.
            assert!(share <= 1.2 / (n + 1) as f64, "{n}: {share}");
            assert!(share >= 0.8 / (n + 1) as f64, "{n}: {share}");
        }
    }

    #[test]
    fn a_key_walks_past_endpoints_it_may_not_use() {
        let ids = ids(5);
        let p = points(&ids, &[1; 5]);
        let h = 12_345;
        let first = home(&p, h);
        let next = match p.choose(h, None, &|i| i != first, &|_| true, &[]) {
            Choice::Endpoint(i) => i,
            other => panic!("{other:?}"),
        };
        assert_ne!(next, first);
        // At its stream limit: the same next one; none usable: empty.
        assert_eq!(
            p.choose(h, None, &|_| true, &|i| i != first, &[]),
            Choice::Endpoint(next)
        );
        assert_eq!(p.choose(h, None, &|_| true, &|_| false, &[]), Choice::Full);
        assert_eq!(p.choose(h, None, &|_| false, &|_| true, &[]), Choice::Empty);
    }

    #[test]
    fn bounded_load_keeps_a_hot_key_within_the_bound() {
        // Calls arrive one at a time and stay in flight: one hot key sends
        // ten times the calls of all the others together.
        let n = 8;
        let ids = ids(n);
        let p = points(&ids, &vec![1; n]);
        let factor = 125;
        let mut in_flight = vec![0usize; n];
        let mut rng_key = 0u64;
        for call in 0..2_000u64 {
            let hash = if call % 11 == 0 {
                rng_key += 1;
                xxh64(&rng_key.to_le_bytes(), 1)
            } else {
                42 // the hot key
            };
            let Choice::Endpoint(i) =
                p.choose(hash, Some(factor), &|_| true, &|_| true, &in_flight)
            else {
                panic!("an endpoint");
            };
            let total: usize = in_flight.iter().sum();
            let bound = ((total + 1) as f64 * 1.25 / n as f64).ceil() as usize;
            assert!(
                in_flight[i] < bound.max(1),
                "call {call}: {in_flight:?} over {bound}"
            );
            in_flight[i] += 1;
        }
        // Without the bound, the hot key's endpoint would take them all.
        let hot = home(&p, 42);
        assert_eq!(
            p.choose(42, None, &|_| true, &|_| true, &in_flight),
            Choice::Endpoint(hot)
        );
    }

    #[test]
    fn request_keys_join_header_values_and_are_none_without_them() {
        let header = HashHeader(Some(http::HeaderName::from_static("x-key")));
        let mut h = HeaderMap::new();
        h.append("x-key", "a".parse().unwrap());
        assert_eq!(request_hash(&h, &header), Some(xxh64(b"a", 0)));
        h.append("x-key", "b".parse().unwrap());
        assert_eq!(request_hash(&h, &header), Some(xxh64(b"a,b", 0)));
        assert_eq!(request_hash(&HeaderMap::new(), &header), None);
        assert_eq!(request_hash(&h, &HashHeader(None)), None);
    }
}
