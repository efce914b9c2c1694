//! `tonic-etcd`: see and poke the registry without writing code.
//!
//! Exit codes: 0 success, 1 runtime failure (etcd unreachable, auth failure)
//! with a one-line error that says what to check, 2 usage errors.

use std::collections::BTreeMap;
use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use tokio_stream::StreamExt;
use tonic_etcd::catalog::{self, Listing};
use tonic_etcd::console::ConsoleOptions;
use tonic_etcd::schema::{self, Schema};
use tonic_etcd::testing::demo::{self, DemoOptions};
use tonic_etcd::Etcd;
use tonic_etcd::{rbac, upgrade};
use tonic_etcd::{ConfigStore, Discover, Metadata, Override, OverrideStore, Registration};
use tower::discover::Change;

#[derive(Parser, Debug)]
#[command(
    name = "tonic-etcd",
    version,
    about = "Inspect and use the etcd service registry of tonic-etcd"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct Global {
    /// etcd endpoints, comma separated [default: 127.0.0.1:2379; the demo
    /// starts its own etcd when none is given].
    #[arg(long, global = true, env = "ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd: Option<Vec<String>>,
    /// Key layout: naming (etcd's Go naming package) or colon.
    #[arg(long, global = true, default_value = "naming")]
    schema: String,
    /// Namespace (key prefix); required by the colon schema.
    #[arg(long, global = true)]
    namespace: Option<String>,
    /// etcd user name.
    #[arg(long, global = true)]
    user: Option<String>,
    /// etcd password (better: the TONIC_ETCD_PASSWORD environment variable).
    #[arg(
        long,
        global = true,
        env = "TONIC_ETCD_PASSWORD",
        hide_env_values = true
    )]
    password: Option<Secret>,
    /// CA certificate (PEM) to verify etcd's TLS certificate.
    #[arg(long, global = true)]
    cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate auth.
    #[arg(long, global = true, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// Client key (PEM) for --cert.
    #[arg(long, global = true, requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// Limit on connecting and on each etcd request, in seconds.
    #[arg(long, global = true, default_value_t = 5.0)]
    timeout: f64,
}

