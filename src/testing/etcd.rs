//! Real etcd processes for tests, examples and benchmarks.
//!
//! Every process listens on free loopback ports with a data directory under a
//! temporary root, and is killed when its handle drops. Each etcd runs under a
//! small `sh` supervisor whose stdin is a pipe from this process: when this
//! process exits for any reason (even SIGKILL), the pipe closes and the
//! supervisor kills etcd, so no etcd outlives the test run.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a member may take to answer `/health` after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopped member may take to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at finding free ports when a fresh member fails to bind.
const PORT_ATTEMPTS: usize = 3;

/// The supervisor: runs etcd, prints its pid, kills it when stdin closes, and
/// prints `exited <code>` when etcd ends.
pub(super) const SUPERVISOR: &str = r#"
exec 3<&0
"$0" "$@" >>"$TONIC_ETCD_LOG" 2>&1 </dev/null 3<&- &
pid=$!
echo "$pid"
parent=$$
( read -r _ <&3; if kill -0 "$parent" 2>/dev/null; then kill -9 "$pid" 2>/dev/null; fi ) &
wait "$pid"
echo "exited $?"
"#;

/// Finds the etcd binary: `ETCD_BIN`, else `etcd` on `PATH`.
///
/// # Panics
/// When there is none, with a message that says how to install it. Tests that
/// need etcd must fail, never skip silently.
pub fn etcd_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("ETCD_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "ETCD_BIN is set to {} but no such file exists",
            bin.display()
        );
        return bin;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
    });
    match found {
        Some(bin) => bin,
        None => panic!(
            "the etcd binary was not found: set ETCD_BIN=/path/to/etcd or install it \
             (as root on Debian: `apt-get update && apt-get install -y etcd-server`). \
             Tests that need etcd never skip."
        ),
    }
}

/// Options for starting etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    fsync: bool,
    tls: Option<TlsFiles>,
}

/// Certificate files for an etcd that serves clients over TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server certificate (PEM), valid for `127.0.0.1`.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// With a CA (PEM), etcd also requires client certificates signed by it.
    pub client_ca: Option<PathBuf>,
}

impl EtcdOptions {
    /// Whether etcd fsyncs its WAL (default off: tests gain speed, and no test
    /// relies on surviving a machine crash). Benchmarks turn it on to measure
    /// what production sees.
    pub fn fsync(mut self, on: bool) -> Self {
        self.fsync = on;
        self
    }

    /// Serve clients over TLS with these files (peers stay on plaintext
    /// loopback). Client URLs become `https://`.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// Starts a single-member etcd.
    pub fn start(self) -> Etcd {
        Etcd {
            cluster: Cluster::start(1, self),
        }
    }

    /// Starts a cluster of `members` etcd processes.
    pub fn start_cluster(self, members: usize) -> EtcdCluster {
        EtcdCluster {
            cluster: Cluster::start(members, self),
        }
    }
}

/// A single etcd process on loopback. Killed on drop.
#[derive(Debug)]
pub struct Etcd {
    cluster: Cluster,
}

impl Etcd {
    /// Starts etcd on free loopback ports and waits until it answers.
    ///
    /// # Panics
    /// When etcd is not installed or does not become healthy in time; the
    /// message carries the end of etcd's log.
    pub fn start() -> Self {
        EtcdOptions::default().start()
    }

    /// Options for a customised start.
    pub fn options() -> EtcdOptions {
        EtcdOptions::default()
    }

    /// The client URL, e.g. `http://127.0.0.1:23791`.
    pub fn endpoint(&self) -> String {
        self.cluster.member(0).endpoint()
    }

    /// The client URLs (one for a single node).
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// etcd's Prometheus metrics (its `/metrics`).
    pub fn metrics(&self) -> String {
        http_get(self.cluster.member(0).metrics_port, "/metrics")
    }

    /// Stops etcd gracefully (SIGTERM); keeps ports and data.
    pub fn stop(&self) {
        self.cluster.member(0).stop();
    }

