//! HBONE on loopback, each figure beside a baseline measured in the same run:
//! - `hbone_stream_open_warm`: one CONNECT + `200` on an already-pooled connection, then drop the stream;
//!   against a plain TCP connect, and against one 1-byte round trip on an established mutual-TLS
//!   connection (the least a CONNECT on an open connection can cost).
//! - `bulk_copy_one_stream`: 64 MiB client -> server through one HBONE stream, against the same bytes
//!   through one plain mutual-TLS connection (and through plain TCP, the ceiling of both). Two HBONE
//!   variants: `hbone_stream` through `AsyncRead`/`AsyncWrite` (the caller's slices are copied in and out),
//!   and `hbone_stream_chunks` through `poll_write_chunk`/`poll_read_chunk`, the zero-copy path that
//!   `mesh_proxy::forward` takes (the caller hands over owned `Bytes` and takes the received frames).
//! - `hbone_handshake_first_byte`: a fresh connection per iteration (TCP, mutual TLS, HTTP/2, CONNECT and
//!   one echoed byte), against a plain mutual-TLS handshake and one echoed byte.
//!
//! Everything runs on a two-worker tokio runtime: each measured routine is spawned onto it and times
//! itself, so client and server share the same two threads. Every network step has a timeout, so a broken
//! build fails the bench (or `cargo test --all-targets`) instead of hanging it.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use mesh_core::cert::StaticCertProvider;
use mesh_core::drain::{self, DrainTrigger};
use mesh_core::{CertProvider, tls};
use mesh_hbone::{ConnectRequest, HboneAcceptor, HboneConfig, HboneConnector, HboneStream, InboundTunnel};
use mesh_test::{TEST_CERT_LIFETIME, TestPki};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
// rustls, named through tokio-rustls so the bench needs no direct rustls dependency.
use tokio_rustls::rustls::{client as rustls_client, server as rustls_server};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Bytes moved per iteration of the bulk benches.
const BULK_BYTES: usize = 64 << 20;
/// Size of every write in the bulk benches (and of every read buffer on the receiving side).
const CHUNK: usize = 64 << 10;
/// Upper bound for any one step (a connect, one bulk iteration, one round trip): generous for a loaded
/// machine, but a hang becomes a panic with a message.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// The CONNECT authority: the address the acceptor sees connections arrive on, and not a proxy port.
const AUTHORITY: &str = "127.0.0.1:8080";

fn runtime() -> Runtime {
    // As ztunnel's `main` does: HBONE's bulk path frees a frame buffer per DATA frame, and glibc's default
    // would hand each one back to the kernel (see mesh_core::sys::allocator). Plain mTLS allocates nothing
    // per read, so the baselines are not affected.
    let _ = mesh_core::sys::allocator::tune(mesh_core::sys::allocator::Tuning::PROXY);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Awaits `future` for at most [`STEP_TIMEOUT`], panicking with `what` if it takes longer.
async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {STEP_TIMEOUT:?}"))
}

/// Runs `routine` for `iters` iterations as a task on `rt`, handing it the bench's state and taking the
/// state back; returns the time the routine measured.
fn spawn_timed<S, F, Fut>(rt: &Runtime, state: &mut Option<S>, iters: u64, routine: F) -> Duration
where
    S: Send + 'static,
    F: FnOnce(S, u64) -> Fut,
    Fut: Future<Output = (S, Duration)> + Send + 'static,
{
    let taken = state.take().expect("bench state is returned after every run");
    let task = rt.spawn(routine(taken, iters));
    let (returned, elapsed) = rt.block_on(task).expect("bench routine panicked");
    *state = Some(returned);
    elapsed
}

/// Identities, certificates and TLS configurations shared by all benches.
struct Fixture {
    pki: TestPki,
    certs: Arc<dyn CertProvider>,
    server_tls: Arc<rustls_server::ServerConfig>,
    client_tls: Arc<rustls_client::ClientConfig>,
}

impl Fixture {
    fn new() -> Fixture {
        let pki = TestPki::new();
        let mut certs = StaticCertProvider::new();
        certs.insert(
            pki.ca()
                .issue(&pki.id("default", "client"), TEST_CERT_LIFETIME)
                .expect("client certificate"),
        );
        let server_tls = tls::server_config(pki.cert("default", "server"), vec![pki.trust_domain().clone()])
            .expect("server TLS config");
        let client_tls = tls::client_config(pki.cert("default", "client"), vec![pki.id("default", "server")])
            .expect("client TLS config");
        Fixture {
            pki,
            certs: Arc::new(certs),
            server_tls,
            client_tls,
        }
    }

