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

/// Range requests etcd has answered (listings, reads of configs).
fn ranges(etcd: &Etcd) -> f64 {
    tonic_etcd::testing::metric_where(
        &etcd.metrics(),
        "grpc_server_handled_total",
        "grpc_method=\"Range\"",
    )
    .unwrap_or(0.0)
}

/// The next `n` changes of `d`, within the limit.
async fn changes(
    d: &mut Discover,
    n: usize,
) -> Vec<tower::discover::Change<String, tonic_etcd::Instance>> {
    use tokio_stream::StreamExt;
    let mut out = Vec::new();
    for _ in 0..n {
        let next = tokio::time::timeout(LIMIT, d.next()).await;
        out.push(
            next.expect("a change in time")
                .expect("stream open")
                .unwrap(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_of_one_prefix_share_one_listing_and_start_from_it() {
    common::init_tracing();
    let server = Etcd::start();
    let etcd = server.client().await;
    let svc = unique("shared-view");
    let mut regs = Vec::new();
    for i in 0..3 {
        let addr = format!("127.0.0.1:{}", 22_000 + i);
        regs.push(common::register_with(&etcd, &svc, &addr, Metadata::new()).await);
    }
    let mut first = Discover::builder(etcd.clone(), &svc).build().unwrap();
    assert_eq!(changes(&mut first, 3).await.len(), 3);

    // A second Discover of the same service: its three instances at once,
    // from the running view, without asking etcd.
    let before = ranges(&server);
    let mut second = Discover::builder(etcd.clone(), &svc).build().unwrap();
    let got = changes(&mut second, 3).await;
    assert!(got
        .iter()
        .all(|c| matches!(c, tower::discover::Change::Insert(..))));
    assert_eq!(ranges(&server), before, "no second listing");
    assert!(second.status().borrow().synced);

    // A Balancer on a client of its own reads etcd three times: its
    // instances, its service config, its overrides. One beside the
    // Discovers reads the last two only, and is ready on the shared view.
    let reads_of = |build: Box<dyn FnOnce() -> Balancer>, expected: f64, what: &'static str| {
        let server = &server;
        async move {
            let before = ranges(server);
            let balancer = build();
            eventually(LIMIT, what, || async {
                (balancer.registered() == 3 && ranges(server) - before == expected).then_some(())
            })
            .await;
            balancer
        }
    };
    let other = tonic_etcd::Etcd::from(etcd.client().clone());
    let (s, e) = (svc.clone(), etcd.clone());
    let alone = reads_of(
        Box::new(move || Balancer::builder(other, &s).build().unwrap()),
        3.0,
        "a Balancer on a client of its own: three reads",
    )
    .await;
    let s = svc.clone();
    let balancer = reads_of(
        Box::new(move || Balancer::builder(e, &s).build().unwrap()),
        2.0,
        "a Balancer beside the Discovers: two reads",
    )
    .await;
    drop(alone);

    // Changes reach every consumer, and one leaving does not stop the others.
    let addr = "127.0.0.1:22100";
    let fourth = common::register_with(&etcd, &svc, addr, Metadata::new()).await;
    for d in [&mut first, &mut second] {
        let got = changes(d, 1).await;
        assert!(matches!(&got[0], tower::discover::Change::Insert(_, i) if i.addr == addr));
    }
    drop(first);
    drop(fourth);
    let got = changes(&mut second, 1).await;
    assert!(matches!(&got[0], tower::discover::Change::Remove(_)));
    eventually(LIMIT, "the Balancer sees the removal", || async {
        (balancer.registered() == 3).then_some(())
    })
    .await;

    // The last consumer gone, the view stops: the next one lists again.
    drop((second, balancer));
    wait_for_counts(&server, 0.0, 0.0, "every view dropped").await;
    let before = ranges(&server);
    let mut again = Discover::builder(etcd.clone(), &svc).build().unwrap();
    assert_eq!(changes(&mut again, 3).await.len(), 3);
    assert!(
        ranges(&server) > before,
        "a fresh listing once the shared view stopped"
    );
    drop(regs);
}
