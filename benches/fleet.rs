//! A client fleet at etcd: P client processes × B Balancers over S services,
//! each Balancer's service holding one (unreachable) instance, directly at
//! etcd, through one etcd gRPC proxy, and through two (the processes split
//! between them); beside it the floor of the same
//! number of plain etcd-client watchers (one watch per Balancer, as a
//! client without sharing opens them).
//!
//! Reported, from etcd's own `/metrics` and `/proc`: watch streams and
//! watchers at etcd, etcd's CPU and RSS and the liveness reads (`Range`)
//! while the fleet idles, the fleet's initial sync time, the clients' CPU
//! and RSS per Balancer while idle, and the time for one new instance to
//! reach every Balancer of its service (p50, p99, max). Both sides are
//! sampled every millisecond, so a delay includes up to 1 ms of sampling.
//!
//! `cargo bench --bench fleet`; `BENCH_FLEET_PROCS` (4),
//! `BENCH_FLEET_BALANCERS` per process (100), `BENCH_FLEET_SERVICES` (50),
//! `BENCH_FLEET_IDLE_SECS` (30), `BENCH_FLEET_CHANGES` (30),
//! `BENCH_SCENARIOS` (`direct`, `proxy`, `2proxies`).

#[path = "../tests/common/cpu.rs"]
mod cpu;
#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::counted::Counted;
use support::{cpu_of, ms, setting, table, write_json, Stats};
use tonic_etcd::testing::{metric, metric_where, Etcd, EtcdProxy};

const CHILD: &str = "TONIC_ETCD_FLEET_CHILD";
/// Longest wait for a change to reach every member, and for a sync; a
/// member that has not seen a change by then is counted as missed.
const WAIT: Duration = Duration::from_secs(5);

fn service(i: usize) -> String {
    format!("fleet.v1.S{i}")
}

fn unix_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let procs = setting("BENCH_FLEET_PROCS", 4, 2) as usize;
    let per = setting("BENCH_FLEET_BALANCERS", 100, 4) as usize;
    let services = setting("BENCH_FLEET_SERVICES", 50, 2) as usize;
    // Longer than a quiet period and its request timeout (10 s + 5 s), so
    // the steady liveness checks fall inside it.
    let idle = Duration::from_secs(setting("BENCH_FLEET_IDLE_SECS", 30, 1));
    let changes = setting("BENCH_FLEET_CHANGES", 30, 3) as usize;
    let etcd = Etcd::options().fsync(true).start();
    let rt = support::runtime();
    rt.block_on(async {
        let client = etcd.client().await;
        for s in 0..services {
            let key = format!("{}/127.0.0.1:1", service(s));
            let value = r#"{"Op":0,"Addr":"127.0.0.1:1","Metadata":null}"#;
            client
                .clone()
                .put(key, value, None)
                .await
                .expect("put an instance");
        }
    });
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    for (via, n_proxies) in [("direct", 0), ("proxy", 1), ("2proxies", 2)] {
        if !support::selected(via) {
            continue;
        }
        for mode in ["floor", "balancer"] {
            // Fresh proxies for each variant, so that no proxy carries the
            // previous variant's upstream watchers into this one's count
            // (through one proxy the count is still not reliable; see
            // docs/performance.md).
            let proxies: Vec<EtcdProxy> = (0..n_proxies)
                .map(|_| EtcdProxy::start(&[etcd.endpoint()]))
                .collect();
            let endpoints: Vec<String> = if proxies.is_empty() {
                vec![etcd.endpoint()]
            } else {
                proxies.iter().map(EtcdProxy::endpoint).collect()
            };
            let run = Run {
                etcd: &etcd,
                proxies: &proxies,
                endpoints: &endpoints,
                mode,
                procs,
                per,
                services,
                idle,
                changes,
            };
            let r = rt.block_on(run.measure());
            rows.push(r.row(via, mode, procs * per));
            json.insert(format!("{via}/{mode}"), r.json());
        }
    }
    write_json("fleet", &serde_json::Value::Object(json));
    table(
        &format!(
            "Fleet: {procs} processes × {per} watchers or Balancers over {services} services \
             (idle {idle:?}, {changes} changes; cargo bench --bench fleet)"
        ),
        &[
            "via",
            "client",
            "members",
            "etcd streams",
            "etcd watchers",
            "sync ms",
            "client CPU ms/s per member",
            "client RSS KiB per member",
            "etcd CPU ms/s idle",
            "etcd RSS MiB",
            "proxies CPU ms/s idle",
            "proxies RSS MiB",
            "reads/s idle",
            "restarts idle",
            "re-lists idle",
            "change p50",
            "change p99",
            "change max",
            "missed",
        ],
        &rows,
    );
}

