//! Through etcd's gRPC proxy (`etcd grpc-proxy start`, from the same etcd
//! binary), which does not answer watch progress requests: registration,
//! discovery, the Balancer and the service-config watch work, and a quiet
//! watch is not restarted for want of a progress answer.

mod common;

use std::time::Duration;

use common::{eventually, unique};
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::{metric_where, shared, EtcdProxy};
use tonic_etcd::{Balancer, Discover, Metadata, Registration};

const LIMIT: Duration = Duration::from_secs(15);
/// Short, so that several quiet periods pass within the test.
const IDLE: Duration = Duration::from_millis(300);
const REQUEST: Duration = Duration::from_millis(700);

/// `discover`'s status, once its first listing is done.
async fn synced(discover: &Discover) -> tokio::sync::watch::Receiver<tonic_etcd::WatchStatus> {
    let status = discover.status();
    eventually(LIMIT, "the view synced", || async {
        status.borrow().synced.then_some(())
    })
    .await;
    status
}

async fn serve_greeter(id: &str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let router = tonic_etcd::server::builder().add_service(Greeter::new(id).into_service());
    let task = tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let _ = router.serve_with_incoming(incoming).await;
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_works_through_the_proxy_and_quiet_watches_stay() {
    common::init_tracing();
    let etcd = shared();
    let proxy = EtcdProxy::start(&[etcd.endpoint()]);
    let client = proxy.client().await;
    let svc = unique("proxied");
    let (addr, _server) = serve_greeter("p1").await;
    let reg = Registration::builder(client.clone())
        .service(&svc)
        .addr(&addr)
        .metadata(Metadata::new())
        .ttl(Duration::from_secs(5))
        .register()
        .await
        .expect("registered through the proxy");

    let discover = Discover::builder(client.clone(), &svc)
        .idle_timeout(IDLE)
        .request_timeout(REQUEST)
        .build()
        .unwrap();
    let status = discover.status();
    let b = Balancer::builder(client.clone(), &svc).build().unwrap();
    b.wait_for_ready(1, LIMIT).await.unwrap();
    let mut greeter = GreeterClient::new(b.clone());
    greeter
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .expect("a call through a Balancer that found its server via the proxy");

    // Many quiet periods: the proxy never answers a progress request, and
    // the watch must not be restarted for it.
    eventually(LIMIT, "the view synced", || async {
        status.borrow().synced.then_some(())
    })
    .await;
    tokio::time::sleep((IDLE + REQUEST) * 6).await;
    let s = status.borrow().clone();
    assert_eq!(s.reconnects, 0, "a quiet watch was restarted: {s:?}");
    assert!(s.last_error.is_none(), "{s:?}");

    // A change still arrives, through the proxy's coalesced watch.
    let (addr2, _server2) = serve_greeter("p2").await;
    let _reg2 = common::register_with(&client, &svc, &addr2, Metadata::new()).await;
    b.wait_for_ready(2, LIMIT).await.unwrap();

    // Removal too: the first server deregisters, the Balancer drops it.
    reg.deregister().await.unwrap();
    eventually(
        LIMIT,
        "the Balancer dropped the deregistered server",
        || async {
            let eps = b.endpoints();
            (eps.len() == 1 && eps[0].instance.addr == addr2).then_some(())
        },
    )
    .await;
}

/// When the proxy dies, a watch's liveness read fails and the watch is
/// restarted once the proxy is back; the view catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_is_followed() {
    common::init_tracing();
    let etcd = shared();
    let mut proxy = EtcdProxy::start(&[etcd.endpoint()]);
    let client = proxy.client().await;
    let direct = etcd.client().await;
    let svc = unique("proxied-restart");
    let discover = Discover::builder(client.clone(), &svc)
        .idle_timeout(IDLE)
        .request_timeout(REQUEST)
        .build()
        .unwrap();
    let status = synced(&discover).await;
    proxy.restart();
    // Written directly to etcd while the proxy restarts.
    let _reg = common::register_with(&direct, &svc, "127.0.0.1:1", Metadata::new()).await;
    eventually(LIMIT, "the view caught up after the restart", || async {
        (status.borrow().endpoints == 1).then_some(())
    })
    .await;
}

/// etcd's count of linearizable reads (`Range` calls) served.
fn ranges(etcd: &tonic_etcd::testing::Etcd) -> f64 {
    metric_where(
        &etcd.metrics(),
        "grpc_server_handled_total",
        "grpc_method=\"Range\"",
    )
    .unwrap_or(0.0)
}

/// Through the proxy a quiet watch is checked with a read; on one `Etcd`
/// one read answers for all its quiet watches, so twenty of them cost
/// about one read per quiet period, not twenty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_watches_on_one_client_share_their_liveness_reads() {
    common::init_tracing();
    const VIEWS: usize = 20;
    const PERIODS: u32 = 8;
    // A dedicated etcd: its read count is this test's alone.
    let etcd = tonic_etcd::testing::Etcd::start();
    let proxy = EtcdProxy::start(&[etcd.endpoint()]);
    let client = proxy.client().await;
    let views: Vec<Discover> = (0..VIEWS)
        .map(|i| {
            Discover::builder(client.clone(), format!("quiet{i}"))
                .idle_timeout(IDLE)
                .request_timeout(REQUEST)
                .build()
                .unwrap()
        })
        .collect();
    for v in &views {
        synced(v).await;
    }
    // The first quiet period finds out that the proxy does not answer
    // progress requests; count from after it.
    tokio::time::sleep(IDLE + REQUEST * 2).await;
    let before = ranges(&etcd);
    tokio::time::sleep(IDLE * PERIODS).await;
    let reads = ranges(&etcd) - before;
    assert!(
        reads <= f64::from(PERIODS) * 2.0,
        "{reads} reads in {PERIODS} quiet periods of {VIEWS} watches"
    );
    for v in &views {
        let s = v.status().borrow().clone();
        assert_eq!(s.reconnects, 0, "a quiet watch was restarted: {s:?}");
    }
}

/// etcd's gRPC proxy keeps gRPC-go's default ping policy (a client may ping
/// at most every 5 minutes; the third ping sooner on a quiet connection is
/// answered with GOAWAY `too_many_pings` and the connection closed): a
/// client that pings every few seconds loses every watch about every 15 s.
/// A quiet watch through the proxy must outlive several such periods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_connection_through_the_proxy_is_not_closed_for_its_pings() {
    common::init_tracing();
    let etcd = shared();
    let proxy = EtcdProxy::start(&[etcd.endpoint()]);
    let client = proxy.client().await;
    let discover = Discover::builder(client.clone(), unique("pings"))
        .build()
        .unwrap();
    let status = synced(&discover).await;
    tokio::time::sleep(Duration::from_secs(22)).await;
    let s = status.borrow().clone();
    assert_eq!(s.reconnects, 0, "the watch was restarted: {s:?}");
    assert!(s.last_error.is_none(), "{s:?}");
}
