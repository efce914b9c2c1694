//! Ring hash (gRFC A42, A76), with optional bounded load: the same key goes
//! to the same endpoint while it is in rotation, from every client.
//!
//! * **The ring**: each endpoint in rotation gets entries at
//!   `XXH64("<id>_<n>", seed 0)`, as grpc-go hashes `"<address>_<n>"`, in
//!   number proportional to its weight: the lightest gets at least
//!   `minRingSize × its share` entries (rounded up to a power of two, so
//!   that a join does not resize every endpoint's entries, see
//!   [`Points::new`]), the ring at most `maxRingSize`.
//!   The id is the instance's metadata `hash_key` when set (A76), else its
//!   instance id, not its address: an instance that re-registers at another
//!   address keeps its keys. Endpoints are ordered by id before the ring is
//!   built, so every client builds the same ring from the same instances.
//! * **The key**: `XXH64` of the request header named by
//!   `requestHashHeader` (several values joined by `,`), or a random key
//!   when there is no such header.
//! * **The pick**: the first entry at or after the key's hash. An endpoint
//!   out of rotation has no entries, so its keys fall to the next endpoint
//!   on the ring and come back when it returns, and only its keys move (the
//!   ring is built from the endpoints in rotation and rebuilt when they
//!   change; grpc-go walks past them on a ring of every endpoint, which
//!   lands on the same next endpoint). A retry or hedge walks on to the
//!   next endpoint the call has not used; one at its stream limit is
//!   passed over the same way.
//! * **Bounded load** (`hashBalanceFactor` c %, beyond A42; Envoy's
//!   `hash_balance_factor`, Mirrokni et al.): an endpoint may hold
//!   `ceil(ceil((calls in flight + 1) × c / 100) × its share of the weight)`
//!   calls. When the key's endpoint is full, further positions are drawn
//!   from hashes of the key itself (not the next ring entries, which would
//!   pile a hot key's overflow onto one neighbour) until one with room is
//!   found, else the least loaded endpoint takes it.
//!
//! Locality ([`prefer_zone`](super::BalancerBuilder::prefer_zone)), slow
//! start and the cost-weighted shares do not apply: a key's home is the
//! point of the policy.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use http::HeaderMap;
use xxhash_rust::xxh64::xxh64;

use super::Pick;
use crate::balancer::pool::{Ready, ReadySet, Shared};
use crate::service_config::{HashHeader, RingHashConfig};
use crate::Instance;

/// Key-seeded positions tried for a key whose endpoint is full under
/// bounded load, before the least loaded endpoint is taken.
const OVERFLOW_PROBES: u64 = 32;

/// One call's ring-hash routing: the key's hash and the ring's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingPlan {
    pub(crate) hash: u64,
    pub(crate) config: RingHashConfig,
}

/// The hash of a request's key: its `header` values joined by `,`, or a
/// random one without them.
pub(crate) fn request_hash(headers: &HeaderMap, header: &HashHeader) -> u64 {
    let Some(name) = &header.0 else {
        return rand::random();
    };
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return rand::random();
    };
    match values.next() {
        None => xxh64(first.as_bytes(), 0),
        Some(second) => {
            let mut joined = first.as_bytes().to_vec();
            for v in std::iter::once(second).chain(values) {
                joined.push(b',');
                joined.extend_from_slice(v.as_bytes());
            }
            xxh64(&joined, 0)
        }
    }
}

/// A ring with the ready set and settings it was built from. It lives in
/// the pool's route cache, which the pool empties on every change: a ring
/// holds its endpoints' connections and must not outlive a change.
struct CachedRing {
    set: Arc<ReadySet>,
    config: RingHashConfig,
    ring: Arc<Ring>,
}

/// A balancer's rings: the entries of the last membership and settings
/// (kept while only the ready set changes), and the lock that lets one
/// call at a time build a ring.
#[derive(Default)]
pub(crate) struct Rings {
    points: Mutex<Option<CachedPoints>>,
}

/// A ring's entries with the members and settings they were built for.
type CachedPoints = (Vec<Member>, RingHashConfig, Arc<Points>);