struct Run<'a> {
    etcd: &'a Etcd,
    proxies: &'a [EtcdProxy],
    /// Process `p` connects to `endpoints[p % len]`.
    endpoints: &'a [String],
    mode: &'a str,
    procs: usize,
    per: usize,
    services: usize,
    idle: Duration,
    changes: usize,
}

struct Measured {
    streams: f64,
    watchers: f64,
    sync: Duration,
    client_cpu_per_member_ms_s: f64,
    client_rss_per_member: u64,
    etcd_cpu_ms_s: f64,
    etcd_rss: u64,
    /// The proxies' CPU while idle and RSS, summed (from their metrics).
    proxy_cpu_ms_s: f64,
    proxy_rss: u64,
    reads_per_s: f64,
    /// Watch restarts and re-listings while the fleet idled.
    restarts: u64,
    relists: u64,
    /// Members that had not seen a change within `WAIT`.
    missed: usize,
    change: Stats,
}

impl Measured {
    fn row(&self, via: &str, mode: &str, members: usize) -> Vec<String> {
        vec![
            via.into(),
            mode.into(),
            members.to_string(),
            format!("{}", self.streams),
            format!("{}", self.watchers),
            format!("{:.0}", self.sync.as_secs_f64() * 1e3),
            format!("{:.4}", self.client_cpu_per_member_ms_s),
            format!("{}", self.client_rss_per_member / 1024),
            format!("{:.1}", self.etcd_cpu_ms_s),
            format!("{}", self.etcd_rss >> 20),
            format!("{:.1}", self.proxy_cpu_ms_s),
            format!("{}", self.proxy_rss >> 20),
            format!("{:.1}", self.reads_per_s),
            self.restarts.to_string(),
            self.relists.to_string(),
            ms(self.change.p50),
            ms(self.change.p99),
            ms(self.change.max),
            self.missed.to_string(),
        ]
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "etcd_watch_streams": self.streams,
            "etcd_watchers": self.watchers,
            "sync_ms": self.sync.as_secs_f64() * 1e3,
            "client_cpu_ms_per_s_per_member": self.client_cpu_per_member_ms_s,
            "client_rss_bytes_per_member": self.client_rss_per_member,
            "etcd_cpu_ms_per_s_idle": self.etcd_cpu_ms_s,
            "etcd_rss_bytes": self.etcd_rss,
            "proxies_cpu_ms_per_s_idle": self.proxy_cpu_ms_s,
            "proxies_rss_bytes": self.proxy_rss,
            "etcd_reads_per_s_idle": self.reads_per_s,
            "watch_restarts_idle": self.restarts,
            "relists_idle": self.relists,
            "change": self.change.json(),
            "change_missed": self.missed,
        })
    }
}

/// etcd's count of `Range` calls served.
fn ranges(metrics: &str) -> f64 {
    metric_where(
        metrics,
        "grpc_server_handled_total",
        "grpc_method=\"Range\"",
    )
    .unwrap_or(0.0)
}

/// What the children report: CPU and RSS, and the watch restarts and
/// re-listings their clients counted (a plain watch that ended counts as
/// a restart it would need).
#[derive(Default)]
struct Usage {
    cpu: Duration,
    rss: u64,
    restarts: u64,
    relists: u64,
}

struct Kid {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Kid {
    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to a fleet child");
        self.stdin.flush().expect("flush");
    }

    fn read(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read from a fleet child");
        assert!(!line.is_empty(), "a fleet child ended early");
        line.trim().to_owned()
    }
}

