//! A greeter server that registers itself in etcd and leaves on SIGINT/SIGTERM.
//!
//! ```sh
//! cargo run --example greeter_server -- --etcd 127.0.0.1:2379 \
//!     --service greeter.v1.Greeter --addr 127.0.0.1:50051
//! # over TLS, requiring client certificates signed by ca.pem:
//! cargo run --example greeter_server -- --addr 127.0.0.1:50051 \
//!     --tls-cert server.pem --tls-key server-key.pem --tls-client-ca ca.pem
//! ```

use std::time::Duration;

use clap::Parser;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_etcd::server::RegisteredServer;
use tonic_etcd::testing::greeter::Greeter;
use tonic_etcd::Registration;

#[derive(Parser, Debug)]
struct Args {
    /// etcd endpoints, comma separated.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    etcd: Vec<String>,
    /// The service name to register under.
    #[arg(long, default_value = "greeter.v1.Greeter")]
    service: String,
    /// The address to serve on and advertise (host:port).
    #[arg(long)]
    addr: String,
    /// Key layout: naming (etcd's Go naming package) or colon.
    #[arg(long, default_value = "naming")]
    schema: String,
    /// Namespace (key prefix); required by the colon schema.
    #[arg(long)]
    namespace: Option<String>,
    /// Lease TTL in seconds.
    #[arg(long, default_value_t = 10)]
    ttl: u64,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let schema = tonic_etcd::schema::by_name(&args.schema, args.namespace.as_deref())?;
    let client = tonic_etcd::connect(&args.etcd, Some(tonic_etcd::connect_options())).await?;
    let registration = Registration::builder(client)
        .schema(schema)
        .service(&args.service)
        .addr(&args.addr)
        .ttl(Duration::from_secs(args.ttl));

    let mut server = tonic_etcd::server::builder();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ));
        if let Some(ca) = &args.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(std::fs::read(ca)?));
        }
        server = server.tls_config(tls)?;
    }
    let router = server.add_service(Greeter::new(&args.addr).into_service());
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    tracing::info!(addr = %args.addr, service = %args.service, tls = args.tls_cert.is_some(), "serving");
    RegisteredServer::new(registration)
        .serve_with_shutdown(router, listener, tonic_etcd::server::shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}
