//! The `tonic-etcd` binary against a real etcd.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{absent, eventually, get, unique};
use tonic_etcd::testing::{shared, signal};
use tonic_etcd::Registration;

const BIN: &str = env!("CARGO_BIN_EXE_tonic-etcd");
const LIMIT: Duration = Duration::from_secs(10);

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["--etcd", &shared().endpoint()])
        .args(args)
        .output()
        .expect("run tonic-etcd")
}

#[tokio::test]
async fn list_shows_services_and_undecodable_entries() {
    let client = shared().client().await;
    let ns = unique("cli-list");
    let reg = Registration::builder(client.clone())
        .schema(tonic_etcd::NamingSchema::with_namespace(&ns).unwrap())
        .service("greeter")
        .addr("127.0.0.1:7101")
        .metadata(tonic_etcd::Metadata::new().with("zone", "a"))
        .register()
        .await
        .unwrap();
    let mut raw = client.clone();
    raw.put(format!("{ns}/greeter/bad"), "not json", None)
        .await
        .unwrap();

    let out = cli(&["--namespace", &ns, "list"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("greeter") && text.contains("127.0.0.1:7101"),
        "{text}"
    );
    assert!(text.contains(r#"{"zone":"a"}"#), "{text}");
    assert!(
        text.contains("/10s"),
        "TTL left of the granted 10 s: {text}"
    );
    assert!(
        text.contains("undecodable") && text.contains(&format!("{ns}/greeter/bad")),
        "{text}"
    );

    let out = cli(&["--namespace", &ns, "list", "greeter", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["services"]["greeter"][0]["addr"], "127.0.0.1:7101");
    assert_eq!(v["undecodable"][0]["key"], format!("{ns}/greeter/bad"));
    drop(reg);
}

#[tokio::test]
async fn register_keeps_the_key_until_sigterm() {
    let client = shared().client().await;
    let svc = unique("cli-register");
    let key = format!("{svc}/127.0.0.1:7102");
    let mut child = Command::new(BIN)
        .args([
            "--etcd",
            &shared().endpoint(),
            "register",
            &svc,
            "127.0.0.1:7102",
        ])
        .args(["--ttl", "5", "--metadata", "version=v2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (value, _) = eventually(LIMIT, "registered", || async { get(&client, &key).await }).await;
    assert_eq!(
        value,
        br#"{"Op":0,"Addr":"127.0.0.1:7102","Metadata":{"version":"v2"}}"#
    );
    signal(child.id(), "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(absent(&client, &key).await, "deregistered on SIGTERM");
}

#[tokio::test]
async fn watch_prints_one_line_per_change() {
    let client = shared().client().await;
    let svc = unique("cli-watch");
    let first = Registration::builder(client.clone())
        .service(&svc)
        .addr("127.0.0.1:7103")
        .register()
        .await
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["--etcd", &shared().endpoint(), "watch", &svc])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = tokio::time::timeout(LIMIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(line.ends_with("insert 127.0.0.1:7103 null"), "{line}");
    let t: u128 = line.split(' ').next().unwrap().parse().unwrap();
    assert!(t > 1_600_000_000_000, "unix time in ms: {line}");
    first.deregister().await.unwrap();
    let line = tokio::time::timeout(LIMIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(line.ends_with("remove 127.0.0.1:7103 null"), "{line}");
    signal(child.id(), "INT");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn exit_codes_say_what_went_wrong() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(BIN)
        .args([
            "--etcd",
            &format!("127.0.0.1:{port}"),
            "--timeout",
            "1",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("check --etcd"), "{err}");

    let out = Command::new(BIN)
        .args(["list", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .args(["--schema", "colon", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "colon needs a namespace");
}

#[tokio::test]
async fn list_without_a_namespace_reads_every_key() {
    // The naming schema without a namespace has an empty prefix; etcd has
    // no empty key, so this once failed with "key is not provided".
    let client = shared().client().await;
    let svc = unique("cli-root");
    client
        .clone()
        .put(format!("{svc}-unrelated/config"), "not an instance", None)
        .await
        .unwrap();
    let _reg = Registration::builder(client)
        .service(&svc)
        .addr("127.0.0.1:7104")
        .register()
        .await
        .unwrap();
    let out = cli(&["list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["services"][&svc][0]["addr"], "127.0.0.1:7104");
    // Other applications' keys are not called undecodable entries.
    assert_eq!(v["undecodable"], serde_json::json!([]));
}

#[tokio::test]
async fn config_set_validates_then_get_and_rm() {
    let svc = unique("cli-config");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"methodConfig":[{"name":[{}],"retryPolicy":{"maxAttempts":1}}]}"#,
    )
    .unwrap();
    let out = cli(&["config", "set", &svc, bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("maxAttempts") && err.contains("nothing written"),
        "{err}"
    );
    let client = shared().client().await;
    let key = format!("_tonic-etcd/service-config/{svc}");
    assert!(absent(&client, &key).await);

    let good = r#"{"methodConfig":[{"name":[{"service":"a.B"}],"timeout":"1s"}]}"#;
    let mut child = Command::new(BIN)
        .args(["--etcd", &shared().endpoint(), "config", "set", &svc, "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), good.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(get(&client, &key).await.unwrap().0, good.as_bytes());

    let out = cli(&["config", "get", &svc]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), good);

    // A document written past the CLI that balancers refuse: shown, and
    // said so.
    let mut raw = client.clone();
    raw.put(key.as_str(), "{", None).await.unwrap();
    let out = cli(&["config", "get", &svc]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refuse"),
        "{out:?}"
    );

    let out = cli(&["config", "rm", &svc]);
    assert!(out.status.success(), "{out:?}");
    assert!(absent(&client, &key).await);
}

#[tokio::test]
async fn drain_weight_and_undrain_show_in_list() {
    let client = shared().client().await;
    let ns = unique("cli-drain");
    let reg = Registration::builder(client.clone())
        .schema(tonic_etcd::NamingSchema::with_namespace(&ns).unwrap())
        .service("greeter")
        .id("one")
        .addr("127.0.0.1:7102")
        .register()
        .await
        .unwrap();
    let list = || {
        let out = cli(&["--namespace", &ns, "list", "greeter"]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let out = cli(&["--namespace", &ns, "drain", "greeter", "one"]);
    assert!(out.status.success(), "{out:?}");
    assert!(list().contains("drained by cli:"), "{}", list());
    let out = cli(&["--namespace", &ns, "weight", "greeter", "one", "7"]);
    assert!(out.status.success(), "{out:?}");
    assert!(list().contains("weight 7 by cli:"), "{}", list());
    let out = cli(&["--namespace", &ns, "undrain", "greeter", "one"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!list().contains(" by cli:"), "{}", list());
    // An instance that is not registered: a clear error, exit code 1.
    let out = cli(&["--namespace", &ns, "drain", "greeter", "nobody"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no instance \"nobody\""), "{err}");
    assert!(err.contains("id or address"), "{err}");

    // By address, as `list` shows it first, when one instance has it; the
    // record names who (here: no USER, so the host), never `unknown`.
    let by_addr = |args: &[&str]| {
        Command::new(BIN)
            .args(["--etcd", &shared().endpoint(), "--namespace", &ns])
            .args(args)
            .env_remove("USER")
            .env_remove("LOGNAME")
            .output()
            .unwrap()
    };
    let out = by_addr(&["drain", "greeter", "127.0.0.1:7102"]);
    assert!(out.status.success(), "{out:?}");
    let listed = list();
    assert!(listed.contains("drained by cli:host:"), "{listed}");
    let out = by_addr(&["undrain", "greeter", "127.0.0.1:7102"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed the override"),
        "{out:?}"
    );
    assert!(!list().contains(" by cli:"), "{}", list());
    // Two instances on one address: which one is for the operator to say.
    let twin = Registration::builder(client.clone())
        .schema(tonic_etcd::NamingSchema::with_namespace(&ns).unwrap())
        .service("greeter")
        .id("two")
        .addr("127.0.0.1:7102")
        .register()
        .await
        .unwrap();
    let out = by_addr(&["drain", "greeter", "127.0.0.1:7102"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("one, two") && err.contains("by its id"),
        "{err}"
    );
    drop((reg, twin));
}

/// `upgrade-keys` moves a namespace's service config and overrides from
/// the layout before 0.2 (`_tonic-etcd/<kind>/<ns>/...`) into the
/// namespace: a plan first (nothing written), then copies (with the
/// override's lease; a key already in its new place and an override whose
/// instance is gone are left), then the old keys removed. A Balancer of
/// the new version then reads both.
#[tokio::test]
async fn upgrade_keys_moves_the_old_layout_into_the_namespace() {
    let client = shared().client().await;
    let ns = unique("cli-upgrade");
    let schema = tonic_etcd::NamingSchema::with_namespace(&ns).unwrap();
    let reg = Registration::builder(client.clone())
        .schema(schema.clone())
        .service("greeter")
        .addr("127.0.0.1:7111")
        .register()
        .await
        .unwrap();
    let mut raw = client.clone();
    let instance = raw.get(reg.keys()[0].as_str(), None).await.unwrap();
    let lease = instance.kvs()[0].lease();
    let old_config = format!("_tonic-etcd/service-config/{ns}/greeter");
    let old_drain = format!("_tonic-etcd/overrides/{ns}/greeter/127.0.0.1:7111");
    let old_stale = format!("_tonic-etcd/overrides/{ns}/greeter/127.0.0.1:7112");
    let old_kept = format!("_tonic-etcd/service-config/{ns}/other");
    let config = r#"{"methodConfig":[{"name":[{}],"timeout":"7s"}]}"#;
    raw.put(old_config.as_str(), config, None).await.unwrap();
    raw.put(old_kept.as_str(), config, None).await.unwrap();
    let drain = r#"{"Op":0,"Addr":"127.0.0.1:7111","Metadata":{"by":"cli:old","drain":"true"}}"#;
    let with_lease = etcd_client::PutOptions::new().with_lease(lease);
    raw.put(old_drain.as_str(), drain, Some(with_lease.clone()))
        .await
        .unwrap();
    let other_lease = raw.lease_grant(60, None).await.unwrap().id();
    let stale = etcd_client::PutOptions::new().with_lease(other_lease);
    raw.put(old_stale.as_str(), drain, Some(stale))
        .await
        .unwrap();
    // Written by a newer client already: stays.
    let kept = format!("{ns}/_tonic-etcd/service-config/other");
    raw.put(kept.as_str(), "{}", None).await.unwrap();

    let plan = cli(&["--namespace", &ns, "upgrade-keys"]);
    assert!(plan.status.success(), "{plan:?}");
    let text = String::from_utf8_lossy(&plan.stdout);
    assert_eq!(text.matches("to copy").count(), 4, "{text}");
    assert!(absent(&client, &format!("{ns}/_tonic-etcd/service-config/greeter")).await);

    let out = cli(&["--namespace", &ns, "upgrade-keys", "--apply"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches(": copied").count(), 2, "{text}");
    assert!(text.contains("new key exists"), "{text}");
    assert!(text.contains("instance gone"), "{text}");
    let new_config = format!("{ns}/_tonic-etcd/service-config/greeter");
    let new_drain = format!("{ns}/_tonic-etcd/overrides/greeter/127.0.0.1:7111");
    assert_eq!(
        get(&client, &new_config).await.unwrap().0,
        config.as_bytes()
    );
    let copied = raw.get(new_drain.as_str(), None).await.unwrap();
    assert_eq!(copied.kvs()[0].lease(), lease, "the copy keeps the lease");
    assert_eq!(get(&client, &kept).await.unwrap().0, b"{}");
    assert!(
        absent(
            &client,
            &format!("{ns}/_tonic-etcd/overrides/greeter/127.0.0.1:7112")
        )
        .await
    );

    // The new version reads the moved keys.
    let balancer = tonic_etcd::Balancer::builder(client.clone(), "greeter")
        .schema(schema)
        .build()
        .unwrap();
    eventually(LIMIT, "the moved config and drain in force", || async {
        let from_etcd = matches!(
            &balancer.service_config().source,
            tonic_etcd::config_store::ConfigSource::Etcd { key, .. } if *key == new_config
        );
        // (Nothing listens: the endpoint stays connecting, and its
        // metadata shows the drain.)
        let drained = balancer.endpoints().iter().any(|e| {
            e.instance
                .metadata
                .get(tonic_etcd::overrides::DRAINED_BY)
                .as_deref()
                == Some("cli:old")
        });
        (from_etcd && drained).then_some(())
    })
    .await;

    let out = cli(&[
        "--namespace",
        &ns,
        "upgrade-keys",
        "--apply",
        "--remove-old",
    ]);
    assert!(out.status.success(), "{out:?}");
    for old in [&old_config, &old_drain, &old_kept] {
        assert!(absent(&client, old).await, "{old} left");
    }
    // The stale override is left to its lease.
    assert!(!absent(&client, &old_stale).await);
    raw.lease_revoke(other_lease).await.unwrap();
    let out = cli(&["--namespace", &ns, "upgrade-keys"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nothing to move"), "{text}");
    reg.deregister().await.unwrap();
}

/// Mistakes in `config set` are named with their fix: a misspelled field
/// (which gRPC would ignore: ring hash then hashes at random) and a
/// misspelled service name are refused unless `--force`, a `methodConfig`
/// for another service is warned about, `config rm` says what the clients
/// fall back to and prints what it removed, and a Balancer shows the
/// fields of its config that have no effect.
#[tokio::test]
async fn config_mistakes_are_named_with_their_fix() {
    let client = shared().client().await;
    let ns = unique("cli-mistakes");
    let schema = tonic_etcd::NamingSchema::with_namespace(&ns).unwrap();
    let _reg = Registration::builder(client.clone())
        .schema(schema.clone())
        .service("cache.v1.Cache")
        .addr("127.0.0.1:7121")
        .register()
        .await
        .unwrap();
    let set = |service: &str, doc: &str, force: bool| {
        let mut args = vec!["--namespace", &ns, "config", "set", service, "-"];
        if force {
            args.push("--force");
        }
        let mut child = Command::new(BIN)
            .args(["--etcd", &shared().endpoint()])
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), doc.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let key = format!("{ns}/_tonic-etcd/service-config/cache.v1.Cache");
    let typo = r#"{"loadBalancingConfig":[{"ring_hash":{"requestHashHeaders":"x-user"}}]}"#;
    let (code, err) = set("cache.v1.Cache", typo, false);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(r#"requestHashHeaders: not a field this client reads; did you mean "requestHashHeader"?"#)
            && err.contains("nothing written")
            && err.contains("--force"),
        "{err}"
    );
    assert!(absent(&client, &key).await);

    let (code, err) = set(
        "cache.v1.Cahce",
        r#"{"loadBalancingConfig":[{"ring_hash":{}}]}"#,
        false,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(r#"did you mean "cache.v1.Cache"?"#), "{err}");

    let (code, err) = set(
        "cache.v1.Cache",
        r#"{"methodConfig":[{"name":[{"service":"other.v1.Other"}],"timeout":"1s"}]}"#,
        false,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains(r#"names service "other.v1.Other""#), "{err}");

    let (code, err) = set("cache.v1.Cache", typo, true);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("did you mean"), "warned all the same: {err}");
    let balancer = tonic_etcd::Balancer::builder(client.clone(), "cache.v1.Cache")
        .schema(schema)
        .build()
        .unwrap();
    let warnings = eventually(LIMIT, "the warning in the Balancer's status", || async {
        let w = balancer.service_config().warnings;
        (!w.is_empty()).then_some(w)
    })
    .await;
    assert_eq!(
        warnings[0].path,
        "loadBalancingConfig[0].ring_hash.requestHashHeaders"
    );
    let out = cli(&["--namespace", &ns, "config", "get", "cache.v1.Cache"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("requestHashHeader"),
        "{out:?}"
    );

    let out = cli(&["--namespace", &ns, "config", "rm", "cache.v1.Cache"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), typo);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config they were built with") && err.contains("to restore"),
        "{err}"
    );
    eventually(LIMIT, "the Balancer back on its own config", || async {
        balancer.service_config().warnings.is_empty().then_some(())
    })
    .await;
}

/// `drain --wait` follows the instance's own report of its calls in flight
/// (its ORCA stream): too short a wait fails naming the method still
/// running; a long enough one returns within a second of the last call's
/// end (the server reports the moment it goes idle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_returns_when_the_last_call_ends() {
    use tonic_etcd::testing::greeter::{GreeterClient, HelloRequest};
    let client = shared().client().await;
    let ns = unique("cli-drain-wait");
    let backend = backend::Backend::start_slow("127.0.0.1:0", "slow", Duration::from_secs(3));
    let _reg = Registration::builder(client.clone())
        .schema(tonic_etcd::NamingSchema::with_namespace(&ns).unwrap())
        .service("greeter")
        .id("one")
        .addr(&backend.addr)
        .register()
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", backend.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let call = tokio::spawn(async move {
        let r = GreeterClient::new(channel)
            .say_hello(HelloRequest { name: "x".into() })
            .await;
        (r, std::time::Instant::now())
    });
    // The call is in flight once the server says so.
    let mut reports = Box::pin(
        tonic_etcd::orca::watch(&backend.addr, Duration::from_secs(1), LIMIT)
            .await
            .unwrap(),
    );
    let mut in_flight = false;
    for _ in 0..5 {
        let r = tokio_stream::StreamExt::next(&mut reports)
            .await
            .unwrap()
            .unwrap();
        if r.in_flight() == Some(1) {
            in_flight = true;
            break;
        }
    }
    assert!(in_flight, "the call never showed as in flight");
    drop(reports);

    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            (cli(&args), std::time::Instant::now())
        })
    };
    let args = |wait: &str| -> Vec<String> {
        [
            "--namespace",
            &ns,
            "drain",
            "greeter",
            "one",
            "--wait",
            "--wait-timeout",
            wait,
        ]
        .map(String::from)
        .to_vec()
    };
    let (out, _) = run(args("0.5")).await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("still has calls in flight") && err.contains("/greeter.v1.Greeter/SayHello"),
        "{err}"
    );

    let waiting = run(args("20"));
    let (answered, ended) = call.await.unwrap();
    answered.unwrap();
    let (out, returned) = waiting.await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("no call in flight"), "{text}");
    let after = returned.saturating_duration_since(ended);
    assert!(
        after < Duration::from_secs(1),
        "returned {after:?} after the last call ended"
    );
}
