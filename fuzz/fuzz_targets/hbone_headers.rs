//! Arbitrary text as a `baggage`, `forwarded` or `traceparent` header value: each codec parses it or
//! refuses it, never panics, and whatever it accepts re-encodes to something that parses back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    mesh_hbone::headers::__fuzz::headers(text);
});
