//! Arbitrary bytes as an `istio.workload.Address` xDS resource: decoding and conversion to the mesh model
//! refuse it or accept it, never panic, and whatever converts comes back unchanged from model -> proto ->
//! model.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_xds::__fuzz::convert_address(data);
});
