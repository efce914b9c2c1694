//! etcd with authentication: a user limited to one prefix registers and
//! discovers inside it, is refused outside it at once, and a wrong password
//! is a clear error at start-up. Secrets never appear in errors or output.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::eventually;
use etcd_client::Permission;
use tokio_stream::StreamExt;
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Discover, NamingSchema, Registration};
use tower::discover::Change;

const LIMIT: Duration = Duration::from_secs(10);
const ROOT_PW: &str = "root-secret-4711";
const SVC_PW: &str = "svc-secret-0815";

/// Root user, a role with read-write on `allowed/` only, a user `svc` with it;
/// then auth on.
async fn with_auth(etcd: &Etcd) {
    let mut c = etcd.client().await;
    c.user_add("root", ROOT_PW, None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add("svc").await.unwrap();
    c.role_grant_permission("svc", Permission::read_write("allowed/").with_prefix())
        .await
        .unwrap();
    c.user_add("svc", SVC_PW, None).await.unwrap();
    c.user_grant_role("svc", "svc").await.unwrap();
    c.auth_enable().await.unwrap();
}

async fn connect_as(
    etcd: &Etcd,
    user: &str,
    password: &str,
) -> Result<tonic_etcd::Etcd, etcd_client::Error> {
    etcd_client::Client::connect(
        etcd.endpoints(),
        Some(
            tonic_etcd::connect_options()
                .with_user(user, password)
                .with_auto_token_refresh(true),
        ),
    )
    .await
    .map(Into::into)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_limited_to_a_prefix_works_inside_it_and_is_refused_outside() {
    let etcd = Etcd::start();
    with_auth(&etcd).await;
    let client = connect_as(&etcd, "svc", SVC_PW).await.unwrap();
    let inside = NamingSchema::with_namespace("allowed").unwrap();

    let mut discover = Discover::builder(client.clone(), "greeter")
        .schema(inside.clone())
        .build()
        .unwrap();
    let reg = Registration::builder(client.clone())
        .schema(inside.clone())
        .service("greeter")
        .addr("127.0.0.1:7201")
        .register()
        .await
        .expect("registration inside the permitted prefix");
    let change = tokio::time::timeout(LIMIT, discover.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(change, Change::Insert(_, i) if i.addr == "127.0.0.1:7201"));
    // The one-prefix role covers a Balancer's service config, overrides
    // and client key too (all inside the namespace): etcd refuses nothing.
    let config = tonic_etcd::ServiceConfig::from_json(
        r#"{"loadBalancingConfig":[{"tonic_etcd_coordinated_subsetting":
            {"subsetSize":1,"childPolicy":[{"round_robin":{}}]}}]}"#,
    )
    .unwrap();
    let balancer = tonic_etcd::Balancer::builder(client.clone(), "greeter")
        .schema(inside.clone())
        .service_config(config)
        .build()
        .unwrap();
    eventually(
        LIMIT,
        "the service config read and the client key written",
        || {
            let synced = balancer.service_config().synced;
            let mut kv = client.clone();
            async move {
                let keys = kv
                    .get(
                        "allowed/_tonic-etcd/clients/greeter/",
                        Some(etcd_client::GetOptions::new().with_prefix()),
                    )
                    .await
                    .ok()?;
                (synced && keys.count() == 1).then_some(())
            }
        },
    )
    .await;
    assert!(balancer.service_config().last_error.is_none());
    assert_eq!(denied(&etcd), 0.0, "a one-prefix role was refused");
    drop(balancer);
    reg.deregister().await.unwrap();
    assert!(matches!(
        tokio::time::timeout(LIMIT, discover.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        Change::Remove(_)
    ));

    // Outside the prefix: refused at once, not retried until the deadline.
    let t = Instant::now();
    let err = Registration::builder(client.clone())
        .schema(NamingSchema::with_namespace("other").unwrap())
        .service("greeter")
        .addr("127.0.0.1:7202")
        .register()
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("permission denied"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "refused in {:?}",
        t.elapsed()
    );

    // A Discover outside the prefix keeps nothing and reports why.
    let outside = Discover::builder(client, "greeter")
        .schema(NamingSchema::with_namespace("other").unwrap())
        .build()
        .unwrap();
    let error = eventually(LIMIT, "the refusal is reported", || async {
        outside
            .status()
            .borrow()
            .last_error
            .as_ref()
            .map(ToString::to_string)
    })
    .await;
    assert!(error.contains("permission denied"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_at_start_up_without_leaking_it() {
    let etcd = Etcd::start();
    with_auth(&etcd).await;
    let wrong = "wrong-secret-1234";
    let t = Instant::now();
    let Err(err) = connect_as(&etcd, "svc", wrong).await else {
        panic!("connected with a wrong password");
    };
    assert!(t.elapsed() < Duration::from_secs(2));
    let text = format!("{err} {err:?}");
    assert!(text.contains("authentication failed"), "{text}");
    assert!(!text.contains(wrong), "the password leaked: {text}");

    // The CLI: exit 1, one line, no password anywhere in its output.
    let out = Command::new(env!("CARGO_BIN_EXE_tonic-etcd"))
        .args(["--etcd", &etcd.endpoint(), "--user", "svc", "list"])
        .env("TONIC_ETCD_PASSWORD", wrong)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stderr.contains("authentication failed") || stderr.contains("check --etcd"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(wrong) && !stdout.contains(wrong),
        "the password leaked: {stderr}"
    );

    // The library's own Debug output carries no credentials either.
    let client = connect_as(&etcd, "svc", SVC_PW).await.unwrap();
    let builder = Registration::builder(client)
        .service("x")
        .addr("127.0.0.1:1");
    let debug = format!("{builder:?}");
    assert!(!debug.contains(SVC_PW), "{debug}");
}

/// Every line the crate logs at warn or above, for the test that counts them.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The process's subscriber, installed by the first test that asks
    /// (tests share it: each filters the lines of its own namespace).
    fn install() -> Self {
        static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
        CAPTURED
            .get_or_init(|| {
                let captured = Self::default();
                let writer = captured.clone();
                tracing_subscriber::fmt()
                    .with_max_level(tracing::Level::WARN)
                    .with_ansi(false)
                    .with_writer(move || writer.clone())
                    .init();
                captured
            })
            .clone()
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

/// etcd's count of requests it refused for permissions (unary calls).
fn denied(etcd: &Etcd) -> f64 {
    tonic_etcd::testing::metric_where(
        &etcd.metrics(),
        "grpc_server_handled_total",
        "grpc_code=\"PermissionDenied\"",
    )
    .unwrap_or(0.0)
}

/// A role that covers the namespace's instances only (as a server's role
/// does, or a one-prefix role did before 0.2 moved the service config and
/// overrides into the namespace): a Balancer finds its instances, but not
/// its service config and overrides. It works, warns once per refused
/// watch naming the grant to add, shows
/// the refusal in `service_config()`, and asks etcd again at most once a
/// minute (before: every second, 21 refusals in 6 s). A Balancer of a
/// service outside the role fails its readiness at once, naming the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_optional_grants_works_warns_once_and_does_not_loop() {
    let logs = Captured::install();
    let etcd = Etcd::start();
    with_auth(&etcd).await;
    let mut root = connect_as(&etcd, "root", ROOT_PW).await.unwrap();
    root.role_add("instances").await.unwrap();
    // The two ranges around `allowed/_tonic-etcd/` (lower-case service
    // names sort after `_`).
    for (from, to) in [
        ("allowed/", "allowed/_tonic-etcd/"),
        ("allowed/_tonic-etcd0", "allowed0"),
    ] {
        let instances = Permission::read_write(from).with_range_end(to);
        root.role_grant_permission("instances", instances)
            .await
            .unwrap();
    }
    root.user_add("inst", SVC_PW, None).await.unwrap();
    root.user_grant_role("inst", "instances").await.unwrap();
    let client = connect_as(&etcd, "inst", SVC_PW).await.unwrap();
    let inside = NamingSchema::with_namespace("allowed").unwrap();
    let _reg = Registration::builder(client.clone())
        .schema(inside.clone())
        .service("greeter")
        .addr("127.0.0.1:7203")
        .register()
        .await
        .unwrap();
    let balancer = tonic_etcd::Balancer::builder(client.clone(), "greeter")
        .schema(inside)
        .build()
        .unwrap();
    eventually(LIMIT, "the instance found", || async {
        (balancer.registered() == 1).then_some(())
    })
    .await;
    let refusal = eventually(LIMIT, "the config refusal shown", || async {
        let status = balancer.service_config();
        status.last_error.map(|e| e.to_string())
    })
    .await;
    assert!(refusal.contains("grant-permission"), "{refusal}");
    // The optional watches' first refusals have landed; then a window in
    // which the old loop made ten more.
    // (Other tests in this binary log refusals of their own prefixes.)
    let optional = || {
        let lines = logs.lines_with("etcd refused");
        lines
            .into_iter()
            .filter(|l| l.contains("allowed/_tonic-etcd/"))
            .collect::<Vec<_>>()
    };
    eventually(LIMIT, "both optional watches refused once", || async {
        (optional().len() >= 2).then_some(())
    })
    .await;
    let settled = denied(&etcd);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let later = denied(&etcd);
    assert!(settled <= 2.0, "{settled} refused requests at start");
    assert_eq!(later, settled, "refused requests repeated within 10 s");
    let warned = optional();
    assert_eq!(
        warned.len(),
        2,
        "one warning per optional watch: {warned:#?}"
    );
    assert!(
        warned.iter().all(|l| l.contains("grant-permission")),
        "{warned:#?}"
    );
    assert_eq!(balancer.registered(), 1, "the instances stay");

    let t = Instant::now();
    let outside = tonic_etcd::Balancer::builder(client, "greeter")
        .schema(NamingSchema::with_namespace("other").unwrap())
        .build()
        .unwrap();
    let err = outside.wait_for_ready(1, LIMIT).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let text = err.to_string();
    assert!(
        matches!(err, tonic_etcd::Error::Refused { access: "read", .. })
            && text.contains("other/greeter"),
        "{text}"
    );
}

/// etcd's count of requests it answered with `code` (unary calls and
/// streams that ended with it).
fn handled(etcd: &Etcd, code: &str) -> f64 {
    tonic_etcd::testing::metric_where(
        &etcd.metrics(),
        "grpc_server_handled_total",
        &format!("grpc_code=\"{code}\""),
    )
    .unwrap_or(0.0)
}

/// The CLI as `user` in namespace `ns`, with its password in the
/// environment.
fn cli_run(
    etcd: &Etcd,
    user: &str,
    password: &str,
    ns: &str,
    args: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tonic-etcd"))
        .args([
            "--etcd",
            &etcd.endpoint(),
            "--user",
            user,
            "--namespace",
            ns,
        ])
        .args(args)
        .env("TONIC_ETCD_PASSWORD", password)
        .env("USER", "role-test")
        .output()
        .unwrap()
}

/// [`cli_run`], which must succeed; its output.
fn cli_as(etcd: &Etcd, user: &str, password: &str, ns: &str, args: &[&str]) -> String {
    let out = cli_run(etcd, user, password, ns, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} as {user}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// One HTTP/1.1 request to the console; the status and body.
async fn http(addr: std::net::SocketAddr, request: String) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, out)
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: console\r\nConnection: close\r\n\r\n")
}

/// The roles `tonic-etcd rbac` creates, each used by its own part for a
/// whole life: a server registers (and deregisters while drained, which
/// etcd's lease rule makes the hard case), `config set` stores a service
/// config, a Balancer reads it, applies coordinated subsetting and the
/// overrides and makes calls, the console shows everything read-only and
/// drains with writes, the CLI drains, weighs and undrains. etcd refuses
/// nothing: 0 `PermissionDenied` answers, and no refusal logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_runs_its_part_with_no_refused_request() {
    use tonic_etcd::balancer::EndpointState;
    use tonic_etcd::rbac;
    use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};

    let logs = Captured::install();
    let etcd = Etcd::start();
    with_auth(&etcd).await;
    let root = connect_as(&etcd, "root", ROOT_PW).await.unwrap();
    let ns = "team-a";
    let schema = NamingSchema::with_namespace(ns).unwrap();
    let roles = rbac::roles(&schema, &rbac::default_prefix(ns)).unwrap();
    let applied = rbac::apply(&root, &roles, true).await.unwrap();
    let user = |part: &str| format!("tonic-etcd-{ns}-{part}");
    let password = |part: &str| {
        applied
            .iter()
            .find(|a| a.name == user(part))
            .and_then(|a| a.password.clone())
            .unwrap()
    };
    let as_part = |part: &str| {
        let (user, password) = (user(part), password(part));
        let etcd = &etcd;
        async move { connect_as(etcd, &user, &password).await }
    };
    let cli_part =
        |part: &str, args: &[&str]| cli_as(&etcd, &user(part), &password(part), ns, args);
    // Run again: roles updated, users kept.
    let again = rbac::apply(&root, &roles, true).await.unwrap();
    assert!(again
        .iter()
        .all(|a| !a.role_created && a.password.is_none()));

    // A server registers.
    let backend = backend::Backend::start("g0");
    let reg = Registration::builder(as_part("server").await.unwrap())
        .schema(schema.clone())
        .service("greeter")
        .addr(&backend.addr)
        .register()
        .await
        .unwrap();
    let id = backend.addr.clone();

    // `config set`: coordinated subsetting over round robin.
    let doc = std::env::temp_dir().join(format!("role-test-{}.json", std::process::id()));
    std::fs::write(
        &doc,
        r#"{"loadBalancingConfig":[{"tonic_etcd_coordinated_subsetting":
            {"subsetSize":1,"childPolicy":[{"round_robin":{}}]}}]}"#,
    )
    .unwrap();
    cli_part(
        "config",
        &["config", "set", "greeter", doc.to_str().unwrap()],
    );
    let _ = std::fs::remove_file(&doc);

    // A Balancer: instances, the service config, overrides, its client key.
    let balancer = tonic_etcd::Balancer::builder(as_part("client").await.unwrap(), "greeter")
        .schema(schema.clone())
        .build()
        .unwrap();
    balancer.wait_for_ready(1, LIMIT).await.unwrap();
    eventually(LIMIT, "the service config from etcd", || async {
        matches!(
            balancer.service_config().source,
            tonic_etcd::config_store::ConfigSource::Etcd { .. }
        )
        .then_some(())
    })
    .await;
    let clients = format!("{ns}/_tonic-etcd/clients/greeter/");
    eventually(LIMIT, "the client key", || async {
        let got = root
            .clone()
            .get(
                clients.as_str(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .ok()?;
        (got.count() == 1).then_some(())
    })
    .await;
    let mut greeter = GreeterClient::new(balancer.clone());
    for _ in 0..20 {
        greeter
            .say_hello(HelloRequest {
                name: "role".into(),
            })
            .await
            .unwrap();
    }
    let state = || {
        balancer
            .endpoints()
            .into_iter()
            .find(|e| e.instance.id == id)
            .map(|e| e.state)
    };

    // The CLI as operator: drain, weight, undrain.
    cli_part("operator", &["drain", "greeter", &id]);
    eventually(LIMIT, "drained", || async {
        (state() == Some(EndpointState::Drained)).then_some(())
    })
    .await;
    cli_part("operator", &["weight", "greeter", &id, "7"]);
    cli_part("operator", &["undrain", "greeter", &id]);
    eventually(LIMIT, "back in traffic", || async {
        (state() != Some(EndpointState::Drained)).then_some(())
    })
    .await;

    // The console read-only as viewer, then with writes as operator.
    let viewer = tonic_etcd::console::ConsoleOptions::new();
    let token = "ops=role-test-token-0123456789";
    let writer = tonic_etcd::console::ConsoleOptions::new()
        .with_writes(token)
        .unwrap();
    for (part, opts) in [("viewer", viewer), ("operator", writer)] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let console = tokio::spawn(tonic_etcd::console::serve(
            as_part(part).await.unwrap(),
            std::sync::Arc::new(schema.clone()),
            opts,
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        for path in ["/", "/service?name=greeter", "/etcd"] {
            let (status, body) = http(addr, get(path)).await;
            assert_eq!(status, 200, "{part} {path}: {body}");
        }
        let (_, page) = http(addr, get("/service?name=greeter")).await;
        assert!(page.contains(&id), "{page}");
        if part == "operator" {
            let body = format!(r#"{{"service":"greeter","id":"{id}","action":"drain"}}"#);
            let request = format!(
                "POST /api/override HTTP/1.1\r\nHost: console\r\nConnection: close\r\n\
                 Authorization: Bearer role-test-token-0123456789\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let (status, answer) = http(addr, request).await;
            assert_eq!(status, 200, "{answer}");
        }
        let _ = stop.send(());
        let _ = console.await;
    }
    eventually(LIMIT, "drained from the console", || async {
        (state() == Some(EndpointState::Drained)).then_some(())
    })
    .await;
    let listed = cli_part("viewer", &["list"]);
    assert!(listed.contains(&id), "{listed}");
    // The crate's own keys share the namespace but are not services.
    assert!(!listed.contains("_tonic-etcd"), "{listed}");
    let mut catalog = tonic_etcd::Catalog::builder(as_part("viewer").await.unwrap())
        .schema(schema.clone())
        .build()
        .unwrap();
    catalog.synced(LIMIT).await.unwrap();
    let services: Vec<String> = catalog.snapshot().into_keys().collect();
    assert_eq!(services, ["greeter"]);
    assert_eq!(
        catalog.status().borrow().skipped,
        0,
        "own keys counted as bad"
    );
    cli_part("viewer", &["config", "get", "greeter"]);

    // The drained server leaves: its lease (with the drain bound to it) is
    // revoked, which etcd allows only with write on every key of it.
    let instance_key = reg.keys()[0].clone();
    reg.deregister().await.unwrap();
    let mut kv = root.clone();
    let left = kv
        .get(
            format!("{ns}/"),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap();
    let keys: Vec<String> = left
        .kvs()
        .iter()
        .map(|k| String::from_utf8_lossy(k.key()).into_owned())
        .collect();
    assert!(
        !keys
            .iter()
            .any(|k| *k == instance_key || k.contains("/overrides/")),
        "left behind: {keys:?}"
    );
    drop(balancer);

    let refused: Vec<String> = logs
        .lines_with("etcd refused")
        .into_iter()
        .filter(|l| l.contains(ns))
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
    assert_eq!(
        handled(&etcd, "PermissionDenied"),
        0.0,
        "etcd refused requests"
    );
    assert_eq!(
        handled(&etcd, "Unauthenticated"),
        0.0,
        "etcd refused tokens"
    );
}

/// `tonic-etcd rbac` prints the etcdctl commands without touching etcd;
/// with `--apply --users`, as root, creates the roles and users and prints
/// each new password once; a user who may not manage roles gets a clear
/// refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_prints_the_roles_and_creates_them_as_root() {
    let etcd = Etcd::start();
    with_auth(&etcd).await;
    let run =
        |user: &str, password: &str, args: &[&str]| cli_run(&etcd, user, password, "shop", args);
    // Printing needs no etcd (and no password).
    let printed = Command::new(env!("CARGO_BIN_EXE_tonic-etcd"))
        .args(["--etcd", "127.0.0.1:9", "--namespace", "shop", "rbac"])
        .output()
        .unwrap();
    assert!(printed.status.success(), "{printed:?}");
    let script = String::from_utf8_lossy(&printed.stdout);
    assert!(
        script.contains("etcdctl role grant-permission tonic-etcd-shop-viewer --prefix read shop/"),
        "{script}"
    );

    let refused = run("svc", SVC_PW, &["rbac", "--apply"]);
    assert_eq!(refused.status.code(), Some(1));
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(
        text.contains("permission denied") && text.contains("root user"),
        "{text}"
    );

    let out = run("root", ROOT_PW, &["rbac", "--apply", "--users"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let password = text
        .lines()
        .find_map(|l| l.strip_prefix("user tonic-etcd-shop-client created, password: "))
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();
    let mut client = connect_as(&etcd, "tonic-etcd-shop-client", &password)
        .await
        .unwrap();
    client.get("shop/", None).await.unwrap();
    let write = client.put("shop/greeter/x", "v", None).await.unwrap_err();
    assert!(write.to_string().contains("permission denied"), "{write}");
    // Again: nothing new, passwords kept.
    let again = run("root", ROOT_PW, &["rbac", "--apply", "--users"]);
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(!text.contains("password:"), "{text}");
    assert_eq!(text.matches("password unchanged").count(), 5, "{text}");
}
