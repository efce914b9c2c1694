//! The gRPC client contract of the Balancer against real etcd and real tonic
//! servers: deadlines (no endpoint, frozen backend), TLS and mTLS, the
//! fail-fast gate, idempotent metadata updates, ports that do not speak
//! HTTP/2, and option values that must not panic.

mod common;
#[path = "common/pki.rs"]
mod pki;
#[path = "common/proxy.rs"]
mod proxy;

use std::time::{Duration, Instant};

use common::{eventually, unique};
use tokio::io::AsyncWriteExt;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_etcd::balancer::TlsConfig;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata, Registration};

const LIMIT: Duration = Duration::from_secs(10);

/// A greeter served on a free loopback port, optionally over TLS; stops when
/// dropped.
struct Backend {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    async fn start(id: &str, tls: Option<ServerTlsConfig>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut server = tonic_etcd::server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls).unwrap();
        }
        let router = server.add_service(Greeter::new(id).into_service());
        let task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = router.serve_with_incoming(incoming).await;
        });
        Self { addr, task }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn register(svc: &str, addr: &str) -> Registration {
    Registration::builder(shared().client().await)
        .service(svc)
        .addr(addr)
        .register()
        .await
        .unwrap()
}

fn hello(timeout: Option<Duration>) -> tonic::Request<HelloRequest> {
    let mut r = tonic::Request::new(HelloRequest { name: "x".into() });
    if let Some(t) = timeout {
        r.set_timeout(t);
    }
    r
}

