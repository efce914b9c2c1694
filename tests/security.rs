//! etcd with authentication: a user limited to one prefix registers and
//! discovers inside it, is refused outside it at once, and a wrong password
//! is a clear error at start-up. Secrets never appear in errors or output.

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
        .schema(inside)
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
    /// Installed as the process's subscriber (only the test below logs).
    fn install() -> Self {
        let captured = Self::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        captured
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

/// The README's old one-prefix role: a Balancer in its namespace finds its
/// instances, but the service config and overrides live outside the role.
/// It works, warns once per refused watch naming the grant to add, shows
/// the refusal in `service_config()`, and asks etcd again at most once a
/// minute (before: every second, 21 refusals in 6 s). A Balancer of a
/// service outside the role fails its readiness at once, naming the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_optional_grants_works_warns_once_and_does_not_loop() {
    let logs = Captured::install();
    let etcd = Etcd::start();
    with_auth(&etcd).await;
    let client = connect_as(&etcd, "svc", SVC_PW).await.unwrap();
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
            .filter(|l| l.contains("_tonic-etcd/"))
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
