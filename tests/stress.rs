//! The Balancer under stress, against real etcd and real tonic servers:
//! storms of calls cancelled at their deadline must fail alone, with
//! `DEADLINE_EXCEEDED`, and never cost the connection they ran on; a
//! deadline shorter than the timer tick is never sent.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backend::Backend;
use common::unique;
use tonic_etcd::balancer::OutlierDetection;
use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata};

const LIMIT: Duration = Duration::from_secs(10);

/// 64 callers, each call with a 5 ms deadline against a backend that
/// answers in 20 ms: every call expires, the server's answers keep
/// arriving for streams the client already reset (which h2, by default,
/// counts toward closing the connection after 1,024). Every call must end
/// as `DEADLINE_EXCEEDED`, and the one connection must live through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_expired_calls_fails_alone_and_keeps_the_connection() {
    let client = shared().client().await;
    let svc = unique("storm");
    let backend = Backend::start_slow("127.0.0.1:0", "slow", Duration::from_millis(20));
    let _reg = common::register_with(&client, &svc, &backend.addr, Metadata::new()).await;
    let b = Balancer::builder(client.clone(), &svc)
        .outlier_detection(OutlierDetection::disabled())
        .build()
        .unwrap();
    b.wait_for_ready(1, LIMIT).await.unwrap();

    const CALLERS: usize = 64;
    const CALLS: usize = 6_000; // several times h2's default limit of 1,024
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(CALLS));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let (b, left) = (b.clone(), left.clone());
        tasks.spawn(async move {
            let mut codes = BTreeMap::<String, (usize, String)>::new();
            let mut greeter = GreeterClient::new(b);
            let started = tokio::time::Instant::now();
            while left
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |n| n.checked_sub(1),
                )
                .is_ok()
                && started.elapsed() < Duration::from_secs(60)
            {
                let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
                request.set_timeout(Duration::from_millis(5));
                let code = match greeter.say_hello(request).await {
                    Ok(_) => "Ok".to_owned(),
                    Err(s) => format!("{:?}: {}", s.code(), s.message()),
                };
                // Group messages by their words, without numbers.
                let key: String = code
                    .chars()
                    .filter(|c| !c.is_ascii_digit())
                    .take(90)
                    .collect();
                // One whole message per group, to read in a failure.
                codes.entry(key).or_insert_with(|| (0, code)).0 += 1;
            }
            codes
        });
    }
    let mut codes = BTreeMap::<String, (usize, String)>::new();
    while let Some(done) = tasks.join_next().await {
        for (k, (n, example)) in done.unwrap() {
            codes.entry(k).or_insert_with(|| (0, example)).0 += n;
        }
    }
    let total: usize = codes.values().map(|(n, _)| n).sum();
    assert_eq!(total, CALLS, "{codes:?}");
    let not_deadline: BTreeMap<&String, &(usize, String)> = codes
        .iter()
        .filter(|(k, _)| !k.starts_with("DeadlineExceeded"))
        .collect();
    assert!(
        not_deadline.is_empty(),
        "every call expired, so every call must say DEADLINE_EXCEEDED: {codes:?}"
    );
    // The connection lived: a call with room to finish succeeds at once on
    // the endpoint still in rotation, which never had to reconnect.
    let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
    request.set_timeout(Duration::from_secs(2));
    GreeterClient::new(b.clone())
        .say_hello(request)
        .await
        .unwrap();
    let endpoints = b.endpoints();
    assert_eq!(endpoints.len(), 1);
    assert!(
        endpoints[0].last_error.is_none(),
        "{:?}",
        endpoints[0].last_error
    );
    assert_eq!(
        backend.accepted(),
        1,
        "the storm cost the connection: the server accepted a second one ({codes:?})"
    );
}

