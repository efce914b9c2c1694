//! The demo: the README's main command and `tonic-etcd demo`.
//!
//! Starts a local etcd (unless endpoints are given), three greeter servers as
//! separate processes that register themselves, and a client that dials the
//! service by name through [`Balancer`]. Then one server
//! shuts down gracefully, one is killed with SIGKILL, and a new one joins,
//! while calls keep flowing. Prints where the calls went in each phase and
//! how many failed.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;

use super::greeter::{serve_registered, GreeterClient, HelloRequest};
use super::{shutdown_signal, signal, Etcd};
use crate::{Balancer, Catalog, CatalogEvent, NamingSchema, Registration};

/// What the demo runs against. The README's main command and
/// `tonic-etcd demo` fill it from their flags.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// etcd endpoints; `None` starts a local etcd and removes it afterwards.
    pub etcd: Option<Vec<String>>,
    /// The namespace the demo registers under.
    pub namespace: String,
    /// The service name.
    pub service: String,
    /// Lease TTL of the servers, in seconds (how long a killed server's key
    /// outlives it).
    pub ttl: u64,
    /// Length of each phase.
    pub phase: Duration,
    /// Arguments that make this executable run one demo server when
    /// followed by `--serve <addr> --etcd .. --namespace .. --service .. --ttl ..`.
    pub server_args: Vec<String>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            etcd: None,
            namespace: "tonic-etcd-demo".into(),
            service: "greeter.v1.Greeter".into(),
            ttl: 3,
            phase: Duration::from_millis(1500),
            server_args: Vec::new(),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the demo and prints its report.
pub async fn run(args: &DemoOptions) -> Result<(), BoxError> {
    let local;
    let endpoints = match &args.etcd {
        Some(e) => e.clone(),
        None => {
            println!("starting a local etcd ...");
            local = tokio::task::spawn_blocking(Etcd::start).await?;
            local.endpoints()
        }
    };
    println!("etcd at {}", endpoints.join(","));
    let client = crate::connect(&endpoints, Some(crate::connect_options())).await?;
    let schema = NamingSchema::with_namespace(&args.namespace)?;

    // Show the registry as the catalog sees it.
    let mut catalog = Catalog::builder(client.clone())
        .schema(schema.clone())
        .build()?;
    let registered_at: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    let seen = registered_at.clone();
    let catalog_task = tokio::spawn(async move {
        while let Some(event) = catalog.next().await {
            match event {
                CatalogEvent::Insert { instance, .. } => {
                    println!(
                        "  [etcd {:>6.3}s] + {} {}",
                        started.elapsed().as_secs_f64(),
                        instance.service,
                        instance.addr
                    );
                    if let Ok(mut s) = seen.lock() {
                        s.insert(instance.addr, Instant::now());
                    }
                }
                CatalogEvent::Remove { instance, .. } => {
                    println!(
                        "  [etcd {:>6.3}s] - {} {}",
                        started.elapsed().as_secs_f64(),
                        instance.service,
                        instance.addr
                    );
                }
            }
        }
    });

    let mut servers: Vec<Server> = Vec::new();
    for _ in 0..3 {
        servers.push(Server::spawn(args, &endpoints)?);
    }
    // The crate's own balancer: load-aware, failure-aware, never hangs.
    let channel = Balancer::builder(client.clone(), &args.service)
        .schema(schema)
        .build()?;
    if channel
        .wait_for_ready(3, Duration::from_secs(15))
        .await
        .is_err()
    {
        return Err("the three servers did not register within 15 s".into());
    }

    let phase = args.phase;
    let mut report = Vec::new();
    report.push(run_phase("three servers registered", &channel, phase, || {}).await);

    let graceful = servers[0].addr.clone();
    let pid = servers[0].pid();
    report.push(
        run_phase(
            &format!("{graceful} shuts down (SIGTERM)"),
            &channel,
            phase,
            || signal(pid, "TERM"),
        )
        .await,
    );

    let killed = servers[1].addr.clone();
    let pid = servers[1].pid();
    // The killed server's key lives on in etcd until its lease expires; this
    // phase spans that whole window (TTL + one phase), during which the
    // balancer must route around it on its own.
    let ttl_phase = Duration::from_secs(args.ttl) + phase;
    report.push(
        run_phase(
            &format!("{killed} killed (SIGKILL)"),
            &channel,
            ttl_phase,
            || signal(pid, "KILL"),
        )
        .await,
    );

    let joined = Server::spawn(args, &endpoints)?;
    let joined_addr = joined.addr.clone();
    servers.push(joined);
    let mut r = run_phase(&format!("{joined_addr} joins"), &channel, phase, || {}).await;
    r.first_call_after = first_call_after(&registered_at, &joined_addr, &r);
    report.push(r);

    println!();
    println!(
        "{:<40} {:>6} {:>7} {:>16} {:>12}  calls per backend",
        "phase", "ok", "failed", "ready/registered", "slowest call"
    );
    for r in &report {
        let per: Vec<String> = r.counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let rr = format!("{}/{}", r.ready, r.registered);
        println!(
            "{:<40} {:>6} {:>7} {:>16} {:>10.1}ms  {}",
            r.name,
            r.ok(),
            r.failed,
            rr,
            r.slowest.as_secs_f64() * 1000.0,
            per.join(" ")
        );
    }
    for r in &report {
        for e in r.errors.iter().take(3) {
            println!("failed in \"{}\": {e}", r.name);
        }
    }
    if let Some(d) = report.last().and_then(|r| r.first_call_after) {
        println!("\n{joined_addr}: first call answered {d:?} after its key appeared in etcd");
    }
    println!(
        "\nready/registered: endpoints in rotation / instances etcd lists at the end of the \
         phase. A killed server stays listed until its lease expires (TTL {} s; the SIGKILL \
         phase spans that window), but leaves the rotation as soon as its connection dies. \
         A call in flight on it at that instant can fail (UNAVAILABLE, naming it): without a \
         retry policy for the method it is not retried, since it may have reached the server \
         (give idempotent methods a retry policy: ServiceConfig, or `tonic-etcd config set`).",
        args.ttl
    );

    for s in &mut servers {
        s.stop();
    }
    // Stop watching before a local etcd goes away.
    catalog_task.abort();
    drop(channel);
    Ok(())
}

