//! The acceptor driven frame by frame over an in-memory pipe (mesh_hbone::testkit): requests our connector
//! would never send, and the limits a hostile client runs into.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use mesh_core::drain::{self, DrainWatch};
use mesh_core::tls;
use mesh_hbone::testkit::{FrameClient, StreamAnswer, flags, frame_type};
use mesh_hbone::{HboneAcceptor, HboneConfig, InboundTunnel};
use mesh_test::TestPki;
use tokio::io::AsyncWriteExt;
use tower::service_fn;

const PROTOCOL_ERROR: u32 = 0x1;
const REFUSED_STREAM: u32 = 0x7;

fn local() -> SocketAddr {
    "10.0.0.2:15008".parse().unwrap()
}

fn peer() -> SocketAddr {
    "10.0.0.1:40000".parse().unwrap()
}

/// Echoes each tunnel; with `hold`, keeps tunnels unanswered for a minute instead.
async fn client(
    hold: bool,
    config: HboneConfig,
) -> (
    FrameClient,
    tokio::task::JoinHandle<Result<(), mesh_hbone::HboneError>>,
    DrainWatch,
) {
    let pki = TestPki::new();
    let server_tls =
        tls::server_config(pki.cert("default", "server"), vec![pki.trust_domain().clone()]).unwrap();
    let service = service_fn(move |tunnel: InboundTunnel| async move {
        if hold {
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(tunnel);
        } else {
            let stream = tunnel.accept(HeaderMap::new()).unwrap();
            let (mut read, mut write) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        }
        Ok::<(), Infallible>(())
    });
    let acceptor = Arc::new(HboneAcceptor::new(config, server_tls, service));
    let (trigger, watch) = drain::channel();
    std::mem::forget(trigger); // never drained in these tests
    let (client, task) = FrameClient::connect(
        acceptor,
        pki.cert("default", "client"),
        pki.id("default", "server"),
        peer(),
        local(),
        watch.clone(),
    )
    .await
    .unwrap();
    (client, task, watch)
}

fn connect_headers(authority: &str) -> Vec<(&str, &str)> {
    vec![(":method", "CONNECT"), (":authority", authority)]
}

#[tokio::test]
async fn a_well_formed_connect_tunnels_bytes_frame_by_frame() {
    let (mut client, _task, _drain) = client(false, HboneConfig::default()).await;
    client
        .send_headers(1, &connect_headers("10.0.0.2:8080"), false)
        .await
        .unwrap();
    let answer = client.answer(1).await.unwrap().unwrap();
    assert_eq!(answer.status(), Some(200), "{answer:?}");
    client.send_data(1, b"frame by frame", true).await.unwrap();
    assert_eq!(client.read_body(1).await.unwrap(), b"frame by frame");
}

#[tokio::test]
async fn methods_are_matched_exactly() {
    // An extension method spelled `connect` is not CONNECT: refused, never tunnelled.
    let (mut client, _task, _drain) = client(false, HboneConfig::default()).await;
    client
        .send_headers(
            1,
            &[(":method", "connect"), (":authority", "10.0.0.2:8080")],
            false,
        )
        .await
        .unwrap();
    let answer = client.answer(1).await.unwrap().unwrap();
    assert!(
        answer.status() == Some(400) || answer == StreamAnswer::Reset(PROTOCOL_ERROR),
        "{answer:?}"
    );
}

#[tokio::test]
async fn malformed_connects_never_get_a_tunnel() {
    let cases: Vec<Vec<(&str, &str)>> = vec![
        // No :authority.
        vec![(":method", "CONNECT")],
        // A classic CONNECT must not carry :scheme or :path.
        vec![
            (":method", "CONNECT"),
            (":scheme", "https"),
            (":path", "/"),
            (":authority", "10.0.0.2:8080"),
        ],
        // An authority that is not host:port.
        vec![(":method", "CONNECT"), (":authority", "10.0.0.2")],
        // The CONNECT IP is not the address the connection arrived on.
        connect_headers("10.0.0.3:8080"),
        // The proxy's own ports.
        connect_headers("10.0.0.2:15008"),
        connect_headers("10.0.0.2:15006"),
    ];
    for headers in cases {
        let (mut client, _task, _drain) = client(false, HboneConfig::default()).await;
        client.send_headers(1, &headers, false).await.unwrap();
        let answer = client.answer(1).await.unwrap();
        let refused = match &answer {
            Some(answer @ StreamAnswer::Response(_)) => answer.status() == Some(400),
            Some(StreamAnswer::Reset(_) | StreamAnswer::GoAway(_)) => true,
            None => false,
        };
        assert!(refused, "{headers:?} got {answer:?}");
    }
}

