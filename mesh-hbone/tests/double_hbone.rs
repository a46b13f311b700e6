//! Double HBONE through an east-west gateway on loopback: the outer tunnel ends at the gateway, the inner
//! one (with its own mutual TLS) at the destination, and the gateway relays bytes it cannot read.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue};
use mesh_core::cert::StaticCertProvider;
use mesh_core::drain;
use mesh_core::tls;
use mesh_hbone::headers::X_FORWARDED_NETWORK;
use mesh_hbone::{ConnectRequest, HboneAcceptor, HboneConfig, HboneConnector, InboundTunnel, TunnelTarget};
use mesh_test::{TEST_CERT_LIFETIME, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::service_fn;

const SECRET: &[u8] = b"plaintext the gateway must never see";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_tunnel_is_end_to_end_through_the_gateway() {
    let pki = TestPki::new();
    let (_trigger, watch) = drain::channel();

    // The destination: echoes, and reports what it saw in its 200 response headers.
    let destination_tls =
        tls::server_config(pki.cert("default", "server"), vec![pki.trust_domain().clone()]).unwrap();
    let destination = service_fn(|tunnel: InboundTunnel| async move {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-seen-peer",
            HeaderValue::from_str(tunnel.peer_identity().as_str()).unwrap(),
        );
        if let Some(network) = tunnel.headers().get(X_FORWARDED_NETWORK) {
            headers.insert("x-seen-network", network.clone());
        }
        let stream = tunnel.accept(headers).unwrap();
        let (mut read, mut write) = tokio::io::split(stream);
        tokio::io::copy(&mut read, &mut write).await.unwrap();
        write.shutdown().await.unwrap();
        Ok::<(), Infallible>(())
    });
    let destination_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let destination_addr = destination_listener.local_addr().unwrap();
    tokio::spawn(
        HboneAcceptor::new(HboneConfig::default(), destination_tls, destination)
            .serve(destination_listener, watch.clone()),
    );

    // The east-west gateway: routes by the outer authority's hostname, relays bytes, and checks that the
    // secret never crosses it in the clear.
    let relayed = Arc::new(AtomicUsize::new(0));
    let saw_secret = Arc::new(AtomicBool::new(false));
    let gateway_tls = tls::server_config(
        pki.cert("istio-system", "eastwest"),
        vec![pki.trust_domain().clone()],
    )
    .unwrap();
    let (relayed_in, saw_secret_in) = (relayed.clone(), saw_secret.clone());
    let gateway = service_fn(move |tunnel: InboundTunnel| {
        let (relayed, saw_secret) = (relayed_in.clone(), saw_secret_in.clone());
        async move {
            assert_eq!(
                tunnel.target(),
                &TunnelTarget::Host {
                    host: "echo.default.svc.cluster.local".into(),
                    port: 8080
                }
            );
            let upstream = TcpStream::connect(destination_addr).await.unwrap();
            let stream = tunnel.accept(HeaderMap::new()).unwrap();
            let (mut from_client, mut to_client) = tokio::io::split(stream);
            let (mut from_upstream, mut to_upstream) = upstream.into_split();
            let forward = async {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = from_client.read(&mut buf).await.unwrap();
                    if n == 0 {
                        to_upstream.shutdown().await.unwrap();
                        return;
                    }
                    relayed.fetch_add(n, Ordering::Relaxed);
                    if buf[..n].windows(SECRET.len()).any(|w| w == SECRET) {
                        saw_secret.store(true, Ordering::Relaxed);
                    }
                    to_upstream.write_all(&buf[..n]).await.unwrap();
                }
            };
            let backward = async {
                tokio::io::copy(&mut from_upstream, &mut to_client).await.unwrap();
                to_client.shutdown().await.unwrap();
            };
            tokio::join!(forward, backward);
            Ok::<(), Infallible>(())
        }
    });
    let gateway_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_addr = gateway_listener.local_addr().unwrap();
    tokio::spawn(
        HboneAcceptor::new(HboneConfig::default(), gateway_tls, gateway)
            .allow_any_destination()
            .serve(gateway_listener, watch),
    );

    let client_id = pki.id("default", "client");
    let mut certs = StaticCertProvider::new();
    certs.insert(pki.ca().issue(&client_id, TEST_CERT_LIFETIME).unwrap());
    let connector = HboneConnector::new(HboneConfig::default(), Arc::new(certs));
    let outer = ConnectRequest::new(
        client_id.clone(),
        gateway_addr,
        vec![pki.id("istio-system", "eastwest")],
        "echo.default.svc.cluster.local:8080",
    );
    let inner = ConnectRequest::new(
        client_id.clone(),
        destination_addr,
        vec![pki.id("default", "server")],
        "127.0.0.1:8080",
    )
    .with_header(
        HeaderName::from_static(X_FORWARDED_NETWORK),
        HeaderValue::from_static("network-b"),
    );

    let mut stream = connector.connect_double(outer, inner).await.unwrap();
    // The inner session authenticated the destination, and the destination authenticated us, through the
    // gateway.
    assert_eq!(stream.peer_identity(), &pki.id("default", "server"));
    assert_eq!(stream.headers()["x-seen-peer"], client_id.as_str());
    assert_eq!(stream.headers()["x-seen-network"], "network-b");

    stream.write_all(SECRET).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, SECRET);
    assert!(
        relayed.load(Ordering::Relaxed) > SECRET.len(),
        "the gateway relayed the inner TLS session"
    );
    assert!(!saw_secret.load(Ordering::Relaxed), "the gateway saw plaintext");
    // One pooled outer connection; the inner session is not pooled.
    assert_eq!(connector.stats().open_connections, 1);
}
