//! The operator console in a real browser (Debian's chromium through
//! chromedriver, driven over WebDriver), against real etcd and real tonic
//! servers, run as users run it: the `tonic-etcd console` binary.
//!
//! It opens the services page, follows the link to the service, checks the
//! instances table and that metadata holding `<script>` shows as text,
//! registers an instance and sees its row appear without a reload, drains
//! an instance from the page (with a token) and sees a Balancer stop
//! sending it calls. The service page's screenshot is written to
//! `console-service.png` in cargo's `CARGO_TARGET_TMPDIR` (the docs' picture
//! comes from it).
//!
//! chromium and chromedriver come from `scripts/ensure-deps` (or `CHROMIUM`
//! and `CHROMEDRIVER`); without them the test fails and says so.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backend::Backend;
use common::{eventually, unique};
use fantoccini::{Client, ClientBuilder, Locator};
use tonic_etcd::balancer::{EndpointState, OutlierDetection};
use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, Metadata, NamingSchema, Registration};

const LIMIT: Duration = Duration::from_secs(15);
const TOKEN: &str = "console-test-secret-0123456789";

/// A child process killed when dropped, with its whole process group:
/// chromedriver starts chromium, which a plain kill of chromedriver would
/// leave running, orphaned, when a test fails.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = kill_group(self.0.id());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kill(-pgid, SIGKILL)`: every process of the group (`kill(1)` takes a
/// negative pid for a group, and needs no unsafe code).
fn kill_group(pgid: u32) -> std::io::Result<std::process::ExitStatus> {
    Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

fn find_tool(env: &str, names: &[&str]) -> String {
    if let Ok(p) = std::env::var(env) {
        return p;
    }
    for name in names {
        for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
            let p = format!("{dir}/{name}");
            if std::path::Path::new(&p).exists() {
                return p;
            }
        }
    }
    panic!(
        "{} not found: run scripts/ensure-deps (installs Debian's chromium and chromium-driver) \
         or set {env}",
        names[0]
    );
}

/// Starts `tonic-etcd console` and returns it with its URL.
fn start_console(endpoint: &str, ns: &str) -> (Kill, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tonic-etcd"))
        .args([
            "--etcd",
            endpoint,
            "--namespace",
            ns,
            "console",
            "--listen",
            "127.0.0.1:0",
            "--allow-writes",
        ])
        .env("TONIC_ETCD_CONSOLE_TOKENS", format!("tester={TOKEN}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tonic-etcd console");
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("console prints its address");
    let url = line
        .trim()
        .strip_prefix("console: ")
        .unwrap_or_else(|| panic!("unexpected console output {line:?}"))
        .trim_end_matches('/')
        .to_owned();
    (Kill(child), url)
}

/// Starts chromedriver on a free port and connects a headless chromium.
async fn browser() -> (Kill, Client) {
    let chromium = find_tool("CHROMIUM", &["chromium", "chromium-browser"]);
    let driver = find_tool("CHROMEDRIVER", &["chromedriver"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(&driver)
        // Its own process group, so the guard ends chromium with it.
        .process_group(0)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {driver}: {e}"));
    let guard = Kill(child);
    let caps: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1400,900",
                ],
            }
        }))
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + LIMIT;
    loop {
        // Plain HTTP to chromedriver on loopback: no TLS stack (another
        // rustls provider in the build would leave rustls without a default).
        let mut builder =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(caps.clone());
        match builder.connect(&url).await {
            Ok(client) => return (guard, client),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("chromedriver at {url} did not start a browser: {e}"),
        }
    }
}

