//! Subsetting through the Balancer, against real etcd and real servers:
//! coordinated subsets give every instance the same number of clients (±1,
//! counted on the backends) and follow the clients as they come and go; random subsets
//! (A68) have the configured size; a member out of rotation is replaced.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use backend::Backend;
use common::{eventually, unique};
use tonic_etcd::balancer::OutlierDetection;
use tonic_etcd::service_config::SubsetScheme;
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata, Registration, ServiceConfig};

const LIMIT: Duration = Duration::from_secs(15);

fn subsetting(scheme: &str, size: u32) -> ServiceConfig {
    ServiceConfig::from_json(&format!(
        r#"{{"loadBalancingConfig":[{{"{scheme}":{{"subsetSize":{size},
            "childPolicy":[{{"round_robin":{{}}}}]}}}}]}}"#
    ))
    .unwrap()
}

struct Fleet {
    client: tonic_etcd::Etcd,
    svc: String,
    backends: Vec<Backend>,
    _regs: Vec<Registration>,
}

async fn fleet(n: usize) -> Fleet {
    let client = shared().client().await;
    let svc = unique("subset");
    let backends: Vec<Backend> = (0..n).map(|i| Backend::start(&format!("g{i}"))).collect();
    let mut regs = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        let reg = Registration::builder(client.clone())
            .service(&svc)
            .id(format!("instance-{i}"))
            .addr(&b.addr)
            .metadata(Metadata::new())
            .register()
            .await
            .unwrap();
        regs.push(reg);
    }
    Fleet {
        client,
        svc,
        backends,
        _regs: regs,
    }
}

impl Fleet {
    fn balancer(&self, config: ServiceConfig) -> Balancer {
        Balancer::builder(self.client.clone(), &self.svc)
            .outlier_detection(OutlierDetection::disabled())
            .service_config(config)
            .build()
            .unwrap()
    }
}

/// The addresses `b` is connected to (its subset).
fn members(b: &Balancer) -> Vec<String> {
    b.endpoints().into_iter().map(|e| e.instance.addr).collect()
}

