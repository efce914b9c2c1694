//! gRPC's interop test cases (`doc/interop-test-descriptions.md` in
//! grpc/grpc), run through the Balancer against two real interop servers
//! registered in real etcd, in three modes: no service config, a retry
//! policy for every method, a hedging policy for every method. The cases
//! are written for this crate from the public descriptions; the server is
//! `tonic_etcd::testing::interop`.
//!
//! Where tonic cannot express a description exactly, the case checks what
//! it means: a cancelled call has no status on a tonic client (its future is
//! dropped), so `cancel_after_begin` and `cancel_after_first_response`
//! check that the server saw the cancellation; tonic compresses every
//! message of a stream or none, so the compressed cases are the unary ones.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::Request;
use tonic_etcd::testing::interop::pb::test_service_client::TestServiceClient;
use tonic_etcd::testing::interop::pb::unimplemented_service_client::UnimplementedServiceClient;
use tonic_etcd::testing::interop::pb::{
    BoolValue, EchoStatus, Empty, Payload, ResponseParameters, SimpleRequest,
    StreamingInputCallRequest, StreamingOutputCallRequest,
};
use tonic_etcd::testing::interop::{Events, TestServer, ECHO_INITIAL, ECHO_TRAILING};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata, Registration, ServiceConfig};

const LIMIT: Duration = Duration::from_secs(10);
/// How soon a server must see a call the client cancelled.
const PROMPTLY: Duration = Duration::from_secs(3);

type Client = TestServiceClient<Balancer>;

#[derive(Debug, Clone, Copy)]
enum Mode {
    Plain,
    Retry,
    Hedging,
}

impl Mode {
    fn config(self) -> Option<ServiceConfig> {
        let policy = match self {
            Mode::Plain => return None,
            Mode::Retry => {
                r#""retryPolicy":{"maxAttempts":3,"initialBackoff":"0.01s","maxBackoff":"0.1s",
                   "backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}"#
            }
            Mode::Hedging => {
                r#""hedgingPolicy":{"maxAttempts":3,"hedgingDelay":"0.02s",
                   "nonFatalStatusCodes":["UNAVAILABLE"]}"#
            }
        };
        let json = format!(
            r#"{{"methodConfig":[{{"name":[{{"service":"grpc.testing.TestService"}}],{policy}}}]}}"#
        );
        Some(ServiceConfig::from_json(&json).expect("a valid service config"))
    }
}

/// Two interop servers in etcd, a Balancer in front of them.
struct Fixture {
    balancer: Balancer,
    events: Vec<Arc<Events>>,
    _regs: Vec<Registration>,
    _servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Fixture {
    async fn new(mode: Mode) -> Self {
        common::init_tracing();
        let etcd = shared().client().await;
        let svc = common::unique("interop");
        let (mut events, mut regs, mut servers) = (Vec::new(), Vec::new(), Vec::new());
        for id in ["a", "b"] {
            let server = TestServer::new(id);
            events.push(server.events());
            let (addr, task) = common::serve_interop(server).await;
            servers.push(task);
            regs.push(common::register_with(&etcd, &svc, &addr, Metadata::new()).await);
        }
        let mut builder = Balancer::builder(etcd, &svc);
        if let Some(config) = mode.config() {
            builder = builder.service_config(config);
        }
        let balancer = builder.build().unwrap();
        balancer.wait_for_ready(2, LIMIT).await.unwrap();
        Self {
            balancer,
            events,
            _regs: regs,
            _servers: servers,
        }
    }

    fn client(&self) -> Client {
        TestServiceClient::new(self.balancer.clone())
    }

    /// Cancellations of `method` on either server so far.
    fn cancellations(&self, method: &str) -> usize {
        self.events
            .iter()
            .flat_map(|e| e.cancellations())
            .filter(|c| c.method == method)
            .count()
    }

    fn started(&self) -> u64 {
        self.events.iter().map(|e| e.started()).sum()
    }
}

fn zeros(n: usize) -> Option<Payload> {
    Some(Payload {
        r#type: 0,
        body: vec![0; n],
    })
}

fn size_of(p: &Option<Payload>) -> usize {
    p.as_ref().map_or(0, |p| p.body.len())
}

fn output(sizes: &[i32], payload: usize) -> StreamingOutputCallRequest {
    StreamingOutputCallRequest {
        response_parameters: sizes
            .iter()
            .map(|&size| ResponseParameters {
                size,
                ..ResponseParameters::default()
            })
            .collect(),
        payload: (payload > 0).then(|| zeros(payload)).flatten(),
        ..StreamingOutputCallRequest::default()
    }
}

fn large() -> SimpleRequest {
    SimpleRequest {
        response_size: 314_159,
        payload: zeros(271_828),
        ..SimpleRequest::default()
    }
}

/// Every call's deadline unless a case says otherwise.
fn bounded<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.set_timeout(LIMIT);
    r
}

async fn empty_unary(f: &Fixture) {
    let r = f.client().empty_call(bounded(Empty {})).await.unwrap();
    assert_eq!(r.into_inner(), Empty {});
}

