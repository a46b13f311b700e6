//! The upstream HTTP/1.1 server the `wrk` loads hit: `GET /` answers 200 with a 1 KiB body, on keep-alive
//! connections unless the request says `Connection: close`. Its listener is bound inside the server
//! namespace; it is served by this process's runtime.
//!
//! It is deliberately minimal (no chunked bodies, no request bodies, one fixed response), so that its cost
//! is small and the same for the direct and the mesh paths. What a client can make it hold is bounded: a
//! request head of 8 KiB, 60 s of idleness, and 4,096 connections at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The body of `GET /`.
pub(crate) const BODY_BYTES: usize = 1024;
/// The longest request head read before answering 431 and closing.
const MAX_HEAD: usize = 8 * 1024;
/// How long a connection may sit without a request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once; later ones are closed at accept.
const MAX_CONNECTIONS: usize = 4096;

/// A running server; it stops, and closes its connections, when dropped.
#[derive(Debug)]
pub(crate) struct HttpServer {
    task: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
}

impl HttpServer {
    /// Serves `listener` (bound anywhere, typically inside a namespace) on the current runtime.
    pub(crate) fn start(listener: std::net::TcpListener) -> std::io::Result<HttpServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let task = tokio::spawn(accept_loop(listener));
        Ok(HttpServer { task, addr })
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its `JoinSet`, which aborts every connection task.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener) {
    let responses = Arc::new(Responses::new());
    let active = Arc::new(AtomicUsize::new(0));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors, or an aborted handshake: back off briefly, keep serving.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    continue;
                }
                active.fetch_add(1, Ordering::Relaxed);
                let (responses, active) = (responses.clone(), active.clone());
                connections.spawn(async move {
                    // An I/O error or timeout only ends this connection.
                    let _ = serve(stream, &responses).await;
                    active.fetch_sub(1, Ordering::Relaxed);
                });
            }
            // Reap finished connections so the set does not grow with a `Connection: close` load.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// The fixed responses, built once.
struct Responses {
    keep_alive: Vec<u8>,
    close: Vec<u8>,
}

impl Responses {
    fn new() -> Responses {
        let build = |connection: &str| {
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {BODY_BYTES}\r\n{connection}\r\n"
            )
            .into_bytes();
            response.resize(response.len() + BODY_BYTES, b'x');
            response
        };
        Responses {
            keep_alive: build(""),
            close: build("Connection: close\r\n"),
        }
    }
}

/// What to do with one request head.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// 200 with the body; close afterwards if the client asked to.
    Ok { close: bool },
    /// An error status, then close: the request was not one this server serves.
    Refuse(&'static str),
}

/// Decides the answer to one request head (request line and headers, without the blank line).
fn answer(head: &[u8]) -> Answer {
    let Ok(head) = std::str::from_utf8(head) else {
        return Answer::Refuse("400 Bad Request");
    };
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let (method, path, version) = (request_line.next(), request_line.next(), request_line.next());
    let mut close = version == Some("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Answer::Refuse("400 Bad Request");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            close =
                value.eq_ignore_ascii_case("close") || (close && !value.eq_ignore_ascii_case("keep-alive"));
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("content-length") && value != "0")
        {
            // A body this server would have to skip: not something the loads send.
            return Answer::Refuse("400 Bad Request");
        }
    }
    match (method, path, version) {
        (Some("GET"), Some("/"), Some("HTTP/1.1" | "HTTP/1.0")) => Answer::Ok { close },
        (Some("GET"), Some(_), Some(_)) => Answer::Refuse("404 Not Found"),
        _ => Answer::Refuse("400 Bad Request"),
    }
}

/// Serves one connection: request heads in, fixed responses out, until the client closes, asks to close,
/// sends something this server refuses, or stays idle too long.
async fn serve(mut stream: TcpStream, responses: &Responses) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    loop {
        // Answer every complete head already read (a pipelining client sends several at once).
        while let Some(end) = head_end(&buf[..filled]) {
            match answer(&buf[..end - 4]) {
                Answer::Ok { close: false } => stream.write_all(&responses.keep_alive).await?,
                Answer::Ok { close: true } => {
                    stream.write_all(&responses.close).await?;
                    return stream.shutdown().await;
                }
                Answer::Refuse(status) => return refuse(&mut stream, status).await,
            }
            buf.copy_within(end..filled, 0);
            filled -= end;
        }
        if filled == buf.len() {
            return refuse(&mut stream, "431 Request Header Fields Too Large").await;
        }
        let read = tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buf[filled..])).await;
        match read {
            Ok(Ok(0)) | Err(_) => return Ok(()),
            Ok(Ok(n)) => filled += n,
            Ok(Err(error)) => return Err(error),
        }
    }
}

async fn refuse(stream: &mut TcpStream, status: &str) -> std::io::Result<()> {
    let response = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The index just past the first `\r\n\r\n` of `buf`.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn requests_are_answered_by_method_path_and_connection_header() {
        assert_eq!(answer(b"GET / HTTP/1.1\r\nHost: a"), Answer::Ok { close: false });
        assert_eq!(
            answer(b"GET / HTTP/1.1\r\nHost: a\r\nconnection: Close"),
            Answer::Ok { close: true }
        );
        assert_eq!(answer(b"GET / HTTP/1.0"), Answer::Ok { close: true });
        assert_eq!(
            answer(b"GET / HTTP/1.0\r\nConnection: keep-alive"),
            Answer::Ok { close: false }
        );
        assert_eq!(answer(b"GET /x HTTP/1.1"), Answer::Refuse("404 Not Found"));
        assert_eq!(
            answer(b"POST / HTTP/1.1\r\nContent-Length: 3"),
            Answer::Refuse("400 Bad Request")
        );
        assert_eq!(
            answer(b"GET / HTTP/1.1\r\nno colon"),
            Answer::Refuse("400 Bad Request")
        );
        assert_eq!(answer(&[0xff, 0xfe]), Answer::Refuse("400 Bad Request"));
    }

    /// Reads one response (head and `Content-Length` body) from a blocking stream.
    fn read_response(stream: &mut std::net::TcpStream) -> (String, Vec<u8>) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).unwrap();
        (head, body)
    }

    #[test]
    fn keep_alive_serves_many_requests_on_one_connection_and_close_ends_it() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = runtime.block_on(async { HttpServer::start(listener) }).unwrap();
        let mut stream = std::net::TcpStream::connect(server.addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Two pipelined requests in one write, then one more.
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        for _ in 0..2 {
            let (head, body) = read_response(&mut stream);
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert_eq!(body.len(), BODY_BYTES);
        }
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (head, body) = read_response(&mut stream);
        assert!(head.contains("Connection: close\r\n"), "{head}");
        assert_eq!(body.len(), BODY_BYTES);
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "the server closes after a `Connection: close` response"
        );
    }

    #[test]
    fn an_oversized_head_is_refused_with_431() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = runtime.block_on(async { HttpServer::start(listener) }).unwrap();
        let mut stream = std::net::TcpStream::connect(server.addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut request = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
        // Exactly a full buffer without the blank line: the server reads all of it (so its close is a FIN,
        // not a reset that could discard the answer) and still has no complete head.
        request.resize(MAX_HEAD, b'a');
        stream.write_all(&request).unwrap();
        let (head, _) = read_response(&mut stream);
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
    }
}
