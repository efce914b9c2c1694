//! etcd's gRPC proxy (`etcd grpc-proxy start`) in front of a test etcd,
//! started from the same `etcd` binary: what a fleet too large for one etcd
//! cluster's watchers puts between its clients and etcd. It coalesces
//! identical watches and does not answer watch progress requests.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::etcd::{etcd_binary, free_port, signal, SUPERVISOR};

/// A running `etcd grpc-proxy`; stopped when dropped.
#[derive(Debug)]
pub struct EtcdProxy {
    upstream: Vec<String>,
    port: u16,
    metrics_port: u16,
    log: tempfile::NamedTempFile,
    proc: Option<(Child, u32)>,
}

impl EtcdProxy {
    /// Starts a proxy for the etcd members at `endpoints` (URLs) and waits
    /// until it accepts connections.
    ///
    /// # Panics
    /// When it cannot be started, with its log.
    pub fn start(endpoints: &[String]) -> Self {
        let mut proxy = Self {
            upstream: endpoints
                .iter()
                .map(|e| e.trim_start_matches("http://").to_owned())
                .collect(),
            port: free_port(),
            metrics_port: free_port(),
            log: tempfile::NamedTempFile::new().expect("a temporary file for the proxy's log"),
            proc: None,
        };
        proxy.spawn();
        proxy
    }

    /// The proxy's client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client of etcd through the proxy (see [`crate::connect`]).
    pub async fn client(&self) -> crate::Etcd {
        super::etcd::connect(&[self.endpoint()]).await
    }

    /// The proxy's Prometheus metrics (its `/metrics`).
    pub fn metrics(&self) -> String {
        super::etcd::http_get(self.metrics_port, "/metrics")
    }

    /// Kills the proxy (SIGKILL) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Kills the proxy (SIGKILL).
    pub fn stop(&mut self) {
        if let Some((mut child, pid)) = self.proc.take() {
            signal(pid, "KILL");
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(SUPERVISOR)
            .arg(etcd_binary())
            .args(["grpc-proxy", "start"])
            .arg(format!("--endpoints={}", self.upstream.join(",")))
            .arg(format!("--listen-addr=127.0.0.1:{}", self.port))
            .arg(format!("--advertise-client-url=127.0.0.1:{}", self.port))
            .arg(format!(
                "--metrics-addr=http://127.0.0.1:{}",
                self.metrics_port
            ))
            .env("TONIC_ETCD_LOG", self.log.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot spawn `sh` to supervise etcd grpc-proxy: {e}"),
        };
        let pid = child
            .stdout
            .take()
            .and_then(|out| BufReader::new(out).lines().next())
            .and_then(|line| line.ok())
            .and_then(|line| line.trim().parse().ok())
            .unwrap_or_else(|| panic!("etcd grpc-proxy's supervisor did not report a pid"));
        self.proc = Some((child, pid));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
                panic!("etcd grpc-proxy did not listen within 10 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for EtcdProxy {
    fn drop(&mut self) {
        self.stop();
    }
}
