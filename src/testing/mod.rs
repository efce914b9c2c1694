//! Test support: real etcd processes and a greeter service (feature `testing`).
//!
//! One implementation serves the crate's tests, examples and benchmarks, so
//! the demo runs the same etcd harness that CI exercises.

pub mod demo;
mod etcd;
pub mod greeter;
mod grpc_proxy;
pub mod interop;
mod proxy;

pub use etcd::{
    connect, etcd_binary, metric, metric_where, shared, signal, Etcd, EtcdCluster, EtcdOptions,
    TlsFiles,
};
pub use grpc_proxy::EtcdProxy;
pub use proxy::FaultProxy;

pub use crate::server::shutdown_signal;
