//! Generates the protobuf messages and gRPC stubs from `proto/`.
//!
//! protox parses the `.proto` files in Rust (the well-known `google/protobuf` types are built into it), so
//! building needs no system `protoc`; tonic-prost-build turns the descriptors into prost messages and
//! tonic clients and servers under `OUT_DIR`, gathered by `_includes.rs` into one module tree.

use std::error::Error;

/// The files to compile; each imports what it needs from `proto/` or the well-known types.
const PROTOS: &[&str] = &[
    "proto/xds.proto",
    "proto/workload.proto",
    "proto/authorization.proto",
    "proto/citadel.proto",
    "proto/zds.proto",
    "proto/workload_api.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        // Addresses arrive as raw bytes; `Bytes` lets a decoded message share the receive buffer.
        .bytes(".")
        .include_file("_includes.rs")
        .compile_fds(descriptors)?;
    Ok(())
}
