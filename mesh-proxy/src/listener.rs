//! [`serve_tcp`]: the accept loop under every plain-TCP port of the node proxy (outbound capture 15001,
//! SOCKS5 15080, inbound plaintext 15006).
//!
//! It spawns one task per accepted connection and runs a [`ConnectionHandler`] in it, with three limits a
//! peer cannot push past: at most [`ListenerConfig::max_connections`] handlers at once (over the limit the
//! loop stops accepting, so further clients wait in the kernel's listen backlog instead of costing us a
//! task each); accept errors such as `EMFILE` are logged and retried after a pause rather than spun on; and
//! a drain stops accepting, then waits at most [`ListenerConfig::drain_deadline`] for the handlers still
//! running before aborting them.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::drain::DrainWatch;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};

/// Handles one accepted connection, to completion, in its own task.
///
/// The handler owns the stream: dropping it closes the connection. It reports its own failures (logs,
/// [`telemetry`](crate::telemetry) observers), since the accept loop has nobody to return them to. Any
/// `Fn(TcpStream, SocketAddr) -> impl Future<Output = ()>` that is `Send + Sync + 'static` is a handler,
/// which keeps tests and small embedders free of boilerplate; [`Outbound`](crate::outbound::Outbound) and
/// [`Socks5`](crate::socks5::Socks5) implement it for their ports.
pub trait ConnectionHandler: Send + Sync + 'static {
    /// Serves `stream`, accepted from `peer`. Aborted (dropped mid-way) if it is still running when a
    /// drain's deadline passes.
    fn handle(&self, stream: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> + Send;
}

impl<F, Fut> ConnectionHandler for F
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    fn handle(&self, stream: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> + Send {
        self(stream, peer)
    }
}

/// Binds a listener for captured traffic (15001, 15006) on `addr`, as Istio's ztunnel does: with
/// `IP_TRANSPARENT` where the process may set it (`CAP_NET_ADMIN`), so that `iptables TPROXY` can hand it
/// connections addressed to hosts this one is not, else plain (`REDIRECT` needs nothing more). Returns
/// the listener and whether it is transparent. The backlog is 1,024 connections.
pub fn bind_capture_listener(addr: SocketAddr) -> std::io::Result<(TcpListener, bool)> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    let transparent = mesh_core::sys::set_transparent(&socket).is_ok();
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok((TcpListener::from_std(socket.into())?, transparent))
}

/// Limits of one [`serve_tcp`] loop.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Connections handled at once; the loop stops accepting while this many handlers run.
    pub max_connections: NonZeroUsize,
    /// After a drain starts, how long in-flight handlers may keep running before they are aborted
    /// (Istio's `CONNECTION_TERMINATION_DEADLINE`, 5 s).
    pub drain_deadline: Duration,
    /// Pause after a failed `accept` (out of file descriptors, say) before trying again, so a persistent
    /// failure does not spin a core.
    pub accept_error_backoff: Duration,
    /// Whether to set `TCP_NODELAY` on accepted connections (ztunnel does: proxied bytes should not wait
    /// for Nagle's algorithm on top of the application's own batching).
    pub nodelay: bool,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            // One task and two 8 KiB copy buffers per connection: about 1 GiB at the limit.
            max_connections: NonZeroUsize::new(64 * 1024).unwrap_or(NonZeroUsize::MIN),
            drain_deadline: Duration::from_secs(5),
            accept_error_backoff: Duration::from_millis(100),
            nodelay: true,
        }
    }
}

/// What a [`serve_tcp`] loop did, once it has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeSummary {
    /// Connections accepted and handed to the handler.
    pub accepted: u64,
    /// Handlers still running at the drain deadline, which were aborted.
    pub aborted: usize,
}

