//! Registration storms: a fleet that starts together, or re-registers at
//! once after etcd lost its data, against one real etcd (fsync on).
//!
//! For each N (`BENCH_STORM_N`, comma-separated; default 1000,5000,10000):
//!
//! * **floor**: N lease grants and N puts under them issued at once by
//!   plain etcd clients, each sent again 100 to 200 ms after etcd refused
//!   it with "too many requests" (the fastest etcd takes them);
//! * **cold start**: N registrations (TTL 10 s, 30 s start-up deadline),
//!   all starting at the same instant.
//!
//! Both spread the N over `BENCH_STORM_PROCS` child processes (default 16,
//! each with its own etcd client).
//!
//! * **then 10 s steady**: what the N registrations cost etcd once in;
//! * **after a wipe**: etcd killed, its data dir wiped, restarted on the
//!   same port: every lease is gone and every registration re-registers.
//!
//! Reported per phase: the time until all N keys are present (counted
//! every 50 ms), the largest drop of that count on the way (keys that were
//! there and went again), etcd's Raft proposals per instance (its
//! `raftIndex` before and after), the CPU of etcd and of the child
//! processes, and start-ups that failed. Each phase is cut off at 60 s.
//!
//! `cargo bench --bench storm`; writes `target/bench/storm.json`.
//! `BENCH_STORM_LOG=<dir>` keeps each child's registration log there;
//! `BENCH_STORM_TRACE=1` prints the key count and etcd's Raft and applied
//! index every half second; `ETCD_ENABLE_PPROF=true` (read by etcd itself)
//! serves etcd's profiles on its client URL.

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{GetOptions, PutOptions};
use support::{cpu_of, setting, table, write_json};
use tokio::time::Instant;
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Metadata, Registration};

const CHILD: &str = "TONIC_ETCD_STORM_CHILD";
const PHASE_LIMIT: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(10);
const STEADY: Duration = Duration::from_secs(10);

fn main() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let sizes: Vec<usize> = std::env::var("BENCH_STORM_N")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| {
            if support::smoke() {
                vec![200]
            } else {
                vec![1_000, 5_000, 10_000]
            }
        });
    let procs = setting("BENCH_STORM_PROCS", 16, 4) as usize;
    let etcd = Etcd::options().fsync(true).start();
    let rt = support::runtime();
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    for n in sizes {
        let phases = rt.block_on(storm(&etcd, n, procs));
        let mut entry = serde_json::Map::new();
        for p in &phases {
            rows.push(p.row());
            entry.insert(p.name.into(), p.json());
        }
        json.insert(n.to_string(), serde_json::Value::Object(entry));
        // A clean etcd for the next size.
        etcd.wipe_and_restart();
    }
    table(
        &format!("storm: N registrations in {procs} processes against one etcd (fsync), TTL 10 s"),
        &[
            "N",
            "phase",
            "all present s",
            "largest drop",
            "proposals/instance",
            "etcd CPU s",
            "clients CPU s",
            "failed start-ups",
        ],
        &rows,
    );
    write_json("storm", &serde_json::Value::Object(json));
}

/// What one phase measured.
struct Phase {
    name: &'static str,
    /// Until every key was present (`None`: not within the limit).
    all_present: Option<Duration>,
    /// The count at the end, if not all.
    last_count: usize,
    largest_drop: usize,
    proposals: u64,
    etcd_cpu: Duration,
    /// CPU of the child processes (registering, or the floor's clients).
    client_cpu: Duration,
    failed: Option<usize>,
    n: usize,
    /// A steady phase: the time column says whether every key stayed.
    steady: bool,
}

impl Phase {
    fn row(&self) -> Vec<String> {
        let n = self.n;
        vec![
            n.to_string(),
            self.name.into(),
            match self.all_present {
                Some(_) if self.steady => "all stayed".into(),
                None if self.steady => format!("down to {} of {n}", self.last_count),
                Some(d) => format!("{:.2}", d.as_secs_f64()),
                None => format!("never ({} of {n})", self.last_count),
            },
            self.largest_drop.to_string(),
            format!("{:.2}", self.proposals as f64 / self.n as f64),
            format!("{:.2}", self.etcd_cpu.as_secs_f64()),
            format!("{:.2}", self.client_cpu.as_secs_f64()),
            self.failed.map_or("-".into(), |f| f.to_string()),
        ]
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "all_present_s": self.all_present.map(|d| d.as_secs_f64()),
            "last_count": self.last_count,
            "largest_drop": self.largest_drop,
            "proposals_per_instance": self.proposals as f64 / self.n as f64,
            "etcd_cpu_s": self.etcd_cpu.as_secs_f64(),
            "client_cpu_s": self.client_cpu.as_secs_f64(),
            "failed_startups": self.failed,
        })
    }
}

