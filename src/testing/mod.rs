//! Test support: real etcd processes and a greeter service (feature `testing`).
//!
//! One implementation serves the crate's tests, examples and benchmarks, so
//! the demo runs the same etcd harness that CI exercises.

pub mod demo;
mod etcd;
pub mod greeter;

pub use etcd::{connect, etcd_binary, shared, signal, Etcd, EtcdCluster, EtcdOptions, TlsFiles};

/// Resolves on SIGINT or SIGTERM: what a server process waits for before it
/// shuts down gracefully.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