/// A deadline shorter than tokio's 1 ms timer tick (a service config
/// `timeout` of 1 µs, as an operator might write by mistake) must still stop
/// every call: none is sent past its deadline, none succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_shorter_than_the_timer_tick_is_never_sent() {
    let client = shared().client().await;
    let svc = unique("tiny-deadline");
    let backend = Backend::start("fast");
    let _reg = common::register_with(&client, &svc, &backend.addr, Metadata::new()).await;
    let config = tonic_etcd::ServiceConfig::from_json(
        r#"{"methodConfig":[{"name":[{}],"timeout":"0.000001s"}]}"#,
    )
    .unwrap();
    let b = Balancer::builder(client.clone(), &svc)
        .service_config(config)
        .service_config_from_etcd(false)
        .build()
        .unwrap();
    b.wait_for_ready(1, LIMIT).await.unwrap();
    let mut codes = BTreeMap::<String, usize>::new();
    for _ in 0..50 {
        let request = tonic::Request::new(HelloRequest { name: "x".into() });
        let code = match GreeterClient::new(b.clone()).say_hello(request).await {
            Ok(_) => "Ok".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        *codes.entry(code).or_default() += 1;
    }
    assert_eq!(
        codes,
        BTreeMap::from([("DeadlineExceeded".to_owned(), 50)]),
        "a call whose deadline passed must never be sent"
    );
}

/// HTTP/2 DATA frames a client sent, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct DataFrames {
    /// Non-final frames with a payload: what h2 (>= 0.4.16) servers charge
    /// to their small-frame budget.
    open: usize,
    /// Empty non-final frames (h2 servers close the connection after 100).
    empty_open: usize,
    /// Frames with `END_STREAM`.
    last: usize,
}

/// A loopback relay for one connection that reads the client's HTTP/2
/// frames on their way to `target` and counts its DATA frames.
async fn frame_counting_relay(target: String) -> (String, Arc<std::sync::Mutex<DataFrames>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let counts = Arc::new(std::sync::Mutex::new(DataFrames::default()));
    let seen = counts.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(target).await.unwrap();
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut server_rx, &mut client_tx).await });
        const PREFACE: usize = 24;
        let mut pending = Vec::new();
        let mut preface_left = PREFACE;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if server_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
            pending.extend_from_slice(&buf[..n]);
            let skip = preface_left.min(pending.len());
            pending.drain(..skip);
            preface_left -= skip;
            // Whole frames: a 9-byte header (24-bit length, type, flags,
            // stream id), then the payload.
            while pending.len() >= 9 {
                let len = usize::from(pending[0]) << 16
                    | usize::from(pending[1]) << 8
                    | usize::from(pending[2]);
                if pending.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (pending[3], pending[4]);
                if kind == 0 {
                    let mut c = seen.lock().unwrap();
                    match (flags & 0x1 != 0, len == 0) {
                        (true, _) => c.last += 1,
                        (false, true) => c.empty_open += 1,
                        (false, false) => c.open += 1,
                    }
                }
                pending.drain(..9 + len);
            }
        }
    });
    (addr, counts)
}

/// A unary request is one DATA frame that ends the stream (as grpc-go
/// sends it), not a small DATA frame and an empty one to end it: h2 servers
/// (>= 0.4.16) charge every non-final small DATA frame to a budget that a
/// frame arriving after the server answered never gets back, so a storm of
/// cancelled unary calls closed the connection (GOAWAY ENHANCE_YOUR_CALM
/// "too_many_data_frames"). A client stream's messages are non-final by
/// nature; its last one ends the stream as soon as the caller's sender is
/// dropped with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_request_is_one_data_frame_that_ends_the_stream() {
    let client = shared().client().await;
    let svc = unique("frames");
    let backend = Backend::start("frames");
    let (relay, frames) = frame_counting_relay(backend.addr.clone()).await;
    let _reg = common::register_with(&client, &svc, &relay, Metadata::new()).await;
    let b = Balancer::builder(client.clone(), &svc).build().unwrap();
    b.wait_for_ready(1, LIMIT).await.unwrap();
    let mut greeter = GreeterClient::new(b.clone());
    const CALLS: usize = 20;
    for _ in 0..CALLS {
        greeter
            .say_hello(HelloRequest { name: "x".into() })
            .await
            .unwrap();
    }
    let seen = *frames.lock().unwrap();
    assert_eq!(
        seen,
        DataFrames {
            open: 0,
            empty_open: 0,
            last: CALLS
        },
        "each unary request must be one DATA frame with END_STREAM"
    );
}