/// What a phase costs: etcd's Raft proposals and CPU, and the CPU of the
/// child processes, from the phase's start.
struct Meter<'a> {
    etcd: &'a Etcd,
    client: &'a etcd_client::Client,
    raft: u64,
    etcd_cpu: Duration,
    client_cpu: Duration,
    clients: Vec<u32>,
}

impl<'a> Meter<'a> {
    async fn start(etcd: &'a Etcd, client: &'a etcd_client::Client, clients: Vec<u32>) -> Self {
        Self {
            etcd,
            client,
            raft: raft_index(client).await,
            etcd_cpu: etcd_cpu(etcd),
            client_cpu: clients.iter().map(|&p| cpu_of(p)).sum(),
            clients,
        }
    }

    /// The phase's row, from what it measured and this meter's readings.
    async fn phase(
        &self,
        name: &'static str,
        n: usize,
        counted: (Option<Duration>, usize, usize),
        failed: Option<usize>,
        steady: bool,
    ) -> Phase {
        let (all_present, last_count, largest_drop) = counted;
        let client_cpu: Duration = self.clients.iter().map(|&p| cpu_of(p)).sum();
        Phase {
            name,
            all_present,
            last_count,
            largest_drop,
            proposals: raft_index(self.client).await.saturating_sub(self.raft),
            etcd_cpu: etcd_cpu(self.etcd).saturating_sub(self.etcd_cpu),
            client_cpu: client_cpu.saturating_sub(self.client_cpu),
            failed,
            n,
            steady,
        }
    }
}

async fn storm(etcd: &Etcd, n: usize, procs: usize) -> Vec<Phase> {
    let client = etcd.client().await;
    let mut phases = vec![floor(etcd, &client, n, procs).await];
    etcd.wipe_and_restart();
    let client = etcd.client().await;

    let service = format!("storm-{n}");
    let prefix = format!("{service}/");
    let mut fleet = Fleet::spawn(etcd, Mode::Register, &service, n, procs);
    let meter = Meter::start(etcd, &client, fleet.pids()).await;
    fleet.started().await;
    let counted = follow(&client, &prefix, n, fleet.t0).await;
    // Start-ups end within their 30 s deadline; each child reports.
    let failed = fleet.failures();
    phases.push(
        meter
            .phase("cold start", n, counted, Some(failed), false)
            .await,
    );

    // What N registrations cost etcd once they are in (keep-alives every
    // TTL/3 and the key checks).
    let meter = Meter::start(etcd, &client, fleet.pids()).await;
    let lowest = hold(&client, &prefix, STEADY).await;
    let counted = (
        (lowest >= n).then_some(STEADY),
        lowest,
        n.saturating_sub(lowest),
    );
    phases.push(
        meter
            .phase("then 10 s steady", n, counted, None, true)
            .await,
    );

    // etcd loses its data: every lease and key is gone at once.
    etcd.wipe_and_restart();
    let client = etcd.client().await;
    let t0 = Instant::now();
    let meter = Meter::start(etcd, &client, fleet.pids()).await;
    let counted = follow(&client, &prefix, n, t0).await;
    phases.push(meter.phase("after a wipe", n, counted, None, false).await);
    fleet.stop();
    phases
}

/// N grants and N puts under them, issued at once by plain etcd clients in
/// `procs` child processes, as the registrations are.
async fn floor(etcd: &Etcd, client: &tonic_etcd::Etcd, n: usize, procs: usize) -> Phase {
    let service = format!("floor-{n}");
    let mut fleet = Fleet::spawn(etcd, Mode::Floor, &service, n, procs);
    let meter = Meter::start(etcd, client, fleet.pids()).await;
    fleet.started().await;
    let counted = follow(client, &format!("{service}/"), n, fleet.t0).await;
    let failed = fleet.failures();
    let phase = meter
        .phase("floor: grant + put", n, counted, Some(failed), false)
        .await;
    fleet.stop();
    phase
}

