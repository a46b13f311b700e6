//! Arbitrary YAML to the security-resource parser and, when it compiles, arbitrary requests to the
//! evaluator at ztunnel and at a waypoint: typed errors or decisions, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 64 bytes (if any) describe the request; the rest is the YAML.
    let (request, yaml) = data.split_at(data.len().min(64));
    if let Ok(yaml) = std::str::from_utf8(yaml) {
        mesh_policy::__fuzz::parse_and_evaluate(yaml, request);
    }
});
