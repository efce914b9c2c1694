//! What a client costs in CPU, beside tonic's: instructions per unary call,
//! and CPU while idle.
//!
//! Three clients of the same four greeter servers (registered in a real
//! etcd), each in a process of its own so that nothing else is counted:
//!
//! * `plain`: a tonic `Channel` to one server (the floor: no balancing);
//! * `tonic_balanced`: tonic's balanced channel fed by etcd
//!   ([`tonic_etcd::ChannelBuilder`]);
//! * `balancer`: this crate's [`tonic_etcd::Balancer`].
//!
//! **Instructions per call**: each client runs under `valgrind
//! --tool=callgrind` twice, making `N1` and then `N2` sequential unary calls
//! after the same set-up; (I(N2) − I(N1)) / (N2 − N1) is the cost of one
//! call, start-up and discovery cancelling out. Instruction counts do not
//! depend on what else the machine is doing.
//!
//! **Idle CPU**: each client, connected and warmed up, then idle; process
//! CPU time from `getrusage` over the idle period, in ms per second.
//!
//! **As the kernel sees a call** (what callgrind does not count): heap
//! allocations and bytes per call (a counting global allocator in the
//! client), voluntary and involuntary context switches per call
//! (`getrusage`), and system calls per call (`strace -c -f`, the
//! difference of two runs as for instructions), each client on one thread.
//! Runtime parks per call: how often the client's thread ran out of work
//! and slept until the kernel woke it (tokio's `worker_park_count`). Tasks
//! polled per call (each poll is a task woken or spawned) need tokio's
//! unstable metrics: build with `RUSTFLAGS="--cfg tokio_unstable"` for that
//! column (`-` otherwise).
//!
//! The servers run in this (parent) process, on a runtime each; the clients
//! are this binary started again with `cpu-child` arguments. Writes
//! `target/bench/cpu.json`. Settings: `BENCH_CALLS` (N2 − N1, default
//! 2,000), `BENCH_IDLE_SECS` (default 10), `BENCH_CALLGRIND_DIR` (keep
//! each callgrind profile there as `<variant>-<calls>.out`: compare two
//! with `callgrind_annotate --inclusive=yes`).

#[path = "support/backends.rs"]
mod backends;
#[path = "../tests/common/cpu.rs"]
mod cpu;
#[path = "../tests/common/pki.rs"]
mod pki;
#[path = "../tests/common/proxy.rs"]
mod proxy;
#[path = "support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backends::{caller, Backends, Call, Setup};
use support::{setting, smoke, table, write_json};
use tonic_etcd::testing::Etcd;
use tonic_etcd::{Balancer, ChannelBuilder};

const SERVICE: &str = "cpu.v1.Greeter";
/// `balancer_h2_keepalive`: the Balancer with HTTP/2 keep-alive turned on
/// (off by default, as in tonic), to show what hyper's ping bookkeeping
/// costs a call.
const VARIANTS: [&str; 4] = [
    "plain",
    "tonic_balanced",
    "balancer",
    "balancer_h2_keepalive",
];
/// Calls made before anything is counted (connections made, estimates fed).
const WARM_UP: usize = 50;
const READY_LIMIT: Duration = Duration::from_secs(30);

