//! The one error type of `mesh-xds`, [`XdsError`], and the reasons a field is refused, [`FieldProblem`].
//!
//! A conversion error names the resource (a workload's uid, a service's `namespace/hostname`, a policy's
//! `namespace/name`) and the field inside it, in the proto's own spelling (`addresses[1]`,
//! `waypoint.destination`, `services["default/echo"].ports[0].target_port`), so that a NACK sent back to
//! the control plane says exactly what to fix.

use std::fmt;

use mesh_core::model::ModelError;

/// Errors from `mesh-xds`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum XdsError {
    /// An `istio.workload.Workload` could not be converted.
    #[error("workload {uid}: {field}: {problem}")]
    Workload {
        /// The workload's uid (its xDS resource name), or `namespace/name` if the uid is empty; cut to
        /// 128 characters.
        uid: String,
        /// The offending field, e.g. `addresses[1]`.
        field: String,
        /// What is wrong with it.
        problem: FieldProblem,
    },

    /// An `istio.workload.Service` could not be converted.
    #[error("service {service}: {field}: {problem}")]
    Service {
        /// The service's `namespace/hostname` (its xDS resource name); cut to 128 characters.
        service: String,
        /// The offending field, e.g. `ports[0].target_port`.
        field: String,
        /// What is wrong with it.
        problem: FieldProblem,
    },

    /// An `istio.security.Authorization` could not be converted.
    #[error("authorization {policy}: {field}: {problem}")]
    Authorization {
        /// The policy's `namespace/name` (its xDS resource name); cut to 128 characters.
        policy: String,
        /// The offending field, e.g. `rules[0].clauses[1].matches[0].source_ips[2]`.
        field: String,
        /// What is wrong with it.
        problem: FieldProblem,
    },

    /// A message converted on its own, outside any resource (e.g. by [`gateway_from_proto`]), is invalid.
    ///
    /// [`gateway_from_proto`]: crate::gateway_from_proto
    #[error("{field}: {problem}")]
    Field {
        /// The offending field, relative to the converted message.
        field: String,
        /// What is wrong with it.
        problem: FieldProblem,
    },

    /// The ADS client has stopped, so it cannot answer.
    #[error("the ADS client has stopped")]
    ClientStopped,

    /// A demand named a type the ADS client does not subscribe to.
    #[error("the ADS client does not subscribe to {type_url}")]
    NotSubscribed {
        /// The type asked for.
        type_url: String,
    },

    /// An on-demand subscription would exceed the client's bound on demanded names.
    #[error("more than {limit} on-demand names")]
    TooManyDemands {
        /// The bound ([`AdsConfig::max_demanded`](crate::client::AdsConfig::max_demanded)).
        limit: usize,
    },

    /// An `istio.workload.Address` holds neither a workload nor a service.
    #[error("address resource holds neither a workload nor a service")]
    EmptyAddress,

    /// Bytes do not decode as the expected protobuf message.
    #[error("{message} does not decode: {reason}")]
    Decode {
        /// The fully qualified message name, e.g. `istio.workload.Address`.
        message: &'static str,
        /// prost's explanation.
        reason: prost::DecodeError,
    },

    /// A local configuration document (`mesh_xds::local`) is invalid: bad YAML, a value of the wrong type,
    /// or a value the conversion refuses. The location names the file, line and column.
    #[error("{location}: {}{reason}", FieldPrefix(.field))]
    LocalConfig {
        /// Where: the value's own position when the parser knows it, else the start of its document.
        location: crate::local::SourceLocation,
        /// The offending field, e.g. `workloads[1].workloadIps[0]` or `spec.ports[0].targetPort`; empty when
        /// the whole document is at fault.
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A local configuration document is a Kubernetes object of a kind the loader neither converts nor
    /// documents as ignored.
    #[error("{location}: unsupported kind {kind:?} (apiVersion {api_version:?})")]
    LocalUnsupportedKind {
        /// Where the document starts.
        location: crate::local::SourceLocation,
        /// The document's `kind`.
        kind: String,
        /// The document's `apiVersion`.
        api_version: String,
    },

    /// A local configuration path could not be read.
    #[error("{path}: cannot read: {source}")]
    LocalIo {
        /// The file or directory.
        path: String,
        /// The operating system's error.
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },

    /// A local configuration file (or inline configuration, or a directory's files together) is larger
    /// than the loader accepts.
    #[error("{path}: {size} bytes is more than the limit of {limit}")]
    LocalTooLarge {
        /// The file, directory or inline configuration's name.
        path: String,
        /// Its size in bytes (at least this many, if it was still growing).
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },

    /// A bearer token for control-plane calls could not be loaded, or cannot be sent as one.
    #[error("bearer token from {origin}: {problem}")]
    Token {
        /// Where the token comes from: the file's path, or `a literal token`.
        origin: String,
        /// What is wrong.
        problem: TokenProblem,
    },

    /// A header configured for control-plane calls has an invalid or reserved name, or an invalid value.
    #[error("header {name:?}: {reason}")]
    Header {
        /// The header's name, as configured (cut to 128 characters).
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A gRPC transport setting is unusable: an address that is not `http(s)://host:port`, missing or
    /// malformed root certificates, a TLS configuration rustls refuses, no tokio runtime to run in, ...
    #[error("invalid transport configuration: {reason}")]
    Transport {
        /// What is wrong.
        reason: String,
    },

    /// Connecting to a gRPC server failed: TCP, or the TLS handshake (for example, a server certificate
    /// that does not chain to the configured roots).
    #[error("connecting to {address} failed: {reason}")]
    Connect {
        /// The `host:port` dialled.
        address: String,
        /// The cause, with the TLS alert or certificate error when there is one.
        reason: String,
    },

    /// A caller of the CA service could not be authenticated by one authenticator.
    #[error("{reason}")]
    Unauthenticated {
        /// Why, in words safe to send back to the caller (never the token itself).
        reason: String,
    },

    /// A certificate or key operation of `mesh-core` failed (issuing the local server's certificate, ...).
    #[error(transparent)]
    Core(Box<mesh_core::Error>),
}

/// Why a bearer token could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenProblem {
    /// The token file could not be read (it is missing, or not readable).
    #[error("cannot read it: {0}")]
    Unreadable(String),

    /// The token is empty, or only whitespace.
    #[error("it is empty")]
    Empty,

    /// The token file is larger than any real token.
    #[error("it is larger than {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },

    /// The token holds characters an HTTP header value cannot carry.
    #[error("it holds characters a header value cannot carry")]
    NotHeaderValue,
}

