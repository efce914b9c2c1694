//! Subsetting: each client connects to `subsetSize` of the instances, not
//! to all of them, so that a fleet of clients and servers does not hold a
//! connection per pair.
//!
//! * **Random** (gRFC A68, `random_subsetting_experimental`): the instances
//!   whose `XXH64(address, seed)` are lowest, with a seed of the client's
//!   own; one instance joining or leaving changes at most one member. The
//!   spread is uneven: the SRE book measured 300 clients × 300 backends with
//!   90 each at 63 % to 121 % of the average connections per backend.
//! * **Coordinated** (`tonic_etcd_coordinated_subsetting`, new): every
//!   client of the service holds a lease-bound key under
//!   `<namespace prefix>_tonic-etcd/clients/<service>/` (under the one
//!   lease all client keys of its `Etcd` share), which says when it
//!   joined, so each knows its rank in join order and the number of
//!   clients. The instances, sorted by id and shuffled once with a fixed
//!   seed, form a ring; client `i` takes the `size` positions from
//!   `i × size` on (mod the ring). The slices cover `clients × size`
//!   consecutive positions, so every instance gets the same number of
//!   clients, ±1, for any instance count, subset size and client count
//!   (the SRE book's rounds leave `instances mod size` out of each round;
//!   Finagle's deterministic aperture evens the load, not the connections).
//!   A client that joins takes the next slice and moves no other client; a
//!   client that leaves shifts the clients that joined after it by one
//!   slice. Until the client's own key is in the view it read from etcd
//!   (etcd unreachable at start), the random scheme stands in.
//!
//! Within the subset the configured pick runs as usual. A member out of
//! rotation (its connection failing, ejected, unhealthy) does not count
//! towards the size: the next candidate in the client's order is added
//! until `size` members are usable, and dropped again when the member
//! recovers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::Etcd;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tower::discover::Change;
use xxhash_rust::xxh64::xxh64;

use crate::schema::{Reserved, Schema};
use crate::service_config::SubsetScheme;
use crate::{Discover, Instance, Metadata};

/// Instances in the order client `who` prefers them: its subset first, then
/// replacements. `instances` are (key, instance); the result indexes it.
pub(crate) fn order(instances: &[(String, Arc<Instance>)], size: usize, who: Who) -> Vec<usize> {
    match who {
        Who::Seed(seed) => random_order(instances, seed),
        Who::Rank { index, count } => deterministic_order(instances, size, index, count),
    }
}

/// Who a client is, for its subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Who {
    /// A68: a seed of its own.
    Seed(u64),
    /// Coordinated: its rank among `count` clients.
    Rank { index: usize, count: usize },
}

/// A68: lowest `XXH64(address, seed)` first.
fn random_order(instances: &[(String, Arc<Instance>)], seed: u64) -> Vec<usize> {
    let mut order: Vec<(u64, usize)> = instances
        .iter()
        .enumerate()
        .map(|(i, (_, inst))| (xxh64(inst.addr.as_bytes(), seed), i))
        .collect();
    order.sort_unstable();
    order.into_iter().map(|(_, i)| i).collect()
}

/// Coordinated subsetting, for the client at `index` (its rank in join
/// order) of `count`: the instances, sorted by id and shuffled once with a
/// fixed seed, form a ring that the clients' slices of `size` cover one
/// after another — client `i` takes ring positions `i·size … i·size+size−1`
/// (mod the number of instances), then the positions after its slice as
/// replacements. The clients' slices together cover `count × size`
/// consecutive positions, so every instance gets ⌊count·size/n⌋ or one more
/// client, whatever the numbers (the SRE book's rounds leave `n mod size`
/// instances out of each round).
fn deterministic_order(
    instances: &[(String, Arc<Instance>)],
    size: usize,
    index: usize,
    count: usize,
) -> Vec<usize> {
    let n = instances.len();
    let mut ring: Vec<usize> = (0..n).collect();
    ring.sort_by(|&a, &b| {
        let (ka, a) = &instances[a];
        let (kb, b) = &instances[b];
        a.id.cmp(&b.id).then_with(|| ka.cmp(kb))
    });
    if n == 0 {
        return ring;
    }
    // Shuffled so that an instance's neighbours (which take over its
    // clients when it fails) are not its neighbours by name.
    shuffle(&mut ring, RING_SEED);
    let start = (index % count.max(1)).saturating_mul(size.clamp(1, n)) % n;
    ring.rotate_left(start);
    ring
}

/// The seed of the coordinated ring's shuffle: the same for every client of
/// every version.
const RING_SEED: u64 = 0x7375_6273_6574;

/// Fisher–Yates with positions from `XXH64(step, seed)`: every client of
/// every version draws the same permutation (a library RNG's stream may
/// change between versions).
fn shuffle(items: &mut [usize], seed: u64) {
    for i in (1..items.len()).rev() {
        let j = xxh64(&(i as u64).to_le_bytes(), seed) % (i as u64 + 1);
        items.swap(i, j as usize);
    }
}

