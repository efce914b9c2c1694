//! What a server pays per unary call for its load reports (ORCA: the
//! `endpoint-load-metrics-bin` trailer on every response, the calls in
//! flight counted per method).
//!
//! Two servers of the same greeter, each in a process of its own under
//! `valgrind --tool=callgrind`:
//!
//! * `reports_off`: tonic's server builder with `DeadlineLayer` only (what
//!   `server::builder()` was before load reports);
//! * `reports_on`: `server::builder()`.
//!
//! This (parent) process calls the child over a plain tonic `Channel`:
//! `N1`, then (a new child) `N1 + N` sequential unary calls after the same
//! warm-up; (I(N1 + N) − I(N1)) / N is one call's cost to the server,
//! start-up and shutdown cancelling out. Variants are interleaved; each is
//! measured `BENCH_ROUNDS` times (default 2) and the lowest kept.
//! Instruction counts do not depend on what else the machine is doing.
//! The child serves until its stdin closes. Needs no etcd: nothing of the
//! server's request path touches it. Writes `target/bench/server_cpu.json`.
//! Settings: `BENCH_CALLS` (N, default 2,000), `BENCH_ROUNDS`,
//! `BENCH_CALLGRIND_DIR` (keep each profile there as `<variant>-<calls>.out`).

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{setting, smoke, table, write_json};
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};

const VARIANTS: [&str; 2] = ["reports_off", "reports_on"];
const WARM_UP: usize = 50;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("server-child") {
        return child(&args[2]);
    }
    let calls = setting("BENCH_CALLS", 2_000, 20) as usize;
    let rounds = setting("BENCH_ROUNDS", 2, 1) as usize;
    let n1 = 100.min(calls);
    let valgrind = Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !smoke() && !valgrind {
        panic!(
            "valgrind not found: this benchmark counts instructions with \
             `valgrind --tool=callgrind`. Install it (as root on Debian: \
             `scripts/ensure-deps`, or `apt-get install -y valgrind`)."
        );
    }
    let rt = support::runtime();
    let mut best: Vec<Option<f64>> = vec![None; VARIANTS.len()];
    for _ in 0..rounds {
        for (i, variant) in VARIANTS.iter().enumerate() {
            let low = serve_and_call(&rt, variant, n1, valgrind);
            let high = serve_and_call(&rt, variant, n1 + calls, valgrind);
            if valgrind {
                let per_call = high.saturating_sub(low) as f64 / calls as f64;
                best[i] = Some(best[i].map_or(per_call, |b: f64| b.min(per_call)));
            }
        }
    }
    let off = best[0];
    let rows: Vec<Vec<String>> = VARIANTS
        .iter()
        .zip(&best)
        .map(|(v, i)| {
            vec![
                v.to_string(),
                i.map_or("-".into(), |i| format!("{i:.0}")),
                match (i, off) {
                    (Some(i), Some(off)) => format!("{:.3}x", i / off),
                    _ => "-".into(),
                },
            ]
        })
        .collect();
    table(
        &format!(
            "Server CPU: instructions per unary call (callgrind, {calls} calls, \
             lowest of {rounds} rounds)"
        ),
        &["server", "instr/call", "vs reports_off"],
        &rows,
    );
    let mut json = serde_json::Map::new();
    for (v, i) in VARIANTS.iter().zip(&best) {
        json.insert(
            v.to_string(),
            serde_json::json!({ "instructions_per_call": i.map(f64::round) }),
        );
    }
    if let (Some(on), Some(off)) = (best[1], best[0]) {
        json.insert(
            "instructions_ratio_on_to_off".into(),
            ((on / off * 1000.0).round() / 1000.0).into(),
        );
    }
    json.insert("calls".into(), calls.into());
    write_json("server_cpu", &serde_json::Value::Object(json));
}

/// Starts a `variant` server (under callgrind when `counted`), makes the
/// warm-up and `n` calls to it, stops it; returns the instructions it ran
/// (0 when not counted).
fn serve_and_call(rt: &tokio::runtime::Runtime, variant: &str, n: usize, counted: bool) -> u64 {
    let exe = std::env::current_exe().expect("current exe");
    let out_file = std::env::temp_dir().join(format!(
        "tonic-etcd-server-cpu-{}-{variant}-{n}.out",
        std::process::id()
    ));
    let mut cmd = if counted {
        let mut c = Command::new("valgrind");
        c.arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out_file.display()))
            .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let mut child = cmd
        .arg("server-child")
        .arg(variant)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server process");
    let stdout = child.stdout.take().expect("the child's stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the server's address");
    let addr = line
        .trim()
        .strip_prefix("addr ")
        .unwrap_or_else(|| panic!("no address from the server: {line:?}"))
        .to_owned();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("an address")
            .connect_timeout(Duration::from_secs(30))
            .connect()
            .await
            .expect("connect to the server");
        let mut greeter = GreeterClient::new(channel);
        for _ in 0..WARM_UP + n {
            greeter
                .say_hello(HelloRequest { name: "x".into() })
                .await
                .expect("a call");
        }
    });
    // The channel is gone: closing stdin lets the server shut down at once.
    drop(child.stdin.take());
    let output = child.wait_with_output().expect("the server's exit");
    // BENCH_CALLGRIND_DIR keeps each profile, for `callgrind_annotate`.
    match std::env::var_os("BENCH_CALLGRIND_DIR") {
        Some(dir) => {
            let _ = std::fs::rename(
                &out_file,
                std::path::Path::new(&dir).join(format!("{variant}-{n}.out")),
            );
        }
        None => {
            let _ = std::fs::remove_file(&out_file);
        }
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "server {variant} failed ({:?}):\n{stderr}",
        output.status
    );
    if !counted {
        return 0;
    }
    // "==1234== Collected : 123456789"
    stderr
        .lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no instruction count from callgrind:\n{stderr}"))
}

/// The server process: serves the greeter on a free loopback port, prints
/// `addr <host:port>`, and stops when its stdin closes.
fn child(variant: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local address");
        println!("addr {addr}");
        std::io::stdout().flush().expect("flush");
        let stop = async {
            let _ = tokio::task::spawn_blocking(|| {
                let mut rest = String::new();
                let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
            })
            .await;
        };
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let greeter = Greeter::new("cpu").into_service();
        let served = match variant {
            "reports_on" => {
                tonic_etcd::server::builder()
                    .add_service(greeter)
                    .serve_with_incoming_shutdown(incoming, stop)
                    .await
            }
            "reports_off" => {
                tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .layer(tonic_etcd::server::DeadlineLayer)
                    .add_service(greeter)
                    .serve_with_incoming_shutdown(incoming, stop)
                    .await
            }
            other => panic!("unknown variant {other}"),
        };
        served.expect("the server");
    });
}