#[tokio::test]
async fn a_call_with_no_endpoint_fails_at_its_own_deadline() {
    let svc = unique("deadline-none");
    // The gate would wait 10 s; the call's own deadline is what counts.
    let balancer = Balancer::builder(shared().client().await, &svc)
        .no_endpoint_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut greeter = GreeterClient::new(balancer);
    for deadline in [Duration::from_millis(200), Duration::from_millis(350)] {
        let t = Instant::now();
        let status = greeter.say_hello(hello(Some(deadline))).await.unwrap_err();
        let took = t.elapsed();
        // The deadline ended the wait (grpc-go and grpc-java say the same),
        // and the message says why no endpoint took the call.
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
        assert!(status.message().contains("no instance"), "{status}");
        assert!(
            took >= deadline && took < deadline + Duration::from_millis(50),
            "deadline {deadline:?}, took {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_backend_never_holds_a_call_past_its_deadline() {
    let svc = unique("deadline-frozen");
    let healthy = Backend::start("healthy", None).await;
    let frozen_backend = Backend::start("frozen", None).await;
    let proxy = proxy::Proxy::start(frozen_backend.addr.clone()).await;
    let _r1 = register(&svc, &healthy.addr).await;
    let _r2 = register(&svc, &proxy.addr.to_string()).await;
    let balancer = Balancer::builder(shared().client().await, &svc)
        .build()
        .unwrap();
    // Calls without a deadline of their own get the builder's.
    let capped = Balancer::builder(shared().client().await, &svc)
        .filter({
            let frozen = proxy.addr.to_string();
            move |i| i.addr == frozen
        })
        .call_timeout(Duration::from_millis(250))
        .build()
        .unwrap();
    balancer.wait_for_ready(2, LIMIT).await.unwrap();
    capped.wait_for_ready(1, LIMIT).await.unwrap();
    proxy.freeze();

    let deadline = Duration::from_millis(300);
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut greeter = GreeterClient::new(balancer.clone());
        calls.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = greeter.say_hello(hello(Some(deadline))).await;
            (r.map(|r| r.into_inner().server_id), t.elapsed())
        }));
    }
    let (mut ok, mut expired) = (0, 0);
    for c in calls {
        let (result, took) = c.await.unwrap();
        match result {
            Ok(id) => {
                assert_eq!(id, "healthy");
                assert!(
                    took < Duration::from_millis(200),
                    "a call to the healthy backend waited {took:?}"
                );
                ok += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
                assert!(
                    took >= deadline && took < deadline + Duration::from_millis(50),
                    "took {took:?}"
                );
                expired += 1;
            }
        }
    }
    assert!(
        ok > 0 && expired > 0,
        "both backends got calls: ok {ok}, expired {expired}"
    );

    let t = Instant::now();
    let status = GreeterClient::new(capped)
        .say_hello(hello(None))
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(300),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_gate_closes_calls_fail_at_once_until_an_endpoint_is_ready() {
    let svc = unique("failfast");
    let balancer = Balancer::builder(shared().client().await, &svc)
        .no_endpoint_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut greeter = GreeterClient::new(balancer.clone());
    // The first call waits out the no-endpoint timeout and closes the gate.
    let status = greeter.say_hello(hello(None)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);

    let mut burst = Vec::new();
    for _ in 0..500 {
        let mut g = greeter.clone();
        burst.push(tokio::spawn(async move {
            let t = Instant::now();
            let status = g
                .say_hello(hello(Some(Duration::from_secs(5))))
                .await
                .unwrap_err();
            (status, t.elapsed())
        }));
    }
    let mut took = Vec::new();
    for b in burst {
        let (status, t) = b.await.unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("failing fast"), "{status}");
        took.push(t);
    }
    took.sort();
    let (p50, max) = (took[took.len() / 2], took[took.len() - 1]);
    assert!(p50 < Duration::from_millis(10), "p50 {p50:?}");
    assert!(max < Duration::from_millis(100), "max {max:?}");

    // An endpoint reopens the gate.
    let backend = Backend::start("a", None).await;
    let _reg = register(&svc, &backend.addr).await;
    balancer.wait_for_ready(1, LIMIT).await.unwrap();
    let reply = greeter.say_hello(hello(None)).await.unwrap();
    assert_eq!(reply.into_inner().server_id, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_ready_calls_wait_for_an_endpoint_until_their_deadline() {
    let svc = unique("waitforready");
    let balancer = Balancer::builder(shared().client().await, &svc)
        .no_endpoint_timeout(Duration::from_millis(100))
        .fail_fast(false)
        .build()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await; // past the gate's timeout
    let mut greeter = GreeterClient::new(balancer);
    let call = tokio::spawn(async move { greeter.say_hello(hello(Some(LIMIT))).await });
    let backend = Backend::start("late", None).await;
    let _reg = register(&svc, &backend.addr).await;
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.into_inner().server_id, "late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_to_backends() {
    let pki = pki::Pki::new("backends");
    let identity = Identity::from_pem(&pki.server_cert, &pki.server_key);
    let svc = unique("tls");
    let server = Backend::start(
        "tls",
        Some(ServerTlsConfig::new().identity(identity.clone())),
    )
    .await;
    let _reg = register(&svc, &server.addr).await;

    let balancer = Balancer::builder(shared().client().await, &svc)
        .tls(TlsConfig::new().ca_certificate(&pki.ca))
        .build()
        .unwrap();
    balancer.wait_for_ready(1, LIMIT).await.unwrap();
    let reply = GreeterClient::new(balancer)
        .say_hello(hello(Some(LIMIT)))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().server_id, "tls");

    // A client that trusts another CA is refused, and says why.
    let stranger = pki::Pki::new("stranger");
    let refused = Balancer::builder(shared().client().await, &svc)
        .tls(TlsConfig::new().ca_certificate(&stranger.ca))
        .no_endpoint_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let status = eventually(LIMIT, "a TLS error", || {
        let mut g = GreeterClient::new(refused.clone());
        async move {
            let s = g.say_hello(hello(None)).await.unwrap_err();
            s.message().contains("TLS handshake").then_some(s)
        }
    })
    .await;
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("certificate"), "{status}");
    assert_eq!(refused.ready(), 0);
    // The endpoint says the same, with the error itself.
    let endpoint = &refused.endpoints()[0];
    assert_eq!(
        endpoint.state,
        tonic_etcd::balancer::EndpointState::Connecting
    );
    let error = endpoint.last_error.as_ref().expect("the connect error");
    assert!(error.to_string().contains("TLS handshake"), "{error}");

    // mTLS: a server that requires client certificates.
    let svc = unique("mtls");
    let server = Backend::start(
        "mtls",
        Some(
            ServerTlsConfig::new()
                .identity(identity)
                .client_ca_root(Certificate::from_pem(&pki.ca)),
        ),
    )
    .await;
    let _reg = register(&svc, &server.addr).await;
    let anonymous = Balancer::builder(shared().client().await, &svc)
        .tls(TlsConfig::new().ca_certificate(&pki.ca))
        .no_endpoint_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let status = eventually(LIMIT, "a refused client certificate", || {
        let mut g = GreeterClient::new(anonymous.clone());
        async move {
            let s = g.say_hello(hello(None)).await.unwrap_err();
            s.message()
                .contains("none is reachable (last error")
                .then_some(s)
        }
    })
    .await;
    assert!(status.message().contains(&server.addr), "{status}");
    assert_eq!(
        anonymous.ready(),
        0,
        "never in rotation without a client certificate"
    );

    let with_identity = Balancer::builder(shared().client().await, &svc)
        .tls(
            TlsConfig::new()
                .ca_certificate(&pki.ca)
                .identity(&pki.client_cert, &pki.client_key)
                .domain_name("localhost"),
        )
        .build()
        .unwrap();
    with_identity.wait_for_ready(1, LIMIT).await.unwrap();
    let reply = GreeterClient::new(with_identity)
        .say_hello(hello(Some(LIMIT)))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().server_id, "mtls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_update_keeps_the_connection() {
    let svc = unique("meta");
    let backend = Backend::start("m", None).await;
    let proxy = proxy::Proxy::start(backend.addr.clone()).await;
    let reg = register(&svc, &proxy.addr.to_string()).await;
    let balancer = Balancer::builder(shared().client().await, &svc)
        .filter(|i| i.metadata.get("drain").as_deref() != Some("yes"))
        .build()
        .unwrap();
    balancer.wait_for_ready(1, LIMIT).await.unwrap();
    assert_eq!(proxy.accepted(), 1);

    reg.update_metadata(Metadata::new().with("version", "v2"))
        .await
        .unwrap();
    eventually(LIMIT, "the new metadata in the balancer", || async {
        balancer
            .ready_instances()
            .iter()
            .any(|i| i.metadata.get("version").as_deref() == Some("v2"))
            .then_some(())
    })
    .await;
    let reply = GreeterClient::new(balancer.clone())
        .say_hello(hello(Some(LIMIT)))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().server_id, "m");
    assert_eq!(proxy.accepted(), 1, "no redial for a metadata change");

    // Metadata that fails the filter takes it out of rotation.
    reg.update_metadata(Metadata::new().with("drain", "yes"))
        .await
        .unwrap();
    eventually(LIMIT, "filtered out", || async {
        (balancer.ready() == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_does_not_speak_http2_never_enters_the_rotation() {
    let svc = unique("not-h2");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    // An HTTP/1.1 server: it answers the preface with a 400 and closes.
    let server = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = socket
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let _reg = register(&svc, &addr).await;
    let balancer = Balancer::builder(shared().client().await, &svc)
        .no_endpoint_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    eventually(LIMIT, "registered", || async {
        (balancer.registered() == 1).then_some(())
    })
    .await;
    let start = Instant::now();
    let first = accepted.load(std::sync::atomic::Ordering::SeqCst);
    while start.elapsed() < Duration::from_secs(2) {
        assert_eq!(balancer.ready(), 0, "a non-HTTP/2 port joined the rotation");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dials = accepted.load(std::sync::atomic::Ordering::SeqCst) - first;
    // Back-off from 50 ms doubling: about 6 dials in 2 s; redialling at once
    // would be hundreds.
    assert!(dials <= 10, "{dials} dials in 2 s");
    let status = GreeterClient::new(balancer)
        .say_hello(hello(None))
        .await
        .unwrap_err();
    assert!(status.message().contains("HTTP/2"), "{status}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_max_in_every_option_does_not_panic() {
    let svc = unique("max");
    let client = shared().client().await;
    let backend = Backend::start("max", None).await;
    let reg = Registration::builder(client.clone())
        .service(&svc)
        .addr(&backend.addr)
        .request_timeout(Duration::MAX)
        .startup_timeout(Duration::MAX)
        .register()
        .await
        .unwrap();
    let balancer = Balancer::builder(client.clone(), &svc)
        .call_timeout(Duration::MAX)
        .no_endpoint_timeout(Duration::MAX)
        .connect_timeout(Duration::MAX)
        .http2_keep_alive(Duration::MAX, Duration::MAX)
        .reconnect_backoff_max(Duration::MAX)
        .etcd_request_timeout(Duration::MAX)
        .build()
        .unwrap();
    balancer.wait_for_ready(1, LIMIT).await.unwrap();
    // The largest deadline the header can carry (tonic's `set_timeout`
    // refuses `Duration::MAX` itself).
    let mut request = hello(None);
    request.metadata_mut().insert(
        "grpc-timeout",
        tonic::metadata::MetadataValue::from_static("99999999H"),
    );
    GreeterClient::new(balancer.clone())
        .say_hello(request)
        .await
        .unwrap();
    GreeterClient::new(balancer)
        .say_hello(hello(None))
        .await
        .unwrap();

    let channel = tonic_etcd::ChannelBuilder::new(client.clone(), &svc)
        .no_endpoint_timeout(Duration::MAX)
        .request_timeout(Duration::MAX)
        .build()
        .unwrap();
    channel.wait_for_endpoints(LIMIT).await.unwrap();
    GreeterClient::new(channel)
        .say_hello(hello(None))
        .await
        .unwrap();
    let catalog = tonic_etcd::Catalog::builder(client.clone())
        .request_timeout(Duration::MAX)
        .build()
        .unwrap();
    catalog.synced(LIMIT).await.unwrap();
    let _discover = tonic_etcd::Discover::builder(client.clone(), &svc)
        .request_timeout(Duration::MAX)
        .idle_timeout(Duration::MAX)
        .build()
        .unwrap();
    let _server = tonic_etcd::server::RegisteredServer::new(
        Registration::builder(client.clone()).service(&svc),
    )
    .grace(Duration::MAX)
    .drain_timeout(Duration::MAX);
    // Capped at a century, which etcd grants (its limit is about 285 years).
    let century = Registration::builder(client)
        .service(&svc)
        .addr("127.0.0.1:1")
        .ttl(Duration::MAX)
        .register()
        .await
        .unwrap();
    century.deregister().await.unwrap();
    reg.deregister().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_etcd_is_named_as_the_problem() {
    // A port nothing listens on: etcd is unreachable, not the service absent.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = etcd_client::Client::connect(
        [format!("http://{dead}")],
        Some(tonic_etcd::connect_options()),
    )
    .await
    .unwrap();
    let balancer = Balancer::builder(client, "svc")
        .etcd_request_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let status = GreeterClient::new(balancer)
        .say_hello(hello(Some(Duration::from_millis(800))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
    assert!(
        status.message().contains("etcd unreachable") && status.message().contains("\"svc\""),
        "{status}"
    );
    // Touch the shared etcd so this binary's run is counted as etcd-backed.
    let _ = shared().client().await;
}
