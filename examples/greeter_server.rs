//! A greeter server that registers itself in etcd and leaves on SIGINT/SIGTERM.
//!
//! ```sh
//! cargo run --example greeter_server -- --etcd 127.0.0.1:2379 \
//!     --service greeter.v1.Greeter --addr 127.0.0.1:50051
//! ```

use std::time::Duration;

use clap::Parser;
use tonic_etcd::testing::greeter::serve_registered;
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
    let client =
        etcd_client::Client::connect(&args.etcd, Some(tonic_etcd::connect_options())).await?;
    let registration = Registration::builder(client)
        .schema_arc(schema)
        .service(&args.service)
        .ttl(Duration::from_secs(args.ttl));
    tracing::info!(addr = %args.addr, service = %args.service, "serving");
    serve_registered(
        registration,
        &args.addr,
        tonic_etcd::testing::shutdown_signal(),
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}
