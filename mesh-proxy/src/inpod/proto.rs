//! The ZDS wire messages (protobuf package `istio.workload.zds`), written by hand as `prost` structs.
//!
//! mesh-proxy does not depend on mesh-xds (DESIGN.md), which compiles `mesh-xds/proto/zds.proto`; these
//! structs repeat its field numbers and types, and `tests/inpod.rs` checks that both encode every message
//! to the same bytes, so the two cannot drift apart silently. Istio's istio-cni and ztunnel share this
//! contract: names and numbers must not change.

/// The protocol version ztunnel announces in [`ZdsHello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    /// Never sent.
    NotUsed = 0,
    /// The first and only version.
    V1 = 1,
}

/// ztunnel's first message on a new connection.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ZdsHello {
    /// The version ztunnel speaks (a [`Version`]).
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// What ztunnel learns about a pod from istio-cni before xDS describes it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WorkloadInfo {
    /// The pod name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The pod namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// The pod's service account.
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// Start serving a pod; the packet carries the pod's network namespace file descriptor (SCM_RIGHTS).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct AddWorkload {
    /// The pod's UID.
    #[prost(string, tag = "1")]
    pub uid: String,
    /// The pod's name, namespace and service account.
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// Keep serving a pod whose network namespace istio-cni could not reopen (only before `snapshot_sent`).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct KeepWorkload {
    /// The pod's UID.
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// Stop serving a pod.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct DelWorkload {
    /// The pod's UID (field 2, as upstream).
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// Every existing pod has been sent on this connection.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct SnapshotSent {}

/// ztunnel's answer to each request: an empty `error` means it was handled.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Ack {
    /// Empty on success, else what went wrong.
    #[prost(string, tag = "1")]
    pub error: String,
}

/// A message from istio-cni to ztunnel.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WorkloadRequest {
    /// What to do (field 4, `no_snapshot_present`, was removed upstream).
    #[prost(oneof = "workload_request::Payload", tags = "1, 2, 3, 5")]
    pub payload: Option<workload_request::Payload>,
}

/// The `payload` oneof of [`WorkloadRequest`].
pub mod workload_request {
    /// What istio-cni asks for.
    #[derive(Clone, PartialEq, Eq, prost::Oneof)]
    pub enum Payload {
        /// Start serving a pod.
        #[prost(message, tag = "1")]
        Add(super::AddWorkload),
        /// Stop serving a pod.
        #[prost(message, tag = "2")]
        Del(super::DelWorkload),
        /// The initial snapshot is complete.
        #[prost(message, tag = "3")]
        SnapshotSent(super::SnapshotSent),
        /// Keep a pod from the previous connection.
        #[prost(message, tag = "5")]
        Keep(super::KeepWorkload),
    }
}

/// A message from ztunnel to istio-cni.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WorkloadResponse {
    /// The reply.
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

/// The `payload` oneof of [`WorkloadResponse`].
pub mod workload_response {
    /// ztunnel's reply.
    #[derive(Clone, PartialEq, Eq, prost::Oneof)]
    pub enum Payload {
        /// The acknowledgement.
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}
