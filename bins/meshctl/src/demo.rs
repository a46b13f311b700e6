//! `meshctl demo`: the local demo mesh, on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mesh_core::cert::CachingCertConfig;
use mesh_core::{CachingCertProvider, CertWatch, DevCa, SpiffeId, TrustDomain, tls};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Options of `meshctl demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Lifetime of the workload certificates; a short one shows rotation (renewal at half life).
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// How long the long-lived connection runs while certificates rotate under it.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    run_for: Duration,
}

type DemoResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub(crate) async fn run(args: DemoArgs) -> DemoResult<()> {
    let td = TrustDomain::new("cluster.local")?;
    let ca = DevCa::new(td.clone(), args.cert_lifetime)?;
    println!("CA       development root for trust domain {td}");
    let provider = CachingCertProvider::new(
        Arc::new(ca),
        CachingCertConfig {
            validity: args.cert_lifetime,
            ..CachingCertConfig::default()
        },
    );
    let client_id = SpiffeId::istio(&td, "default", "client")?;
    let server_id = SpiffeId::istio(&td, "default", "server")?;
    let client_cert = provider.fetch(&client_id).await?;
    let server_cert = provider.fetch(&server_id).await?;
    for cert in [&client_cert, &server_cert] {
        println!(
            "cert     {} valid for {}",
            cert.identity(),
            describe_life(&cert.current())
        );
    }

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(tls::server_config(server_cert.clone(), vec![td.clone()])?);
    tokio::spawn(serve(listener, acceptor));
    println!("server   {server_id} listening on {addr} (mutual TLS 1.3, ALPN h2)");

    // A long-lived connection that must survive certificate rotation on both sides.
    let mut conn = connect(&client_cert, &server_id, addr).await?;
    let started = Instant::now();
    let mut watch = client_cert.clone();
    let mut rotations = 0u32;
    let mut pings = 0u32;
    while started.elapsed() < args.run_for {
        tokio::select! {
            rotated = watch.changed() => {
                let Some(cert) = rotated else { break };
                rotations += 1;
                println!("rotate   {} renewed, new certificate valid for {}", cert.identity(), describe_life(&cert));
                // New connections use the new certificate at once.
                let fresh = connect(&client_cert, &server_id, addr).await?;
                drop(fresh);
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                pings += 1;
                let reply = conn.round_trip(&format!("ping {pings}")).await?;
                println!("data     long-lived connection: sent \"ping {pings}\", got \"{reply}\"");
            }
        }
    }

    let intruder = SpiffeId::istio(&td, "default", "not-the-server")?;
    match connect(&client_cert, &intruder, addr).await {
        Ok(_) => {
            return Err("a client expecting another identity was accepted: verification is broken".into());
        }
        Err(e) => println!(
            "refused  client expecting {intruder} refused the server: {}",
            explain(&*e)
        ),
    }
    println!(
        "done     {pings} round trips on one connection across {rotations} certificate rotation(s); \
         HBONE, policy and the proxies join this demo as they land"
    );
    Ok(())
}

/// A client connection that sends a line and reads the echoed line.
struct DemoConnection {
    stream: BufReader<tokio_rustls::client::TlsStream<TcpStream>>,
}

impl DemoConnection {
    async fn round_trip(&mut self, line: &str) -> DemoResult<String> {
        self.stream
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await?;
        let mut reply = String::new();
        self.stream.read_line(&mut reply).await?;
        Ok(reply.trim_end().to_owned())
    }
}

async fn connect(
    cert: &CertWatch,
    expected: &SpiffeId,
    addr: std::net::SocketAddr,
) -> DemoResult<DemoConnection> {
    let connector = TlsConnector::from(tls::client_config(cert.clone(), vec![expected.clone()])?);
    let started = Instant::now();
    let tcp = TcpStream::connect(addr).await?;
    let stream = connector.connect(tls::server_name(), tcp).await?;
    let (_, session) = stream.get_ref();
    let peer = tls::peer_identity(session)?;
    let suite = session
        .negotiated_cipher_suite()
        .map_or_else(|| "?".to_owned(), |s| format!("{:?}", s.suite()));
    println!(
        "client   {} connected to {peer} in {} µs ({suite})",
        cert.identity(),
        started.elapsed().as_micros()
    );
    Ok(DemoConnection {
        stream: BufReader::new(stream),
    })
}

/// Accepts connections and echoes each line back, prefixed with the client's proven identity.
async fn serve(listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(stream) => stream,
                Err(e) => {
                    println!("server   refused a handshake: {e}");
                    return;
                }
            };
            let peer = match tls::peer_identity(stream.get_ref().1) {
                Ok(peer) => peer,
                Err(e) => {
                    println!("server   no peer identity: {e}");
                    return;
                }
            };
            println!("server   accepted {peer}");
            let mut lines = BufReader::new(stream);
            let mut line = String::new();
            while matches!(lines.read_line(&mut line).await, Ok(n) if n > 0) {
                let reply = format!(
                    "pong from server to {} ({})\n",
                    peer.service_account().unwrap_or("?"),
                    line.trim_end()
                );
                if lines.get_mut().write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                line.clear();
            }
        });
    }
}

/// Our typed identity error when a handshake failed on one, otherwise the error as it is.
fn explain(error: &(dyn std::error::Error + 'static)) -> String {
    let identity = error
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(tls::identity_error);
    match identity {
        Some(mesh_error) => mesh_error.to_string(),
        None => error.to_string(),
    }
}

fn describe_life(cert: &mesh_core::WorkloadCert) -> String {
    format!("{:.1}s", cert.remaining(SystemTime::now()).as_secs_f64())
}

/// Parses `500ms`, `4s`, `2m` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number.parse().map_err(|_| format!("not a duration: {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit in {text:?}: use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}
