//! A full SPIFFE mutual-TLS handshake on loopback (TCP connect + TLS 1.3 + both verifiers), with plain TCP
//! connect on loopback as the same-run baseline.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_test::{TestPki, tls_pair};
use tokio::net::{TcpListener, TcpStream};

fn handshake(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pki = TestPki::new();
    let client = pki.cert("default", "client");
    let server = pki.cert("default", "server");
    let expected = vec![pki.id("default", "server")];

    let mut group = c.benchmark_group("loopback_connect");
    group.bench_function("baseline_tcp", |b| {
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        b.iter(|| {
            rt.block_on(async {
                let (accepted, connected) = tokio::join!(listener.accept(), TcpStream::connect(addr));
                (accepted.expect("accept"), connected.expect("connect"))
            })
        })
    });
    group.bench_function("mtls_handshake", |b| {
        b.iter(|| {
            rt.block_on(tls_pair(client.clone(), expected.clone(), server.clone()))
                .expect("handshake")
        })
    });
    group.finish();
}

criterion_group!(benches, handshake);
criterion_main!(benches);