/// A greeter whose server stream sends a small message every millisecond
/// until the client goes away.
mod trickle {
    use std::pin::Pin;
    use std::time::Duration;

    use tonic::{Request, Response, Status};
    use tonic_etcd::testing::greeter::pb::greeter_server::Greeter;
    use tonic_etcd::testing::greeter::{HelloReply, HelloRequest};

    pub type Replies = Pin<Box<dyn tokio_stream::Stream<Item = Result<HelloReply, Status>> + Send>>;

    pub struct Trickle;

    #[tonic::async_trait]
    impl Greeter for Trickle {
        type SayHelloStreamStream = Replies;
        type ChatStream = Replies;

        async fn say_hello(
            &self,
            _: Request<HelloRequest>,
        ) -> Result<Response<HelloReply>, Status> {
            Ok(Response::new(HelloReply::default()))
        }

        async fn say_hello_stream(
            &self,
            _: Request<HelloRequest>,
        ) -> Result<Response<Replies>, Status> {
            let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
                Duration::from_millis(1),
            ));
            Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
                ticks,
                |_| {
                    Ok(HelloReply {
                        message: "x".into(),
                        server_id: String::new(),
                    })
                },
            ))))
        }

        async fn chat(
            &self,
            _: Request<tonic::Streaming<HelloRequest>>,
        ) -> Result<Response<Replies>, Status> {
            Err(Status::unimplemented("chat"))
        }
    }
}

/// Callers that read one message of a server stream and drop it, 3,200
/// times: the server's next message is often on the wire when the client
/// resets the stream. h2 (0.4.16 to 0.4.20 at least) charges every such
/// small DATA frame to the connection's small-frame budget and never
/// refunds it while it remembers the reset stream, so the client closed its
/// own connection (GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames") once
/// enough had arrived over the connection's life: about 10,000 with hyper's
/// default 5 MB window. The Balancer's h2 forgets a reset stream at once; a
/// late frame is then answered with a reset and costs nothing. The test
/// sets a 1 MB window (h2's budget is half of it: about 2,100 late frames)
/// so that a few thousand dropped streams would do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_drops_its_streams_early_keeps_the_connection() {
    // Its own runtime thread, as a separate process would have.
    let backend = Backend::serve(
        "127.0.0.1:0",
        tonic_etcd::server::builder().add_service(
            tonic_etcd::testing::greeter::GreeterServer::new(trickle::Trickle),
        ),
    );
    let addr = backend.addr.clone();
    let client = shared().client().await;
    let svc = unique("dropped-streams");
    let _reg = common::register_with(&client, &svc, &addr, Metadata::new()).await;
    let b = Balancer::builder(client.clone(), &svc)
        .initial_connection_window_size(1 << 20)
        .build()
        .unwrap();
    b.wait_for_ready(1, LIMIT).await.unwrap();

    const CALLERS: usize = 16;
    const STREAMS_EACH: usize = 200;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let b = b.clone();
        tasks.spawn(async move {
            let mut greeter = GreeterClient::new(b);
            let mut failures = Vec::new();
            let started = tokio::time::Instant::now();
            for _ in 0..STREAMS_EACH {
                if started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
                request.set_timeout(Duration::from_secs(5));
                let first = match greeter.say_hello_stream(request).await {
                    Ok(stream) => stream.into_inner().message().await.map(|_| ()),
                    Err(status) => Err(status),
                };
                if let Err(status) = first {
                    failures.push(status.to_string());
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        failures.extend(done.unwrap());
    }
    failures.truncate(3);
    assert!(failures.is_empty(), "streams failed: {failures:?}");
    assert_eq!(
        backend.accepted(),
        1,
        "the client closed its connection and opened another"
    );
}