    /// Kills etcd with SIGKILL; keeps ports and data.
    pub fn kill(&self) {
        self.cluster.member(0).kill();
    }

    /// Starts etcd again on the same ports and data dir (stopping it first if
    /// it runs) and waits until it answers.
    pub fn restart(&self) {
        let mut m = self.cluster.member(0);
        m.stop();
        m.start_and_wait();
    }

    /// Starts etcd again on the same ports with a fresh data dir: every key
    /// and lease is gone, as after losing etcd's disk.
    pub fn wipe_and_restart(&self) {
        let mut m = self.cluster.member(0);
        m.kill();
        m.wipe();
        m.start_and_wait();
    }

    /// Starts etcd again after [`stop`](Self::stop) or [`kill`](Self::kill)
    /// without waiting for it to answer.
    pub fn start_again_nowait(&self) {
        self.cluster.member(0).spawn();
    }

    /// Whether the etcd process runs.
    pub fn is_running(&self) -> bool {
        self.cluster.member(0).is_running()
    }

    /// The etcd process's id while it runs (for CPU and memory readings).
    pub fn pid(&self) -> Option<u32> {
        self.cluster.member(0).proc.as_ref().map(|p| p.pid)
    }

    /// A client with the crate's recommended connect options.
    pub async fn client(&self) -> crate::Etcd {
        connect(&self.endpoints()).await
    }
}

/// A multi-member etcd cluster on loopback. Every member is killed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    cluster: Cluster,
}

impl EtcdCluster {
    /// Starts a 3-member cluster and waits until every member is healthy.
    pub fn start() -> Self {
        EtcdOptions::default().start_cluster(3)
    }

    /// Client URLs of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len())
            .map(|i| self.cluster.member(i).endpoint())
            .collect()
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.cluster.member(i).endpoint()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.cluster.members.len()
    }

    /// Always false: a cluster has members.
    pub fn is_empty(&self) -> bool {
        self.cluster.members.is_empty()
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill_member(&self, i: usize) {
        self.cluster.member(i).kill();
    }

    /// Stops member `i` with SIGTERM.
    pub fn stop_member(&self, i: usize) {
        self.cluster.member(i).stop();
    }

    /// Restarts member `i` on its ports and data dir and waits until it is healthy.
    pub fn restart_member(&self, i: usize) {
        let mut m = self.cluster.member(i);
        m.stop();
        m.start_and_wait();
    }

    /// A client over every member, with the crate's recommended options.
    pub async fn client(&self) -> crate::Etcd {
        connect(&self.endpoints()).await
    }

    /// A client connected to member `i` only.
    pub async fn member_client(&self, i: usize) -> crate::Etcd {
        connect(&[self.endpoint(i)]).await
    }
}

/// Connects to `endpoints` with [`crate::connect_options`], retrying briefly.
///
/// # Panics
/// When no connection is made within a few seconds.
pub async fn connect(endpoints: &[String]) -> crate::Etcd {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match crate::connect(endpoints, Some(crate::connect_options())).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "etcd connect failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot connect to etcd at {endpoints:?}: {e}"),
        }
    }
}

#[derive(Debug)]
struct Cluster {
    members: Vec<Mutex<Member>>,
    // Dropped after the members (field order), so data dirs outlive processes.
    _root: tempfile::TempDir,
}