/// A password: never shown by `Debug`.
#[derive(Clone)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every service and its instances (or one service's), as a table.
    List {
        /// Only this service.
        service: Option<String>,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// Also probe each instance (grpc.health.v1 Check, 1 s each).
        #[arg(long)]
        probe: bool,
    },
    /// The operator console: every service in a browser, live
    /// (http://127.0.0.1:8080 by default).
    Console {
        /// Address to serve on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Allow drains and weight overrides; needs tokens in
        /// TONIC_ETCD_CONSOLE_TOKENS (name=secret,...; secrets of 16+ chars).
        #[arg(long)]
        allow_writes: bool,
    },
    /// Take an instance out of traffic: Balancers send it no new calls and
    /// let those in flight finish (until `undrain` or its registration ends).
    Drain {
        /// The service.
        service: String,
        /// The instance id (see `list`).
        id: String,
        /// Then wait until the instance reports no call in flight (its
        /// ORCA load stream, which servers built on tonic-etcd's
        /// `server::builder` serve); fail at --wait-timeout naming the
        /// methods still running.
        #[arg(long)]
        wait: bool,
        /// The longest --wait, in seconds.
        #[arg(long, default_value_t = 60.0, requires = "wait")]
        wait_timeout: f64,
    },
    /// Put a drained instance back into traffic (removes its override).
    Undrain {
        /// The service.
        service: String,
        /// The instance id.
        id: String,
    },
    /// Override an instance's weight (1 to 10000) until `undrain` or its
    /// registration ends.
    Weight {
        /// The service.
        service: String,
        /// The instance id.
        id: String,
        /// The weight.
        weight: u32,
    },
    /// Follow a service live: an initial listing, then one line per change,
    /// `<unix-time-ms> insert|remove <addr> <metadata-json>`, until SIGINT.
    Watch {
        /// The service to watch.
        service: String,
    },
    /// Register an instance, keep it alive, and deregister on SIGINT/SIGTERM.
    Register {
        /// The service name.
        service: String,
        /// The address clients dial (host:port).
        addr: String,
        /// Lease TTL in seconds.
        #[arg(long, default_value_t = 10)]
        ttl: u64,
        /// Metadata as key=value (repeatable).
        #[arg(long = "metadata", value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
    },
    /// A service's gRPC service config in etcd (retries, hedging, timeouts),
    /// which every Balancer of the service applies to its next call.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// The etcd roles each part needs in --namespace (server, client,
    /// viewer, operator, config), as etcdctl commands; with --apply, run as
    /// etcd's root user, creates them.
    Rbac {
        /// Create the roles in etcd instead of printing the commands.
        #[arg(long)]
        apply: bool,
        /// Also a user per role, holding it (with --apply: new random
        /// passwords, printed once).
        #[arg(long)]
        users: bool,
        /// Role and user names start with this [default: tonic-etcd-<namespace>].
        #[arg(long)]
        role_prefix: Option<String>,
    },
    /// Copy --namespace's service configs and overrides from the layout
    /// before 0.2 (`_tonic-etcd/<kind>/<namespace>/...`) to their place
    /// inside the namespace; prints the plan unless --apply is given.
    UpgradeKeys {
        /// Copy the keys (a key already in its new place is left as is).
        #[arg(long)]
        apply: bool,
        /// With --apply: also remove the old keys whose copy exists (once
        /// every client runs 0.2 or later).
        #[arg(long, requires = "apply")]
        remove_old: bool,
    },
    /// The demo: a local etcd (unless --etcd is given), self-registering
    /// servers, and a client that dials them by name.
    Demo {
        /// Lease TTL of the demo servers, in seconds.
        #[arg(long, default_value_t = 3)]
        ttl: u64,
        /// Length of each phase, in milliseconds.
        #[arg(long, default_value_t = 1500)]
        phase_ms: u64,
        /// Internal: run as one demo server on this address.
        #[arg(long, hide = true)]
        serve: Option<String>,
        /// Internal: the demo's service name.
        #[arg(long, hide = true, default_value = "greeter.v1.Greeter")]
        service: String,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigAction {
    /// Print the stored document (and say on stderr when balancers refuse it).
    Get {
        /// The service.
        service: String,
    },
    /// Validate a document (a file, or `-` for stdin) and store it; nothing
    /// is written when it does not validate.
    Set {
        /// The service.
        service: String,
        /// The JSON document, or `-` to read stdin.
        file: String,
        /// Store it even with fields that have no effect, or for a service
        /// that is not registered but resembles one that is.
        #[arg(long)]
        force: bool,
    },
    /// Delete the stored document: balancers go back to their own config.
    Rm {
        /// The service.
        service: String,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// A runtime failure: one line, saying what to check.
struct Failure(String);

impl<E: fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let g = cli.global;
    if let Command::Demo {
        ttl,
        phase_ms,
        serve,
        service,
    } = cli.command
    {
        let opts = DemoOptions {
            etcd: g.etcd.clone(),
            namespace: g
                .namespace
                .clone()
                .unwrap_or_else(|| DemoOptions::default().namespace),
            service,
            ttl,
            phase: Duration::from_millis(phase_ms),
            server_args: vec!["demo".into()],
        };
        return match serve {
            Some(addr) => demo::serve(&opts, &addr).await.map_err(Failure::from),
            None => demo::run(&opts).await.map_err(Failure::from),
        };
    }
    let schema = schema::by_name(&g.schema, g.namespace.as_deref())?;
    let timeout = Duration::from_secs_f64(g.timeout.max(0.1));
    if let Command::Rbac {
        apply,
        users,
        role_prefix,
    } = &cli.command
    {
        let prefix = role_prefix
            .clone()
            .unwrap_or_else(|| rbac::default_prefix(g.namespace.as_deref().unwrap_or_default()));
        let roles = rbac::roles(&*schema, &prefix)?;
        if !apply {
            print!("{}", rbac::script(&roles, *users));
            return Ok(());
        }
        let client = connect(&g, timeout).await?;
        for done in rbac::apply(&client, &roles, *users).await? {
            let state = if done.role_created {
                "created"
            } else {
                "updated"
            };
            println!("role {} {state}", done.name);
            if let Some(password) = done.password {
                println!("user {} created, password: {password}", done.name);
            } else if *users {
                println!("user {} exists: password unchanged", done.name);
            }
        }
        if *users {
            eprintln!("the passwords are shown only now: store them in your secret store");
        }
        return Ok(());
    }
    let client = connect(&g, timeout).await?;
    match cli.command {
        Command::List {
            service,
            json,
            probe,
        } => list(&client, schema, service.as_deref(), json, probe, timeout).await,
        Command::Console {
            listen,
            allow_writes,
        } => console(client, schema, &listen, allow_writes, timeout).await,
        Command::Drain {
            service,
            id,
            wait,
            wait_timeout,
        } => {
            let store = OverrideStore::new(client, schema).request_timeout(timeout);
            store
                .set(&service, &id, &Override::drain(operator(&g)))
                .await?;
            println!("drained {id} of {service}: Balancers send it no new calls");
            if wait {
                let instance = store.find(&service, &id).await?;
                let limit = Duration::from_secs_f64(wait_timeout.max(0.0));
                wait_idle(&instance.addr, limit, timeout).await?;
            }
            Ok(())
        }
        Command::Undrain { service, id } => {
            let store = OverrideStore::new(client, schema).request_timeout(timeout);
            if store.remove(&service, &id).await? {
                println!("removed the override of {id} of {service}");
            } else {
                println!("{id} of {service} had no override");
            }
            Ok(())
        }
        Command::Weight {
            service,
            id,
            weight,
        } => {
            let store = OverrideStore::new(client, schema).request_timeout(timeout);
            store
                .set(&service, &id, &Override::weight(weight, operator(&g))?)
                .await?;
            println!("weight of {id} of {service} set to {weight}");
            Ok(())
        }
        Command::Watch { service } => watch(client, schema, &service, timeout).await,
        Command::Register {
            service,
            addr,
            ttl,
            metadata,
        } => register(client, schema, service, addr, ttl, metadata, timeout).await,
        Command::Config { action } => {
            let store = ConfigStore::new(client.clone())
                .schema(schema.clone())
                .request_timeout(timeout);
            config(&store, action, &client, &*schema, timeout).await
        }
        Command::UpgradeKeys { apply, remove_old } => {
            let moves = if apply {
                upgrade::apply(&client, &*schema, remove_old, timeout).await?
            } else {
                upgrade::plan(&client, &*schema, timeout).await?
            };
            if moves.is_empty() {
                println!("nothing to move: no keys of this namespace in the old layout");
            }
            for m in &moves {
                println!(
                    "{} -> {}: {}",
                    printable(&m.from),
                    printable(&m.to),
                    m.outcome
                );
            }
            Ok(())
        }
        Command::Demo { .. } | Command::Rbac { .. } => Ok(()),
    }
}

async fn config(
    store: &ConfigStore,
    action: ConfigAction,
    client: &Etcd,
    schema: &dyn Schema,
    timeout: Duration,
) -> Result<(), Failure> {
    match action {
        ConfigAction::Get { service } => match store.get(&service).await? {
            None => {
                eprintln!(
                    "no service config for {service} in etcd (key {})",
                    store.key(&service)?
                );
                Ok(())
            }
            Some(stored) => {
                println!("{}", stored.json.trim_end());
                if let Ok(value) = serde_json::from_str(&stored.json) {
                    for u in tonic_etcd::service_config::unknown_fields(&value) {
                        eprintln!("warning: {u}");
                    }
                }
                match stored.config {
                    Ok(_) => Ok(()),
                    Err(e) => Err(Failure(format!(
                        "balancers refuse this document (revision {}), and keep the config they had: {e}",
                        stored.revision
                    ))),
                }
            }
        },
        ConfigAction::Set {
            service,
            file,
            force,
        } => {
            let json = if file == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| Failure(format!("cannot read stdin: {e}")))?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| Failure(format!("cannot read {file}: {e}")))?
            };
            let parsed = serde_json::from_str(&json)
                .map_err(|e| Failure(format!("not JSON: {e}; nothing written")))?;
            let config = tonic_etcd::ServiceConfig::from_value(&parsed)
                .map_err(|e| Failure(format!("{e}; nothing written")))?;
            let mut doubts = Vec::new();
            let unknown = tonic_etcd::service_config::unknown_fields(&parsed);
            for u in &unknown {
                eprintln!("warning: {u}");
            }
            if !unknown.is_empty() {
                doubts.push(format!("{} field(s) with no effect", unknown.len()));
            }
            for (i, mc) in config.method_configs.iter().enumerate() {
                for (k, name) in mc.names.iter().enumerate() {
                    if let Some(other) = name.service.as_deref().filter(|s| *s != service) {
                        eprintln!(
                            "warning: methodConfig[{i}].name[{k}] names service {other:?}: this \
                             document is for {service:?}, whose Balancers use the entry only for \
                             calls to {other}'s methods"
                        );
                    }
                }
            }
            let listing = catalog::list(client, schema, None, timeout).await?;
            if !listing.services.contains_key(&service) {
                match listing.nearest_service(&service) {
                    Some(near) => {
                        eprintln!(
                            "warning: no instance of {service:?} is registered; did you mean {near:?}?"
                        );
                        doubts.push(format!("a service name close to {near:?}"));
                    }
                    None => eprintln!(
                        "note: no instance of {service:?} is registered yet; its Balancers will \
                         apply this config when they start"
                    ),
                }
            }
            if !doubts.is_empty() && !force {
                return Err(Failure(format!(
                    "{}; nothing written (fix the document, or pass --force to store it as it is)",
                    doubts.join(" and ")
                )));
            }
            let revision = store.set(&service, &json).await?;
            eprintln!("stored at {} (revision {revision})", store.key(&service)?);
            Ok(())
        }
        ConfigAction::Rm { service } => {
            let before = store.get(&service).await?;
            if store.remove(&service).await? {
                eprintln!(
                    "removed {}; Balancers of {service} now use the config they were built \
                     with (BalancerBuilder::service_config, none unless set in code)",
                    store.key(&service)?
                );
                if let Some(old) = before {
                    eprintln!(
                        "the removed document (revision {}), to restore it: \
                         tonic-etcd config set {service} -",
                        old.revision
                    );
                    println!("{}", old.json.trim_end());
                }
            } else {
                eprintln!("no service config for {service} in etcd");
            }
            Ok(())
        }
    }
}