/// Runs one demo server (what `server_args` + `--serve <addr>` starts).
pub async fn serve(args: &DemoOptions, addr: &str) -> Result<(), BoxError> {
    let endpoints = args.etcd.clone().unwrap_or_default();
    let client = crate::connect(&endpoints, Some(crate::connect_options())).await?;
    let registration = Registration::builder(client)
        .schema(NamingSchema::with_namespace(&args.namespace)?)
        .service(&args.service)
        .ttl(Duration::from_secs(args.ttl));
    serve_registered(registration, addr, shutdown_signal()).await?;
    Ok(())
}

/// A greeter server process.
struct Server {
    addr: String,
    child: Child,
}

impl Server {
    fn spawn(args: &DemoOptions, endpoints: &[String]) -> Result<Self, BoxError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(std::env::current_exe()?)
            .args(&args.server_args)
            .args(["--serve", &addr, "--etcd", &endpoints.join(",")])
            .args(["--namespace", &args.namespace, "--service", &args.service])
            .args(["--ttl", &args.ttl.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self { addr, child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct PhaseReport {
    name: String,
    slowest: Duration,
    ready: usize,
    registered: usize,
    counts: BTreeMap<String, usize>,
    first_reply: BTreeMap<String, Instant>,
    failed: usize,
    /// Why calls failed (the first few).
    errors: Vec<String>,
    first_call_after: Option<Duration>,
}

impl PhaseReport {
    fn ok(&self) -> usize {
        self.counts.values().sum()
    }
}

/// Calls from four workers for `length`, running `event` 300 ms in.
async fn run_phase(
    name: &str,
    channel: &Balancer,
    length: Duration,
    event: impl FnOnce(),
) -> PhaseReport {
    println!("phase: {name}");
    let t0 = Instant::now();
    let end = Instant::now() + length;
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut greeter = GreeterClient::new(channel.clone());
        workers.push(tokio::spawn(async move {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            let mut first_reply: BTreeMap<String, Instant> = BTreeMap::new();
            let mut failed = 0;
            let mut errors = Vec::new();
            let mut slowest = Duration::ZERO;
            while Instant::now() < end {
                let started = Instant::now();
                let call = greeter.say_hello(HelloRequest {
                    name: "demo".into(),
                });
                match tokio::time::timeout(Duration::from_secs(2), call).await {
                    Ok(Ok(r)) => {
                        let id = r.into_inner().server_id;
                        first_reply.entry(id.clone()).or_insert_with(Instant::now);
                        *counts.entry(id).or_default() += 1;
                    }
                    Ok(Err(status)) => {
                        failed += 1;
                        if errors.len() < 3 {
                            errors.push(format!("{:?}: {}", status.code(), status.message()));
                        }
                    }
                    Err(_) => {
                        failed += 1;
                        if errors.len() < 3 {
                            errors.push("no answer within 2 s".to_owned());
                        }
                    }
                }
                slowest = slowest.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (counts, first_reply, failed, errors, slowest)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    event();
    tracing::debug!(at = ?t0.elapsed(), "event");
    let mut report = PhaseReport {
        name: name.to_owned(),
        slowest: Duration::ZERO,
        ready: 0,
        registered: 0,
        counts: BTreeMap::new(),
        first_reply: BTreeMap::new(),
        failed: 0,
        errors: Vec::new(),
        first_call_after: None,
    };
    for w in workers {
        if let Ok((counts, first, failed, errors, slowest)) = w.await {
            report.errors.extend(errors);
            report.slowest = report.slowest.max(slowest);
            for (k, v) in counts {
                *report.counts.entry(k).or_default() += v;
            }
            for (k, t) in first {
                let e = report.first_reply.entry(k).or_insert(t);
                *e = (*e).min(t);
            }
            report.failed += failed;
        }
    }
    report.ready = channel.ready();
    report.registered = channel.registered();
    report
}

fn first_call_after(
    registered_at: &Mutex<BTreeMap<String, Instant>>,
    addr: &str,
    report: &PhaseReport,
) -> Option<Duration> {
    let registered = *registered_at.lock().ok()?.get(addr)?;
    let first = *report.first_reply.get(addr)?;
    Some(first.saturating_duration_since(registered))
}
