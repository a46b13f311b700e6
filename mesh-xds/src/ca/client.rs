//! [`IstioCaSigner`]: certificates from Istio's certificate service.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures_util::future::BoxFuture;
use mesh_core::cert::{SignRequest, SignedCert};
use mesh_core::{CertSigner, Error, SpiffeId};
use prost_types::value::Kind;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{IMPERSONATED_IDENTITY, MAX_CHAIN_CERTS};
use crate::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use crate::transport::CallCredentials;

/// Settings of [`IstioCaSigner`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IstioCaConfig {
    /// Node-proxy mode (ztunnel's shared mode): ask for each workload's certificate on its behalf, with
    /// `ImpersonatedIdentity` in the request's metadata.
    pub impersonate: bool,
    /// The CA's roots as configured (ztunnel's `CA_ROOT_CA`). The trust bundle of issued certificates is
    /// the response's `root_cert` if the CA sends it, otherwise these, otherwise the last certificate of
    /// the response's chain.
    pub roots: Vec<CertificateDer<'static>>,
    /// How long one call may take (also sent to the server as the gRPC deadline).
    pub timeout: Duration,
    /// The largest response accepted, in bytes (a chain of [`MAX_CHAIN_CERTS`] certificates is a few
    /// tens of kilobytes).
    pub max_response_bytes: usize,
}

impl Default for IstioCaConfig {
    fn default() -> Self {
        IstioCaConfig {
            impersonate: false,
            roots: Vec::new(),
            timeout: Duration::from_secs(10),
            max_response_bytes: 256 * 1024,
        }
    }
}

impl IstioCaConfig {
    /// Turns node-proxy (impersonation) mode on or off.
    pub fn with_impersonation(mut self, impersonate: bool) -> Self {
        self.impersonate = impersonate;
        self
    }

    /// Sets the configured roots.
    pub fn with_roots(mut self, roots: Vec<CertificateDer<'static>>) -> Self {
        self.roots = roots;
        self
    }

    /// Sets the per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// A [`CertSigner`] that calls `istio.v1.auth.IstioCertificateService/CreateCertificate`, as ztunnel's CA
/// client does.
///
/// Every failure is a [`mesh_core::Error::Signing`] naming the identity: a refusal carries the gRPC code
/// and the server's message (`PermissionDenied: ...`), a transport failure its cause (for example, a
/// server certificate that does not chain to the configured roots). The issued chain is checked before it
/// is returned: at most [`MAX_CHAIN_CERTS`] certificates, valid PEM, and a leaf that chains to the roots;
/// [`mesh_core::CachingCertProvider`] then checks that it carries the requested identity and key.
#[derive(Clone)]
pub struct IstioCaSigner {
    client: IstioCertificateServiceClient<InterceptedService<Channel, CallCredentials>>,
    config: IstioCaConfig,
}

impl IstioCaSigner {
    /// A signer calling the CA over `channel` (see [`crate::transport::connect_lazy`]) with `credentials`
    /// (the bearer token, `clusterid`, `CA_HEADER_*`).
    pub fn new(channel: Channel, credentials: CallCredentials, config: IstioCaConfig) -> Self {
        let client = IstioCertificateServiceClient::with_interceptor(channel, credentials)
            .max_decoding_message_size(config.max_response_bytes);
        IstioCaSigner { client, config }
    }