impl Run<'_> {
    /// The proxies' CPU seconds and RSS bytes, summed, from their own
    /// metrics (Go's process collector).
    fn proxies_usage(&self) -> (f64, f64) {
        self.proxies.iter().fold((0.0, 0.0), |(cpu, rss), p| {
            let m = p.metrics();
            (
                cpu + metric(&m, "process_cpu_seconds_total").unwrap_or(0.0),
                rss + metric(&m, "process_resident_memory_bytes").unwrap_or(0.0),
            )
        })
    }

    /// etcd's metrics once its watch stream and watcher counts have held
    /// still for a second (at most 15 s).
    async fn settled(&self) -> String {
        let count = |m: &str| {
            (
                metric(m, "etcd_debugging_mvcc_watcher_total"),
                metric(m, "etcd_debugging_mvcc_watch_stream_total"),
            )
        };
        let until = Instant::now() + Duration::from_secs(15);
        let mut last = self.etcd.metrics();
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = self.etcd.metrics();
            let still = count(&now) == count(&last);
            last = now;
            if still {
                break;
            }
        }
        last
    }

    async fn measure(&self) -> Measured {
        // The previous variant's watchers are cancelled asynchronously (a
        // killed proxy's too): take the baseline once etcd's counts hold still.
        let before = self.settled().await;
        let t0 = Instant::now();
        let mut kids: Vec<Kid> = (0..self.procs)
            .map(|p| {
                let mut child = Command::new(std::env::current_exe().expect("own path"))
                    .env(CHILD, "1")
                    .args([
                        self.mode,
                        &self.endpoints[p % self.endpoints.len()],
                        &(p * self.per).to_string(),
                        &self.per.to_string(),
                        &self.services.to_string(),
                    ])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("start a fleet child");
                let stdin = child.stdin.take().expect("stdin");
                let stdout = BufReader::new(child.stdout.take().expect("stdout"));
                Kid {
                    child,
                    stdin,
                    stdout,
                }
            })
            .collect();
        for k in &mut kids {
            let line = k.read();
            assert_eq!(line, "synced", "fleet child: {line}");
        }
        let sync = t0.elapsed();
        // A member is synced once it has listed; its watches are created
        // after that, one at a time per stream: count once etcd's counts
        // hold still.
        let base = metric(&before, "etcd_debugging_mvcc_watch_stream_total").unwrap_or(0.0);
        let base_w = metric(&before, "etcd_debugging_mvcc_watcher_total").unwrap_or(0.0);
        let m = self.settled().await;
        let streams = metric(&m, "etcd_debugging_mvcc_watch_stream_total").unwrap_or(0.0) - base;
        let watchers = metric(&m, "etcd_debugging_mvcc_watcher_total").unwrap_or(0.0) - base_w;

        // Idle.
        let pid = self.etcd.pid().unwrap_or(0);
        let usage = |kids: &mut Vec<Kid>| -> Usage {
            let mut sum = Usage::default();
            for k in kids.iter_mut() {
                k.send("usage");
                let line = k.read();
                let v: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .map(|v| v.parse().unwrap_or(0))
                    .collect();
                let at = |i: usize| v.get(i).copied().unwrap_or(0);
                sum.cpu += Duration::from_micros(at(0));
                sum.rss += at(1);
                sum.restarts += at(2);
                sum.relists += at(3);
            }
            sum
        };
        let u0 = usage(&mut kids);
        let (etcd0, reads0, at0) = (cpu_of(pid), ranges(&self.etcd.metrics()), Instant::now());
        let proxies0 = self.proxies_usage();
        tokio::time::sleep(self.idle).await;
        let u1 = usage(&mut kids);
        let span = at0.elapsed().as_secs_f64();
        let etcd_cpu_ms_s = (cpu_of(pid) - etcd0).as_secs_f64() * 1e3 / span;
        let proxies1 = self.proxies_usage();
        let proxy_cpu_ms_s = (proxies1.0 - proxies0.0) * 1e3 / span;
        let reads_per_s = (ranges(&self.etcd.metrics()) - reads0) / span;
        let members = (self.procs * self.per) as f64;
        let client_cpu_per_member_ms_s = (u1.cpu - u0.cpu).as_secs_f64() * 1e3 / span / members;

        // Changes: a new instance of one service, seen by every member of it.
        let mut client = self.etcd.client().await;
        let mut delays = Vec::new();
        let mut missed = 0;
        for c in 0..self.changes {
            let s = c % self.services;
            for k in &mut kids {
                k.send(&format!("change {s}"));
                assert_eq!(k.read(), "armed");
            }
            let addr = format!("127.0.0.2:{}", 1_000 + c);
            let value = format!(r#"{{"Op":0,"Addr":"{addr}","Metadata":null}}"#);
            let put_at = unix_us();
            client
                .put(format!("{}/{addr}", service(s)), value, None)
                .await
                .expect("put a change");
            for k in &mut kids {
                let line = k.read();
                for seen in line.split_whitespace().skip(1) {
                    match seen.parse::<u128>() {
                        Ok(at) => {
                            delays.push(Duration::from_micros(at.saturating_sub(put_at) as u64))
                        }
                        Err(_) => missed += 1,
                    }
                }
            }
        }
        for mut k in kids {
            k.send("quit");
            let _ = k.child.wait();
        }
        // Leave etcd as it was: the changes' instances go.
        for c in 0..self.changes {
            let addr = format!("127.0.0.2:{}", 1_000 + c);
            let _ = client
                .delete(format!("{}/{addr}", service(c % self.services)), None)
                .await;
        }
        Measured {
            streams,
            watchers,
            sync,
            client_cpu_per_member_ms_s,
            client_rss_per_member: u1.rss / (self.procs * self.per).max(1) as u64,
            restarts: u1.restarts - u0.restarts,
            relists: u1.relists - u0.relists,
            etcd_cpu_ms_s,
            etcd_rss: rss_of(pid),
            proxy_cpu_ms_s,
            proxy_rss: proxies1.1 as u64,
            reads_per_s,
            missed,
            change: Stats::of(if delays.is_empty() {
                vec![Duration::ZERO]
            } else {
                delays
            }),
        }
    }
}

