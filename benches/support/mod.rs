//! Shared by the benchmarks: percentiles, a readable table, JSON output.
#![allow(dead_code)]

pub mod counted;

use std::path::PathBuf;
use std::time::Duration;

/// Whether this is a smoke run: `cargo test --all-targets` runs bench
/// targets without `--bench` (`cargo bench` passes it). A smoke run does a
/// little of everything, so CI proves the benchmarks work without paying
/// for them.
pub fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// `name` from the environment, else `full` (or `smoke_value` in a smoke run).
pub fn setting(name: &str, full: u64, smoke_value: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if smoke() { smoke_value } else { full })
}

/// Samples per measured series: `BENCH_SAMPLES`, default `default` (10 in a smoke run).
pub fn samples(default: usize) -> usize {
    setting("BENCH_SAMPLES", default as u64, 10) as usize
}

/// Whether scenario `name` is selected by `BENCH_SCENARIOS` (comma-separated
/// words, a scenario runs when its name contains one; all when unset).
pub fn selected(name: &str) -> bool {
    let only = std::env::var("BENCH_SCENARIOS").unwrap_or_default();
    only.is_empty() || only.split(',').any(|o| name.contains(o.trim()))
}

/// Summary of one series of latencies.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub n: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

impl Stats {
    pub fn of(mut v: Vec<Duration>) -> Self {
        assert!(!v.is_empty(), "no samples");
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        let total: Duration = v.iter().sum();
        Self {
            n: v.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: v[v.len() - 1],
            mean: total / v.len() as u32,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "n": self.n,
            "p50_us": us(self.p50),
            "p90_us": us(self.p90),
            "p99_us": us(self.p99),
            "max_us": us(self.max),
            "mean_us": us(self.mean),
        })
    }
}

pub fn us(d: Duration) -> f64 {
    (d.as_nanos() as f64 / 1000.0 * 10.0).round() / 10.0
}

pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// Prints rows under a header, columns padded to fit.
pub fn table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    println!("\n{title}");
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        println!("  {}", parts.join("  "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for r in rows {
        line(r.clone());
    }
}

/// Writes `value` to `target/bench/<name>.json` and says where (not in a
/// smoke run, whose figures mean nothing).
pub fn write_json(name: &str, value: &serde_json::Value) {
    if smoke() {
        println!("\nsmoke run (no --bench): figures not written");
        return;
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(value).expect("serialize");
    std::fs::write(&path, text).expect("write bench json");
    println!("\nwrote {}", path.display());
}

/// The runtime the benchmarks' clients run on: two workers, as many as
/// this machine has cores.
pub fn runtime() -> tokio::runtime::Runtime {
    runtime_with(2)
}

/// A runtime of `workers` threads (a benchmark's child process uses one,
/// so that many of them share the machine's cores as a fleet would).
pub fn runtime_with(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Resident memory of this process, in bytes (Linux).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// CPU time (user + system) process `pid` has used so far, from /proc.
pub fn cpu_of(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command's closing parenthesis (the command may hold
    // spaces): utime is the 12th of those, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis((field(11) + field(12)) * 1_000 / hz)
}