/// The members to connect: candidates in `order`, until `size` of them are
/// `usable` (a member out of rotation stays, and the next one is added).
pub(crate) fn select(order: &[usize], size: usize, usable: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut chosen = Vec::with_capacity(size);
    let mut good = 0;
    for &i in order {
        if good >= size {
            break;
        }
        chosen.push(i);
        if usable(i) {
            good += 1;
        }
    }
    chosen
}

/// Where this client stands among the service's clients, as published by
/// [`coordinate`]: `None` until its own key is in the view.
pub(crate) type Rank = Option<(usize, usize)>;

/// What the coordinated scheme needs to register the client.
#[derive(Clone)]
pub(crate) struct Registry {
    pub(crate) client: Etcd,
    /// The instances' schema: client keys live under its
    /// [`Reserved::Clients`].
    pub(crate) schema: Arc<dyn Schema>,
    pub(crate) service: String,
    pub(crate) request_timeout: Duration,
}

/// Registers this client (`id`) under the service's client prefix, keeps
/// it registered, and publishes its rank among the clients there. Runs
/// until aborted; the key is deleted with it.
pub(crate) async fn coordinate(registry: Registry, id: String, rank: watch::Sender<Rank>) {
    // The join order: a client that joins takes the next slice and moves
    // nobody else's; re-registering after a lost lease keeps its place.
    let joined = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        .to_string();
    let schema = match Reserved::Clients.schema(&*registry.schema) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "client registry unavailable; random subsets");
            return;
        }
    };
    // Kept under the lease every client key of this `Etcd` shares: a
    // process with 100 coordinated Balancers holds one lease, not 100.
    let entry = schema.encode(&Instance {
        service: registry.service.clone(),
        id: id.clone(),
        // Not dialled: a client key says who, not where.
        addr: "client.invalid:1".into(),
        metadata: Metadata::new()
            .with("pid", std::process::id().to_string())
            .with(JOINED, joined),
    });
    let _key = match entry {
        Ok(entry) => registry.client.hold_key(
            entry,
            schema.service_prefix(&registry.service),
            registry.request_timeout,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "client registry unavailable; random subsets");
            return;
        }
    };
    let view = Discover::builder(registry.client.clone(), registry.service.clone())
        .schema(schema.clone())
        .request_timeout(registry.request_timeout)
        .build();
    let mut view = match view {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "client registry unavailable; random subsets");
            return;
        }
    };
    let own = format!("{}{id}", schema.service_prefix(&registry.service));
    // Key → when it joined (a key without a readable time sorts first).
    let mut clients: BTreeMap<String, u128> = BTreeMap::new();
    loop {
        match view.next().await {
            Some(Ok(Change::Insert(key, client))) => {
                let at = client.metadata.get(JOINED).and_then(|t| t.parse().ok());
                clients.insert(key, at.unwrap_or(0));
            }
            Some(Ok(Change::Remove(key))) => {
                clients.remove(&key);
            }
            Some(Err(error)) => tracing::debug!(%error, "client registry view"),
            None => return,
        }
        let now = rank_of(&clients, &own);
        rank.send_if_modified(|r| std::mem::replace(r, now) != now);
    }
}

/// The metadata field of a client key that says when the client joined
/// (Unix milliseconds).
const JOINED: &str = "joined";

/// `own`'s rank among `clients` in join order (ties broken by key), and
/// their number; `None` while `own` is not among them.
fn rank_of(clients: &BTreeMap<String, u128>, own: &str) -> Rank {
    let at = *clients.get(own)?;
    let before = clients
        .iter()
        .filter(|(k, t)| (**t, k.as_str()) < (at, own))
        .count();
    Some((before, clients.len()))
}

