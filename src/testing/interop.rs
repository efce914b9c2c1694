//! gRPC's interop test service (`grpc.testing.TestService`), written for
//! this crate from gRPC's public interop protos and test descriptions, for
//! the interop and cancellation tests: it answers as any gRPC
//! implementation's interop server does, and it counts how each handler
//! ended, so a test can tell whether a cancelled call reached the server.
//!
//! Beyond the descriptions, a request may carry `x-interop-delay-ms`: the
//! handler waits that long before its response headers (a server slow to
//! start answering), and the server may wait before every call
//! ([`TestServer::with_delay`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status, Streaming};

/// The generated `grpc.testing` messages, client and server.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("grpc.testing");
}

use pb::test_service_server::{TestService, TestServiceServer};
use pb::*;

/// The header whose value (milliseconds) a handler waits before answering.
pub const DELAY_HEADER: &str = "x-interop-delay-ms";
/// Echoed into the response headers (the `custom_metadata` case).
pub const ECHO_INITIAL: &str = "x-grpc-test-echo-initial";
/// Echoed into the trailers (the `custom_metadata` case).
pub const ECHO_TRAILING: &str = "x-grpc-test-echo-trailing-bin";

/// How the handlers of one server ended.
#[derive(Debug, Default)]
pub struct Events {
    started: AtomicU64,
    completed: AtomicU64,
    cancelled: Mutex<Vec<Cancellation>>,
}

/// A call the server dropped before its response ended: the client reset
/// the stream (or went away). tonic hands a handler a request stream the
/// client reset as if the client had half-closed it, so the server's truth
/// is whether its response was delivered.
#[derive(Debug, Clone)]
pub struct Cancellation {
    /// The method, as `TestService`'s (`"FullDuplexCall"`).
    pub method: String,
    /// When the call arrived.
    pub started: Instant,
    /// When the server saw the cancellation.
    pub seen: Instant,
}

impl Events {
    /// Calls that arrived so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Calls whose response the server sent to its end (a status the
    /// handler chose counts).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    /// Calls that were cancelled, in the order the server saw it.
    pub fn cancellations(&self) -> Vec<Cancellation> {
        self.cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One call's life on the server, from the request to the end of its
/// response: dropped before the response ended (hyper drops it when the
/// client resets the stream), the call was cancelled.
struct Witness {
    events: Arc<Events>,
    method: String,
    started: Instant,
    done: bool,
}

impl Witness {
    fn new(events: Arc<Events>, path: &str) -> Self {
        events.started.fetch_add(1, Ordering::SeqCst);
        Self {
            events,
            method: path.rsplit('/').next().unwrap_or(path).to_owned(),
            started: Instant::now(),
            done: false,
        }
    }

    fn done(&mut self) {
        if !std::mem::replace(&mut self.done, true) {
            self.events.completed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        if !self.done {
            let c = Cancellation {
                method: std::mem::take(&mut self.method),
                started: self.started,
                seen: Instant::now(),
            };
            self.events
                .cancelled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(c);
        }
    }
}

/// The interop server. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct TestServer {
    id: String,
    delay: Duration,
    events: Arc<Events>,
}

impl TestServer {
    /// A server that names itself `id` in `SimpleResponse.server_id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            delay: Duration::ZERO,
            events: Arc::default(),
        }
    }

    /// Waits `delay` before the response headers of every call.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// How this server's handlers ended.
    pub fn events(&self) -> Arc<Events> {
        self.events.clone()
    }

    /// The service to add to a tonic server: `TestService` with the
    /// metadata echo of the `custom_metadata` case, and the record of how
    /// each call ended.
    pub fn into_service(self) -> Echo<TestServiceServer<Self>> {
        let events = self.events.clone();
        let inner = TestServiceServer::new(self)
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip);
        Echo { inner, events }
    }

    /// Waits the server's and the request's delay before a handler answers.
    async fn start<T>(&self, request: &Request<T>) {
        let asked = request
            .metadata()
            .get(DELAY_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_millis);
        let delay = self.delay + asked;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

/// `size` zero bytes, as the descriptions ask (`COMPRESSABLE`).
fn payload(size: i32) -> Option<Payload> {
    Some(Payload {
        r#type: PayloadType::Compressable as i32,
        body: vec![0; usize::try_from(size).unwrap_or(0)],
    })
}

/// The status a request asks for, when it is not `OK`.
fn asked_status(status: Option<&EchoStatus>) -> Option<Status> {
    let s = status.filter(|s| s.code != 0)?;
    Some(Status::new(tonic::Code::from(s.code), s.message.clone()))
}

type Outbound = ReceiverStream<Result<StreamingOutputCallResponse, Status>>;

/// Sends the responses `request` asks for; false once the client is gone.
async fn respond(
    tx: &mpsc::Sender<Result<StreamingOutputCallResponse, Status>>,
    request: &StreamingOutputCallRequest,
) -> bool {
    for p in &request.response_parameters {
        let interval = Duration::from_micros(u64::try_from(p.interval_us).unwrap_or(0));
        if !interval.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = tx.closed() => return false,
            }
        }
        let response = StreamingOutputCallResponse {
            payload: payload(p.size),
        };
        if tx.send(Ok(response)).await.is_err() {
            return false;
        }
    }
    true
}

