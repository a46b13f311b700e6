//! HTTP/2 PING keepalive, shared by both sides.

use std::time::Duration;

use h2::{Ping, PingPong};

/// Sends a PING every `interval` and resolves when one goes unanswered for `timeout`: the caller then drops
/// the connection. Never resolves if PINGs are unavailable (another user took the handle) or once the
/// connection itself failed, since the connection task notices that on its own.
pub(crate) async fn run(ping: Option<PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_connection_failed)) => return std::future::pending().await,
            Err(_elapsed) => return,
        }
    }
}
