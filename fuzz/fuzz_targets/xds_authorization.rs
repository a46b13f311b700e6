//! Arbitrary bytes as an `istio.security.Authorization` xDS resource: decoding and validation refuse it
//! or accept it, never panic, and whatever converts comes back unchanged from its proto form.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_xds::__fuzz::convert_authorization(data);
});
