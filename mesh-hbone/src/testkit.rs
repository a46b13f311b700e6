//! In-memory HBONE for tests (feature `testkit`): an [`HboneAcceptor`] served over `tokio::io::duplex`,
//! and [`FrameClient`], a raw HTTP/2 client inside real mutual TLS that writes and reads individual
//! frames. It sends what our connector never would (a lower-case method, a missing authority, too many
//! streams, oversized headers), so tests can check how an acceptor and its service treat a hostile peer.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mesh_core::drain::DrainWatch;
use mesh_core::{CertWatch, SpiffeId, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tower::Service;

use crate::error::HboneError;
use crate::server::{HboneAcceptor, InboundTunnel};

/// HTTP/2 frame types (RFC 9113 section 6).
pub mod frame_type {
    /// DATA.
    pub const DATA: u8 = 0x0;
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// PING.
    pub const PING: u8 = 0x6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u8 = 0x8;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flags {
    /// END_STREAM on DATA and HEADERS.
    pub const END_STREAM: u8 = 0x1;
    /// ACK on SETTINGS and PING.
    pub const ACK: u8 = 0x1;
    /// END_HEADERS on HEADERS and CONTINUATION.
    pub const END_HEADERS: u8 = 0x4;
}

/// The client connection preface every HTTP/2 connection starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame payloads above this are refused when reading (the peer's SETTINGS may not allow more anyway).
const MAX_READ_FRAME: usize = 16 * 1024 * 1024;

/// One HTTP/2 frame as it travelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The frame type (see [`frame_type`]).
    pub kind: u8,
    /// The flags (see [`flags`]).
    pub flags: u8,
    /// The stream id (0 for connection frames).
    pub stream_id: u32,
    /// The payload.
    pub payload: Bytes,
}

impl Frame {
    /// The error code of a RST_STREAM frame, or the one in a GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let bytes = match self.kind {
            frame_type::RST_STREAM => self.payload.get(0..4)?,
            frame_type::GOAWAY => self.payload.get(4..8)?,
            _ => return None,
        };
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// What the server answered on one stream: a response, or a reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamAnswer {
    /// A HEADERS frame: the decoded header list, `:status` first.
    Response(Vec<(String, String)>),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code: the connection is ending.
    GoAway(u32),
}

impl StreamAnswer {
    /// The `:status` of a response.
    pub fn status(&self) -> Option<u16> {
        match self {
            StreamAnswer::Response(headers) => headers
                .iter()
                .find(|(name, _)| name == ":status")
                .and_then(|(_, value)| value.parse().ok()),
            _ => None,
        }
    }
}

/// A raw HTTP/2 client over real mutual TLS on an in-memory pipe to an acceptor.
pub struct FrameClient {
    tls: TlsStream<DuplexStream>,
    encoder: fluke_hpack::Encoder<'static>,
    decoder: fluke_hpack::Decoder<'static>,
    buffer: BytesMut,
}

impl std::fmt::Debug for FrameClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameClient").finish_non_exhaustive()
    }
}