/// Waits until the server at `addr` reports no call in flight, printing
/// what still runs as it changes; fails at `limit` naming it.
async fn wait_idle(addr: &str, limit: Duration, timeout: Duration) -> Result<(), Failure> {
    use tokio_stream::StreamExt;
    let started = tokio::time::Instant::now();
    let deadline = started + limit;
    let mut reports = Box::pin(
        tonic_etcd::orca::watch(addr, tonic_etcd::server::MIN_REPORT_INTERVAL, timeout).await?,
    );
    let mut shown = String::new();
    loop {
        let report = match tokio::time::timeout_at(deadline, reports.next()).await {
            Err(_) => {
                return Err(Failure(format!(
                    "{addr} still has calls in flight after {limit:?}: {}",
                    if shown.is_empty() { "unknown" } else { &shown }
                )))
            }
            Ok(None) => return Err(Failure(format!("{addr} closed its load stream"))),
            Ok(Some(Err(status))) => {
                return Err(Failure(format!(
                    "{addr}'s load stream failed: {}: {}",
                    status.code(),
                    status.message()
                )))
            }
            Ok(Some(Ok(report))) => report,
        };
        let Some(in_flight) = report.in_flight() else {
            return Err(Failure(format!(
                "{addr} reports its load without its calls in flight (not a tonic-etcd server?)"
            )));
        };
        if in_flight == 0 {
            println!(
                "{addr}: no call in flight ({:.1} s after the drain)",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        let now: Vec<String> = report
            .in_flight_by_method()
            .into_iter()
            .map(|(method, n)| format!("{n} {method}"))
            .collect();
        let now = format!("{in_flight} in flight ({})", now.join(", "));
        if now != shown {
            println!("{addr}: {now}");
            shown = now;
        }
    }
}

async fn connect(g: &Global, timeout: Duration) -> Result<Etcd, Failure> {
    let mut opts = tonic_etcd::connect_options().with_connect_timeout(timeout);
    if let Some(user) = &g.user {
        let password = g.password.clone().map(|s| s.0).unwrap_or_default();
        opts = opts.with_user(user.clone(), password);
    }
    opts = tls_options(g, opts)?;
    let endpoints: Vec<String> = g
        .etcd
        .clone()
        .unwrap_or_else(|| vec!["127.0.0.1:2379".into()])
        .iter()
        .map(|e| endpoint_url(e, g))
        .collect();
    let connected =
        tokio::time::timeout(timeout, tonic_etcd::connect(&endpoints, Some(opts))).await;
    let fail = |reason: String| {
        Failure(format!(
            "cannot connect to etcd at {}: {reason}; check --etcd, --user/--password and the TLS options",
            endpoints.join(",")
        ))
    };
    let silent = || fail(format!("no answer within {timeout:?}"));
    let mut client = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(fail(e.to_string())),
        Err(_) => return Err(silent()),
    };
    // etcd-client connects lazily; one request proves the endpoint answers.
    match tokio::time::timeout(timeout, client.status()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(silent()),
    }
}

/// `host:port` gets `https://` when TLS options are given, else `http://`.
fn endpoint_url(e: &str, g: &Global) -> String {
    if e.contains("://") {
        e.to_owned()
    } else if g.cacert.is_some() || g.cert.is_some() {
        format!("https://{e}")
    } else {
        format!("http://{e}")
    }
}

#[cfg(feature = "tls")]
fn tls_options(
    g: &Global,
    opts: etcd_client::ConnectOptions,
) -> Result<etcd_client::ConnectOptions, Failure> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    if g.cacert.is_none() && g.cert.is_none() {
        return Ok(opts);
    }
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| Failure(format!("cannot read {}: {e}", p.display())))
    };
    let mut tls = TlsOptions::new();
    if let Some(ca) = &g.cacert {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&g.cert, &g.key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(opts.with_tls(tls))
}

