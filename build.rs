//! Generates the greeter service used by examples, tests and benchmarks,
//! and gRPC's interop test service (feature `testing` only: a plain build
//! compiles no proto of its own).

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=proto/greeter.proto");
    println!("cargo:rerun-if-changed=proto/grpc/testing/test.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none() && !on_path("protoc") {
        // etcd-client's own build needs protoc too; say how to get it instead
        // of failing somewhere deep inside prost-build.
        panic!(
            "`protoc` (the protobuf compiler) was not found on PATH and PROTOC is not set.\n\
             Install it: as root on Debian/Ubuntu `apt-get update && apt-get install -y protobuf-compiler`,\n\
             elsewhere see https://protobuf.dev/installation/ and/or set PROTOC=/path/to/protoc."
        );
    }
    if std::env::var_os("CARGO_FEATURE_TESTING").is_none() {
        return;
    }
    for proto in ["proto/greeter.proto", "proto/grpc/testing/test.proto"] {
        if let Err(e) = tonic_prost_build::configure().compile_protos(&[proto], &["proto"]) {
            panic!("failed to compile {proto}: {e}");
        }
    }
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| Path::new(&dir).join(bin).is_file()))
        .unwrap_or(false)
}