impl FrameClient {
    /// Serves `acceptor` on one end of an in-memory pipe (as a connection from `peer_addr` arriving on
    /// `local_addr`), completes mutual TLS on the other end presenting `client_cert` and expecting
    /// `server_identity`, and sends the HTTP/2 preface with empty SETTINGS. Returns the client and the
    /// acceptor's task, which ends with the connection.
    pub async fn connect<S>(
        acceptor: Arc<HboneAcceptor<S>>,
        client_cert: CertWatch,
        server_identity: SpiffeId,
        peer_addr: SocketAddr,
        local_addr: SocketAddr,
        drain: DrainWatch,
    ) -> Result<(FrameClient, JoinHandle<Result<(), HboneError>>), HboneError>
    where
        S: Service<InboundTunnel, Response = (), Error = Infallible> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(256 * 1024);
        let server =
            tokio::spawn(async move { acceptor.serve_io(server_io, peer_addr, local_addr, drain).await });
        let config = tls::client_config(client_cert, vec![server_identity])?;
        let tls = TlsConnector::from(config)
            .connect(tls::server_name(), client_io)
            .await
            .map_err(|source| HboneError::Tls {
                addr: local_addr,
                source,
            })?;
        let mut client = FrameClient {
            tls,
            encoder: fluke_hpack::Encoder::new(),
            decoder: fluke_hpack::Decoder::new(),
            buffer: BytesMut::new(),
        };
        client.tls.write_all(PREFACE).await?;
        client.send_frame(frame_type::SETTINGS, 0, 0, &[]).await?;
        Ok((client, server))
    }

    /// Writes one frame.
    pub async fn send_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|len| *len < (1 << 24))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame payload too large"))?;
        let mut frame = BytesMut::with_capacity(9 + payload.len());
        frame.put_slice(&len.to_be_bytes()[1..]);
        frame.put_u8(kind);
        frame.put_u8(flags);
        frame.put_u32(stream_id & 0x7fff_ffff);
        frame.put_slice(payload);
        self.tls.write_all(&frame).await?;
        self.tls.flush().await
    }

    /// HPACK-encodes `headers` verbatim (names and values as given, pseudo-headers included) and sends
    /// them as one HEADERS frame with END_HEADERS.
    pub async fn send_headers(
        &mut self,
        stream_id: u32,
        headers: &[(&str, &str)],
        end_stream: bool,
    ) -> io::Result<()> {
        let block = self.encode(headers);
        let flags = flags::END_HEADERS | if end_stream { flags::END_STREAM } else { 0 };
        self.send_frame(frame_type::HEADERS, flags, stream_id, &block)
            .await
    }

    /// HPACK-encodes a header list with this connection's encoder (for hand-built HEADERS and CONTINUATION).
    pub fn encode(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        self.encoder.encode(
            headers
                .iter()
                .map(|(name, value)| (name.as_bytes(), value.as_bytes())),
        )
    }

    /// Sends DATA on a stream.
    pub async fn send_data(&mut self, stream_id: u32, data: &[u8], end_stream: bool) -> io::Result<()> {
        let flags = if end_stream { flags::END_STREAM } else { 0 };
        self.send_frame(frame_type::DATA, flags, stream_id, data).await
    }

    /// Reads the next frame; `None` when the server closed the connection.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if self.buffer.len() >= 9 {
                let len = usize::from(self.buffer[0]) << 16
                    | usize::from(self.buffer[1]) << 8
                    | usize::from(self.buffer[2]);
                if len > MAX_READ_FRAME {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "frame larger than the test client reads",
                    ));
                }
                if self.buffer.len() >= 9 + len {
                    let mut header = self.buffer.split_to(9);
                    let payload = self.buffer.split_to(len).freeze();
                    header.advance(3);
                    let kind = header.get_u8();
                    let flags = header.get_u8();
                    let stream_id = header.get_u32() & 0x7fff_ffff;
                    return Ok(Some(Frame {
                        kind,
                        flags,
                        stream_id,
                        payload,
                    }));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = match self.tls.read(&mut chunk).await {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(None);
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads frames until the server answers `stream_id` (a response HEADERS or a RST_STREAM) or sends
    /// GOAWAY, acknowledging SETTINGS and PINGs on the way as a well-behaved client does. `None` if the
    /// connection closed first.
    pub async fn answer(&mut self, stream_id: u32) -> io::Result<Option<StreamAnswer>> {
        while let Some(frame) = self.read_frame().await? {
            match frame.kind {
                frame_type::SETTINGS if frame.flags & flags::ACK == 0 => {
                    self.send_frame(frame_type::SETTINGS, flags::ACK, 0, &[]).await?;
                }
                frame_type::PING if frame.flags & flags::ACK == 0 => {
                    let payload = frame.payload.clone();
                    self.send_frame(frame_type::PING, flags::ACK, 0, &payload).await?;
                }
                frame_type::HEADERS => {
                    // Every header block must go through the decoder, to keep its dynamic table in step.
                    let headers = self.decode(&frame.payload)?;
                    if frame.stream_id == stream_id {
                        return Ok(Some(StreamAnswer::Response(headers)));
                    }
                }
                frame_type::RST_STREAM if frame.stream_id == stream_id => {
                    return Ok(frame.error_code().map(StreamAnswer::Reset));
                }
                frame_type::GOAWAY => return Ok(frame.error_code().map(StreamAnswer::GoAway)),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Reads DATA on `stream_id` until END_STREAM (or the connection ends), answering SETTINGS and PINGs.
    pub async fn read_body(&mut self, stream_id: u32) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        while let Some(frame) = self.read_frame().await? {
            match frame.kind {
                frame_type::DATA if frame.stream_id == stream_id => {
                    body.extend_from_slice(&frame.payload);
                    if frame.flags & flags::END_STREAM != 0 {
                        break;
                    }
                }
                frame_type::PING if frame.flags & flags::ACK == 0 => {
                    let payload = frame.payload.clone();
                    self.send_frame(frame_type::PING, flags::ACK, 0, &payload).await?;
                }
                frame_type::HEADERS => {
                    self.decode(&frame.payload)?;
                }
                _ => {}
            }
        }
        Ok(body)
    }

    fn decode(&mut self, block: &[u8]) -> io::Result<Vec<(String, String)>> {
        let headers = self
            .decoder
            .decode(block)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("HPACK: {e:?}")))?;
        Ok(headers
            .into_iter()
            .map(|(name, value)| {
                (
                    String::from_utf8_lossy(&name).into_owned(),
                    String::from_utf8_lossy(&value).into_owned(),
                )
            })
            .collect())
    }
}