#[cfg(not(feature = "tls"))]
fn tls_options(
    g: &Global,
    opts: etcd_client::ConnectOptions,
) -> Result<etcd_client::ConnectOptions, Failure> {
    if g.cacert.is_some() || g.cert.is_some() {
        return Err(Failure(
            "this build has no TLS support; rebuild with `--features cli,tls`".into(),
        ));
    }
    Ok(opts)
}

/// Who a write from the CLI is recorded as: the etcd user (the identity
/// etcd itself checked), else the OS user, else the host name; never
/// `unknown` (a drain nobody can trace back is an incident of its own).
fn operator(g: &Global) -> String {
    let os_user = || {
        ["USER", "LOGNAME"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .find(|u| !u.trim().is_empty())
    };
    let host = || {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .map(|h| format!("host:{h}"))
    };
    let who = g
        .user
        .clone()
        .map(|u| format!("etcd:{u}"))
        .or_else(os_user)
        .or_else(host)
        .unwrap_or_else(|| format!("pid:{}", std::process::id()));
    format!("cli:{who}")
}

async fn console(
    client: Etcd,
    schema: Arc<dyn Schema>,
    listen: &str,
    allow_writes: bool,
    timeout: Duration,
) -> Result<(), Failure> {
    let mut opts = ConsoleOptions::new();
    if allow_writes {
        let tokens = std::env::var("TONIC_ETCD_CONSOLE_TOKENS").unwrap_or_default();
        opts = opts.with_writes(&tokens)?;
    }
    opts.request_timeout = Some(timeout);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure(format!("cannot listen on {listen}: {e}")))?;
    let local = listener.local_addr()?;
    if !allow_writes && !local.ip().is_loopback() {
        eprintln!("console on {local} is read-only (no --allow-writes)");
    }
    println!("console: http://{local}/");
    let shutdown = tonic_etcd::server::shutdown_signal();
    tonic_etcd::console::serve(client, schema, opts, listener, shutdown).await?;
    Ok(())
}