/// One member: a Balancer, or a plain etcd-client watch (the floor) that
/// raises a flag on every put.
enum Member {
    Balancer(tonic_etcd::Balancer),
    Watch(Arc<AtomicBool>),
}

impl Member {
    fn seen(&self, baseline: usize) -> bool {
        match self {
            Self::Balancer(b) => b.registered() > baseline,
            Self::Watch(flag) => flag.load(Ordering::Acquire),
        }
    }

    fn baseline(&self) -> usize {
        match self {
            Self::Balancer(b) => b.registered(),
            Self::Watch(flag) => {
                flag.store(false, Ordering::Release);
                0
            }
        }
    }
}

/// A child: `<mode> <endpoint> <first> <count> <services>`; prints
/// `synced`, then answers `usage`, `change <service>` and `quit` on stdin.
fn child() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, endpoint, first, count, services, ..] = args.as_slice() else {
        eprintln!("fleet child: expected <mode> <endpoint> <first> <count> <services>");
        std::process::exit(2);
    };
    let parse = |s: &str| s.parse::<usize>().unwrap_or(0);
    let (first, count, services) = (parse(first), parse(count), parse(services).max(1));
    let counted = Counted::install();
    // Plain watches that ended (the floor's restarts).
    let ended = Arc::new(AtomicU64::new(0));
    let rt = support::runtime_with(1);
    rt.block_on(async {
        let etcd = tonic_etcd::testing::connect(std::slice::from_ref(endpoint)).await;
        let mut members = Vec::new();
        let mut watches = Vec::new();
        for i in first..first + count {
            let s = i % services;
            let member = if mode == "balancer" {
                Member::Balancer(
                    tonic_etcd::Balancer::builder(etcd.clone(), service(s))
                        .build()
                        .expect("a Balancer"),
                )
            } else {
                let flag = Arc::new(AtomicBool::new(false));
                let opts = etcd_client::WatchOptions::new().with_prefix();
                let mut watch_client = etcd.watch_client();
                let mut stream = watch_client
                    .watch(format!("{}/", service(s)), Some(opts))
                    .await
                    .expect("a plain watch");
                let set = flag.clone();
                let ended = ended.clone();
                watches.push(tokio::spawn(async move {
                    // A plain watch, as a client without recovery keeps it:
                    // when it ends, say so (the bench counts its misses).
                    loop {
                        match stream.message().await {
                            Ok(Some(resp)) if !resp.events().is_empty() => {
                                set.store(true, Ordering::Release);
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break eprintln!("fleet floor: a watch ended"),
                            Err(e) => break eprintln!("fleet floor: a watch failed: {e}"),
                        }
                    }
                    ended.fetch_add(1, Ordering::Relaxed);
                }));
                Member::Watch(flag)
            };
            members.push((s, member));
        }
        let deadline = Instant::now() + WAIT;
        while members
            .iter()
            .any(|(_, m)| matches!(m, Member::Balancer(b) if b.registered() == 0))
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("synced");
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin());
        let mut line = String::new();
        loop {
            line.clear();
            use tokio::io::AsyncBufReadExt;
            if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["usage"] => println!(
                    "usage {} {} {} {}",
                    cpu::cpu_time().as_micros(),
                    rss_of(std::process::id()),
                    counted.total("tonic_etcd_watch_reconnects_total", None)
                        + ended.load(Ordering::Relaxed),
                    counted.total("tonic_etcd_watch_resyncs_total", None),
                ),
                ["change", s] => {
                    let s = parse(s);
                    let watched: Vec<(usize, &Member)> = members
                        .iter()
                        .filter(|(ms, _)| *ms == s)
                        .map(|(_, m)| (m.baseline(), m))
                        .collect();
                    println!("armed");
                    let mut seen = vec![None; watched.len()];
                    let deadline = Instant::now() + WAIT;
                    let mut tick = tokio::time::interval(Duration::from_millis(1));
                    while seen.iter().any(Option::is_none) && Instant::now() < deadline {
                        tick.tick().await;
                        let now = unix_us();
                        for (i, (baseline, m)) in watched.iter().enumerate() {
                            if seen[i].is_none() && m.seen(*baseline) {
                                seen[i] = Some(now);
                            }
                        }
                    }
                    let list: Vec<String> = seen
                        .iter()
                        .map(|t| t.map_or_else(|| "never".into(), |t| t.to_string()))
                        .collect();
                    println!("seen {}", list.join(" "));
                }
                _ => return,
            }
        }
    });
}
