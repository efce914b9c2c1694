//! The harness's fault proxy under the name the tests use.
#![allow(unused_imports)]

pub use tonic_etcd::testing::FaultProxy as Proxy;
