//! [`CaService`]: Istio's certificate service for a local control plane.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use mesh_core::{DevCa, SpiffeId};
use prost_types::value::Kind;
use rustls_pki_types::CertificateDer;
use tonic::{Request, Response, Status};

use super::authn::{CallInfo, Caller, CallerAuthenticator, NodeAuthorizer};
use super::{IMPERSONATED_IDENTITY, csr};
use crate::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use crate::transport::ConnectionInfo;

/// The largest request accepted, in bytes: a CSR and a little metadata.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Istio's certificate service, signing with a [`DevCa`]: the CA of a local control plane.
///
/// Each call is decided as istiod decides it:
/// 1. **Authenticate** the caller with the configured [`CallerAuthenticator`]s, in order; the first that
///    succeeds names the caller. None configured, or none succeeding: `Unauthenticated`.
/// 2. **Check the CSR**: its signature, and exactly one URI SAN holding a SPIFFE ID in the CA's trust
///    domain; otherwise `InvalidArgument`. (Unlike istiod, which ignores the CSR's SANs and certifies the
///    caller's identity, the CSR must ask for exactly the identity it will get, so a mistaken client sees
///    its mistake.)
/// 3. **Authorize**: without `ImpersonatedIdentity`, the CSR's identity must be the caller's. With it, the
///    impersonated identity must be the CSR's, the caller must be one of the configured impersonators
///    (node proxies such as `spiffe://cluster.local/ns/istio-system/sa/ztunnel`) with a known node, and the
///    [`NodeAuthorizer`] must confirm that a workload with that identity runs on that node. Refusals are
///    `PermissionDenied`; istiod answers an opaque `Unauthenticated` here, we say why, since this server
///    is for development.
/// 4. **Sign** for the requested validity (the default when the request gives none), capped by the CA's
///    maximum, and answer `cert_chain = [leaf, root]` in PEM, as istiod does.
///
/// Refusals are logged at info, with the caller's address.
#[derive(Clone)]
pub struct CaService {
    ca: Arc<DevCa>,
    authenticators: Vec<Arc<dyn CallerAuthenticator>>,
    impersonators: HashSet<SpiffeId>,
    node_authorizer: Option<Arc<dyn NodeAuthorizer>>,
    default_validity: Duration,
}

impl CaService {
    /// A service signing with `ca`. It authenticates nobody until an authenticator is added.
    pub fn new(ca: Arc<DevCa>) -> Self {
        CaService {
            ca,
            authenticators: Vec::new(),
            impersonators: HashSet::new(),
            node_authorizer: None,
            default_validity: Duration::from_secs(24 * 60 * 60),
        }
    }

    /// Adds an authenticator, tried after those added before it.
    pub fn with_authenticator(mut self, authenticator: impl CallerAuthenticator + 'static) -> Self {
        self.authenticators.push(Arc::new(authenticator));
        self
    }

    /// Adds a shared authenticator, tried after those added before it.
    pub fn with_shared_authenticator(mut self, authenticator: Arc<dyn CallerAuthenticator>) -> Self {
        self.authenticators.push(authenticator);
        self
    }

    /// Lets the callers with these identities impersonate the workloads on their node (Istio's
    /// `CA_TRUSTED_NODE_ACCOUNTS`).
    pub fn with_impersonators(mut self, identities: impl IntoIterator<Item = SpiffeId>) -> Self {
        self.impersonators.extend(identities);
        self
    }

    /// Sets the check that a workload with an identity runs on a node. Without one, impersonation is
    /// always refused.
    pub fn with_node_authorizer(mut self, authorizer: impl NodeAuthorizer + 'static) -> Self {
        self.node_authorizer = Some(Arc::new(authorizer));
        self
    }

    /// The validity granted when a request asks for none (24 h by default, Istio's `SECRET_TTL`).
    pub fn with_default_validity(mut self, validity: Duration) -> Self {
        self.default_validity = validity;
        self
    }

    /// The tonic service, refusing requests larger than 64 KiB.
    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    async fn authenticate(&self, call: &CallInfo<'_>) -> Result<Caller, Status> {
        let mut reasons = Vec::new();
        for authenticator in &self.authenticators {
            match authenticator.authenticate(call).await {
                Ok(caller) => return Ok(caller),
                Err(error) => reasons.push(error.to_string()),
            }
        }
        if reasons.is_empty() {
            reasons.push("no authenticator is configured".to_owned());
        }
        Err(Status::unauthenticated(format!(
            "request authentication failed: {}",
            reasons.join("; ")
        )))
    }