impl Cluster {
    fn start(n: usize, opts: EtcdOptions) -> Self {
        let bin = etcd_binary();
        let root = temp_root();
        let mut last_err = String::new();
        for attempt in 0..PORT_ATTEMPTS {
            let ports: Vec<(u16, u16, u16)> = (0..n)
                .map(|_| (free_port(), free_port(), free_port()))
                .collect();
            let initial_cluster = ports
                .iter()
                .enumerate()
                .map(|(i, (_, peer, _))| format!("m{i}=http://127.0.0.1:{peer}"))
                .collect::<Vec<_>>()
                .join(",");
            let mut members: Vec<Member> = ports
                .iter()
                .enumerate()
                .map(|(i, &(client_port, peer_port, metrics_port))| Member {
                    name: format!("m{i}"),
                    bin: bin.clone(),
                    client_port,
                    peer_port,
                    metrics_port,
                    tls: opts.tls.clone(),
                    dir: root.path().join(format!("a{attempt}-m{i}")),
                    initial_cluster: initial_cluster.clone(),
                    token: format!("tonic-etcd-{}-{attempt}", std::process::id()),
                    fsync: opts.fsync,
                    proc: None,
                })
                .collect();
            for m in &mut members {
                m.spawn();
            }
            match members.iter_mut().try_for_each(|m| m.wait_ready()) {
                Ok(()) => {
                    record_start(n);
                    return Self {
                        members: members.into_iter().map(Mutex::new).collect(),
                        _root: root,
                    };
                }
                Err(e) => {
                    last_err = e;
                    for m in &mut members {
                        m.kill();
                    }
                }
            }
        }
        panic!("etcd did not start after {PORT_ATTEMPTS} attempts: {last_err}");
    }

    fn member(&self, i: usize) -> MutexGuard<'_, Member> {
        // A panic while a member was locked leaves it usable: the state is
        // only the process handle.
        self.members[i]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug)]