/// Counts the client's heap allocations (a `realloc` counts as one).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Context switches (voluntary, involuntary) of this process so far.
fn context_switches() -> (i64, i64) {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    (usage.ru_nvcsw, usage.ru_nivcsw)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("cpu-child") {
        return child(&args[2..]);
    }
    let calls = setting("BENCH_CALLS", 2_000, 20) as usize;
    let idle_secs = setting("BENCH_IDLE_SECS", 10, 1);
    let n1 = 100.min(calls);
    let valgrind = which("valgrind");
    let strace = which("strace");
    if !smoke() && !valgrind {
        panic!(
            "valgrind not found: the cpu benchmark counts instructions with \
             `valgrind --tool=callgrind`. Install it (as root on Debian: \
             `scripts/ensure-deps`, or `apt-get install -y valgrind`)."
        );
    }
    let etcd = Etcd::start();
    let rt = support::runtime();
    let backends = rt.block_on(async {
        let client = etcd.client().await;
        Backends::start(&client, SERVICE, Setup::default()).await
    });
    let endpoint = etcd.endpoint();
    let plain_addr = backends.addrs[0].clone();

    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    let mut per_call = std::collections::HashMap::new();
    let mut kernel = Vec::new();
    for variant in VARIANTS {
        let spawn = |mode: &str, n: usize, under_valgrind: bool| {
            run_child(
                under_valgrind,
                &[variant, mode, &n.to_string(), &endpoint, &plain_addr],
            )
        };
        // Instructions: the two runs, interleaved per variant.
        let instructions = if valgrind {
            let low = spawn("calls", n1, true).instructions;
            let high = spawn("calls", n1 + calls, true).instructions;
            Some(high.saturating_sub(low) as f64 / calls as f64)
        } else {
            // Without valgrind (a smoke run only): the same runs, uncounted.
            spawn("calls", n1, false);
            None
        };
        let idle = spawn("idle", idle_secs as usize, false).idle_ms_per_s;
        // Allocations and context switches, uninstrumented.
        let counted = spawn("calls", calls, false).counts;
        // System calls: two runs under strace, as for instructions.
        let syscalls = strace.then(|| {
            let low =
                run_child_traced(&[variant, "calls", &n1.to_string(), &endpoint, &plain_addr]);
            let high = run_child_traced(&[
                variant,
                "calls",
                &(n1 + calls).to_string(),
                &endpoint,
                &plain_addr,
            ]);
            high.saturating_sub(low) as f64 / calls as f64
        });
        kernel.push((variant, counted, syscalls));
        if let Some(i) = instructions {
            per_call.insert(variant, i);
        }
        json.insert(
            variant.into(),
            serde_json::json!({
                "instructions_per_call": instructions.map(f64::round),
                "idle_cpu_ms_per_s": idle,
            }),
        );
        rows.push((variant, instructions, idle));
    }
    let floor = per_call.get("plain").copied();
    let tonic = per_call.get("tonic_balanced").copied();
    let ratio = |i: Option<f64>, to: Option<f64>, digits: usize| match (i, to) {
        (Some(i), Some(to)) => format!("{:.digits$}x", i / to),
        _ => "-".into(),
    };
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(v, i, idle)| {
            vec![
                v.to_string(),
                i.map_or("-".into(), |i| format!("{i:.0}")),
                ratio(i, floor, 2),
                ratio(i, tonic, 3),
                idle.map_or("-".into(), |ms| format!("{ms:.3}")),
            ]
        })
        .collect();
    table(
        &format!(
            "Client CPU: instructions per unary call (callgrind, {calls} calls) and \
             idle CPU ({idle_secs} s, 4 connected endpoints)"
        ),
        &[
            "client",
            "instr/call",
            "vs plain",
            "vs tonic_balanced",
            "idle ms CPU/s",
        ],
        &rows,
    );
    let kernel_rows: Vec<Vec<String>> = kernel
        .iter()
        .map(|(v, c, sys)| {
            vec![
                v.to_string(),
                format!("{:.1}", c.allocations),
                format!("{:.0}", c.bytes),
                sys.map_or("-".into(), |s| format!("{s:.2}")),
                format!("{:.3}", c.voluntary),
                format!("{:.3}", c.involuntary),
                format!("{:.3}", c.parks),
                c.polls.map_or("-".into(), |p| format!("{p:.2}")),
            ]
        })
        .collect();
    table(
        &format!("Client per unary call, as the kernel sees it ({calls} calls, one thread)"),
        &[
            "client",
            "allocs/call",
            "bytes/call",
            "syscalls/call",
            "vol. switches/call",
            "invol. switches/call",
            "parks/call",
            "task polls/call",
        ],
        &kernel_rows,
    );
    for (v, c, sys) in &kernel {
        if let Some(serde_json::Value::Object(o)) = json.get_mut(*v) {
            o.insert("allocations_per_call".into(), c.allocations.into());
            o.insert("allocated_bytes_per_call".into(), c.bytes.into());
            o.insert("syscalls_per_call".into(), (*sys).into());
            o.insert("voluntary_switches_per_call".into(), c.voluntary.into());
            o.insert("involuntary_switches_per_call".into(), c.involuntary.into());
            o.insert("runtime_parks_per_call".into(), c.parks.into());
            o.insert("task_polls_per_call".into(), c.polls.into());
        }
    }
    for (name, variant, key) in [
        ("balancer_to_plain", "balancer", "plain"),
        ("balancer_to_tonic_balanced", "balancer", "tonic_balanced"),
        (
            "balancer_h2_keepalive_to_tonic_balanced",
            "balancer_h2_keepalive",
            "tonic_balanced",
        ),
    ] {
        if let (Some(b), Some(o)) = (per_call.get(variant), per_call.get(key)) {
            json.insert(
                format!("instructions_ratio_{name}"),
                ((b / o * 1000.0).round() / 1000.0).into(),
            );
        }
    }
    json.insert("calls".into(), calls.into());
    json.insert("idle_secs".into(), idle_secs.into());
    write_json("cpu", &serde_json::Value::Object(json));
    drop(backends);
}

