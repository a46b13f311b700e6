//! Arbitrary bytes as the start of a SOCKS5 connection (a greeting, then a request): the parsers accept
//! a message, refuse it, or ask for more, never panic, never claim more bytes than they were given, and
//! every prefix of an accepted message is "incomplete" rather than something else.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mesh_proxy::__fuzz::socks5_handshake(data);
});