    fn request(&self, server: SocketAddr) -> ConnectRequest {
        ConnectRequest::new(
            self.pki.id("default", "client"),
            server,
            vec![self.pki.id("default", "server")],
            AUTHORITY,
        )
    }

    fn connector(&self) -> HboneConnector {
        HboneConnector::new(HboneConfig::default(), self.certs.clone())
    }
}

/// What a server does with each tunnel or connection.
#[derive(Clone)]
enum Serve {
    /// Echo bytes back until EOF or error.
    Echo,
    /// Read and discard; send one `()` on the channel per [`BULK_BYTES`] received.
    Sink(mpsc::UnboundedSender<()>),
    /// As `Sink`, but an HBONE stream is read frame by frame with `poll_read_chunk` (see
    /// [`sink_chunks`]); other transports are served as `Sink`.
    SinkChunks(mpsc::UnboundedSender<()>),
}

impl Serve {
    async fn run<IO: AsyncRead + AsyncWrite + Unpin>(self, mut io: IO) {
        let mut buf = vec![0u8; CHUNK];
        match self {
            Serve::Echo => {
                while let Ok(n @ 1..) = io.read(&mut buf).await {
                    if io.write_all(&buf[..n]).await.is_err() || io.flush().await.is_err() {
                        return;
                    }
                }
            }
            Serve::Sink(done) | Serve::SinkChunks(done) => {
                let mut pending = 0;
                while let Ok(n @ 1..) = io.read(&mut buf).await {
                    pending += n;
                    while pending >= BULK_BYTES {
                        pending -= BULK_BYTES;
                        let _ = done.send(());
                    }
                }
            }
        }
    }
}

/// An HBONE acceptor on loopback serving every accepted tunnel with `serve`.
fn hbone_server(rt: &Runtime, fixture: &Fixture, serve: Serve) -> (SocketAddr, DrainTrigger) {
    let service = tower::service_fn(move |tunnel: InboundTunnel| {
        let serve = serve.clone();
        async move {
            if let Ok(stream) = tunnel.accept(Default::default()) {
                match serve {
                    Serve::SinkChunks(done) => sink_chunks(stream, done).await,
                    serve => serve.run(stream).await,
                }
            }
            Ok::<(), Infallible>(())
        }
    });
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind HBONE listener");
    let addr = listener.local_addr().expect("HBONE listener address");
    let (trigger, watch) = drain::channel();
    let acceptor = HboneAcceptor::new(HboneConfig::default(), fixture.server_tls.clone(), service);
    rt.spawn(acceptor.serve(listener, watch));
    (addr, trigger)
}

/// Takes the frames of `stream` as they arrived and drops them; one `()` on `done` per [`BULK_BYTES`].
async fn sink_chunks(mut stream: HboneStream, done: mpsc::UnboundedSender<()>) {
    let mut pending = 0;
    while let Ok(Some(frame)) = std::future::poll_fn(|cx| stream.poll_read_chunk(cx)).await {
        pending += frame.len();
        while pending >= BULK_BYTES {
            pending -= BULK_BYTES;
            let _ = done.send(());
        }
    }
}

/// A plain mutual-TLS server on loopback (same configuration as the HBONE acceptor's, no HTTP/2), serving
/// every connection with `serve`.
fn mtls_server(rt: &Runtime, fixture: &Fixture, serve: Serve) -> SocketAddr {
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind mTLS listener");
    let addr = listener.local_addr().expect("mTLS listener address");
    let acceptor = TlsAcceptor::from(fixture.server_tls.clone());
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let serve = serve.clone();
            tokio::spawn(async move {
                if let Ok(Ok(stream)) = tokio::time::timeout(STEP_TIMEOUT, acceptor.accept(tcp)).await {
                    serve.run(stream).await;
                }
            });
        }
    });
    addr
}

/// A plain TCP server on loopback serving every connection with `serve`.
fn tcp_server(rt: &Runtime, serve: Serve) -> SocketAddr {
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind TCP listener");
    let addr = listener.local_addr().expect("TCP listener address");
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(serve.clone().run(tcp));
        }
    });
    addr
}

/// TCP connect (with `TCP_NODELAY`, as HBONE sets it) plus a client mutual-TLS handshake.
async fn mtls_connect(
    config: Arc<rustls_client::ClientConfig>,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
    tcp.set_nodelay(true).expect("TCP_NODELAY");
    TlsConnector::from(config)
        .connect(tls::server_name(), tcp)
        .await
        .expect("mTLS handshake")
}