/// Accepts connections on `listener` and runs `handler` for each in its own task, until `drain` is
/// signalled; then stops accepting (closing the listener, so new clients are refused), waits up to
/// [`ListenerConfig::drain_deadline`] for the running handlers, aborts the rest, and returns.
///
/// Holds `drain` until it returns, so a [`DrainTrigger`](mesh_core::drain::DrainTrigger) waiting on the
/// drain also waits for this loop's connections (or its deadline).
pub async fn serve_tcp<H: ConnectionHandler>(
    listener: TcpListener,
    handler: H,
    config: &ListenerConfig,
    drain: DrainWatch,
) -> ServeSummary {
    let handler = Arc::new(handler);
    let local = listener.local_addr().ok();
    let slots = Arc::new(Semaphore::new(
        config.max_connections.get().min(Semaphore::MAX_PERMITS),
    ));
    let mut tasks = JoinSet::new();
    let mut accepted = 0u64;
    loop {
        // Finished handlers are reaped here, so the set never holds more than the limit plus those that
        // ended since the last accept.
        while let Some(result) = tasks.try_join_next() {
            report_join(result, local);
        }
        let permit = tokio::select! {
            biased;
            () = drain.signaled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        let accept = tokio::select! {
            biased;
            () = drain.signaled() => break,
            accept = listener.accept() => accept,
        };
        match accept {
            Ok((stream, peer)) => {
                if config.nodelay
                    && let Err(error) = stream.set_nodelay(true)
                {
                    tracing::debug!(%error, %peer, "setting TCP_NODELAY failed");
                }
                accepted += 1;
                let handler = handler.clone();
                tasks.spawn(async move {
                    handler.handle(stream, peer).await;
                    drop(permit);
                });
            }
            Err(error) => {
                drop(permit);
                tracing::warn!(%error, listener = ?local, "accepting a connection failed; retrying after a pause");
                tokio::select! {
                    biased;
                    () = drain.signaled() => break,
                    () = tokio::time::sleep(config.accept_error_backoff) => {}
                }
            }
        }
    }
    // Closing the socket now makes new clients fail fast instead of waiting in a backlog nobody reads.
    drop(listener);
    let aborted = finish(&mut tasks, config.drain_deadline, local).await;
    ServeSummary { accepted, aborted }
}

/// Waits up to `deadline` for every task, then aborts what is left; returns how many were aborted.
async fn finish(tasks: &mut JoinSet<()>, deadline: Duration, local: Option<SocketAddr>) -> usize {
    let waited = tokio::time::timeout(deadline, async {
        while let Some(result) = tasks.join_next().await {
            report_join(result, local);
        }
    })
    .await;
    if waited.is_ok() {
        return 0;
    }
    let aborted = tasks.len();
    tracing::info!(
        aborted,
        listener = ?local,
        ?deadline,
        "drain deadline passed; aborting the remaining connections"
    );
    tasks.abort_all();
    // Aborted tasks finish at their next poll; this only collects them.
    while tasks.join_next().await.is_some() {}
    aborted
}

fn report_join(result: Result<(), JoinError>, local: Option<SocketAddr>) {
    if let Err(error) = result
        && error.is_panic()
    {
        tracing::error!(listener = ?local, %error, "a connection handler panicked");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{Notify, mpsc};

    use super::*;

    const BOUND: Duration = Duration::from_secs(10);

    /// Counts handlers running at once, and the most ever seen.
    #[derive(Default)]
    struct Gauge {
        now: AtomicUsize,
        max: AtomicUsize,
    }

    impl Gauge {
        fn enter(&self) {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(now, Ordering::SeqCst);
        }
        fn leave(&self) {
            self.now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn config(max: usize, deadline: Duration) -> ListenerConfig {
        ListenerConfig {
            max_connections: NonZeroUsize::new(max).unwrap(),
            drain_deadline: deadline,
            ..ListenerConfig::default()
        }
    }

    #[tokio::test]
    async fn never_runs_more_handlers_than_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gauge = Arc::new(Gauge::default());
        let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
        let release = Arc::new(Semaphore::new(0));
        let handler = {
            let gauge = gauge.clone();
            let release = release.clone();
            move |mut stream: TcpStream, _peer: SocketAddr| {
                let gauge = gauge.clone();
                let release = release.clone();
                let started = started_tx.clone();
                async move {
                    gauge.enter();
                    let _ = started.send(());
                    release.acquire().await.unwrap().forget();
                    stream.write_all(b"served").await.unwrap();
                    gauge.leave();
                }
            }
        };
        let (trigger, drain) = mesh_core::drain::channel();
        let serve = tokio::spawn(async move { serve_tcp(listener, handler, &config(2, BOUND), drain).await });

        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        // Two handlers start; the other three clients wait in the backlog until a slot frees.
        for _ in 0..2 {
            tokio::time::timeout(BOUND, started.recv())
                .await
                .unwrap()
                .unwrap();
        }
        for _ in 0..3 {
            release.add_permits(1);
            tokio::time::timeout(BOUND, started.recv())
                .await
                .unwrap()
                .unwrap();
        }
        release.add_permits(2);
        for mut client in clients {
            let mut reply = Vec::new();
            tokio::time::timeout(BOUND, client.read_to_end(&mut reply))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(reply, b"served");
        }
        assert_eq!(
            gauge.max.load(Ordering::SeqCst),
            2,
            "the limit was reached and never passed"
        );

        tokio::time::timeout(BOUND, trigger.drain()).await.unwrap();
        let summary = serve.await.unwrap();
        assert_eq!(
            summary,
            ServeSummary {
                accepted: 5,
                aborted: 0
            }
        );
    }

    #[tokio::test]
    async fn drain_stops_accepting_and_waits_for_in_flight_handlers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handled = Arc::new(AtomicUsize::new(0));
        let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
        let release = Arc::new(Notify::new());
        let handler = {
            let handled = handled.clone();
            let release = release.clone();
            move |mut stream: TcpStream, _peer: SocketAddr| {
                let handled = handled.clone();
                let release = release.clone();
                let started = started_tx.clone();
                async move {
                    handled.fetch_add(1, Ordering::SeqCst);
                    let _ = started.send(());
                    release.notified().await;
                    stream.write_all(b"bye").await.unwrap();
                }
            }
        };
        let (trigger, drain) = mesh_core::drain::channel();
        let serve = tokio::spawn(async move { serve_tcp(listener, handler, &config(8, BOUND), drain).await });

        let mut in_flight = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(BOUND, started.recv())
            .await
            .unwrap()
            .unwrap();
        let draining = tokio::spawn(trigger.drain());

        // Once the loop sees the drain it closes the listener: new clients are refused.
        let mut refused = false;
        for _ in 0..500 {
            match TcpStream::connect(addr).await {
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                    refused = true;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        assert!(refused, "the listener still accepts after the drain");
        assert!(!serve.is_finished(), "the loop waits for the in-flight handler");
        assert!(!draining.is_finished(), "the drain waits for the loop");

        release.notify_one();
        let mut reply = Vec::new();
        tokio::time::timeout(BOUND, in_flight.read_to_end(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, b"bye", "the in-flight connection completed");
        let summary = tokio::time::timeout(BOUND, serve).await.unwrap().unwrap();
        assert_eq!(
            summary,
            ServeSummary {
                accepted: 1,
                aborted: 0
            }
        );
        tokio::time::timeout(BOUND, draining).await.unwrap().unwrap();
        assert_eq!(
            handled.load(Ordering::SeqCst),
            1,
            "nothing was accepted after the drain"
        );
    }

    #[tokio::test]
    async fn handlers_still_running_at_the_deadline_are_aborted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
        let handler = move |stream: TcpStream, _peer: SocketAddr| {
            let started = started_tx.clone();
            async move {
                let _stream = stream;
                let _ = started.send(());
                std::future::pending::<()>().await;
            }
        };
        let (trigger, drain) = mesh_core::drain::channel();
        let cfg = config(8, Duration::from_millis(50));
        let serve = tokio::spawn(async move { serve_tcp(listener, handler, &cfg, drain).await });

        let mut client = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(BOUND, started.recv())
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(BOUND, trigger.drain()).await.unwrap();
        let summary = tokio::time::timeout(BOUND, serve).await.unwrap().unwrap();
        assert_eq!(
            summary,
            ServeSummary {
                accepted: 1,
                aborted: 1
            }
        );
        // The aborted handler dropped its stream: the client sees the connection end.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(BOUND, client.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(read.is_err() || rest.is_empty());
    }
}
