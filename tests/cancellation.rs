//! A call that ends on the client reaches the server: whatever ended it (its
//! deadline, before or after the response headers, or the caller dropping
//! the response) and whatever the state of its request stream, the
//! server's handler is cancelled at once (`RST_STREAM CANCEL`), and a caller
//! still holding its request sender learns the call is over. The servers
//! are real tonic servers (gRPC's interop service) registered in real etcd;
//! they record when each handler was cancelled.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic_etcd::testing::interop::pb::test_service_client::TestServiceClient;
use tonic_etcd::testing::interop::pb::{
    ResponseParameters, SimpleRequest, StreamingInputCallRequest, StreamingOutputCallRequest,
};
use tonic_etcd::testing::interop::{Cancellation, Events, TestServer, DELAY_HEADER};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata, Registration, ServiceConfig};

const LIMIT: Duration = Duration::from_secs(10);
/// Every deadline in these tests.
const DEADLINE: Duration = Duration::from_millis(300);
/// How late after the call ended the server may see it: far below the
/// handlers' 30 s, far above a loaded machine's scheduling delay.
const SLACK: Duration = Duration::from_millis(1_500);
/// A handler that would run this long unless cancelled.
const FOREVER: &str = "30000";

type Client = TestServiceClient<Balancer>;

/// One interop server registered in etcd, and a Balancer in front of it.
struct Fixture {
    client: Client,
    events: Arc<Events>,
    _reg: Registration,
    _server: tokio::task::JoinHandle<()>,
}

impl Fixture {
    async fn new() -> Self {
        common::init_tracing();
        let etcd = shared().client().await;
        let svc = common::unique("cancel");
        let server = TestServer::new("only");
        let events = server.events();
        let (addr, task) = common::serve_interop(server).await;
        let reg = common::register_with(&etcd, &svc, &addr, Metadata::new()).await;
        let b = Balancer::builder(etcd, &svc).build().unwrap();
        b.wait_for_ready(1, LIMIT).await.unwrap();
        Self {
            client: TestServiceClient::new(b),
            events,
            _reg: reg,
            _server: task,
        }
    }

    /// Drops the caller's `call` (its task) once the server's handler has
    /// started, and waits for the server to see the cancellation.
    async fn drop_once_started<T>(&self, call: tokio::task::JoinHandle<T>, method: &str) {
        common::eventually(LIMIT, "the handler started", || async {
            (self.events.started() == 1).then_some(())
        })
        .await;
        call.abort();
        let dropped = Instant::now();
        self.cancelled(method, dropped).await;
    }

    /// The server's record of the one cancelled handler of `method`, which
    /// it must see no later than `SLACK` after `ended`.
    async fn cancelled(&self, method: &str, ended: Instant) -> Cancellation {
        let events = self.events.clone();
        let seen = common::eventually(SLACK * 3, "the server saw the cancellation", || {
            let events = events.clone();
            async move {
                events
                    .cancellations()
                    .into_iter()
                    .find(|c| c.method == method)
            }
        })
        .await;
        let late = seen.seen.saturating_duration_since(ended);
        assert!(
            late <= SLACK,
            "{method}: the server saw the cancellation {late:?} after the call ended"
        );
        assert_eq!(self.events.completed(), 0, "no handler ran to its end");
        seen
    }
}

fn with_deadline<T>(message: T, delay: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(DEADLINE);
    if let Some(ms) = delay {
        request
            .metadata_mut()
            .insert(DELAY_HEADER, ms.parse().unwrap());
    }
    request
}

fn responses(sizes_and_intervals: &[(i32, i32)]) -> StreamingOutputCallRequest {
    StreamingOutputCallRequest {
        response_parameters: sizes_and_intervals
            .iter()
            .map(|&(size, interval_us)| ResponseParameters {
                size,
                interval_us,
                compressed: None,
            })
            .collect(),
        ..StreamingOutputCallRequest::default()
    }
}