/// Why a field of a resource was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FieldProblem {
    /// An address field does not hold 4 (IPv4) or 16 (IPv6) bytes.
    #[error("{len} bytes is not an IPv4 or IPv6 address")]
    IpBytes {
        /// The number of bytes it holds.
        len: usize,
    },

    /// A port number does not fit 16 bits. (Istio's ztunnel truncates it, which can turn a policy's port
    /// 65616 into port 80; refusing it is safer.)
    #[error("{value} is not a port number (0-65535)")]
    Port {
        /// The value sent.
        value: u32,
    },

    /// A CIDR prefix length is longer than its address.
    #[error("prefix length {length} is longer than the {max} bits of the address")]
    PrefixLength {
        /// The length sent.
        length: u32,
        /// 32 for IPv4, 128 for IPv6.
        max: u8,
    },

    /// An enum field holds a number this version does not know.
    #[error("{value} is not a known {enum_name} value")]
    UnknownEnum {
        /// The proto enum, e.g. `istio.workload.TunnelProtocol`.
        enum_name: &'static str,
        /// The number sent.
        value: i32,
    },

    /// A load-balancing routing preference is `UNSPECIFIED_SCOPE`, which names no locality dimension.
    #[error("UNSPECIFIED_SCOPE is not a locality scope")]
    UnspecifiedScope,

    /// A required message or oneof is not set.
    #[error("is not set")]
    Missing,

    /// A required string is empty.
    #[error("must not be empty")]
    Empty,

    /// A port list names the same service port twice, so the target port is ambiguous.
    #[error("service port {port} is listed more than once")]
    DuplicatePort {
        /// The repeated service port.
        port: u16,
    },

    /// A `namespace/hostname` key does not parse.
    #[error("{0}")]
    ServiceKey(Box<ModelError>),

    /// A trust domain, an identity built from a workload's fields, or a subject alternative name is not
    /// valid SPIFFE.
    #[error("{0}")]
    Identity(Box<mesh_core::Error>),
}

/// A refused field, before the resource it belongs to is known: conversions build these bottom-up and
/// the resource-level function wraps the result into an [`XdsError`].
#[derive(Debug)]
pub(crate) struct Invalid {
    field: String,
    problem: FieldProblem,
}

impl Invalid {
    /// `problem` at `field`.
    pub(crate) fn new(field: impl Into<String>, problem: FieldProblem) -> Self {
        Invalid {
            field: field.into(),
            problem,
        }
    }

    /// Qualifies the field with the path of the message holding it: `destination` within `waypoint`
    /// becomes `waypoint.destination`.
    pub(crate) fn within(mut self, parent: impl fmt::Display) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }

    pub(crate) fn for_workload(self, uid: &str) -> XdsError {
        XdsError::Workload {
            uid: truncate_for_log(uid),
            field: self.field,
            problem: self.problem,
        }
    }

    pub(crate) fn for_service(self, key: &str) -> XdsError {
        XdsError::Service {
            service: truncate_for_log(key),
            field: self.field,
            problem: self.problem,
        }
    }

    pub(crate) fn for_policy(self, key: &str) -> XdsError {
        XdsError::Authorization {
            policy: truncate_for_log(key),
            field: self.field,
            problem: self.problem,
        }
    }

    pub(crate) fn standalone(self) -> XdsError {
        XdsError::Field {
            field: self.field,
            problem: self.problem,
        }
    }
}

/// Resource names come from the network: cap what one of them can make us print (and send in a NACK).
pub(crate) fn truncate_for_log(input: &str) -> String {
    const LIMIT: usize = 128;
    match input.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}...", &input[..cut]),
        None => input.to_owned(),
    }
}

/// Prints `field: ` before a local configuration error's reason, or nothing when no field is named.
struct FieldPrefix<'a>(&'a str);

impl fmt::Display for FieldPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0)
        }
    }
}