struct Member {
    name: String,
    bin: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health`, whatever the client URLs speak.
    metrics_port: u16,
    tls: Option<TlsFiles>,
    dir: PathBuf,
    initial_cluster: String,
    token: String,
    fsync: bool,
    proc: Option<Proc>,
}

#[derive(Debug)]
struct Proc {
    supervisor: Child,
    pid: u32,
    lines: mpsc::Receiver<String>,
    exited: bool,
}

impl Member {
    fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    fn spawn(&mut self) {
        if self.is_running() {
            return;
        }
        self.reap();
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(SUPERVISOR)
            .arg(&self.bin)
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Faster elections than the 100/1000 ms defaults keep cluster
            // tests short; still far above loopback round trips.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{}", self.metrics_port))
            .env("TONIC_ETCD_LOG", self.log_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if !self.fsync {
            cmd.arg("--unsafe-no-fsync");
        }
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.cert);
            cmd.arg("--key-file").arg(&tls.key);
            if let Some(ca) = &tls.client_ca {
                cmd.arg("--trusted-ca-file")
                    .arg(ca)
                    .arg("--client-cert-auth");
            }
        }
        let mut supervisor = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot spawn `sh` to supervise etcd: {e}"),
        };
        let (tx, lines) = mpsc::channel();
        if let Some(out) = supervisor.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let pid = match lines
            .recv_timeout(Duration::from_secs(5))
            .ok()
            .and_then(|l| l.trim().parse().ok())
        {
            Some(pid) => pid,
            None => panic!("etcd supervisor did not report a pid"),
        };
        self.proc = Some(Proc {
            supervisor,
            pid,
            lines,
            exited: false,
        });
    }

    fn is_running(&mut self) -> bool {
        match &mut self.proc {
            Some(p) => {
                if !p.exited {
                    while let Ok(line) = p.lines.try_recv() {
                        if line.starts_with("exited") {
                            p.exited = true;
                        }
                    }
                }
                !p.exited
            }
            None => false,
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if !self.is_running() {
                return Err(format!(
                    "{} exited during start-up: {}",
                    self.name,
                    self.log_tail()
                ));
            }
            if health(self.metrics_port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "{} not healthy after {READY_TIMEOUT:?}: {}",
            self.name,
            self.log_tail()
        ))
    }

    fn start_and_wait(&mut self) {
        self.spawn();
        if let Err(e) = self.wait_ready() {
            panic!("etcd restart failed: {e}");
        }
    }

    fn signal_and_wait(&mut self, sig: &str, timeout: Duration) -> bool {
        if !self.is_running() {
            return true;
        }
        let Some(p) = &mut self.proc else { return true };
        signal(p.pid, sig);
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match p.lines.recv_timeout(left) {
                Ok(line) if line.starts_with("exited") => {
                    p.exited = true;
                    return true;
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                // The supervisor is gone, and with it etcd.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    p.exited = true;
                    return true;
                }
            }
        }
        false
    }

    fn stop(&mut self) {
        if !self.signal_and_wait("TERM", STOP_TIMEOUT) {
            self.kill();
        }
        self.reap();
    }

    fn kill(&mut self) {
        if !self.signal_and_wait("KILL", STOP_TIMEOUT) {
            panic!("etcd {} survived SIGKILL", self.name);
        }
        self.reap();
    }

    /// Closes the supervisor's lifeline and waits for it.
    fn reap(&mut self) {
        if let Some(mut p) = self.proc.take() {
            drop(p.supervisor.stdin.take());
            if !p.exited {
                signal(p.pid, "KILL");
            }
            let _ = p.supervisor.wait();
        }
    }

    fn wipe(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("log {}:\n{tail}", self.log_path().display())
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // Refreshes `exited`, so `reap` never signals a pid etcd no longer owns.
        self.is_running();
        self.reap();
    }
}

/// Appends `<test binary> <members>` to the file named by `TONIC_ETCD_RUN_LOG`,
/// so the test script can prove that etcd-backed tests really ran.
fn record_start(members: usize) {
    let Some(path) = std::env::var_os("TONIC_ETCD_RUN_LOG") else {
        return;
    };
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(Path::file_stem)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Test binaries are named `<target>-<hash>`.
    let name = stem.rsplit_once('-').map_or(stem.as_str(), |(n, _)| n);
    let line = format!("{name} {members}\n");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
}

/// Sends `sig` (a name such as `TERM` or `KILL`) to `pid` with `kill(1)`;
/// keeps the crate free of `unsafe`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Whether etcd's `/health` on `port` says it has a leader and serves.
fn health(port: u16) -> bool {
    http_get(port, "/health").contains("\"health\":\"true\"")
}

/// The sum of every sample of `name` (all label sets) in Prometheus text,
/// or `None` when there is none.
pub fn metric(metrics: &str, name: &str) -> Option<f64> {
    metric_where(metrics, name, "")
}

/// The sum of the samples of `name` whose labels contain `label` (such as
/// `grpc_method="Range"`), or `None` when there is none.
pub fn metric_where(metrics: &str, name: &str, label: &str) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name{labels} v` or `name v`, not `name_suffix …`.
        if !rest.starts_with(['{', ' ']) {
            continue;
        }
        let (labels, value) = rest.rsplit_once(' ').unwrap_or(("", rest));
        if !labels.contains(label) {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The response to `GET path` on loopback `port` (empty when it fails).
pub(super) fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1000)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return String::new();
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// A free loopback port, as the kernel hands it out. Another process may take
/// it before etcd binds; [`Cluster::start`] retries with new ports then.
pub(super) fn free_port() -> u16 {
    match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("cannot find a free loopback port: {e}"),
    }
}

/// A fresh temporary root named after this process, after removing the roots
/// of processes that are gone (a shared etcd in a `static` is never dropped).
fn temp_root() -> tempfile::TempDir {
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("tonic-etcd-") else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or("");
            if !pid.is_empty()
                && pid.chars().all(|c| c.is_ascii_digit())
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    match tempfile::Builder::new()
        .prefix(&format!("tonic-etcd-{}-", std::process::id()))
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => panic!("cannot create a temporary directory for etcd: {e}"),
    }
}

/// A lazily started etcd shared by every test of one test binary. It is never
/// dropped; the supervisor kills it when the binary exits.
pub fn shared() -> &'static Etcd {
    static SHARED: std::sync::OnceLock<Etcd> = std::sync::OnceLock::new();
    SHARED.get_or_init(Etcd::start)
}