/// Writes one byte and reads it back.
async fn echo_one_byte<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO) {
    io.write_all(&[0x5a]).await.expect("write one byte");
    io.flush().await.expect("flush one byte");
    let mut byte = [0u8; 1];
    io.read_exact(&mut byte).await.expect("read the echoed byte");
    assert_eq!(byte, [0x5a]);
}

fn stream_open_warm(c: &mut Criterion) {
    let rt = runtime();
    let fixture = Fixture::new();
    let (hbone_addr, _hbone_trigger) = hbone_server(&rt, &fixture, Serve::Echo);
    let mtls_addr = mtls_server(&rt, &fixture, Serve::Echo);

    let mut group = c.benchmark_group("hbone_stream_open_warm");
    group.measurement_time(Duration::from_secs(5));

    // Open the pooled connection (and check it works) before measuring.
    let connector = fixture.connector();
    let request = fixture.request(hbone_addr);
    rt.block_on(bounded("first HBONE stream", async {
        let mut stream = connector.connect(request.clone()).await.expect("HBONE connect");
        echo_one_byte(&mut stream).await;
    }));
    let mut state = Some((connector, request));
    group.bench_function("hbone_connect_and_drop", |b| {
        b.iter_custom(|iters| {
            spawn_timed(&rt, &mut state, iters, |(connector, request), iters| async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let stream: HboneStream =
                        bounded("HBONE stream open", connector.connect(request.clone()))
                            .await
                            .expect("HBONE stream open");
                    drop(stream);
                }
                let elapsed = start.elapsed();
                assert_eq!(
                    connector.stats().handshakes,
                    1,
                    "every stream reused the pooled connection"
                );
                ((connector, request), elapsed)
            })
        })
    });

    let tcp_addr = tcp_server(&rt, Serve::Echo);
    let mut state = Some(());
    group.bench_function("baseline_tcp_connect", |b| {
        b.iter_custom(|iters| {
            spawn_timed(&rt, &mut state, iters, move |(), iters| async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let tcp = bounded("TCP connect", TcpStream::connect(tcp_addr)).await;
                    drop(tcp.expect("TCP connect"));
                }
                ((), start.elapsed())
            })
        })
    });

    let mut state = Some(rt.block_on(bounded(
        "mTLS connect",
        mtls_connect(fixture.client_tls.clone(), mtls_addr),
    )));
    group.bench_function("baseline_mtls_one_byte_round_trip", |b| {
        b.iter_custom(|iters| {
            spawn_timed(&rt, &mut state, iters, |mut stream, iters| async move {
                let start = Instant::now();
                for _ in 0..iters {
                    bounded("mTLS round trip", echo_one_byte(&mut stream)).await;
                }
                (stream, start.elapsed())
            })
        })
    });
    group.finish();
}

/// A bulk bench's state: the writing end and the server's "received [`BULK_BYTES`]" signals.
type Bulk<W> = (W, mpsc::UnboundedReceiver<()>);

/// Writes [`BULK_BYTES`] in [`CHUNK`]-sized writes `iters` times, each time waiting until the server
/// has received every byte, and returns the state with the time taken.
async fn push_bulk<W: AsyncWrite + Unpin>(
    (mut writer, mut received): Bulk<W>,
    iters: u64,
) -> (Bulk<W>, Duration) {
    let chunk = vec![0xa5u8; CHUNK];
    let start = Instant::now();
    for _ in 0..iters {
        bounded("bulk copy", async {
            for _ in 0..BULK_BYTES / CHUNK {
                writer.write_all(&chunk).await.expect("bulk write");
            }
            writer.flush().await.expect("bulk flush");
            received
                .recv()
                .await
                .expect("the server reports what it received");
        })
        .await;
    }
    ((writer, received), start.elapsed())
}

/// As [`push_bulk`], through `poll_write_chunk`: each write hands over a [`CHUNK`]-byte `Bytes` that
/// shares one allocation (as a proxy hands over the buffer it read into), so nothing is copied before TLS.
async fn push_bulk_chunks(
    (mut stream, mut received): Bulk<HboneStream>,
    iters: u64,
) -> (Bulk<HboneStream>, Duration) {
    let chunk = Bytes::from(vec![0xa5u8; CHUNK]);
    let start = Instant::now();
    for _ in 0..iters {
        bounded("bulk copy", async {
            for _ in 0..BULK_BYTES / CHUNK {
                let mut data = chunk.clone();
                std::future::poll_fn(|cx| stream.poll_write_chunk(cx, &mut data))
                    .await
                    .expect("bulk write");
            }
            received
                .recv()
                .await
                .expect("the server reports what it received");
        })
        .await;
    }
    ((stream, received), start.elapsed())
}