/// Polls the page until `css` matches an element, without reloading.
async fn appears(client: &Client, css: &str) {
    let deadline = Instant::now() + LIMIT;
    while client.find(Locator::Css(css)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{css} never appeared on the page"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the element at `css`, which must be on the page.
async fn text_of(client: &Client, css: &str) -> String {
    let element = client.find(Locator::Css(css)).await;
    let element = element.unwrap_or_else(|e| panic!("no {css} on the page: {e}"));
    element.text().await.unwrap()
}

async fn register(
    client: &etcd_client::Client,
    ns: &str,
    id: &str,
    addr: &str,
    metadata: Metadata,
) -> Registration {
    Registration::builder(client.clone())
        .schema(NamingSchema::with_namespace(ns).unwrap())
        .service("shop")
        .id(id)
        .addr(addr)
        .metadata(metadata)
        .register()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_registry_live_and_drains_from_the_page() {
    let etcd = shared();
    let client = etcd.client().await;
    let ns = unique("console");
    let (one, two, three) = (
        Backend::start("one"),
        Backend::start("two"),
        Backend::start("three"),
    );
    let hostile = "<script>alert('x')</script>";
    let _r1 = register(
        &client,
        &ns,
        "one",
        &one.addr,
        Metadata::new()
            .with("zone", "eu-1")
            .with("version", "1.4.2"),
    )
    .await;
    let _r2 = register(
        &client,
        &ns,
        "two",
        &two.addr,
        Metadata::new().with("zone", "eu-2").with("note", hostile),
    )
    .await;
    let balancer = Balancer::builder(client.clone(), "shop")
        .schema(NamingSchema::with_namespace(&ns).unwrap())
        .outlier_detection(OutlierDetection::disabled())
        .build()
        .unwrap();
    balancer.wait_for_ready(2, LIMIT).await.unwrap();

    let (_console, url) = start_console(&etcd.endpoint(), &ns);
    let (_driver, browser) = browser().await;

    // The services page lists the service with its zones and versions.
    browser.goto(&format!("{url}/")).await.unwrap();
    let text = text_of(&browser, "tbody tr").await;
    assert!(
        text.contains("shop") && text.contains("eu-1") && text.contains("1.4.2"),
        "{text}"
    );
    browser
        .find(Locator::LinkText("shop"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The service page: both instances, metadata with <script> as text.
    appears(&browser, "tr[data-id='one']").await;
    appears(&browser, "tr[data-id='two']").await;
    let shown = text_of(&browser, "tr[data-id='two']").await;
    assert!(
        shown.contains(hostile),
        "the metadata shows as text: {shown}"
    );
    let scripts = browser
        .execute("return document.scripts.length", vec![])
        .await
        .unwrap();
    assert_eq!(
        scripts,
        serde_json::json!(1),
        "only the console's own script"
    );
    let probed = eventually(LIMIT, "the health probe answered", || async {
        let t = browser
            .find(Locator::Css("tr[data-id='one'] td[data-probe]"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        t.contains(" ms").then_some(t)
    })
    .await;
    assert!(probed.starts_with("UNIMPLEMENTED"), "{probed}");
    // Its traffic, from the server's own load report (ORCA).
    let traffic = eventually(LIMIT, "the traffic column filled", || async {
        let t = browser
            .find(Locator::Css("tr[data-id='one'] td[data-traffic]"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        t.contains("in flight").then_some(t)
    })
    .await;
    assert!(
        traffic.contains("/s") && traffic.contains("CPU"),
        "{traffic}"
    );

    // A new instance appears without a reload.
    let _r3 = register(&client, &ns, "three", &three.addr, Metadata::new()).await;
    appears(&browser, "tr[data-id='three']").await;
    let live = text_of(&browser, "#live").await;
    assert!(live.contains("insert") && live.contains("three"), "{live}");

    // Drain `one` from the page: the Balancer stops sending it calls.
    browser
        .find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    browser
        .find(Locator::Css(
            "tr[data-id='one'] button[data-action='drain']",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually(LIMIT, "one drained in the Balancer", || async {
        balancer
            .endpoints()
            .iter()
            .any(|e| e.instance.id == "one" && e.state == EndpointState::Drained)
            .then_some(())
    })
    .await;
    for _ in 0..30 {
        let mut request = tonic::Request::new(HelloRequest { name: "c".into() });
        request.set_timeout(LIMIT);
        let who = GreeterClient::new(balancer.clone())
            .say_hello(request)
            .await
            .unwrap()
            .into_inner()
            .server_id;
        assert_ne!(who, "one", "a drained instance got a call");
    }
    appears(&browser, "tr[data-id='one'] .drained").await;
    // The drain is in the live list, with who made it.
    eventually(LIMIT, "the drain in the live list", || async {
        let live = text_of(&browser, "#live").await;
        (live.contains("drain by ") && live.contains("one")).then_some(())
    })
    .await;
    // The page follows the drained instance's calls in flight until none
    // is left (the Balancer sends it nothing now).
    let idle = eventually(LIMIT, "the drain's countdown ended", || async {
        let t = text_of(&browser, "#result").await;
        t.contains("idle").then_some(t)
    })
    .await;
    assert!(idle.contains("one drained and idle"), "{idle}");
    // A weight set elsewhere (here: from code, as the CLI does) shows too.
    tonic_etcd::OverrideStore::new(client.clone(), NamingSchema::with_namespace(&ns).unwrap())
        .set(
            "shop",
            "two",
            &tonic_etcd::Override::weight(3, "code:test").unwrap(),
        )
        .await
        .unwrap();
    eventually(LIMIT, "the weight in the live list", || async {
        let live = text_of(&browser, "#live").await;
        live.contains("weight 3 by code:test").then_some(())
    })
    .await;

    let png = browser.screenshot().await.unwrap();
    // Cargo's own directory for files tests write: it exists wherever the
    // target directory is (CARGO_TARGET_DIR may point anywhere).
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-service.png");
    std::fs::write(&out, png).unwrap();
    browser.close().await.unwrap();
}

/// One HTTP/1.1 request to the console: (status, body).
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut raw))
        .await
        .expect("the console answered in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// The page's etcd banner (the script mentions the same words).
fn banner(page: &str) -> String {
    let after = page.split("<div id=\"etcd\"").nth(1).unwrap_or("");
    after.split("</div>").next().unwrap_or("").to_owned()
}

async fn console_in_process(
    client: tonic_etcd::Etcd,
    ns: &str,
    opts: tonic_etcd::console::ConsoleOptions,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let schema: std::sync::Arc<dyn tonic_etcd::Schema> =
        std::sync::Arc::new(NamingSchema::with_namespace(ns).unwrap());
    tokio::spawn(tonic_etcd::console::serve(
        client,
        schema,
        opts,
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

/// Writes are refused without `allow_writes` and without a valid token;
/// hostile keys and values are escaped; a service of 1,200 instances is
/// paginated; with etcd down the page says so and shows the last reading,
/// and recovers when etcd returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_guards_writes_escapes_what_etcd_holds_and_survives_etcd_down() {
    let etcd = tonic_etcd::testing::Etcd::start();
    let client = etcd.client().await;
    let ns = unique("console-http");
    let one = Backend::start("one");
    let _r1 = register(&client, &ns, "one", &one.addr, Metadata::new()).await;
    let mut raw = client.clone();
    // A key that is not UTF-8 and a value that is not JSON.
    let mut bad_key = format!("{ns}/shop/").into_bytes();
    bad_key.extend_from_slice(b"\xff<img src=x onerror=alert(1)>");
    raw.put(bad_key, "<script>bad()</script>", None)
        .await
        .unwrap();
    // 1,200 more instances under one lease.
    let lease = raw.lease_grant(60, None).await.unwrap().id();
    for i in 0..1_200 {
        raw.put(
            format!("{ns}/big/i{i:04}"),
            format!(
                r#"{{"Addr":"127.0.0.1:{}","Metadata":{{"zone":"<b>z</b>"}}}}"#,
                10_000 + i
            ),
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    }

    // Read-only: writes refused, and the page says why.
    let (ro, _stop_ro) = console_in_process(
        client.clone(),
        &ns,
        tonic_etcd::console::ConsoleOptions::new(),
    )
    .await;
    let (status, page) = http(&ro, "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<div class=\"banner note\">read-only"),
        "{page}"
    );
    assert!(
        !page.contains("<img src=x") && page.contains("&lt;img src=x"),
        "hostile key escaped"
    );
    assert!(
        !page.contains("<script>bad()"),
        "hostile value never markup"
    );
    let drain = r#"{"service":"shop","id":"one","action":"drain"}"#;
    let (status, _) = http(
        &ro,
        "POST",
        "/api/override",
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {TOKEN}")),
        ],
        drain,
    )
    .await;
    assert_eq!(status, 403);

    // Writes on: a token is required, and a valid one works.
    let opts = tonic_etcd::console::ConsoleOptions::new()
        .with_writes(&format!("tester={TOKEN}"))
        .unwrap();
    let (rw, _stop_rw) = console_in_process(client.clone(), &ns, opts).await;
    let json = ("content-type", "application/json");
    let (status, _) = http(
        &rw,
        "POST",
        "/api/override",
        &[json, ("authorization", "Bearer wrong-token-wrong-token")],
        drain,
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = http(
        &rw,
        "POST",
        "/api/override",
        &[json, ("authorization", &format!("Bearer {TOKEN}"))],
        drain,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let unknown = r#"{"service":"shop","id":"nobody","action":"drain"}"#;
    let (status, _) = http(
        &rw,
        "POST",
        "/api/override",
        &[json, ("authorization", &format!("Bearer {TOKEN}"))],
        unknown,
    )
    .await;
    assert_eq!(status, 404);
    assert!(tonic_etcd::console::ConsoleOptions::new()
        .with_writes("short=abc")
        .is_err());

    // A service config stored on one line reads indented and wraps.
    tonic_etcd::config_store::ConfigStore::new(client.clone())
        .schema(NamingSchema::with_namespace(&ns).unwrap())
        .set(
            "shop",
            r#"{"methodConfig":[{"name":[{"service":"shop.v1.Shop"}],"timeout":"1s"}]}"#,
        )
        .await
        .unwrap();
    let (status, page) = http(&rw, "GET", "/service?name=shop", &[], "").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("{\n  &quot;methodConfig&quot;: [\n    {"),
        "the config indented: {page}"
    );

    // 1,200 instances: 500 rows a page, three pages.
    let started = Instant::now();
    let (status, page) = http(&rw, "GET", "/service?name=big", &[], "").await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert_eq!(page.matches("<tr data-id=").count(), 500);
    assert!(page.contains("page=2\">3</a>"), "three pages");
    assert!(page.contains("&lt;b&gt;z&lt;/b&gt;"));
    eprintln!("service page of 1,200 instances (500 shown) rendered in {took:?}");

    // etcd down: the last reading under a banner; back: fresh again.
    let (status, _) = http(&rw, "GET", "/", &[], "").await;
    assert_eq!(status, 200, "a reading to keep");
    etcd.kill();
    let (status, page) = http(&rw, "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(banner(&page).contains("etcd unreachable"), "{page}");
    // In the services table (the live feed names services too).
    assert!(
        page.contains("name=shop\"") && page.contains("name=big\""),
        "the last reading stays"
    );
    etcd.restart();
    eventually(LIMIT, "the console reads etcd again", || async {
        let (status, page) = http(&rw, "GET", "/", &[], "").await;
        (status == 200 && !banner(&page).contains("etcd unreachable")).then_some(())
    })
    .await;
}