/// Waits (bounded) until the caller's request sender sees the call over.
async fn sender_learns<T>(tx: &mpsc::Sender<T>) {
    tokio::time::timeout(SLACK * 3, tx.closed())
        .await
        .expect("the caller's request sender learns that the call is over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_deadline_before_the_response_reaches_the_server() {
    let f = Fixture::new().await;
    let start = Instant::now();
    let request = with_deadline(SimpleRequest::default(), Some(FOREVER));
    let err = f.client.clone().unary_call(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    f.cancelled("UnaryCall", start + DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_dropped_by_the_caller_reaches_the_server() {
    let f = Fixture::new().await;
    let mut request = Request::new(SimpleRequest::default());
    request
        .metadata_mut()
        .insert(DELAY_HEADER, FOREVER.parse().unwrap());
    let mut client = f.client.clone();
    let call = tokio::spawn(async move { client.unary_call(request).await });
    f.drop_once_started(call, "UnaryCall").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_stream_deadline_while_the_caller_holds_its_sender() {
    let f = Fixture::new().await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(StreamingInputCallRequest::default()).await.unwrap();
    let start = Instant::now();
    let request = with_deadline(ReceiverStream::new(rx), None);
    let err = f
        .client
        .clone()
        .streaming_input_call(request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    f.cancelled("StreamingInputCall", start + DEADLINE).await;
    sender_learns(&tx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_stream_dropped_while_the_caller_holds_its_sender() {
    let f = Fixture::new().await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(StreamingInputCallRequest::default()).await.unwrap();
    let mut client = f.client.clone();
    let call = tokio::spawn(async move {
        client
            .streaming_input_call(Request::new(ReceiverStream::new(rx)))
            .await
    });
    f.drop_once_started(call, "StreamingInputCall").await;
    sender_learns(&tx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_deadline_before_the_response_headers() {
    let f = Fixture::new().await;
    let start = Instant::now();
    let request = with_deadline(responses(&[(1, 0)]), Some(FOREVER));
    let err = f
        .client
        .clone()
        .streaming_output_call(request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    f.cancelled("StreamingOutputCall", start + DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_deadline_after_the_response_headers() {
    let f = Fixture::new().await;
    let start = Instant::now();
    // One response at once, the next in 30 s.
    let request = with_deadline(responses(&[(1, 0), (1, 30_000_000)]), None);
    let mut stream = f
        .client
        .clone()
        .streaming_output_call(request)
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    // The caller still holds the response stream.
    f.cancelled("StreamingOutputCall", start + DEADLINE).await;
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_dropped_after_the_first_response() {
    let f = Fixture::new().await;
    let request = Request::new(responses(&[(1, 0), (1, 30_000_000)]));
    let mut stream = f
        .client
        .clone()
        .streaming_output_call(request)
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    drop(stream);
    f.cancelled("StreamingOutputCall", Instant::now()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_deadline_before_the_response_headers() {
    let f = Fixture::new().await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(responses(&[(1, 0)])).await.unwrap();
    let start = Instant::now();
    let request = with_deadline(ReceiverStream::new(rx), Some(FOREVER));
    let err = f
        .client
        .clone()
        .full_duplex_call(request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    f.cancelled("FullDuplexCall", start + DEADLINE).await;
    sender_learns(&tx).await;
}

/// The case the issue measured: the caller reads the response stream,
/// which fails with DEADLINE_EXCEEDED, and still holds its request sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_deadline_after_the_response_headers_while_reading() {
    let f = Fixture::new().await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(responses(&[(1, 0)])).await.unwrap();
    let start = Instant::now();
    let request = with_deadline(ReceiverStream::new(rx), None);
    let mut stream = f
        .client
        .clone()
        .full_duplex_call(request)
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    f.cancelled("FullDuplexCall", start + DEADLINE).await;
    sender_learns(&tx).await;
    drop(stream);
}

/// Nobody reads the response: the deadline alone must end the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_deadline_after_the_response_headers_without_reading() {
    let f = Fixture::new().await;
    let (tx, rx) = mpsc::channel(4);
    let start = Instant::now();
    let request = with_deadline(ReceiverStream::new(rx), None);
    let stream = f
        .client
        .clone()
        .full_duplex_call(request)
        .await
        .unwrap()
        .into_inner();
    f.cancelled("FullDuplexCall", start + DEADLINE).await;
    sender_learns(&tx).await;
    drop(stream);
}

/// gRPC's `cancel_after_first_response`, with the sender still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_dropped_after_the_first_response_while_the_caller_holds_its_sender() {
    let f = Fixture::new().await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(responses(&[(31415, 0)])).await.unwrap();
    let mut stream = f
        .client
        .clone()
        .full_duplex_call(Request::new(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    drop(stream);
    f.cancelled("FullDuplexCall", Instant::now()).await;
    sender_learns(&tx).await;
}

/// A hedge that loses is cancelled on its server as soon as another wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_losing_hedge_is_cancelled_on_its_server() {
    common::init_tracing();
    let etcd = shared().client().await;
    let svc = common::unique("cancel-hedge");
    let slow = TestServer::new("slow").with_delay(Duration::from_secs(30));
    let slow_events = slow.events();
    let (slow_addr, _slow) = common::serve_interop(slow).await;
    let (fast_addr, _fast) = common::serve_interop(TestServer::new("fast")).await;
    let _r1 = common::register_with(&etcd, &svc, &slow_addr, Metadata::new()).await;
    let _r2 = common::register_with(&etcd, &svc, &fast_addr, Metadata::new()).await;
    let config = ServiceConfig::from_json(
        r#"{"methodConfig":[{"name":[{"service":"grpc.testing.TestService"}],
            "hedgingPolicy":{"maxAttempts":2,"hedgingDelay":"0.05s"}}]}"#,
    )
    .unwrap();
    let b = Balancer::builder(etcd, &svc)
        .service_config(config)
        .build()
        .unwrap();
    b.wait_for_ready(2, LIMIT).await.unwrap();
    let mut client = TestServiceClient::new(b);
    // Whichever server an attempt lands on first, the fast one answers.
    for _ in 0..20 {
        let mut request = Request::new(SimpleRequest {
            fill_server_id: true,
            ..SimpleRequest::default()
        });
        request.set_timeout(Duration::from_secs(5));
        let response = client.unary_call(request).await.unwrap().into_inner();
        assert_eq!(response.server_id, "fast");
    }
    let started = slow_events.started();
    assert!(started >= 1, "some first attempt went to the slow server");
    let cancelled = common::eventually(SLACK * 3, "every losing hedge cancelled", || {
        let events = slow_events.clone();
        async move {
            let c = events.cancellations();
            (c.len() as u64 == started).then_some(c)
        }
    })
    .await;
    for c in cancelled {
        // Each lost within hedgingDelay plus the fast server's answer.
        let ran = c.seen.saturating_duration_since(c.started);
        assert!(ran <= SLACK, "a losing hedge ran on for {ran:?}");
    }
}

/// The status a server answers a unary `UnaryCall` with, sent over a bare
/// HTTP/2 connection (tonic's channel would enforce `grpc-timeout` itself,
/// and say CANCELLED before the server says anything).
async fn raw_unary_status(addr: &str, timeout: &str) -> String {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = http::Request::post(format!("http://{addr}/grpc.testing.TestService/UnaryCall"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .header(DELAY_HEADER, FOREVER)
        // One empty message: not compressed, 0 bytes.
        .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ])))
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    if let Some(code) = parts.headers.get("grpc-status") {
        return code.to_str().unwrap().to_owned();
    }
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    trailers["grpc-status"].to_str().unwrap().to_owned()
}

/// A server built on `tonic_etcd::server::builder()` answers a call whose
/// deadline passed with DEADLINE_EXCEEDED (4), as grpc-go's server does;
/// tonic's own says CANCELLED (1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_an_expired_deadline_with_deadline_exceeded() {
    let server = TestServer::new("only");
    let (addr, _task) = common::serve_interop(server).await;
    for timeout in ["1m", "5m", "50m", "300m", "1500u"] {
        let start = Instant::now();
        let code = tokio::time::timeout(LIMIT, raw_unary_status(&addr, timeout))
            .await
            .expect("the server ends the call at its deadline");
        assert_eq!(code, "4", "grpc-timeout {timeout}");
        assert!(start.elapsed() < SLACK);
    }
}