/// Registers bench `name`, which moves the bytes with `push` through `bulk`'s writer; the writer is
/// closed when the bench is done (the state is dropped), before the next one starts.
fn bench_bulk<W, F, Fut>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    name: &str,
    bulk: Bulk<W>,
    push: F,
) where
    W: Send + 'static,
    F: Fn(Bulk<W>, u64) -> Fut + Copy,
    Fut: Future<Output = (Bulk<W>, Duration)> + Send + 'static,
{
    let mut state = Some(bulk);
    group.bench_function(name, |b| {
        b.iter_custom(|iters| spawn_timed(rt, &mut state, iters, push))
    });
}

fn bulk_copy(c: &mut Criterion) {
    let rt = runtime();
    let fixture = Fixture::new();

    let mut group = c.benchmark_group("bulk_copy_one_stream");
    group
        .throughput(Throughput::Bytes(BULK_BYTES as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));

    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let (hbone_addr, _hbone_trigger) = hbone_server(&rt, &fixture, Serve::Sink(done_tx));
    let connector = fixture.connector();
    let stream = rt
        .block_on(bounded(
            "HBONE connect",
            connector.connect(fixture.request(hbone_addr)),
        ))
        .expect("HBONE connect");
    bench_bulk(&mut group, &rt, "hbone_stream", (stream, done_rx), push_bulk);

    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let (chunks_addr, _chunks_trigger) = hbone_server(&rt, &fixture, Serve::SinkChunks(done_tx));
    let stream = rt
        .block_on(bounded(
            "HBONE connect",
            connector.connect(fixture.request(chunks_addr)),
        ))
        .expect("HBONE connect");
    bench_bulk(
        &mut group,
        &rt,
        "hbone_stream_chunks",
        (stream, done_rx),
        push_bulk_chunks,
    );

    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let mtls_addr = mtls_server(&rt, &fixture, Serve::Sink(done_tx));
    let stream = rt.block_on(bounded(
        "mTLS connect",
        mtls_connect(fixture.client_tls.clone(), mtls_addr),
    ));
    bench_bulk(
        &mut group,
        &rt,
        "baseline_mtls_connection",
        (stream, done_rx),
        push_bulk,
    );

    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let tcp_addr = tcp_server(&rt, Serve::Sink(done_tx));
    let stream = rt.block_on(async {
        let tcp = bounded("TCP connect", TcpStream::connect(tcp_addr))
            .await
            .expect("TCP connect");
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        tcp
    });
    bench_bulk(
        &mut group,
        &rt,
        "baseline_tcp_connection",
        (stream, done_rx),
        push_bulk,
    );
    group.finish();
}

fn handshake_first_byte(c: &mut Criterion) {
    let rt = runtime();
    let fixture = Arc::new(Fixture::new());
    let (hbone_addr, _hbone_trigger) = hbone_server(&rt, &fixture, Serve::Echo);
    let mtls_addr = mtls_server(&rt, &fixture, Serve::Echo);

    let mut group = c.benchmark_group("hbone_handshake_first_byte");
    group.measurement_time(Duration::from_secs(5));

    let mut state = Some(fixture.clone());
    group.bench_function("hbone_new_connection", |b| {
        b.iter_custom(|iters| {
            spawn_timed(&rt, &mut state, iters, move |fixture, iters| async move {
                let request = fixture.request(hbone_addr);
                let start = Instant::now();
                for _ in 0..iters {
                    // A fresh connector has an empty pool: every iteration pays every handshake.
                    let connector = fixture.connector();
                    let mut stream = bounded("HBONE connect", connector.connect(request.clone()))
                        .await
                        .expect("HBONE connect");
                    bounded("HBONE first byte", echo_one_byte(&mut stream)).await;
                }
                (fixture, start.elapsed())
            })
        })
    });

    let mut state = Some(fixture.clone());
    group.bench_function("baseline_mtls_new_connection", |b| {
        b.iter_custom(|iters| {
            spawn_timed(&rt, &mut state, iters, move |fixture, iters| async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut stream = bounded(
                        "mTLS connect",
                        mtls_connect(fixture.client_tls.clone(), mtls_addr),
                    )
                    .await;
                    bounded("mTLS first byte", echo_one_byte(&mut stream)).await;
                }
                (fixture, start.elapsed())
            })
        })
    });
    group.finish();
}

criterion_group!(benches, stream_open_warm, bulk_copy, handshake_first_byte);
criterion_main!(benches);
