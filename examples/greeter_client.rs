//! Dials a service by name through etcd and spreads calls over its instances.
//!
//! ```sh
//! cargo run --example greeter_client -- --etcd 127.0.0.1:2379 \
//!     --service greeter.v1.Greeter --calls 300 --concurrency 8
//! ```
//!
//! Prints `backend <addr> <count>` per backend, then `ok <n> failed <m>`.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
use tonic_etcd::ChannelBuilder;

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
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let schema = tonic_etcd::schema::by_name(&args.schema, args.namespace.as_deref())?;
    let client =
        etcd_client::Client::connect(&args.etcd, Some(tonic_etcd::connect_options())).await?;
    let channel = ChannelBuilder::new(client, &args.service)
        .schema_arc(schema)
        .build()?;
    if let Err(e) = channel.wait_for_endpoints(Duration::from_secs(5)).await {
        eprintln!("warning: {e}; calls will fail with Unavailable");
    }
    let workers = args.concurrency.max(1);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let calls = args.calls / workers + usize::from(w < args.calls % workers);
        let mut greeter = GreeterClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            let mut failed = 0;
            for _ in 0..calls {
                match greeter
                    .say_hello(HelloRequest {
                        name: "client".into(),
                    })
                    .await
                {
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