/// Which scheme is in force and where the client stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubsetStatus {
    /// The scheme configured.
    pub scheme: SubsetScheme,
    /// `subsetSize`.
    pub size: u32,
    /// Under the coordinated scheme, this client's rank and the number of
    /// clients; `None` while the random scheme stands in.
    pub rank: Option<(usize, usize)>,
    /// Instances registered (passing the filter).
    pub instances: usize,
    /// Instances connected to: the subset, with replacements for members
    /// out of rotation.
    pub members: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn instances(n: usize) -> Vec<(String, Arc<Instance>)> {
        (0..n)
            .map(|i| {
                let addr = format!("10.0.{}.{}:50051", i / 250, i % 250);
                let inst = Instance {
                    service: "svc".into(),
                    id: format!("instance-{i:03}"),
                    addr,
                    metadata: Metadata::new(),
                };
                (format!("svc/instance-{i:03}"), Arc::new(inst))
            })
            .collect()
    }

    /// Clients per instance when `clients` clients each take `size`.
    fn spread(n: usize, clients: usize, size: usize, who: impl Fn(usize) -> Who) -> Vec<usize> {
        let inst = instances(n);
        let mut per = vec![0; n];
        for c in 0..clients {
            let order = order(&inst, size, who(c));
            for i in select(&order, size, |_| true) {
                per[i] += 1;
            }
        }
        per
    }

    #[test]
    fn coordinated_subsets_are_exact_and_random_ones_are_not() {
        let ranked = |count| move |c| Who::Rank { index: c, count };
        let coordinated = spread(100, 100, 10, ranked(100));
        assert!(coordinated.iter().all(|n| *n == 10), "{coordinated:?}");
        // 20 clients × 3 of 10: 6 each, though 3 does not divide 10.
        let uneven = spread(10, 20, 3, ranked(20));
        assert!(uneven.iter().all(|n| *n == 6), "{uneven:?}");
        let random = spread(100, 100, 10, |c| Who::Seed(xxh64(&c.to_le_bytes(), 9)));
        let (min, max) = (random.iter().min().unwrap(), random.iter().max().unwrap());
        assert!(max - min >= 4, "random subsets spread unevenly: {random:?}");
        assert_eq!(random.iter().sum::<usize>(), 1_000);
    }

    /// Each client's subset, as instance keys.
    fn subsets(n: usize, size: usize, count: usize) -> Vec<BTreeSet<String>> {
        let inst = instances(n);
        (0..count)
            .map(|index| {
                let order = order(&inst, size, Who::Rank { index, count });
                select(&order, size, |_| true)
                    .into_iter()
                    .map(|i| inst[i].0.clone())
                    .collect()
            })
            .collect()
    }

    proptest! {
        /// Any fleet: every client holds min(size, n) distinct instances,
        /// and every instance has as many clients as any other, give or
        /// take one.
        #[test]
        fn coordinated_subsets_spread_evenly_over_any_fleet(
            n in 1usize..80, size in 1usize..24, count in 1usize..120,
        ) {
            let subsets = subsets(n, size, count);
            let mut per: BTreeMap<&String, usize> = BTreeMap::new();
            for s in &subsets {
                prop_assert_eq!(s.len(), size.min(n));
                for k in s {
                    *per.entry(k).or_default() += 1;
                }
            }
            let counts: Vec<usize> = instances(n)
                .iter()
                .map(|(k, _)| per.get(k).copied().unwrap_or(0))
                .collect();
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            prop_assert!(max - min <= 1, "{:?}", counts);
        }

        /// A client that joins takes the next slice: no other client's
        /// subset changes. A client that leaves moves only the clients that
        /// joined after it.
        #[test]
        fn a_joining_client_moves_nobody_and_a_leaving_one_only_later_joiners(
            n in 1usize..60, size in 1usize..16, count in 1usize..60, leaver in 0usize..60,
        ) {
            let before = subsets(n, size, count);
            let joined = subsets(n, size, count + 1);
            prop_assert_eq!(&before[..], &joined[..count]);
            let leaver = leaver % count;
            let left = subsets(n, size, count - 1);
            prop_assert_eq!(&before[..leaver], &left[..leaver]);
        }
    }

    #[test]
    fn the_rank_is_the_join_order() {
        let clients: BTreeMap<String, u128> = [("c/a", 30), ("c/b", 10), ("c/c", 20), ("c/d", 20)]
            .into_iter()
            .map(|(k, t)| (k.to_owned(), t))
            .collect();
        assert_eq!(rank_of(&clients, "c/b"), Some((0, 4)));
        assert_eq!(rank_of(&clients, "c/c"), Some((1, 4)));
        assert_eq!(rank_of(&clients, "c/d"), Some((2, 4)));
        assert_eq!(rank_of(&clients, "c/a"), Some((3, 4)));
        assert_eq!(rank_of(&clients, "c/e"), None);
    }

    #[test]
    fn one_new_instance_moves_at_most_one_member_of_a_random_subset() {
        let before = instances(100);
        let after = instances(101);
        for c in 0..50u64 {
            let who = Who::Seed(xxh64(&c.to_le_bytes(), 3));
            let keys = |inst: &[(String, Arc<Instance>)]| -> BTreeSet<String> {
                select(&order(inst, 10, who), 10, |_| true)
                    .into_iter()
                    .map(|i| inst[i].0.clone())
                    .collect()
            };
            let (b, a) = (keys(&before), keys(&after));
            assert!(b.difference(&a).count() <= 1, "client {c}");
        }
    }

    #[test]
    fn a_member_out_of_rotation_is_replaced_until_it_recovers() {
        let order = [4, 2, 7, 1, 9];
        assert_eq!(select(&order, 3, |_| true), [4, 2, 7]);
        assert_eq!(select(&order, 3, |i| i != 2), [4, 2, 7, 1]);
        assert_eq!(select(&order, 3, |_| false), order);
    }
}
