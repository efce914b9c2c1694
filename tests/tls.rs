//! etcd over TLS, with certificates made at test time: registration and
//! discovery work; a client without the CA, or without a client certificate
//! where one is required, fails with a clear error.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use tokio_stream::StreamExt;
use tonic_etcd::testing::{Etcd, TlsFiles};
use tonic_etcd::{Discover, Registration};
use tower::discover::Change;

const LIMIT: Duration = Duration::from_secs(10);

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate, written to a temporary directory.
fn pki() -> Pki {
    let p = pki::Pki::new("etcd");
    let dir = tempfile::tempdir().unwrap();
    for (name, pem) in [
        ("ca.pem", &p.ca),
        ("server.pem", &p.server_cert),
        ("server-key.pem", &p.server_key),
        ("client.pem", &p.client_cert),
        ("client-key.pem", &p.client_key),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    Pki {
        dir,
        ca_pem: p.ca,
        client_cert_pem: p.client_cert,
        client_key_pem: p.client_key,
    }
}

fn files(dir: &Path, client_auth: bool) -> TlsFiles {
    TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
        client_ca: client_auth.then(|| dir.join("ca.pem")),
    }
}

async fn connect(etcd: &Etcd, tls: TlsOptions) -> Result<tonic_etcd::Etcd, String> {
    let opts: ConnectOptions = tonic_etcd::connect_options().with_tls(tls);
    let mut c = etcd_client::Client::connect(etcd.endpoints(), Some(opts))
        .await
        .map_err(|e| e.to_string())?;
    // The connection is lazy; one request proves it.
    tokio::time::timeout(Duration::from_secs(3), c.status())
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(c.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_discovery_work_over_tls() {
    let pki = pki();
    let etcd = Etcd::options().tls(files(pki.dir.path(), false)).start();
    assert!(etcd.endpoint().starts_with("https://"));
    let tls = TlsOptions::new().ca_certificate(Certificate::from_pem(&pki.ca_pem));
    let client = connect(&etcd, tls).await.unwrap();

    let mut discover = Discover::builder(client.clone(), "secure").build().unwrap();
    let reg = Registration::builder(client)
        .service("secure")
        .addr("127.0.0.1:7301")
        .register()
        .await
        .unwrap();
    let change = tokio::time::timeout(LIMIT, discover.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(change, Change::Insert(_, i) if i.addr == "127.0.0.1:7301"));
    reg.deregister().await.unwrap();

    // Without the CA the server's certificate is not trusted.
    let err = connect(&etcd, TlsOptions::new())
        .await
        .expect_err("refused without the CA");
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("transport error"),
        "{err}"
    );

    // The CLI over TLS.
    let out = Command::new(env!("CARGO_BIN_EXE_tonic-etcd"))
        .args(["--etcd", etcd.endpoint().trim_start_matches("https://")])
        .arg("--cacert")
        .arg(pki.dir.path().join("ca.pem"))
        .args(["list", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_etcd_asks_for_them() {
    let pki = pki();
    let etcd = Etcd::options().tls(files(pki.dir.path(), true)).start();
    let ca = || TlsOptions::new().ca_certificate(Certificate::from_pem(&pki.ca_pem));

    let err = connect(&etcd, ca())
        .await
        .expect_err("refused without a client certificate");
    assert!(!err.is_empty(), "refused without a client certificate");

    let with_identity = ca().identity(Identity::from_pem(
        &pki.client_cert_pem,
        &pki.client_key_pem,
    ));
    let client = connect(&etcd, with_identity).await.unwrap();
    let reg = Registration::builder(client)
        .service("mtls")
        .addr("127.0.0.1:7302")
        .register()
        .await
        .unwrap();
    reg.deregister().await.unwrap();

    // The CLI with --cert/--key, and without.
    let dir = pki.dir.path();
    let run = |with_cert: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tonic-etcd"));
        cmd.args([
            "--etcd",
            etcd.endpoint().trim_start_matches("https://"),
            "--timeout",
            "2",
        ])
        .arg("--cacert")
        .arg(dir.join("ca.pem"));
        if with_cert {
            cmd.arg("--cert")
                .arg(dir.join("client.pem"))
                .arg("--key")
                .arg(dir.join("client-key.pem"));
        }
        cmd.arg("list").output().unwrap()
    };
    assert!(run(true).status.success());
    let out = run(false);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS options"));
}