    async fn sign_request(&self, request: &SignRequest) -> Result<SignedCert, Error> {
        let identity = &request.identity;
        let failed = |reason: String| Error::Signing {
            identity: identity.clone(),
            reason,
        };
        let mut call = tonic::Request::new(IstioCertificateRequest {
            csr: request.csr_pem.clone(),
            validity_duration: i64::try_from(request.validity.as_secs()).unwrap_or(i64::MAX),
            metadata: self.config.impersonate.then(|| impersonation_metadata(identity)),
        });
        call.set_timeout(self.config.timeout);
        let mut client = self.client.clone();
        let response = tokio::time::timeout(self.config.timeout, client.create_certificate(call))
            .await
            .map_err(|_| failed(format!("no answer from the CA within {:?}", self.config.timeout)))?
            .map_err(|status| failed(describe_status(&status)))?
            .into_inner();
        signed_cert_from_response(&response, &self.config.roots, UnixTime::now()).map_err(failed)
    }
}

impl CertSigner for IstioCaSigner {
    fn sign<'a>(&'a self, request: &'a SignRequest) -> BoxFuture<'a, Result<SignedCert, Error>> {
        Box::pin(self.sign_request(request))
    }
}

impl fmt::Debug for IstioCaSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IstioCaSigner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn impersonation_metadata(identity: &SpiffeId) -> prost_types::Struct {
    prost_types::Struct {
        fields: BTreeMap::from([(
            IMPERSONATED_IDENTITY.to_owned(),
            prost_types::Value {
                kind: Some(Kind::StringValue(identity.as_str().to_owned())),
            },
        )]),
    }
}

/// `Code: message`, followed by the chain of causes (a transport failure's message alone says little).
fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The chain and roots out of a response, checked. The reason on failure completes "signing a certificate
/// for <identity> failed: ".
pub(super) fn signed_cert_from_response(
    response: &IstioCertificateResponse,
    configured_roots: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<SignedCert, String> {
    let certs = parse_pem_list("cert_chain", &response.cert_chain)?;
    let Some(leaf) = certs.first().cloned() else {
        return Err("the CA returned an empty cert_chain".to_owned());
    };
    let sent_roots = match &response.root_cert {
        Some(roots) => parse_pem_list("root_cert", &roots.ca_cert)?,
        None => Vec::new(),
    };
    let roots = if !sent_roots.is_empty() {
        sent_roots
    } else if !configured_roots.is_empty() {
        configured_roots.to_vec()
    } else {
        match certs.split_last() {
            Some((last, rest)) if !rest.is_empty() => vec![last.clone()],
            _ => return Err("the CA sent no root certificate and none is configured".to_owned()),
        }
    };
    // The roots travel as the trust bundle, not in the chain presented during handshakes.
    let chain: Vec<_> = std::iter::once(leaf)
        .chain(certs.into_iter().skip(1).filter(|cert| !roots.contains(cert)))
        .collect();
    verify_issued(&chain, &roots, now)?;
    Ok(SignedCert { chain, roots })
}

/// PEM strings, each holding one or more certificates, into certificates; bounded in number.
fn parse_pem_list(field: &str, entries: &[String]) -> Result<Vec<CertificateDer<'static>>, String> {
    if entries.len() > MAX_CHAIN_CERTS {
        return Err(format!(
            "the CA sent {} entries in {field}, at most {MAX_CHAIN_CERTS} are accepted",
            entries.len()
        ));
    }
    let mut certs = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let before = certs.len();
        for cert in CertificateDer::pem_slice_iter(entry.as_bytes()) {
            let cert = cert.map_err(|e| format!("{field}[{index}] is malformed PEM: {e}"))?;
            if certs.len() == MAX_CHAIN_CERTS {
                return Err(format!(
                    "the CA sent more than {MAX_CHAIN_CERTS} certificates in {field}"
                ));
            }
            certs.push(cert);
        }
        if certs.len() == before {
            return Err(format!("{field}[{index}] holds no PEM certificate"));
        }
    }
    Ok(certs)
}

/// Refuses an issued leaf that does not chain to the roots it will be trusted with: such a certificate
/// would fail every handshake with a peer, so it is better reported now, as the CA's fault.
fn verify_issued(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<(), String> {
    let anchors = roots
        .iter()
        .map(|root| {
            webpki::anchor_from_trusted_cert(root).map_err(|e| format!("unusable root certificate: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if chain.is_empty() {
        return Err("the CA returned an empty cert_chain".to_owned());
    }
    mesh_core::cert::verify_chain(chain, &anchors, now)
        .map_err(|e| format!("the issued certificate does not chain to the roots: {e}"))
}
