//! One gRPC endpoint for both services, as istiod serves them on 15012.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tonic::body::Body;
use tower::Service;

use super::AdsService;
use crate::ca::CaService;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use crate::proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;

const ADS_PREFIX: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/";
const CA_PREFIX: &str = "/istio.v1.auth.IstioCertificateService/";

/// Dispatches gRPC requests to the ADS or the CA service by method path; anything else is
/// `UNIMPLEMENTED`. (tonic's own router needs its `router` feature and axum; two services need no more
/// than this.)
#[derive(Debug, Clone)]
pub struct GrpcRouter {
    ads: AggregatedDiscoveryServiceServer<AdsService>,
    ca: Option<IstioCertificateServiceServer<CaService>>,
}

impl GrpcRouter {
    /// Routes to `ads`, and to `ca` when there is one.
    pub fn new(ads: AdsService, ca: Option<CaService>) -> Self {
        GrpcRouter {
            ads: ads.into_server(),
            ca: ca.map(CaService::into_server),
        }
    }
}

impl Service<http::Request<Body>> for GrpcRouter {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both generated servers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if path.starts_with(ADS_PREFIX) {
            return Box::pin(self.ads.call(request));
        }
        if path.starts_with(CA_PREFIX)
            && let Some(ca) = &mut self.ca
        {
            return Box::pin(ca.call(request));
        }
        let status = tonic::Status::unimplemented(format!(
            "{} is not served here",
            crate::error::truncate_for_log(path)
        ));
        Box::pin(std::future::ready(Ok(status.into_http())))
    }
}