#[tokio::test]
async fn oversized_header_lists_are_refused() {
    let (mut client, _task, _drain) = client(false, HboneConfig::default()).await;
    let big = "x".repeat(70 * 1024);
    let mut headers = connect_headers("10.0.0.2:8080");
    headers.push(("baggage", &big));
    // One header block over the 64 KiB limit, split across HEADERS and CONTINUATION frames.
    let block = client.encode(&headers);
    let (first, rest) = block.split_at(16 * 1024);
    client.send_frame(frame_type::HEADERS, 0, 1, first).await.unwrap();
    for (i, chunk) in rest.chunks(16 * 1024).enumerate() {
        let last = (i + 1) * 16 * 1024 >= rest.len();
        let flags = if last { flags::END_HEADERS } else { 0 };
        client
            .send_frame(frame_type::CONTINUATION, flags, 1, chunk)
            .await
            .unwrap();
    }
    let answer = client.answer(1).await.unwrap();
    let refused = match &answer {
        Some(answer @ StreamAnswer::Response(_)) => answer.status() == Some(431),
        Some(StreamAnswer::Reset(_) | StreamAnswer::GoAway(_)) => true,
        None => false,
    };
    assert!(refused, "{answer:?}");
}

#[tokio::test]
async fn streams_beyond_the_concurrency_limit_are_refused() {
    let config = HboneConfig {
        server_max_concurrent_streams: 5,
        ..HboneConfig::default()
    };
    let (mut client, _task, _drain) = client(true, config).await;
    // Read the server's SETTINGS first, as a client must before exceeding the default limit.
    let settings = client.read_frame().await.unwrap().unwrap();
    assert_eq!(settings.kind, frame_type::SETTINGS);
    client
        .send_frame(frame_type::SETTINGS, flags::ACK, 0, &[])
        .await
        .unwrap();
    for stream_id in (1..=11).step_by(2) {
        client
            .send_headers(stream_id, &connect_headers("10.0.0.2:8080"), false)
            .await
            .unwrap();
    }
    // Streams 1..9 are held by the service; stream 11 is the sixth and must be refused.
    let answer = tokio::time::timeout(Duration::from_secs(5), client.answer(11))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            answer,
            Some(StreamAnswer::Reset(REFUSED_STREAM | PROTOCOL_ERROR)) | Some(StreamAnswer::GoAway(_))
        ),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_client_reset_reaches_the_service_and_the_connection_lives_on() {
    let (mut client, _task, _drain) = client(false, HboneConfig::default()).await;
    client
        .send_headers(1, &connect_headers("10.0.0.2:8080"), false)
        .await
        .unwrap();
    assert_eq!(client.answer(1).await.unwrap().unwrap().status(), Some(200));
    client
        .send_frame(frame_type::RST_STREAM, 0, 1, &8u32.to_be_bytes())
        .await
        .unwrap();
    // The connection still serves new streams.
    client
        .send_headers(3, &connect_headers("10.0.0.2:8080"), false)
        .await
        .unwrap();
    assert_eq!(client.answer(3).await.unwrap().unwrap().status(), Some(200));
    client.send_data(3, b"still alive", true).await.unwrap();
    assert_eq!(client.read_body(3).await.unwrap(), b"still alive");
}

#[tokio::test]
async fn garbage_instead_of_frames_ends_the_connection_with_an_error() {
    let (mut client, task, _drain) = client(false, HboneConfig::default()).await;
    // A frame of an unknown type is ignored (RFC 9113 5.5); a DATA frame on stream 0 is a connection error.
    client.send_frame(0xfa, 0, 0, b"unknown").await.unwrap();
    client
        .send_frame(frame_type::DATA, 0, 0, b"no stream")
        .await
        .unwrap();
    let mut saw_goaway = false;
    while let Ok(Some(frame)) = client.read_frame().await {
        if frame.kind == frame_type::GOAWAY {
            assert_eq!(frame.error_code(), Some(PROTOCOL_ERROR));
            saw_goaway = true;
        }
    }
    assert!(saw_goaway);
    let served = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(served.is_err(), "{served:?}");
    let _ = client;
}
