//! [`HboneConfig`]: the numbers of the HBONE wire contract, with Istio ztunnel's values as defaults.

use std::time::Duration;

/// Settings for both HBONE sides. The defaults are Istio ztunnel's, so that our proxies behave the same on
/// the wire and under load; change them only to match a peer that was configured differently.
#[derive(Debug, Clone)]
pub struct HboneConfig {
    /// HTTP/2 initial stream window, both sides (ztunnel: 4 MiB).
    pub stream_window: u32,
    /// HTTP/2 connection window, both sides (ztunnel: 16 MiB).
    pub connection_window: u32,
    /// HTTP/2 max frame size, both sides (ztunnel: 1 MiB).
    pub max_frame_size: u32,
    /// Streams the server lets a client open at once (ztunnel: 200).
    pub server_max_concurrent_streams: u32,
    /// Largest request header block the server accepts (ztunnel: 64 KiB).
    pub server_max_header_list_size: u32,
    /// Largest response header block the client accepts (ztunnel: 16 KiB).
    pub client_max_header_list_size: u32,
    /// Bytes the server buffers per stream before applying backpressure (ztunnel: 400 KiB).
    pub server_max_send_buffer: usize,
    /// Bytes the client buffers per stream before applying backpressure (ztunnel: 4 MiB).
    pub client_max_send_buffer: usize,
    /// Streams the client opens on one pooled connection before opening another; the peer's own limit
    /// applies if lower (ztunnel's `POOL_MAX_STREAMS_PER_CONNECTION`: 100).
    pub pool_max_streams_per_connection: usize,
    /// A pooled connection with no streams for this long is closed (ztunnel: 5 minutes).
    pub pool_idle_timeout: Duration,
    /// Interval between HTTP/2 PINGs on an established connection (ztunnel: 10 s).
    pub keepalive_interval: Duration,
    /// A connection whose PING is unanswered for this long is closed (ztunnel: 20 s).
    pub keepalive_timeout: Duration,
    /// Limit for TCP connect plus TLS and HTTP/2 handshakes of a new connection.
    pub connect_timeout: Duration,
    /// Limit for the server to see the client's TLS and HTTP/2 handshakes complete: a silent client cannot
    /// hold a half-open connection longer than this.
    pub handshake_timeout: Duration,
    /// Connections one acceptor serves at once; further clients wait in the listen backlog until one ends.
    pub server_max_connections: usize,
}

impl Default for HboneConfig {
    fn default() -> Self {
        const MIB: u32 = 1024 * 1024;
        HboneConfig {
            stream_window: 4 * MIB,
            connection_window: 16 * MIB,
            max_frame_size: MIB,
            server_max_concurrent_streams: 200,
            server_max_header_list_size: 64 * 1024,
            client_max_header_list_size: 16 * 1024,
            server_max_send_buffer: 400 * 1024,
            client_max_send_buffer: 4 * 1024 * 1024,
            pool_max_streams_per_connection: 100,
            pool_idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            // Pooling keeps real fan-in low (one connection per source identity and destination), so this
            // only stops a flood; each connection costs one TLS session and an HTTP/2 state machine.
            server_max_connections: 16 * 1024,
        }
    }
}

impl HboneConfig {
    pub(crate) fn client_builder(&self) -> h2::client::Builder {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.client_max_header_list_size)
            .max_send_buffer_size(self.client_max_send_buffer)
            .initial_max_send_streams(self.pool_max_streams_per_connection)
            .enable_push(false);
        builder
    }

    pub(crate) fn server_builder(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.server_max_concurrent_streams)
            .max_header_list_size(self.server_max_header_list_size)
            .max_send_buffer_size(self.server_max_send_buffer)
            // HTTP/2 rapid reset (CVE-2023-44487) and its local-error variant: a client that resets more
            // than 20 streams before we accepted them, or makes us reset 1024 of its streams for protocol
            // errors, gets GOAWAY(ENHANCE_YOUR_CALM). These are hyper's values (and h2's defaults, which
            // ztunnel keeps); pinned here so an h2 upgrade cannot change them unnoticed.
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(Some(1024));
        builder
    }
}