#[tonic::async_trait]
impl TestService for TestServer {
    async fn empty_call(&self, request: Request<Empty>) -> Result<Response<Empty>, Status> {
        self.start(&request).await;
        Ok(Response::new(Empty {}))
    }

    async fn unary_call(
        &self,
        request: Request<SimpleRequest>,
    ) -> Result<Response<SimpleResponse>, Status> {
        self.start(&request).await;
        let compressed = request
            .metadata()
            .get("grpc-encoding")
            .is_some_and(|e| e != "identity");
        let request = request.into_inner();
        if request.expect_compressed.is_some_and(|e| e.value) && !compressed {
            return Err(Status::invalid_argument("expected a compressed request"));
        }
        if let Some(status) = asked_status(request.response_status.as_ref()) {
            return Err(status);
        }
        let mut response = Response::new(SimpleResponse {
            payload: payload(request.response_size),
            server_id: if request.fill_server_id {
                self.id.clone()
            } else {
                String::new()
            },
            ..SimpleResponse::default()
        });
        // The `server_compressed_unary` case: compressed unless told not to.
        if request.response_compressed.is_some_and(|c| !c.value) {
            response.disable_compression();
        }
        Ok(response)
    }

    type StreamingOutputCallStream = Outbound;

    async fn streaming_output_call(
        &self,
        request: Request<StreamingOutputCallRequest>,
    ) -> Result<Response<Outbound>, Status> {
        self.start(&request).await;
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            if !respond(&tx, &request).await {
                return; // the client is gone
            }
            if let Some(status) = asked_status(request.response_status.as_ref()) {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn streaming_input_call(
        &self,
        request: Request<Streaming<StreamingInputCallRequest>>,
    ) -> Result<Response<StreamingInputCallResponse>, Status> {
        self.start(&request).await;
        let mut inbound = request.into_inner();
        let mut size = 0usize;
        while let Some(m) = inbound.message().await? {
            size += m.payload.map_or(0, |p| p.body.len());
        }
        Ok(Response::new(StreamingInputCallResponse {
            aggregated_payload_size: i32::try_from(size).unwrap_or(i32::MAX),
        }))
    }

    type FullDuplexCallStream = Outbound;

    async fn full_duplex_call(
        &self,
        request: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<Outbound>, Status> {
        self.start(&request).await;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    () = tx.closed() => return,
                };
                // The end (tonic reads a reset as one too), or a failure.
                let Ok(Some(request)) = next else { return };
                if !respond(&tx, &request).await {
                    return;
                }
                if let Some(status) = asked_status(request.response_status.as_ref()) {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type HalfDuplexCallStream = Outbound;

    async fn half_duplex_call(
        &self,
        request: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<Outbound>, Status> {
        self.start(&request).await;
        let mut inbound = request.into_inner();
        let mut requests = Vec::new();
        while let Some(m) = inbound.message().await? {
            requests.push(m);
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for request in &requests {
                if !respond(&tx, request).await {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn unimplemented_call(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented(
            "UnimplementedCall is not implemented",
        ))
    }
}

/// A service that echoes `x-grpc-test-echo-initial` into the response
/// headers and `x-grpc-test-echo-trailing-bin` into the trailers, as the
/// `custom_metadata` case asks of any interop server (a tonic handler cannot
/// set trailers on a successful unary response, so this wraps the service),
/// and records whether each call's response was delivered to its end.
#[derive(Debug, Clone)]
pub struct Echo<S> {
    inner: S,
    events: Arc<Events>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Echo<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Echo<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Dropped with this future when the client resets the stream before
        // the response headers.
        let mut witness = Witness::new(self.events.clone(), request.uri().path());
        let initial = request.headers().get(ECHO_INITIAL).cloned();
        let trailing = request.headers().get(ECHO_TRAILING).cloned();
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            if let Some(v) = initial {
                response.headers_mut().insert(ECHO_INITIAL, v);
            }
            // A trailers-only response carries its status (and the echo) in
            // the headers, and hyper sends it without polling the body.
            if response.headers().contains_key("grpc-status") {
                if let Some(v) = trailing {
                    response.headers_mut().insert(ECHO_TRAILING, v);
                }
                witness.done();
                return Ok(response);
            }
            Ok(response.map(|body| {
                tonic::body::Body::new(Delivered {
                    body,
                    trailing,
                    witness,
                })
            }))
        })
    }
}

/// A response body that adds the trailing echo to its trailers, and marks
/// its call done once hyper has read it to its end.
struct Delivered {
    body: tonic::body::Body,
    trailing: Option<http::HeaderValue>,
    witness: Witness,
}

impl Body for Delivered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            Some(Ok(f)) if f.is_trailers() => this.witness.done(),
            None => this.witness.done(),
            _ => {}
        }
        Poll::Ready(frame.map(|f| {
            f.map(|mut f| {
                if let Some(trailers) = f.trailers_mut() {
                    if let Some(v) = this.trailing.take() {
                        trailers.insert(ECHO_TRAILING, v);
                    }
                }
                f
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}
