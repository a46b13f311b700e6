//! Certificate rotation under live traffic: certificates with a few seconds of life rotate while a
//! long-lived connection stays up, and new connections present the new certificates.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_core::cert::CachingCertConfig;
use mesh_core::{CachingCertProvider, DevCa, SpiffeId, TrustDomain, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const LIFETIME: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_a_live_connection() {
    let td = TrustDomain::new("cluster.local").unwrap();
    let ca = DevCa::new(td.clone(), LIFETIME).unwrap();
    let provider = CachingCertProvider::new(
        Arc::new(ca),
        CachingCertConfig {
            validity: LIFETIME,
            ..CachingCertConfig::default()
        },
    );
    let client_id = SpiffeId::istio(&td, "default", "client").unwrap();
    let server_id = SpiffeId::istio(&td, "default", "server").unwrap();
    let client_cert = provider.fetch(&client_id).await.unwrap();
    let server_cert = provider.fetch(&server_id).await.unwrap();
    let first_client_leaf = client_cert.current().chain()[0].clone();
    let first_server_leaf = server_cert.current().chain()[0].clone();
    let first_expiry = client_cert
        .current()
        .not_after()
        .max(server_cert.current().not_after());

    // An echo server whose configuration is built once, before any rotation.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(tls::server_config(server_cert.clone(), vec![td.clone()]).unwrap());
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut stream = acceptor.accept(tcp).await.unwrap();
            seen_tx
                .send(stream.get_ref().1.peer_certificates().unwrap()[0].clone())
                .unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => stream.write_all(&buf[..n]).await.unwrap(),
                    }
                }
            });
        }
    });
    // The client configuration is also built once: rotation must reach it through the watch.
    let connector =
        TlsConnector::from(tls::client_config(client_cert.clone(), vec![server_id.clone()]).unwrap());
    let connect = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector.connect(tls::server_name(), tcp).await.unwrap()
    };

    let mut long_lived = connect().await;
    assert_eq!(seen_rx.recv().await.unwrap(), first_client_leaf);
    assert_eq!(
        long_lived.get_ref().1.peer_certificates().unwrap()[0],
        first_server_leaf
    );

    // Keep traffic flowing until both first certificates have expired, checking the echo each time.
    let mut rounds = 0u32;
    while SystemTime::now() < first_expiry + Duration::from_secs(1) {
        let message = format!("round {rounds}");
        long_lived.write_all(message.as_bytes()).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        long_lived.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message.as_bytes());
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        rounds >= 10,
        "the long-lived connection carried {rounds} round trips"
    );

    // Both certificates rotated (at half life), and a new connection uses the new ones on both sides. The
    // old ones have expired by now, so this handshake could not succeed with them.
    assert_ne!(client_cert.current().chain()[0], first_client_leaf);
    assert_ne!(server_cert.current().chain()[0], first_server_leaf);
    let fresh = connect().await;
    // (Compared with the first leaf, not with `current()`: another rotation may land at any moment.)
    let client_leaf = seen_rx.recv().await.unwrap();
    assert_ne!(client_leaf, first_client_leaf);
    assert_eq!(mesh_core::cert::svid_identity(&client_leaf).unwrap(), client_id);
    let server_leaf = fresh.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(server_leaf, first_server_leaf);
    assert_eq!(tls::peer_identity(fresh.get_ref().1).unwrap(), server_id);

    // And the long-lived connection is still up.
    long_lived.write_all(b"still here").await.unwrap();
    let mut echoed = [0u8; 10];
    long_lived.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"still here");
}