async fn list(
    client: &Etcd,
    schema: Arc<dyn Schema>,
    service: Option<&str>,
    json: bool,
    probe: bool,
    timeout: Duration,
) -> Result<(), Failure> {
    let listing = catalog::list(client, &*schema, service, timeout).await?;
    if json {
        println!("{}", listing_json(&listing));
        return Ok(());
    }
    let leases = listing.keys.values().map(|k| k.lease).collect();
    let ttls = catalog::lease_ttls(client, leases, timeout).await;
    let overrides = OverrideStore::new(client.clone(), schema)
        .request_timeout(timeout)
        .list(service)
        .await
        .unwrap_or_default();
    let mut probes = BTreeMap::new();
    if probe {
        let targets = listing
            .services
            .iter()
            .flat_map(|(svc, all)| {
                all.iter()
                    .map(|i| ((svc.clone(), i.id.clone()), i.addr.clone()))
            })
            .collect();
        probes.extend(tonic_etcd::console::probe_all(targets, Duration::from_secs(1)).await);
    }
    let mut rows: Vec<[String; 8]> = Vec::new();
    for (svc, instances) in &listing.services {
        for i in instances {
            let key = (svc.clone(), i.id.clone());
            let info = listing.keys.get(&key);
            let ttl = match info.map(|k| (k.lease, ttls.get(&k.lease))) {
                Some((0, _)) => "none".to_owned(),
                Some((_, Some((left, granted)))) if *left >= 0 => format!("{left}/{granted}s"),
                _ => "expired".to_owned(),
            };
            let over = match overrides.get(&key) {
                Some(o) if o.drain => format!("drained by {}", o.by),
                Some(o) => format!("weight {} by {}", o.weight.unwrap_or(1), o.by),
                None => String::new(),
            };
            let health = probes.get(&key).map_or(String::new(), |p| {
                format!("{} {:.1}ms", p.status, p.latency.as_secs_f64() * 1e3)
            });
            rows.push([
                printable(svc),
                printable(&i.id),
                printable(&i.addr),
                ttl,
                info.map_or(String::new(), |k| k.create_revision.to_string()),
                printable(&over),
                health,
                printable(&i.metadata.to_string()),
            ]);
        }
    }
    print_table(
        &[
            "SERVICE",
            "ID",
            "ADDRESS",
            "TTL",
            "SINCE REV",
            "OVERRIDE",
            "HEALTH",
            "METADATA",
        ],
        &rows,
    );
    if !listing.undecodable.is_empty() {
        println!("\nundecodable entries (skipped by clients):");
        let rows: Vec<[String; 2]> = listing
            .undecodable
            .iter()
            .map(|(k, e)| [printable(k), e.to_string()])
            .collect();
        print_table(&["KEY", "REASON"], &rows);
    }
    Ok(())
}

