//! Graceful shutdown that ends: handlers learn that it began, a stream that
//! never ends is cut at the drain limit, and the server returns.

mod common;

use std::time::{Duration, Instant};

use common::{absent, eventually, unique};
use tonic_etcd::server::RegisteredServer;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Registration};

const LIMIT: Duration = Duration::from_secs(10);

/// A registered greeter server with one Chat stream open on it through a
/// Balancer; returns the stop switch, the server task, the stream and the
/// key.
async fn serve_with_a_stream(
    server: impl FnOnce(RegisteredServer) -> (RegisteredServer, Greeter),
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), tonic_etcd::Error>>,
    tonic_etcd::server::Draining,
    (
        tokio::sync::mpsc::Sender<HelloRequest>,
        tonic::Streaming<tonic_etcd::testing::greeter::HelloReply>,
    ),
    Balancer,
) {
    let client = shared().client().await;
    let svc = unique("shutdown");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (server, greeter) = server(
        RegisteredServer::new(Registration::builder(client.clone()).service(&svc))
            .grace(Duration::ZERO),
    );
    let draining = server.draining();
    let router = tonic_etcd::server::builder().add_service(greeter.into_service());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve_with_shutdown(router, listener, async {
        let _ = stopped.await;
    }));
    let balancer = Balancer::builder(client, &svc).build().unwrap();
    balancer.wait_for_ready(1, LIMIT).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = GreeterClient::new(balancer.clone())
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(HelloRequest { name: "s".into() }).await.unwrap();
    replies.message().await.unwrap().expect("a reply");
    (stop, task, draining, (tx, replies), balancer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_ends_is_cut_at_the_drain_limit() {
    common::init_tracing();
    let limit = Duration::from_millis(500);
    let (stop, task, draining, (_tx, mut replies), balancer) =
        serve_with_a_stream(|s| (s.drain_timeout(limit), Greeter::new("g"))).await;
    assert!(!draining.is_started());
    let t0 = Instant::now();
    stop.send(()).unwrap();
    tokio::time::timeout(LIMIT, draining.started())
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, task)
        .await
        .expect("the server returns after the drain limit")
        .unwrap()
        .unwrap();
    let took = t0.elapsed();
    assert!(took >= limit, "it waited for the stream first: {took:?}");
    assert!(took < limit + Duration::from_secs(2), "{took:?}");
    // The cut reached the client: the stream fails, as a lost connection.
    let status = tokio::time::timeout(Duration::from_secs(2), replies.message())
        .await
        .expect("the stream is cut, not left open")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    drop(balancer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_watches_draining_ends_its_stream_and_shutdown_is_quick() {
    let (stop, task, _draining, (_tx, mut replies), balancer) = serve_with_a_stream(|s| {
        let greeter = Greeter::new("g").with_draining(s.draining());
        (s.drain_timeout(Duration::from_secs(30)), greeter)
    })
    .await;
    let key_gone = {
        let instance = balancer.ready_instances().pop().unwrap();
        format!("{}/{}", instance.service, instance.addr)
    };
    let t0 = Instant::now();
    stop.send(()).unwrap();
    let status = tokio::time::timeout(LIMIT, replies.message())
        .await
        .expect("the handler ends its stream")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    tokio::time::timeout(LIMIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let client = shared().client().await;
    eventually(LIMIT, "deregistered", || async {
        absent(&client, &key_gone).await.then_some(())
    })
    .await;
}

/// A load-report stream (ORCA out of band, what `drain --wait` and
/// weighted round robin follow) does not hold a shutting-down server until
/// its drain limit: it reports the server's last call ending, then ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_stream_ends_with_the_servers_last_call_at_shutdown() {
    use tokio_stream::StreamExt;
    let client = shared().client().await;
    let svc = unique("shutdown-orca");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let load = tonic_etcd::server::LoadReporter::new();
    let router = tonic_etcd::server::builder_with_load(load.clone()).add_service(
        Greeter::new("g")
            .with_delay(Duration::from_millis(800))
            .into_service(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        RegisteredServer::new(Registration::builder(client).service(&svc))
            .grace(Duration::ZERO)
            .drain_timeout(Duration::from_secs(30))
            .serve_with_shutdown(router, listener, async {
                let _ = stopped.await;
            }),
    );
    // Reports only when asked for (a long interval) and when the last call
    // ends.
    let mut reports = Box::pin(
        tonic_etcd::orca::watch(&addr, Duration::from_secs(60), LIMIT)
            .await
            .unwrap(),
    );
    let first = reports.next().await.unwrap().unwrap();
    assert_eq!(first.in_flight(), Some(0));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let call = tokio::spawn(async move {
        GreeterClient::new(channel)
            .say_hello(HelloRequest {
                name: "slow".into(),
            })
            .await
    });
    eventually(LIMIT, "the slow call in flight", || async {
        (load.in_flight() == 1).then_some(())
    })
    .await;

    let t0 = Instant::now();
    stop.send(()).unwrap();
    let mut last = None;
    while let Some(report) = tokio::time::timeout(LIMIT, reports.next())
        .await
        .expect("the stream ends with the last call, not at the drain limit")
    {
        last = Some(report.unwrap());
    }
    let last = last.expect("a report after shutdown began");
    assert_eq!(last.in_flight(), Some(0), "{last:?}");
    call.await.unwrap().expect("the call in flight is answered");
    tokio::time::timeout(LIMIT, task)
        .await
        .expect("the server returns once its last call ended")
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
