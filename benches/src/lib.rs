//! # meshkit-benches
//!
//! Criterion benches for meshkit's hot paths, run with `cargo bench -p meshkit-benches`. Each bench that
//! makes a speed claim measures its baseline in the same run (for example a plain TLS handshake beside an
//! HBONE stream open), so results are read as ratios, not absolute times.
//!
//! ## Layout
//! - `benches/identity.rs`: `SpiffeId::parse` on typical and long identities.
//! - `benches/handshake.rs`: a full mutual-TLS handshake on loopback, against plain TCP connect.
//! - `benches/policy.rs`: authorization decisions (L4 and L7) with 10, 1,000 and 10,000 policies, checking
//!   with a counting allocator that a decision allocates nothing; baseline: a decision against an empty set.
//! - `benches/hbone.rs`: HBONE on loopback: a stream opened on a pooled connection (against a TCP connect
//!   and a 1-byte round trip on an open mutual-TLS connection), bulk bytes through one stream (against one
//!   plain mutual-TLS connection and plain TCP), and a fresh connection to its first echoed byte (against
//!   a plain mutual-TLS handshake and first byte). Results are in `docs/performance.md`.
//! - [`SAMPLE_IDS`]: the identities the parse bench uses, shared so tests can check they stay valid.
//!
//! ## Example
//! ```
//! for id in meshkit_benches::SAMPLE_IDS {
//!     assert!(mesh_core::SpiffeId::parse(id).is_ok());
//! }
//! ```
#![forbid(unsafe_code)]

/// SPIFFE IDs of the shapes the data path parses: a typical Istio identity, a long one, and a short one.
pub const SAMPLE_IDS: [&str; 3] = [
    "spiffe://cluster.local/ns/default/sa/client",
    "spiffe://prod-us-east1.corp.example.com/ns/payments-processing-v2/sa/ledger-reconciliation-worker",
    "spiffe://td/ns/a/sa/b",
];
