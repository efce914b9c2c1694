//! Greeter servers for the benchmarks, each on a runtime of its own so one
//! can die alone (its runtime shut down closes every socket, as SIGKILL
//! would), registered in etcd.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tonic::transport::{Identity, ServerTlsConfig};
use tonic_etcd::testing::greeter::{FailSwitch, Greeter, GreeterClient, HelloRequest};
use tonic_etcd::Registration;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How one call ended: the id of the server that answered, or the code.
pub type Outcome = Result<String, tonic::Code>;

/// Makes one greeter call through some channel.
pub type Call = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync>;

/// Any channel a tonic-generated client takes (a `Channel`, an
/// `EtcdChannel`, a `Balancer`), shareable across tasks.
pub trait GrpcChannel:
    tonic::client::GrpcService<
        tonic::body::Body,
        Future: Send,
        Error: Into<BoxError>,
        ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError> + Send>
                          + Send
                          + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> GrpcChannel for T where
    T: tonic::client::GrpcService<
            tonic::body::Body,
            Future: Send,
            Error: Into<BoxError>,
            ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError> + Send>
                              + Send
                              + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A call function over any tonic-compatible channel, each call with a
/// `grpc-timeout` of `deadline` when given.
pub fn caller<T: GrpcChannel>(svc: T, deadline: Option<Duration>) -> Call {
    Arc::new(move || {
        let mut client = GreeterClient::new(svc.clone());
        let mut request = tonic::Request::new(HelloRequest {
            name: "bench".into(),
        });
        if let Some(d) = deadline {
            request.set_timeout(d);
        }
        Box::pin(async move {
            client
                .say_hello(request)
                .await
                .map(|r| r.into_inner().server_id)
                .map_err(|s| s.code())
        })
    })
}

/// One round: `rate` calls per second for `length`, each issued at its
/// scheduled time on a task of its own. Returns (latency from schedule,
/// outcome) per call. `at_fifth` runs once a fifth into the round.
pub async fn round(
    call: &Call,
    rate: u64,
    length: Duration,
    at_fifth: Option<&(dyn Fn() + Sync)>,
) -> Vec<(Duration, Outcome)> {
    let n = (rate as f64 * length.as_secs_f64()) as u64;
    let start = Instant::now() + Duration::from_millis(5);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let scheduled = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(scheduled).await;
        if i == n / 5 {
            if let Some(f) = at_fifth {
                f();
            }
        }
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let outcome = call().await;
            (scheduled.elapsed(), outcome)
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("call task"));
    }
    out
}

use super::pki::Pki;
use super::proxy::Proxy;

/// How a set of backends is served.
#[derive(Clone, Copy)]
pub struct Setup<'a> {
    /// How many (default 4).
    pub n: usize,
    /// These add a delay to every reply.
    pub delays: &'a [(usize, Duration)],
    /// This one is registered behind a proxy that can freeze it.
    pub proxied: Option<usize>,
    /// Serve TLS with these certificates.
    pub tls: Option<&'a Pki>,
    /// Every backend adds this delay to this share of its replies.
    pub spikes: Option<(f64, Duration)>,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Self {
            n: 4,
            delays: &[],
            proxied: None,
            tls: None,
            spikes: None,
        }
    }
}

pub struct Backends {
    /// Where each listens.
    pub addrs: Vec<String>,
    /// Where each is registered (the proxy's address for the proxied one).
    pub registered: Vec<String>,
    /// Makes backend `i` fail every call.
    pub fail: Vec<FailSwitch>,
    pub proxy: Option<Proxy>,
    runtimes: Vec<Option<tokio::runtime::Runtime>>,
    registrations: Vec<Option<Registration>>,
    /// Registrations of killed backends, kept so their keys stay.
    zombies: Vec<Registration>,
    client: tonic_etcd::Etcd,
    service: String,
}

impl Backends {
    /// Starts and registers `setup.n` greeters named `s0`, `s1`, ...
    pub async fn start(client: &tonic_etcd::Etcd, service: &str, setup: Setup<'_>) -> Self {
        let mut this = Self {
            addrs: Vec::new(),
            registered: Vec::new(),
            fail: Vec::new(),
            proxy: None,
            runtimes: Vec::new(),
            registrations: Vec::new(),
            zombies: Vec::new(),
            client: client.clone(),
            service: service.to_owned(),
        };
        for i in 0..setup.n {
            let delay = setup
                .delays
                .iter()
                .find(|(k, _)| *k == i)
                .map_or(Duration::ZERO, |(_, d)| *d);
            let (addr, rt, fail) = serve(format!("s{i}"), delay, setup.spikes, setup.tls);
            this.fail.push(fail);
            let registered = if setup.proxied == Some(i) {
                let p = Proxy::start(addr.clone()).await;
                let a = p.addr.to_string();
                this.proxy = Some(p);
                a
            } else {
                addr.clone()
            };
            this.addrs.push(addr);
            this.registered.push(registered);
            this.runtimes.push(Some(rt));
            this.registrations.push(None);
            this.register(i).await;
        }
        this
    }

    /// Registers backend `i` (again).
    pub async fn register(&mut self, i: usize) {
        // A long TTL: a dead backend's key outlives the measurement.
        let registration = Registration::builder(self.client.clone())
            .service(&self.service)
            .addr(&self.registered[i])
            .ttl(Duration::from_secs(60))
            .register()
            .await
            .unwrap();
        self.registrations[i] = Some(registration);
    }

    /// Kills backend `i` (its key stays registered, as after a SIGKILL,
    /// until its lease would expire) and starts a new one in its place, on
    /// a new port, registered: a rolling restart's step.
    pub async fn replace(&mut self, i: usize, id: String, delay: Duration) {
        self.kill(i);
        // The dead one's registration lives on: its key stays in etcd.
        if let Some(r) = self.registrations[i].take() {
            self.zombies.push(r);
        }
        let (addr, rt, fail) = serve(id, delay, None, None);
        self.addrs[i] = addr.clone();
        self.registered[i] = addr;
        self.runtimes[i] = Some(rt);
        self.fail[i] = fail;
        self.register(i).await;
    }

    /// Deregisters backend `i`; it keeps serving.
    pub async fn deregister(&mut self, i: usize) {
        if let Some(r) = self.registrations[i].take() {
            r.deregister().await.unwrap();
        }
    }

    /// Closes every socket of backend `i` at once, as SIGKILL would.
    pub fn kill(&mut self, i: usize) {
        if let Some(rt) = self.runtimes[i].take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for rt in self.runtimes.iter_mut().filter_map(Option::take) {
            rt.shutdown_background();
        }
    }
}

/// Serves greeter `id` (with `delay` per reply and `spikes`, over TLS with
/// `tls`) on a runtime of its own: its address, runtime and fail switch.
fn serve(
    id: String,
    delay: Duration,
    spikes: Option<(f64, Duration)>,
    tls: Option<&Pki>,
) -> (String, tokio::runtime::Runtime, FailSwitch) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap().to_string();
    let mut greeter = Greeter::new(id).with_delay(delay);
    if let Some((p, d)) = spikes {
        greeter = greeter.with_spikes(p, d);
    }
    let fail = greeter.fail_switch();
    let mut server = tonic_etcd::server::builder();
    if let Some(pki) = tls {
        let identity = Identity::from_pem(&pki.server_cert, &pki.server_key);
        server = server
            .tls_config(ServerTlsConfig::new().identity(identity))
            .unwrap();
    }
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        server
            .add_service(greeter.into_service())
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
    });
    (addr, rt, fail)
}