    fn authorize(
        &self,
        caller: &Caller,
        requested: &SpiffeId,
        impersonated: Option<&str>,
    ) -> Result<(), Status> {
        let Some(impersonated) = impersonated else {
            if caller.identity == *requested {
                return Ok(());
            }
            return Err(Status::permission_denied(format!(
                "caller {caller} may only have its own identity certified, not {requested}"
            )));
        };
        let impersonated = SpiffeId::parse(impersonated).map_err(|e| {
            Status::invalid_argument(format!(
                "metadata {IMPERSONATED_IDENTITY} is not a SPIFFE ID: {e}"
            ))
        })?;
        if impersonated != *requested {
            return Err(Status::invalid_argument(format!(
                "metadata {IMPERSONATED_IDENTITY} {impersonated} differs from the CSR's identity {requested}"
            )));
        }
        if !self.impersonators.contains(&caller.identity) {
            return Err(Status::permission_denied(format!(
                "caller {caller} is not allowed to impersonate: it is not a trusted node proxy"
            )));
        }
        // An empty node name is no node: it would match every workload whose node is not known.
        let Some(node) = caller.node.as_deref().filter(|node| !node.is_empty()) else {
            return Err(Status::permission_denied(format!(
                "caller {caller} runs on no known node, so it may not impersonate"
            )));
        };
        let Some(authorizer) = &self.node_authorizer else {
            return Err(Status::permission_denied(
                "impersonation is disabled: no node authorizer is configured",
            ));
        };
        if !authorizer.runs_on_node(node, &impersonated) {
            return Err(Status::permission_denied(format!(
                "no workload with identity {impersonated} runs on node {node}"
            )));
        }
        Ok(())
    }

    async fn create(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let connection = request.extensions().get::<ConnectionInfo>().cloned();
        let remote_addr = connection
            .as_ref()
            .map(ConnectionInfo::remote_addr)
            .or_else(|| request.remote_addr());
        let (metadata, _, body) = request.into_parts();
        let refuse = |status: Status| {
            tracing::info!(
                peer = ?remote_addr,
                code = ?status.code(),
                reason = status.message(),
                "CA request refused"
            );
            status
        };
        let csr = csr::inspect(&body.csr, self.ca.trust_domain());
        let impersonated = impersonated_identity(body.metadata.as_ref());
        let call = CallInfo {
            metadata: &metadata,
            connection: connection.as_ref(),
            remote_addr,
            requested_identity: csr.as_ref().ok().map(|csr| &csr.identity),
            impersonation: matches!(impersonated, Ok(Some(_))),
        };
        let caller = self.authenticate(&call).await.map_err(refuse)?;
        let csr = csr.map_err(|reason| refuse(Status::invalid_argument(reason)))?;
        let impersonated = impersonated.map_err(|reason| refuse(Status::invalid_argument(reason)))?;
        self.authorize(&caller, &csr.identity, impersonated.as_deref())
            .map_err(refuse)?;
        let validity = match u64::try_from(body.validity_duration) {
            Ok(seconds) if seconds > 0 => Duration::from_secs(seconds),
            _ => self.default_validity,
        };
        let leaf = self
            .ca
            .sign_csr(&csr.identity, &csr.der, validity)
            .map_err(|error| {
                tracing::warn!(identity = %csr.identity, %error, "signing a CSR failed");
                Status::internal(format!("signing failed: {error}"))
            })?;
        tracing::debug!(%caller, identity = %csr.identity, ?validity, "issued a certificate");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![pem_certificate(&leaf), pem_certificate(self.ca.root_cert())],
            root_cert: None,
        }))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.create(request).await
    }
}

impl fmt::Debug for CaService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaService")
            .field("ca", &self.ca)
            .field("authenticators", &self.authenticators)
            .field("impersonators", &self.impersonators)
            .field("node_authorizer", &self.node_authorizer.is_some())
            .field("default_validity", &self.default_validity)
            .finish()
    }
}

/// The `ImpersonatedIdentity` metadata: absent or empty means none (as istiod reads it); any value that
/// is not a string is refused rather than ignored.
fn impersonated_identity(metadata: Option<&prost_types::Struct>) -> Result<Option<String>, String> {
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(id)) if id.is_empty() => Ok(None),
        Some(Kind::StringValue(id)) => Ok(Some(id.clone())),
        None | Some(Kind::NullValue(_)) => Ok(None),
        Some(_) => Err(format!("metadata {IMPERSONATED_IDENTITY} must be a string")),
    }
}

/// One certificate as PEM, with the trailing newline istiod adds so that entries can be concatenated.
fn pem_certificate(der: &CertificateDer<'_>) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::with_capacity(body.len() + body.len() / 64 + 64);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
pub(super) fn pem_for_tests(der: &CertificateDer<'_>) -> String {
    pem_certificate(der)
}