/// What a child reported.
#[derive(Default)]
struct Report {
    instructions: u64,
    idle_ms_per_s: Option<f64>,
    counts: Counts,
}

/// Per call, from a child's own counters.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    allocations: f64,
    bytes: f64,
    voluntary: f64,
    involuntary: f64,
    /// Times the runtime's thread went to sleep waiting for work (each a
    /// wake-up from the kernel to resume).
    parks: f64,
    /// Tasks polled (only when built with `--cfg tokio_unstable`).
    polls: Option<f64>,
}

/// System calls of a child run under `strace -c -f` (every thread).
fn run_child_traced(args: &[&str]) -> u64 {
    let exe = std::env::current_exe().expect("current exe");
    let out = std::env::temp_dir().join(format!("tonic-etcd-strace-{}.txt", std::process::id()));
    let status = Command::new("strace")
        .args(["-c", "-f", "-o"])
        .arg(&out)
        .arg(&exe)
        .arg("cpu-child")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("start strace");
    assert!(
        status.success(),
        "client {args:?} under strace failed: {status:?}"
    );
    let summary = std::fs::read_to_string(&out).expect("strace's summary");
    let _ = std::fs::remove_file(&out);
    // The last line: "100.00    0.001234           1      1234        12 total"
    summary
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with("total"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no total in strace's summary:\n{summary}"))
}

fn run_child(under_valgrind: bool, args: &[&str]) -> Report {
    let exe = std::env::current_exe().expect("current exe");
    // BENCH_CALLGRIND_DIR keeps each run's profile there, named by its
    // arguments, for `callgrind_annotate` (where the instructions go).
    let keep = std::env::var_os("BENCH_CALLGRIND_DIR").map(std::path::PathBuf::from);
    let out_file = match &keep {
        Some(dir) => dir.join(format!("{}-{}.out", args[0], args[2])),
        None => std::env::temp_dir().join(format!("tonic-etcd-cpu-{}.out", std::process::id())),
    };
    let mut cmd = if under_valgrind {
        let mut c = Command::new("valgrind");
        c.arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out_file.display()))
            .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.arg("cpu-child").args(args);
    let t0 = Instant::now();
    let output = cmd.output().expect("start the client process");
    if keep.is_none() {
        let _ = std::fs::remove_file(&out_file);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "client {args:?} failed ({:?} after {:?}):\n{stdout}\n{stderr}",
        output.status,
        t0.elapsed()
    );
    let mut report = Report::default();
    if under_valgrind {
        // "==1234== Collected : 123456789"
        report.instructions = stderr
            .lines()
            .find_map(|l| l.split("Collected :").nth(1))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no instruction count from callgrind:\n{stderr}"));
    }
    let field = |name: &str| -> Option<f64> {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    };
    report.idle_ms_per_s = field("idle_ms_per_s");
    report.counts = Counts {
        allocations: field("allocations_per_call").unwrap_or(0.0),
        bytes: field("bytes_per_call").unwrap_or(0.0),
        voluntary: field("voluntary_per_call").unwrap_or(0.0),
        involuntary: field("involuntary_per_call").unwrap_or(0.0),
        parks: field("parks_per_call").unwrap_or(0.0),
        polls: field("polls_per_call"),
    };
    report
}

