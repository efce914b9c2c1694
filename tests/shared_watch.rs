//! Every watch opened through one `tonic_etcd::Etcd` rides on one etcd
//! Watch stream (as etcd's Go client does), counted from etcd's own
//! metrics: each Balancer's instances, service config and overrides, every
//! Discover and Catalog. The stream survives an etcd restart as one stream,
//! changes still reach every view, and dropping the views cancels their
//! watchers at etcd and closes the stream.

mod common;

use std::time::Duration;

use common::{eventually, unique};
use tonic_etcd::testing::{metric, Etcd};
use tonic_etcd::{Balancer, Catalog, Discover, Metadata};

const LIMIT: Duration = Duration::from_secs(20);
const SERVICES: usize = 4;
const BALANCERS_PER_SERVICE: usize = 2;
/// Instances, service config and overrides.
const WATCHES_PER_SERVICE: usize = 3;

/// etcd's count of open watch streams and watchers.
fn streams_and_watchers(etcd: &Etcd) -> (f64, f64) {
    let m = etcd.metrics();
    (
        metric(&m, "etcd_debugging_mvcc_watch_stream_total").unwrap_or(-1.0),
        metric(&m, "etcd_debugging_mvcc_watcher_total").unwrap_or(-1.0),
    )
}

async fn wait_for_counts(etcd: &Etcd, streams: f64, watchers: f64, what: &str) {
    let mut last = (0.0, 0.0);
    let found = tokio::time::timeout(LIMIT, async {
        loop {
            last = streams_and_watchers(etcd);
            if last == (streams, watchers) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "{what}: etcd counts (streams, watchers) = {last:?}, expected ({streams}, {watchers})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watch_of_one_etcd_rides_one_stream_through_restarts() {
    common::init_tracing();
    // A dedicated etcd: its metrics count this test's watches only.
    let server = Etcd::start();
    let etcd = server.client().await;
    let services: Vec<String> = (0..SERVICES).map(|i| unique(&format!("sw{i}"))).collect();
    let mut regs = Vec::new();
    for (i, svc) in services.iter().enumerate() {
        let addr = format!("127.0.0.1:{}", 20_000 + i);
        regs.push(common::register_with(&etcd, svc, &addr, Metadata::new()).await);
    }

    let mut balancers = Vec::new();
    for svc in &services {
        for _ in 0..BALANCERS_PER_SERVICE {
            balancers.push(Balancer::builder(etcd.clone(), svc).build().unwrap());
        }
    }
    let discovers: Vec<Discover> = services
        .iter()
        .take(2)
        .map(|svc| Discover::builder(etcd.clone(), svc).build().unwrap())
        .collect();
    let catalog = Catalog::builder(etcd.clone()).build().unwrap();
    // One etcd watcher per distinct prefix: each service's instances,
    // config and overrides (the Discovers join the Balancers' instance
    // watchers), and the Catalog's.
    let watchers = (SERVICES * WATCHES_PER_SERVICE + 1) as f64;

    wait_for_counts(&server, 1.0, watchers, "all views built").await;
    for b in &balancers {
        eventually(LIMIT, "each Balancer knows its instance", || async {
            (b.registered() == 1).then_some(())
        })
        .await;
    }

    // A change reaches every view over the shared stream.
    let mut more = Vec::new();
    for (i, svc) in services.iter().enumerate() {
        let addr = format!("127.0.0.1:{}", 21_000 + i);
        more.push(common::register_with(&etcd, svc, &addr, Metadata::new()).await);
    }
    for b in &balancers {
        eventually(LIMIT, "each Balancer sees the second instance", || async {
            (b.registered() == 2).then_some(())
        })
        .await;
    }

    // etcd restarts: every watch resumes, still on one stream.
    server.restart();
    wait_for_counts(&server, 1.0, watchers, "after an etcd restart").await;
    drop(more);
    for b in &balancers {
        eventually(
            LIMIT,
            "a deregistration after the restart reaches each Balancer",
            || async { (b.registered() == 1).then_some(()) },
        )
        .await;
    }

    // Dropping the views cancels their watchers and closes the stream.
    drop((balancers, discovers, catalog));
    wait_for_counts(&server, 0.0, 0.0, "every view dropped").await;
    drop(regs);
}
