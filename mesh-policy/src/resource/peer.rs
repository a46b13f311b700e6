//! `PeerAuthentication` (security.istio.io/v1): whether a workload accepts plaintext.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{NumberOrString, ObjectMeta, WorkloadSelector, invalid, parse_port};
use crate::error::PolicyError;

const KIND: &str = "PeerAuthentication";

/// An Istio PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    /// Name and namespace (the root namespace makes it mesh-wide).
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

/// `spec` of a PeerAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; none means the whole namespace (or mesh, in the root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// The mode for every port.
    #[serde(default)]
    pub mtls: Option<PeerMtls>,
    /// Per-port overrides, keyed by the workload's (target) port, written as a number (`8080:`) or a string
    /// (`"8080":`). Only valid with a selector.
    #[serde(default, deserialize_with = "port_keys")]
    pub port_level_mtls: BTreeMap<String, PeerMtls>,
}

/// `mtls` of a PeerAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PeerMtls {
    /// The mode, as written.
    #[serde(default)]
    pub mode: Option<String>,
}

/// A validated mutual-TLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// Inherit from the enclosing scope.
    Unset,
    /// Plaintext is refused.
    Strict,
    /// Both mutual TLS and plaintext are accepted.
    Permissive,
    /// Mutual TLS is not required (in ambient mode ztunnel still speaks HBONE with mesh peers).
    Disable,
}

impl PeerMtls {
    /// The validated mode (`UNSET` when not written).
    pub fn mode(&self) -> Result<MtlsMode, String> {
        match self.mode.as_deref() {
            None | Some("UNSET") => Ok(MtlsMode::Unset),
            Some("STRICT") => Ok(MtlsMode::Strict),
            Some("PERMISSIVE") => Ok(MtlsMode::Permissive),
            Some("DISABLE") => Ok(MtlsMode::Disable),
            Some(other) => Err(format!(
                "unknown mode {other:?} (UNSET, DISABLE, PERMISSIVE or STRICT)"
            )),
        }
    }
}

/// Reads `portLevelMtls` keys as Istio's examples write them (bare numbers) or as strings.
fn port_keys<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, PeerMtls>, D::Error> {
    let raw: BTreeMap<NumberOrString, PeerMtls> = Deserialize::deserialize(deserializer)?;
    Ok(raw
        .into_iter()
        .map(|(port, mtls)| (port.as_text(), mtls))
        .collect())
}

impl PeerAuthentication {
    /// Refuses what Istio's validation refuses, naming the field.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let meta = &self.metadata;
        if meta.name.is_empty() {
            return Err(invalid(KIND, meta, "metadata.name", "must not be empty"));
        }
        if let Some(mtls) = &self.spec.mtls {
            mtls.mode()
                .map_err(|reason| invalid(KIND, meta, "spec.mtls.mode", reason))?;
        }
        if !self.spec.port_level_mtls.is_empty() && self.spec.selector.is_none() {
            return Err(invalid(KIND, meta, "spec.portLevelMtls", "needs a selector"));
        }
        for (port, mtls) in &self.spec.port_level_mtls {
            let field = format!("spec.portLevelMtls[{port}]");
            parse_port(port).map_err(|reason| invalid(KIND, meta, field.clone(), reason))?;
            mtls.mode()
                .map_err(|reason| invalid(KIND, meta, format!("{field}.mode"), reason))?;
        }
        Ok(())
    }
}
