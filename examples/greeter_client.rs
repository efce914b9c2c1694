//! Dials a service by name through etcd and spreads calls over its instances.
//!
//! ```sh
//! cargo run --example greeter_client -- --etcd 127.0.0.1:2379 \
//!     --service greeter.v1.Greeter --calls 300 --concurrency 8 --deadline-ms 1000
//! # over TLS (add --tls-cert/--tls-key for servers that require client certs):
//! cargo run --example greeter_client -- --tls-ca ca.pem
//! # tonic's own balanced channel, for comparison:
//! cargo run --example greeter_client -- --balancer tonic
//! # retries for the idempotent SayHello (gRPC service config, gRFC A6),
//! # stored in etcd for every client of the service (read by default):
//! echo '{"methodConfig":[{"name":[{"service":"greeter.v1.Greeter","method":"SayHello"}],
//!   "retryPolicy":{"maxAttempts":3,"initialBackoff":"0.02s","maxBackoff":"0.2s",
//!   "backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}}]}' > retry.json
//! cargo run --features cli --bin tonic-etcd -- config set greeter.v1.Greeter retry.json
//! cargo run --example greeter_client
//! # or this client's own, used while etcd holds none:
//! cargo run --example greeter_client -- --service-config retry.json
//! ```
//!
//! Prints `backend <addr> <count>` per backend, then `ok <n> failed <m>`.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic_etcd::balancer::TlsConfig;
use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
use tonic_etcd::EtcdChannel;
use tonic_etcd::{Balancer, ChannelBuilder};
use tower::util::Either;

type Channel = Either<Balancer, EtcdChannel>;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    /// This crate's Balancer (recommended).
    Own,
    /// tonic's balanced channel fed by the same discovery.
    Tonic,
}

#[derive(Parser, Debug)]
struct Args {
    /// etcd endpoints, comma separated.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    etcd: Vec<String>,
    /// The service to dial.
    #[arg(long, default_value = "greeter.v1.Greeter")]
    service: String,
    /// Calls to make in all.
    #[arg(long, default_value_t = 300)]
    calls: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Key layout: naming or colon.
    #[arg(long, default_value = "naming")]
    schema: String,
    /// Namespace (key prefix); required by the colon schema.
    #[arg(long)]
    namespace: Option<String>,
    /// Which balanced channel to dial through.
    #[arg(long, value_enum, default_value = "own")]
    balancer: Kind,
    /// A deadline for each call, in milliseconds.
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Dial the servers over TLS, trusting this CA (PEM).
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// The name to verify server certificates against (default: each
    /// server's host).
    #[arg(long, requires = "tls_ca")]
    tls_domain: Option<String>,
    /// A client certificate (PEM) for servers that require one; needs --tls-key.
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// gRPC service config (JSON) for the Balancer: per-method timeouts,
    /// retry or hedging policies. Refused whole, with the field named, when
    /// invalid. The service's config in etcd, when there is one, replaces
    /// it (`tonic-etcd config set`).
    #[arg(long)]
    service_config: Option<std::path::PathBuf>,
}

async fn channel(args: &Args) -> Result<Channel, Box<dyn std::error::Error>> {
    let schema = tonic_etcd::schema::by_name(&args.schema, args.namespace.as_deref())?;
    let client = tonic_etcd::connect(&args.etcd, Some(tonic_etcd::connect_options())).await?;
    let identity = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some((std::fs::read(c)?, std::fs::read(k)?)),
        _ => None,
    };
    let ca = args.tls_ca.as_ref().map(std::fs::read).transpose()?;
    let wait = Duration::from_secs(5);
    Ok(match args.balancer {
        Kind::Own => {
            let mut builder = Balancer::builder(client, &args.service).schema(schema);
            if let Some(path) = &args.service_config {
                let json = std::fs::read_to_string(path)?;
                builder = builder.service_config(tonic_etcd::ServiceConfig::from_json(&json)?);
            }
            if let Some(ca) = ca {
                let mut tls = TlsConfig::new().ca_certificate(ca);
                if let Some((cert, key)) = identity {
                    tls = tls.identity(cert, key);
                }
                if let Some(domain) = &args.tls_domain {
                    tls = tls.domain_name(domain);
                }
                builder = builder.tls(tls);
            }
            let balancer = builder.build()?;
            if let Err(e) = balancer.wait_for_ready(1, wait).await {
                eprintln!("warning: {e}; calls will fail with Unavailable");
            }
            let config = balancer.service_config();
            match &config.source {
                tonic_etcd::config_store::ConfigSource::Etcd { key, revision } => {
                    eprintln!("service config: from etcd ({key}, revision {revision})");
                }
                tonic_etcd::config_store::ConfigSource::Builder => {
                    eprintln!(
                        "service config: this client's ({} method configs)",
                        config.config.method_configs.len()
                    );
                }
            }
            if let Some(rejected) = &config.rejected {
                eprintln!(
                    "warning: the service config in etcd is refused: {}",
                    rejected.reason
                );
            }
            Either::Left(balancer)
        }
        Kind::Tonic => {
            let mut builder = ChannelBuilder::new(client, &args.service).schema(schema);
            if let Some(ca) = ca {
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                if let Some((cert, key)) = identity {
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                if let Some(domain) = args.tls_domain.clone() {
                    tls = tls.domain_name(domain);
                }
                builder = builder
                    .scheme("https")
                    .endpoint(move |e| e.tls_config(tls.clone()).unwrap_or_else(|e| panic!("{e}")));
            }
            let channel = builder.build()?;
            if let Err(e) = channel.wait_for_endpoints(wait).await {
                eprintln!("warning: {e}; calls will fail with Unavailable");
            }
            Either::Right(channel)
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let channel = channel(&args).await?;
    let deadline = args.deadline_ms.map(Duration::from_millis);
    let workers = args.concurrency.max(1);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let calls = args.calls / workers + usize::from(w < args.calls % workers);
        let mut greeter = GreeterClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            let mut failed = 0;
            for _ in 0..calls {
                let mut request = tonic::Request::new(HelloRequest {
                    name: "client".into(),
                });
                if let Some(d) = deadline {
                    request.set_timeout(d);
                }
                match greeter.say_hello(request).await {
                    Ok(r) => *counts.entry(r.into_inner().server_id).or_default() += 1,
                    Err(_) => failed += 1,
                }
            }
            (counts, failed)
        }));
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    for t in tasks {
        let (c, f) = t.await?;
        for (k, v) in c {
            *counts.entry(k).or_default() += v;
        }
        failed += f;
    }
    for (backend, n) in &counts {
        println!("backend {backend} {n}");
    }
    println!("ok {} failed {failed}", counts.values().sum::<usize>());
    Ok(())
}