fn listing_json(listing: &Listing) -> serde_json::Value {
    let services: BTreeMap<&String, Vec<serde_json::Value>> = listing
        .services
        .iter()
        .map(|(s, instances)| {
            let list = instances
                .iter()
                .map(|i| serde_json::json!({"id": i.id, "addr": i.addr, "metadata": i.metadata.as_json()}))
                .collect();
            (s, list)
        })
        .collect();
    let undecodable: Vec<serde_json::Value> = listing
        .undecodable
        .iter()
        .map(|(k, e)| serde_json::json!({"key": k, "reason": e.to_string()}))
        .collect();
    serde_json::json!({"revision": listing.revision, "services": services, "undecodable": undecodable})
}

/// Values from etcd are data: control characters (a terminal's escape
/// sequences among them) are escaped before printing, and long ones cut.
fn printable(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().take(200) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

async fn watch(
    client: Etcd,
    schema: Arc<dyn Schema>,
    service: &str,
    timeout: Duration,
) -> Result<(), Failure> {
    let mut discover = Discover::builder(client, service)
        .schema(schema)
        .request_timeout(timeout)
        .build()?;
    let mut known: BTreeMap<String, tonic_etcd::Instance> = BTreeMap::new();
    let mut status = discover.status();
    tokio::time::timeout(timeout, status.wait_for(|s| s.synced))
        .await
        .map_err(|_| {
            Failure(format!(
                "no listing of {service:?} within {timeout:?}; check --etcd"
            ))
        })?
        .map_err(|_| Failure("discovery stopped".into()))?;
    let signal = tonic_etcd::server::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => return Ok(()),
            change = discover.next() => {
                let Some(Ok(change)) = change else { return Ok(()) };
                match change {
                    Change::Insert(key, i) => {
                        println!("{} insert {} {}", now_ms(), i.addr, i.metadata);
                        known.insert(key, i);
                    }
                    Change::Remove(key) => {
                        if let Some(i) = known.remove(&key) {
                            println!("{} remove {} {}", now_ms(), i.addr, i.metadata);
                        }
                    }
                }
            }
        }
    }
}

async fn register(
    client: Etcd,
    schema: Arc<dyn Schema>,
    service: String,
    addr: String,
    ttl: u64,
    metadata: Vec<(String, String)>,
    timeout: Duration,
) -> Result<(), Failure> {
    // Handlers first: a SIGTERM while the key is being written must not
    // kill the process with the key left behind.
    let signal = tonic_etcd::server::shutdown_signal();
    let metadata = metadata
        .into_iter()
        .fold(Metadata::new(), |m, (k, v)| m.with(k, v));
    let registration = Registration::builder(client)
        .schema(schema)
        .service(&service)
        .addr(&addr)
        .metadata(metadata)
        .ttl(Duration::from_secs(ttl))
        .request_timeout(timeout)
        .startup_timeout(timeout)
        .register()
        .await?;
    println!("registered {}", registration.keys().join(" "));
    signal.await;
    registration.deregister().await?;
    println!("deregistered");
    Ok(())
}
