//! # mesh-proxy
//!
//! Reusable proxy stacks composed from `mesh-hbone` and `mesh-policy`: outbound, inbound, in-pod and the
//! waypoint's HTTP pipeline. It consumes a [`mesh_core::model::SnapshotReceiver`], never xDS directly, so
//! an embedder can feed it configuration from anywhere.
//!
//! ## Layout
//! This crate is being built (issue "ztunnel").
//!
//! ## Example
//! ```
//! let publisher = mesh_core::model::SnapshotPublisher::new();
//! let receiver = publisher.subscribe();
//! assert_eq!(receiver.current().workloads().count(), 0);
//! ```
#![forbid(unsafe_code)]
