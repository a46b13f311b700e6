//! # mesh-test
//!
//! Shared fixtures for meshkit's tests and benches (not published).
//!
//! ## Layout
//! - [`TestPki`]: a development CA for one trust domain that issues Istio identities in one call.
//! - [`tls_pair`]: a mutual-TLS client and server connected over real loopback TCP.
//! - [`netns`]: network namespaces joined by veth pairs, for end-to-end tests, inside a [`sandbox`].
//! - [`sandbox`]: runs a test in new user, network, mount and PID namespaces of its own
//!   ([`netns::isolated`]), so it needs no root and cannot touch the host's network (a test that cannot
//!   have one fails and says what to install or enable).
//! - [`cni`]: a fake istio-cni, [`cni::FakeCni`], that hands a node proxy in in-pod mode its pods and
//!   their network namespaces over ZDS, and reads its acks with a timeout.
//!
//! ## Example
//! ```
//! let pki = mesh_test::TestPki::new();
//! let cert = pki.cert("default", "client");
//! assert_eq!(cert.identity().as_str(), "spiffe://cluster.local/ns/default/sa/client");
//! ```
#![forbid(unsafe_code)]

pub mod cni;
pub mod netns;
pub mod sandbox;

use std::sync::Arc;
use std::time::Duration;

use mesh_core::{CertWatch, DevCa, SpiffeId, TrustDomain, tls};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// Lifetime of certificates issued by [`TestPki::cert`]: long enough for any test.
pub const TEST_CERT_LIFETIME: Duration = Duration::from_secs(3600);

/// A development CA for one trust domain, with helpers that issue Istio-shaped identities.
///
/// Methods panic on failure: they only fail if certificate generation itself is broken, which should fail
/// the test that called them.
#[derive(Debug, Clone)]
pub struct TestPki {
    ca: Arc<DevCa>,
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// A PKI for `cluster.local`.
    pub fn new() -> Self {
        Self::for_trust_domain("cluster.local")
    }

    /// A PKI for another trust domain (for cross-domain refusal tests).
    pub fn for_trust_domain(trust_domain: &str) -> Self {
        #[allow(clippy::expect_used)]
        let td = TrustDomain::new(trust_domain).expect("test trust domain must be valid");
        #[allow(clippy::expect_used)]
        let ca = DevCa::new(td, Duration::from_secs(24 * 3600)).expect("dev CA generation");
        TestPki { ca: Arc::new(ca) }
    }

    /// The CA itself, to sign CSRs or issue unusual certificates.
    pub fn ca(&self) -> &Arc<DevCa> {
        &self.ca
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn id(&self, namespace: &str, service_account: &str) -> SpiffeId {
        #[allow(clippy::expect_used)]
        SpiffeId::istio(self.trust_domain(), namespace, service_account).expect("test identity must be valid")
    }

    /// A fixed certificate for `namespace/service_account`, valid for [`TEST_CERT_LIFETIME`].
    pub fn cert(&self, namespace: &str, service_account: &str) -> CertWatch {
        #[allow(clippy::expect_used)]
        let cert = self
            .ca
            .issue(&self.id(namespace, service_account), TEST_CERT_LIFETIME)
            .expect("issuing a test certificate");
        CertWatch::fixed(cert)
    }
}

/// Both ends of a mutual-TLS connection over loopback TCP.
#[derive(Debug)]
pub struct TlsPair {
    /// The client end.
    pub client: client::TlsStream<TcpStream>,
    /// The server end.
    pub server: server::TlsStream<TcpStream>,
}

/// Connects a client presenting `client_cert` (expecting `expected` server identities) to a server
/// presenting `server_cert` (accepting its own trust domain), over real loopback TCP, and returns both
/// ends, or the first side's handshake error.
pub async fn tls_pair(
    client_cert: CertWatch,
    expected: Vec<SpiffeId>,
    server_cert: CertWatch,
) -> Result<TlsPair, std::io::Error> {
    let trust_domain = server_cert.identity().trust_domain();
    let server_config = tls::server_config(server_cert, vec![trust_domain]).map_err(std::io::Error::other)?;
    let client_config = tls::client_config(client_cert, expected).map_err(std::io::Error::other)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accept = async {
        let (tcp, _) = listener.accept().await?;
        TlsAcceptor::from(server_config).accept(tcp).await
    };
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(client_config)
            .connect(tls::server_name(), tcp)
            .await
    };
    let (server, client) = tokio::join!(accept, connect);
    Ok(TlsPair {
        client: client?,
        server: server?,
    })
}