/// The client process: `<variant> calls <n> <etcd> <addr>` makes `n` calls
/// after the warm-up; `<variant> idle <secs> <etcd> <addr>` idles after it.
fn child(args: &[String]) {
    let [variant, mode, n, etcd, addr] = args else {
        panic!("usage: cpu-child <variant> calls|idle <n> <etcd> <addr>");
    };
    let n: usize = n.parse().expect("a count");
    // One thread: what the client costs, not how a scheduler spreads it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let call: Call = match variant.as_str() {
            "plain" => {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("connect");
                caller(channel, None)
            }
            "tonic_balanced" => {
                let client = tonic_etcd::testing::connect(std::slice::from_ref(etcd)).await;
                let c = ChannelBuilder::new(client, SERVICE)
                    .build()
                    .expect("channel");
                let wait = Instant::now() + READY_LIMIT;
                while c.endpoints() < 4 {
                    assert!(Instant::now() < wait, "4 endpoints not discovered");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                caller(c, None)
            }
            "balancer" | "balancer_h2_keepalive" => {
                let client = tonic_etcd::testing::connect(std::slice::from_ref(etcd)).await;
                let mut builder = Balancer::builder(client, SERVICE);
                if variant == "balancer_h2_keepalive" {
                    builder =
                        builder.http2_keep_alive(Duration::from_secs(10), Duration::from_secs(20));
                }
                let b = builder.build().expect("balancer");
                b.wait_for_ready(4, READY_LIMIT).await.expect("4 ready");
                caller(b, None)
            }
            other => panic!("unknown variant {other}"),
        };
        for _ in 0..WARM_UP {
            call().await.expect("warm-up call");
        }
        match mode.as_str() {
            "calls" => {
                let (a0, b0) = (
                    ALLOCATIONS.load(Ordering::Relaxed),
                    ALLOCATED.load(Ordering::Relaxed),
                );
                let metrics = tokio::runtime::Handle::current().metrics();
                let (v0, i0) = context_switches();
                let (p0, q0) = (metrics.worker_park_count(0), polls(&metrics));
                for _ in 0..n {
                    call().await.expect("call");
                }
                let (v1, i1) = context_switches();
                let (p1, q1) = (metrics.worker_park_count(0), polls(&metrics));
                let per = |d: f64| d / n as f64;
                println!(
                    "allocations_per_call {:.2}",
                    per((ALLOCATIONS.load(Ordering::Relaxed) - a0) as f64)
                );
                println!(
                    "bytes_per_call {:.1}",
                    per((ALLOCATED.load(Ordering::Relaxed) - b0) as f64)
                );
                println!("voluntary_per_call {:.4}", per((v1 - v0) as f64));
                println!("involuntary_per_call {:.4}", per((i1 - i0) as f64));
                println!("parks_per_call {:.4}", per((p1 - p0) as f64));
                if let (Some(q0), Some(q1)) = (q0, q1) {
                    println!("polls_per_call {:.4}", per((q1 - q0) as f64));
                }
            }
            "idle" => {
                let (cpu0, t0) = (cpu::cpu_time(), Instant::now());
                tokio::time::sleep(Duration::from_secs(n as u64)).await;
                let (cpu, wall) = (cpu::cpu_time() - cpu0, t0.elapsed());
                println!(
                    "idle_ms_per_s {:.4}",
                    cpu.as_secs_f64() * 1000.0 / wall.as_secs_f64()
                );
            }
            other => panic!("unknown mode {other}"),
        }
    });
}

/// Tasks the runtime has polled so far: a task polled is a task woken (or
/// spawned). tokio counts it only under `--cfg tokio_unstable`.
#[cfg(tokio_unstable)]
fn polls(m: &tokio::runtime::RuntimeMetrics) -> Option<u64> {
    Some(m.worker_poll_count(0))
}

#[cfg(not(tokio_unstable))]
fn polls(_: &tokio::runtime::RuntimeMetrics) -> Option<u64> {
    None
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(bin).is_file()))
}