async fn large_unary(f: &Fixture) {
    let r = f.client().unary_call(bounded(large())).await.unwrap();
    assert_eq!(size_of(&r.into_inner().payload), 314_159);
}

async fn client_compressed_unary(f: &Fixture) {
    let expect = |on| SimpleRequest {
        expect_compressed: Some(BoolValue { value: on }),
        ..large()
    };
    // The probe: a server that checks says an uncompressed request that
    // claims otherwise is invalid.
    let err = f
        .client()
        .unary_call(bounded(expect(true)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let mut gzip = f.client().send_compressed(CompressionEncoding::Gzip);
    let r = gzip.unary_call(bounded(expect(true))).await.unwrap();
    assert_eq!(size_of(&r.into_inner().payload), 314_159);
    let r = f.client().unary_call(bounded(expect(false))).await.unwrap();
    assert_eq!(size_of(&r.into_inner().payload), 314_159);
}

async fn server_compressed_unary(f: &Fixture) {
    let mut client = f.client().accept_compressed(CompressionEncoding::Gzip);
    for on in [true, false] {
        let request = SimpleRequest {
            response_compressed: Some(BoolValue { value: on }),
            ..large()
        };
        let r = client.unary_call(bounded(request)).await.unwrap();
        let encoding = r.metadata().get("grpc-encoding").cloned();
        assert_eq!(size_of(&r.into_inner().payload), 314_159);
        if on {
            assert_eq!(encoding.as_ref().map(|e| e.to_str().unwrap()), Some("gzip"));
        }
    }
}

async fn client_streaming(f: &Fixture) {
    let sizes = [27_182, 8, 1_828, 45_904];
    let requests = sizes.map(|n| StreamingInputCallRequest {
        payload: zeros(n),
        ..StreamingInputCallRequest::default()
    });
    let r = f
        .client()
        .streaming_input_call(bounded(tokio_stream::iter(requests)))
        .await
        .unwrap();
    assert_eq!(r.into_inner().aggregated_payload_size, 74_922);
}

async fn server_streaming(f: &Fixture) {
    let sizes = [31_415, 9, 2_653, 58_979];
    let mut stream = f
        .client()
        .streaming_output_call(bounded(output(&sizes, 0)))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        got.push(size_of(&m.payload) as i32);
    }
    assert_eq!(got, sizes);
}

async fn ping_pong(f: &Fixture) {
    let (tx, rx) = mpsc::channel(1);
    let mut stream = f
        .client()
        .full_duplex_call(bounded(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    for (size, payload) in [(31_415, 27_182), (9, 8), (2_653, 1_828), (58_979, 45_904)] {
        tx.send(output(&[size], payload)).await.unwrap();
        let m = stream
            .message()
            .await
            .unwrap()
            .expect("a response per request");
        assert_eq!(size_of(&m.payload), size as usize);
    }
    drop(tx);
    assert!(stream.message().await.unwrap().is_none());
}

async fn empty_stream(f: &Fixture) {
    let mut stream = f
        .client()
        .full_duplex_call(bounded(tokio_stream::empty()))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_none());
}

/// Waits until the servers saw `n` cancellations of `method`: at once, far
/// sooner than the call's own deadline (`LIMIT`) would end it.
async fn cancelled(f: &Fixture, method: &str, n: usize) {
    common::eventually(PROMPTLY, "the server saw the cancellation", || async {
        (f.cancellations(method) >= n).then_some(())
    })
    .await;
}

async fn cancel_after_begin(f: &Fixture) {
    let before = f.cancellations("StreamingInputCall");
    let started = f.started();
    let (tx, rx) = mpsc::channel::<StreamingInputCallRequest>(1);
    let mut client = f.client();
    let call = tokio::spawn(async move {
        client
            .streaming_input_call(bounded(ReceiverStream::new(rx)))
            .await
    });
    common::eventually(LIMIT, "the call began on a server", || async {
        (f.started() > started).then_some(())
    })
    .await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    cancelled(f, "StreamingInputCall", before + 1).await;
    tokio::time::timeout(PROMPTLY, tx.closed())
        .await
        .expect("the request sender learns the call is over");
}

async fn cancel_after_first_response(f: &Fixture) {
    let before = f.cancellations("FullDuplexCall");
    let (tx, rx) = mpsc::channel(1);
    let mut stream = f
        .client()
        .full_duplex_call(bounded(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    tx.send(output(&[31_415], 27_182)).await.unwrap();
    let m = stream.message().await.unwrap().unwrap();
    assert_eq!(size_of(&m.payload), 31_415);
    drop(stream);
    cancelled(f, "FullDuplexCall", before + 1).await;
    tokio::time::timeout(PROMPTLY, tx.closed())
        .await
        .expect("the request sender learns the call is over");
}

async fn timeout_on_sleeping_server(f: &Fixture) {
    let (tx, rx) = mpsc::channel(1);
    tx.send(output(&[], 27_182)).await.unwrap();
    let mut request = Request::new(ReceiverStream::new(rx));
    request.set_timeout(Duration::from_millis(1));
    let code = match f.client().full_duplex_call(request).await {
        Err(status) => status.code(),
        Ok(r) => match r.into_inner().message().await {
            Err(status) => status.code(),
            Ok(m) => panic!("the call outlived its 1 ms deadline: {m:?}"),
        },
    };
    assert_eq!(code, tonic::Code::DeadlineExceeded);
}

async fn custom_metadata(f: &Fixture) {
    let initial = MetadataValue::from_static("test_initial_metadata_value");
    let trailing = BinaryMetadataValue::from_bytes(&[0xab, 0xab, 0xab]);
    let decorate = |r: &mut tonic::metadata::MetadataMap| {
        r.insert(ECHO_INITIAL, initial.clone());
        r.insert_bin(ECHO_TRAILING, trailing.clone());
    };
    // Unary: tonic merges the trailers into the response's metadata.
    let mut request = bounded(large());
    decorate(request.metadata_mut());
    let r = f.client().unary_call(request).await.unwrap();
    assert_eq!(r.metadata().get(ECHO_INITIAL), Some(&initial));
    assert_eq!(r.metadata().get_bin(ECHO_TRAILING), Some(&trailing));
    // Full duplex: the initial metadata with the headers, the trailing in
    // the trailers.
    let (tx, rx) = mpsc::channel(1);
    let mut request = bounded(ReceiverStream::new(rx));
    decorate(request.metadata_mut());
    let r = f.client().full_duplex_call(request).await.unwrap();
    assert_eq!(r.metadata().get(ECHO_INITIAL), Some(&initial));
    let mut stream = r.into_inner();
    tx.send(output(&[314_159], 271_828)).await.unwrap();
    drop(tx);
    let m = stream.message().await.unwrap().unwrap();
    assert_eq!(size_of(&m.payload), 314_159);
    assert!(stream.message().await.unwrap().is_none());
    let trailers = stream.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get_bin(ECHO_TRAILING), Some(&trailing));
}

async fn status_is_echoed(f: &Fixture, message: &str) {
    let status = EchoStatus {
        code: 2,
        message: message.to_owned(),
    };
    let request = SimpleRequest {
        response_status: Some(status.clone()),
        ..SimpleRequest::default()
    };
    let err = f.client().unary_call(bounded(request)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unknown);
    assert_eq!(err.message(), message);
    let request = StreamingOutputCallRequest {
        response_status: Some(status),
        ..StreamingOutputCallRequest::default()
    };
    let mut stream = f
        .client()
        .full_duplex_call(bounded(tokio_stream::iter([request])))
        .await
        .unwrap()
        .into_inner();
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unknown);
    assert_eq!(err.message(), message);
}

async fn status_code_and_message(f: &Fixture) {
    status_is_echoed(f, "test status message").await;
}

async fn special_status_message(f: &Fixture) {
    status_is_echoed(
        f,
        "\t\ntest with whitespace\r\nand Unicode BMP \u{263a} and non-BMP \u{1f608}\t\n",
    )
    .await;
}

async fn unimplemented_method(f: &Fixture) {
    let err = f
        .client()
        .unimplemented_call(bounded(Empty {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}

async fn unimplemented_service(f: &Fixture) {
    let err = UnimplementedServiceClient::new(f.balancer.clone())
        .unimplemented_call(bounded(Empty {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}

/// Runs every case in `mode`, each to its end, and names the ones that
/// failed.
async fn run(mode: Mode) {
    let f = Fixture::new(mode).await;
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {{
            let mut failed = Vec::new();
            $(
                // A panicking case fails alone; the others still run.
                let outcome = tokio::time::timeout(
                    LIMIT * 2,
                    catch_panic(async { $case(&f).await }),
                )
                .await;
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failed.push(format!("{}: {e}", stringify!($case))),
                    Err(_) => failed.push(format!("{}: timed out", stringify!($case))),
                }
            )*
            failed
        }};
    }
    let failed = cases!(
        empty_unary,
        large_unary,
        client_compressed_unary,
        server_compressed_unary,
        client_streaming,
        server_streaming,
        ping_pong,
        empty_stream,
        cancel_after_begin,
        cancel_after_first_response,
        timeout_on_sleeping_server,
        custom_metadata,
        status_code_and_message,
        special_status_message,
        unimplemented_method,
        unimplemented_service,
    );
    assert!(failed.is_empty(), "{mode:?}: {failed:#?}");
}

/// Runs `case`, turning a panic into an error that names it.
async fn catch_panic<F: std::future::Future<Output = ()>>(case: F) -> Result<(), String> {
    use std::panic::AssertUnwindSafe;
    let mut case = std::pin::pin!(case);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| case.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(())) => std::task::Poll::Ready(Ok(())),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default())),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_cases_without_a_service_config() {
    run(Mode::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_cases_with_a_retry_policy_for_every_method() {
    run(Mode::Retry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_cases_with_a_hedging_policy_for_every_method() {
    run(Mode::Hedging).await;
}