/// Connections per instance address over `clients`.
fn per_instance(clients: &[Balancer]) -> BTreeMap<String, usize> {
    let mut per = BTreeMap::new();
    for b in clients {
        for addr in members(b) {
            *per.entry(addr).or_default() += 1;
        }
    }
    per
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinated_subsets_cover_every_instance_once_and_follow_the_clients() {
    let f = fleet(6).await;
    let config = subsetting("tonic_etcd_coordinated_subsetting", 2);
    let mut clients: Vec<Balancer> = (0..3).map(|_| f.balancer(config.clone())).collect();
    // Three clients of six instances, two each: one round, each instance
    // exactly once.
    eventually(LIMIT, "three ranked clients, two members each", || async {
        let ranked = clients.iter().all(|b| {
            b.subset()
                .is_some_and(|s| s.rank.is_some_and(|(_, n)| n == 3) && s.members == 2)
        });
        let per = per_instance(&clients);
        (ranked && per.len() == 6 && per.values().all(|n| *n == 1)).then_some(())
    })
    .await;
    let mut ranks: Vec<usize> = clients
        .iter()
        .map(|b| b.subset().and_then(|s| s.rank).unwrap().0)
        .collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1, 2]);
    for b in &clients {
        b.wait_for_ready(2, LIMIT).await.unwrap();
        let s = b.subset().unwrap();
        assert_eq!(
            (s.scheme, s.size, s.instances),
            (SubsetScheme::Coordinated, 2, 6)
        );
    }

    // One client leaves: two clients of two subsets each... of three:
    // every client still holds two, and they no longer overlap.
    drop(clients.pop());
    eventually(LIMIT, "two ranked clients", || async {
        let ranked = clients.iter().all(|b| {
            b.subset()
                .is_some_and(|s| s.rank.is_some_and(|(_, n)| n == 2))
        });
        let per = per_instance(&clients);
        (ranked && per.len() == 4 && per.values().all(|n| *n == 1)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_subsets_have_their_size_and_replace_a_member_out_of_rotation() {
    let mut f = fleet(5).await;
    let b = f.balancer(subsetting("random_subsetting_experimental", 2));
    b.wait_for_ready(2, LIMIT).await.unwrap();
    // A member whose first connection failed (a loaded machine) is
    // replaced until it connects, then the replacement is dropped: the
    // subset settles at two.
    let before = eventually(LIMIT, "a subset of two", || async {
        let m = members(&b);
        (m.len() == 2).then_some(m)
    })
    .await;
    let s = b.subset().unwrap();
    assert_eq!(
        (s.scheme, s.rank, s.instances),
        (SubsetScheme::Random, None, 5)
    );

    // A member dies (its key stays until its lease expires): a replacement
    // joins so that two are usable.
    let dead = before[0].clone();
    let i = f.backends.iter().position(|x| x.addr == dead).unwrap();
    f.backends[i].kill();
    eventually(LIMIT, "a replacement in rotation", || async {
        let ready: Vec<String> = b.ready_instances().into_iter().map(|i| i.addr).collect();
        (ready.len() == 2 && !ready.contains(&dead)).then_some(())
    })
    .await;
    assert_eq!(members(&b).len(), 3, "the dead member stays, retried");
}

/// Established TCP connections accepted on `addr`'s port, read from the
/// kernel's table (`/proc/net/tcp`): what the backend itself holds.
fn accepted_on(addr: &str) -> usize {
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let table = std::fs::read_to_string("/proc/net/tcp").expect("Linux's /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // State 01 is ESTABLISHED.
            local_port == Some(port) && cols.get(3) == Some(&"01")
        })
        .count()
}

/// 20 clients × a subset of 3 of 10 backends: every backend holds exactly
/// 6 client connections (3 does not divide 10, where the SRE book's rounds
/// leave one backend out of each), counted on the backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_of_ten_backends_give_every_backend_six_connections() {
    let f = fleet(10).await;
    let config = subsetting("tonic_etcd_coordinated_subsetting", 3);
    let clients: Vec<Balancer> = (0..20).map(|_| f.balancer(config.clone())).collect();
    let counted = eventually(LIMIT * 2, "every backend holds 6 connections", || async {
        let ranked = clients.iter().all(|b| {
            b.subset()
                .is_some_and(|s| s.rank.is_some_and(|(_, n)| n == 20) && s.members == 3)
        });
        let counts: Vec<usize> = f.backends.iter().map(|b| accepted_on(&b.addr)).collect();
        (ranked && counts.iter().all(|n| *n == 6)).then_some(counts)
    })
    .await;
    assert_eq!(counted.iter().sum::<usize>(), 60);
    for b in &clients {
        b.wait_for_ready(3, LIMIT).await.unwrap();
    }
}

/// The client keys of every `(lease, key)` under `service`'s client prefix.
async fn client_keys(etcd: &tonic_etcd::Etcd, service: &str) -> Vec<(i64, String)> {
    let prefix = format!("_tonic-etcd/clients/{service}/");
    let opts = etcd_client::GetOptions::new().with_prefix();
    let resp = etcd.kv_client().get(prefix, Some(opts)).await.unwrap();
    resp.kvs()
        .iter()
        .map(|kv| (kv.lease(), kv.key_str().unwrap().to_owned()))
        .collect()
}

/// The Balancers of one `Etcd` keep their client keys under one lease
/// (one keep-alive stream for the process, not one per Balancer): a
/// Balancer that goes deletes its key and leaves the lease to the others,
/// and the last one revokes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancers_of_one_etcd_share_one_lease_for_their_client_keys() {
    let (a, b) = tokio::join!(fleet(3), fleet(3));
    // A process of its own: an `Etcd` nothing else in this test uses.
    let etcd = shared().client().await;
    let config = subsetting("tonic_etcd_coordinated_subsetting", 2);
    let build = |svc: &str| {
        Balancer::builder(etcd.clone(), svc)
            .service_config(config.clone())
            .build()
            .unwrap()
    };
    let mut clients = vec![build(&a.svc), build(&a.svc), build(&b.svc)];
    let keys = eventually(LIMIT, "three client keys", || async {
        let mut keys = client_keys(&etcd, &a.svc).await;
        keys.extend(client_keys(&etcd, &b.svc).await);
        (keys.len() == 3).then_some(keys)
    })
    .await;
    let lease = keys[0].0;
    assert!(
        lease != 0 && keys.iter().all(|(l, _)| *l == lease),
        "one lease for every client key: {keys:?}"
    );
    eventually(LIMIT, "every client ranked", || async {
        clients
            .iter()
            .all(|c| c.subset().is_some_and(|s| s.rank.is_some()))
            .then_some(())
    })
    .await;

    drop(clients.remove(0));
    let left = eventually(LIMIT, "the dropped Balancer's key deleted", || async {
        let keys = client_keys(&etcd, &a.svc).await;
        (keys.len() == 1).then_some(keys)
    })
    .await;
    assert_eq!(left[0].0, lease, "the others keep the lease");
    assert_eq!(client_keys(&etcd, &b.svc).await[0].0, lease);

    drop(clients);
    eventually(LIMIT, "the lease revoked with the last key", || async {
        let ttl = etcd.lease_client().time_to_live(lease, None).await.ok()?;
        (ttl.ttl() == -1).then_some(())
    })
    .await;
    assert!(client_keys(&etcd, &a.svc).await.is_empty());
    assert!(client_keys(&etcd, &b.svc).await.is_empty());
}