impl Rings {
    /// The ring of every registered endpoint of `pool` with `config`, and
    /// those of `set` in rotation: built once per ready set and membership,
    /// its entries once per membership.
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
            Some((m, c, p)) if *m == members && *c == config => p.clone(),
            _ => {
                let p = self::points(&members, config);
                *points = Some((members.clone(), config, p.clone()));
                p
            }
        };
        let fresh_points =
            !matches!(&cached, Some(c) if c.config == config && c.ring.same_points(&points));
        let ring = Arc::new(Ring::new(points, &members, set));
        if fresh_points {
            let addrs: HashMap<&str, &str> = instances
                .iter()
                .map(|(key, i)| (key.as_str(), i.addr.as_str()))
                .collect();
            for (key, share) in ring.shares() {
                if let Some(addr) = addrs.get(key.as_str()) {
                    crate::metrics::ring_share(&pool.service, addr, share);
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
    /// What its entries are keyed by (see [`stable_id`]).
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

/// The ring's entries for `members` (built once per membership and
/// settings; see [`Ring`]).
pub(crate) fn points(members: &[Member], config: RingHashConfig) -> Arc<Points> {
    let ids: Vec<(&str, u32)> = members.iter().map(|m| (m.id.as_str(), m.weight)).collect();
    Arc::new(Points::new(&ids, config))
}

/// The ring of every registered endpoint (as A42 builds it over every
/// address, whatever its state), with those in rotation now: an endpoint
/// out of rotation keeps its entries and is walked past, so no other key
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

/// The ring's entries over endpoints known by index.
pub(crate) struct Points {
    /// Sorted by hash: (hash, endpoint index).
    entries: Vec<(u64, u32)>,
    /// Each endpoint's share of the weight, summing to 1.
    weights: Vec<f64>,
}

impl Points {
    /// Entries for `members` (stable id, weight). Each endpoint gets
    /// `K × its weight / the lightest weight` entries, with `K` the entries
    /// the lightest needs for the ring to reach `minRingSize`, rounded up to
    /// a power of two; beyond `maxRingSize`, A42's scaling to exactly that.
    ///
    /// A42 sizes the ring to `minRingSize` exactly, so every join or leave
    /// changes every endpoint's number of entries (52 each for 20
    /// endpoints, 49 for 21) and moves about twice the keys it must (the
    /// `routing` benchmark measured 2.3 × 1/(n+1)); rounded up to a power
    /// of two, `K` stays the same across most changes and a join moves
    /// only the keys the new endpoint takes.
    fn new(members: &[(&str, u32)], config: RingHashConfig) -> Self {
        let total: f64 = members.iter().map(|(_, w)| f64::from((*w).max(1))).sum();
        let weights: Vec<f64> = members
            .iter()
            .map(|(_, w)| f64::from((*w).max(1)) / total)
            .collect();
        let lightest = members.iter().map(|(_, w)| (*w).max(1)).min().unwrap_or(1);
        // The ring in units of the lightest endpoint's weight.
        let units = total / f64::from(lightest);
        let per_unit = ((f64::from(config.min_ring_size) / units).ceil() as u64)
            .max(1)
            .next_power_of_two();
        let counts: Vec<usize> = if per_unit as f64 * units <= f64::from(config.max_ring_size) {
            members
                .iter()
                .map(|(_, w)| {
                    (per_unit as f64 * f64::from((*w).max(1)) / f64::from(lightest)).round()
                        as usize
                })
                .collect()
        } else {
            // A42's cap: exactly maxRingSize entries by cumulative rounding
            // (the lightest may get none).
            let scale = f64::from(config.max_ring_size);
            let mut cumulative = 0.0;
            let mut placed = 0;
            weights
                .iter()
                .map(|w| {
                    cumulative += w;
                    let target = (scale * cumulative).round() as usize;
                    let n = target.saturating_sub(placed);
                    placed = placed.max(target);
                    n
                })
                .collect()
        };
        let mut entries = Vec::with_capacity(counts.iter().sum());
        let mut key = String::new();
        for (i, ((id, _), count)) in members.iter().zip(&counts).enumerate() {
            for n in 0..*count {
                key.clear();
                let _ = write!(key, "{id}_{n}");
                entries.push((xxh64(key.as_bytes(), 0), i as u32));
            }
        }
        entries.sort_unstable();
        Self { entries, weights }
    }

    /// The endpoint for `hash` among those `usable` says the call may use:
    /// the first on the ring that is `open` (below its stream limit); with
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
        let Some(home) = self.walk(hash, |i| usable(i) && open(i)) else {
            return if (0..n).any(usable) {
                Choice::Full
            } else {
                Choice::Empty
            };
        };
        let Some(factor) = factor else {
            return Choice::Endpoint(home);
        };
        // Bounded load: the key's endpoint if it has room, else positions
        // drawn from the key's own hashes, else the least loaded.
        // Shares among the endpoints in rotation, as Envoy weighs healthy
        // hosts only.
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
        for probe in 1..=OVERFLOW_PROBES {
            if let Some(i) = self.walk(xxh64(&hash.to_le_bytes(), probe), room) {
                return Choice::Endpoint(i);
            }
        }
        let least = (0..n).filter(|&i| usable(i) && open(i)).min_by(|&a, &b| {
            let load = |i: usize| in_flight[i] as f64 / self.weights[i];
            load(a).total_cmp(&load(b))
        });
        Choice::Endpoint(least.unwrap_or(home))
    }

    /// From the first entry at or after `hash`, the first endpoint `ok`
    /// accepts (each endpoint asked once).
    fn walk(&self, hash: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.entries.len();
        let start = self.entries.partition_point(|(h, _)| *h < hash);
        let mut asked = vec![false; self.weights.len()];
        let mut left = self.weights.len();
        for step in 0..n {
            let i = self.entries[(start + step) % n].1 as usize;
            if std::mem::replace(&mut asked[i], true) {
                continue;
            }
            if ok(i) {
                return Some(i);
            }
            left -= 1;
            if left == 0 {
                break;
            }
        }
        None
    }

    /// The share of the hash space each endpoint owns: an entry owns the
    /// arc from the entry before it (exclusive) to itself.
    fn shares(&self) -> Vec<f64> {
        let mut owned = vec![0f64; self.weights.len()];
        let n = self.entries.len();
        for (k, &(hash, i)) in self.entries.iter().enumerate() {
            let prev = self.entries[(k + n - 1) % n].0;
            let arc = if n == 1 {
                u64::MAX
            } else {
                hash.wrapping_sub(prev)
            };
            owned[i as usize] += arc as f64 / 2f64.powi(64);
        }
        owned
    }
}

/// What an instance's ring entries are keyed by: metadata `hash_key`
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
        Points::new(&members, RingHashConfig::DEFAULT)
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
        // The lightest gets 1024 / 8 entries (a power of two), the others by
        // weight.
        let mut entries = [0usize; 4];
        for (_, i) in &p.entries {
            entries[*i as usize] += 1;
        }
        assert_eq!(entries, [128, 128, 256, 512]);
        // The arcs follow the entries within the ring's own spread, which
        // shrinks as it grows: within 5 % at 32 × the entries.
        let members: Vec<(&str, u32)> = ids.iter().map(String::as_str).zip(weights).collect();
        let big = Points::new(
            &members,
            RingHashConfig {
                min_ring_size: 32 * 1024,
                max_ring_size: RingHashConfig::MAX_RING_SIZE,
                hash_balance_factor: None,
            },
        );
        let want = [0.125, 0.125, 0.25, 0.5];
        let shares = big.shares();
        for (share, want) in shares.iter().zip(want) {
            assert!((share / want - 1.0).abs() < 0.05, "{shares:?}");
        }
        // Keys drawn at random land by the same shares.
        let mut hits = [0u32; 4];
        for k in 0..40_000u64 {
            hits[home(&big, xxh64(&k.to_le_bytes(), 7))] += 1;
        }
        for (h, want) in hits.iter().zip(want) {
            let got = f64::from(*h) / 40_000.0;
            assert!((got / want - 1.0).abs() < 0.05, "{hits:?}");
        }
    }

    #[test]
    fn the_ring_is_capped_at_max_ring_size() {
        let ids = ids(3);
        let p = points(&ids, &[1, 1, 10_000]);
        assert_eq!(p.entries.len(), 4_096);
        let p = points(&ids, &[1, 1, 1_000]);
        assert_eq!(p.entries.len(), 2 * 1_002, "below the cap");
        let p = points(&ids, &[1, 1, 1]);
        assert_eq!(
            p.entries.len(),
            3 * 512,
            "1024 / 3 rounded up to a power of two"
        );
    }

    #[test]
    fn one_join_moves_about_one_key_in_n() {
        // Each of ten different instances joining n: a new one's share has
        // the spread of its entries, the average is 1/(n+1). (With A42's
        // exact sizing, 20 → 21 moved 2.3 times that.)
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
    fn request_keys_join_header_values_and_are_random_without_them() {
        let header = HashHeader(Some(http::HeaderName::from_static("x-key")));
        let mut h = HeaderMap::new();
        h.append("x-key", "a".parse().unwrap());
        assert_eq!(request_hash(&h, &header), xxh64(b"a", 0));
        h.append("x-key", "b".parse().unwrap());
        assert_eq!(request_hash(&h, &header), xxh64(b"a,b", 0));
        let empty = HeaderMap::new();
        assert_ne!(request_hash(&empty, &header), request_hash(&empty, &header));
        assert_ne!(
            request_hash(&h, &HashHeader(None)),
            request_hash(&h, &HashHeader(None))
        );
    }
}
