//! Any string either parses into a SPIFFE ID that prints back as itself, or is refused: never a panic, and
//! never two spellings of one identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        assert_eq!(id.as_str(), text);
        assert!(id.as_str().is_ascii());
        assert!(!id.path().contains("//"));
        let _ = (id.namespace(), id.service_account(), id.principal());
    }
});