/// What a child process does with its share of the N instances.
#[derive(Clone, Copy)]
enum Mode {
    /// A plain lease grant and a put under it each (the floor).
    Floor,
    /// A [`Registration`] each, kept until the child's stdin closes.
    Register,
}

/// The child processes of one phase, all starting at the same instant.
struct Fleet {
    children: Vec<Child>,
    /// The instant they start at.
    t0: Instant,
}

impl Fleet {
    fn spawn(etcd: &Etcd, mode: Mode, service: &str, n: usize, procs: usize) -> Self {
        // Time for every child to start and connect before the storm.
        let start_at = unix_ms() + 1_500;
        let children = (0..procs)
            .map(|p| {
                let (from, to) = (p * n / procs, (p + 1) * n / procs);
                Command::new(std::env::current_exe().expect("own path"))
                    .env(CHILD, "1")
                    .args([
                        match mode {
                            Mode::Floor => "floor",
                            Mode::Register => "register",
                        },
                        &etcd.endpoint(),
                        service,
                        &from.to_string(),
                        &to.to_string(),
                        &start_at.to_string(),
                    ])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("start a storm child")
            })
            .collect();
        let t0 = Instant::now() + Duration::from_millis(start_at.saturating_sub(unix_ms()) as u64);
        Self { children, t0 }
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    async fn started(&self) {
        tokio::time::sleep_until(self.t0).await;
    }

    /// Failed start-ups, as each child reports them once all have ended.
    fn failures(&mut self) -> usize {
        self.children
            .iter_mut()
            .map(|c| {
                let Some(out) = c.stdout.as_mut() else {
                    return 0;
                };
                let mut line = String::new();
                let _ = BufReader::new(out).read_line(&mut line);
                line.split_whitespace()
                    .nth(1)
                    .and_then(|f| f.parse::<usize>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Closing stdin ends a child (its registrations are dropped); one that
    /// has not ended within 10 s is killed.
    fn stop(self) {
        let mut children = self.children;
        for c in &mut children {
            drop(c.stdin.take());
        }
        for mut c in children {
            let limit = std::time::Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && std::time::Instant::now() < limit {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The lowest key count under `prefix` over `dur` (counted every 50 ms).
async fn hold(client: &tonic_etcd::Etcd, prefix: &str, dur: Duration) -> usize {
    let mut c = client.clone();
    let t0 = Instant::now();
    let mut lowest = usize::MAX;
    while t0.elapsed() < dur {
        let got = c
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await;
        if let Ok(resp) = got {
            lowest = lowest.min(resp.count() as usize);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lowest
}

/// Sends a request again while etcd refuses it with "too many requests"
/// (after 100 to 200 ms, at most 200 times): the least a client must do to
/// get 10,000 requests issued at once through etcd 3.4 on this machine.
async fn pushed_back<T, F, Fut>(mut call: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Err(e) if tries < 200 && e.to_string().contains("too many requests") => {
                tries += 1;
                let pause = 100 + rand::random::<u64>() % 100;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            r => return r,
        }
    }
}

/// Counts the keys under `prefix` every 50 ms until all `n` are there or
/// the phase limit passes: (time to all, last count, largest drop).
async fn follow(
    client: &tonic_etcd::Etcd,
    prefix: &str,
    n: usize,
    t0: Instant,
) -> (Option<Duration>, usize, usize) {
    let mut c = client.clone();
    let (mut highest, mut largest_drop, mut last) = (0usize, 0usize, 0usize);
    // BENCH_STORM_TRACE=1: the count and etcd's Raft and applied index every
    // half second on stderr, to see how a phase unfolds.
    let trace = std::env::var_os("BENCH_STORM_TRACE").is_some();
    let mut traced = Instant::now();
    while t0.elapsed() < PHASE_LIMIT {
        if trace && traced.elapsed() >= Duration::from_millis(500) {
            traced = Instant::now();
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), c.status()).await {
                eprintln!(
                    "{:6.2}s keys {last:6} raft {} applied {} behind {}",
                    t0.elapsed().as_secs_f64(),
                    s.raft_index(),
                    s.raft_applied_index(),
                    s.raft_index().saturating_sub(s.raft_applied_index())
                );
            }
        }
        let got = tokio::time::timeout(
            Duration::from_secs(2),
            c.get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
        )
        .await;
        if let Ok(Ok(resp)) = got {
            last = resp.count() as usize;
            highest = highest.max(last);
            largest_drop = largest_drop.max(highest - last);
            if last >= n {
                return (Some(t0.elapsed()), last, largest_drop);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (None, last, largest_drop)
}

async fn raft_index(client: &etcd_client::Client) -> u64 {
    let mut c = client.clone();
    for _ in 0..50 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await {
            return s.raft_index();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    0
}

/// etcd's CPU time so far (user + system).
fn etcd_cpu(etcd: &Etcd) -> Duration {
    etcd.pid().map_or(Duration::ZERO, cpu_of)
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// A child: at `start_at` (unix ms), lease grants and puts (`floor`) or
/// registrations (`register`) of instances `from..to` of `service`; prints
/// `failed <k>` once each has ended, and keeps the registrations until its
/// stdin closes.
fn child() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, endpoint, service, from, to, start_at, ..] = args.as_slice() else {
        eprintln!("storm child: expected <mode> <endpoint> <service> <from> <to> <start-ms>");
        std::process::exit(2);
    };
    let (from, to): (usize, usize) = (from.parse().unwrap_or(0), to.parse().unwrap_or(0));
    let start_at: u128 = start_at.parse().unwrap_or(0);
    // BENCH_STORM_LOG=<dir>: each child writes its warnings there, to see
    // which errors a storm is made of.
    if let Some(dir) = std::env::var_os("BENCH_STORM_LOG") {
        let path = std::path::Path::new(&dir).join(format!("{mode}-{from}.log"));
        if let Ok(file) = std::fs::File::create(path) {
            tracing_subscriber::fmt()
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false)
                .with_env_filter("tonic_etcd=debug")
                .init();
        }
    }
    let rt = support::runtime_with(1);
    rt.block_on(async {
        let client = tonic_etcd::testing::connect(std::slice::from_ref(endpoint)).await;
        let wait = start_at.saturating_sub(unix_ms()) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let mut held = Vec::new();
        let mut failed = 0;
        if mode == "floor" {
            let tasks: Vec<_> = (from..to)
                .map(|i| tokio::spawn(grant_and_put(client.clone(), format!("{service}/{i}"))))
                .collect();
            let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
            for t in tasks {
                match t.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => *reasons.entry(e.to_string()).or_default() += 1,
                    Err(e) => *reasons.entry(e.to_string()).or_default() += 1,
                }
            }
            for (reason, count) in reasons {
                eprintln!("floor: {count} failed: {reason}");
                failed += count;
            }
        } else {
            let tasks: Vec<_> = (from..to)
                .map(|i| {
                    let b = Registration::builder(client.clone())
                        .service(service.as_str())
                        .id(format!("instance-{i:05}"))
                        .addr(format!(
                            "10.{}.{}.{}:7020",
                            i >> 16 & 255,
                            i >> 8 & 255,
                            i & 255
                        ))
                        .metadata(Metadata::new())
                        .ttl(TTL)
                        .startup_timeout(Duration::from_secs(30));
                    tokio::spawn(b.register())
                })
                .collect();
            for t in tasks {
                match t.await {
                    Ok(Ok(r)) => held.push(r),
                    _ => failed += 1,
                }
            }
        }
        println!("failed {failed}");
        let _ = std::io::stdout().flush();
        // Until the parent closes stdin.
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        })
        .await;
        drop(held);
    });
}

/// The floor's work for one instance: a lease and a put under it, each sent
/// again while etcd refuses it.
async fn grant_and_put(c: tonic_etcd::Etcd, key: String) -> Result<(), etcd_client::Error> {
    let ttl = TTL.as_secs() as i64;
    let lease = pushed_back(|| {
        let mut c = c.clone();
        async move { c.lease_grant(ttl, None).await }
    })
    .await?
    .id();
    let opts = PutOptions::new().with_lease(lease);
    pushed_back(|| {
        let (mut c, key, opts) = (c.clone(), key.clone(), opts.clone());
        async move { c.put(key, "x", Some(opts)).await }
    })
    .await?;
    Ok(())
}
