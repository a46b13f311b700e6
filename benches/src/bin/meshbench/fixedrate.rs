//! Our fixed-rate request/response generator, and the upstream server it talks to.
//!
//! `wrk` is a closed-loop generator: a connection sends its next request only when the previous answer is
//! in, so when the path stalls it simply sends less, and the requests that *would* have been sent during the
//! stall are never measured ("coordinated omission"). This generator keeps a timetable instead: request `n`
//! (over all connections) is due `n / rate` seconds after the start, connection `i` sending requests
//! `i, i + c, i + 2c, ...` of `c` connections. Each request's latency is measured from when it was
//! *due*, not from when it was actually sent, so a late answer also counts as queueing delay for every
//! request that had to wait behind it. (As in Gil Tene's wrk2: a connection sends at most one request at
//! a time; one whose previous answer is late sends as soon as that answer is in, and the lateness is in
//! the figure.)
//!
//! Latencies go, in microseconds with 3 significant digits, into an `hdrhistogram::Histogram<u64>` per
//! connection, merged at the end. Requests due during the warm-up are sent but not recorded. Each request
//! is 1 KiB with its sequence number in the first bytes; the server answers each 1 KiB with the same
//! 1 KiB, and the generator checks that the answer is its own. An answer that does not come within the
//! answer timeout (2 s) fails the load with an error saying which request it was.
//!
//! The generator runs in this process: the connections are opened by a thread that joined the client
//! node's namespace (sockets stay in the namespace they were made in), and each is driven by a thread of
//! its own with blocking sockets, which wakes up on time far more precisely than an async runtime's
//! millisecond timer. How late the threads woke for requests that were waiting for their time is
//! recorded too (the "timer lag"), since that lag is counted in the latencies.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mesh_test::netns::{Netns, NetnsError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

/// The size of each request and of each answer.
pub(crate) const MESSAGE_BYTES: usize = 1024;
/// How long an answer may take, from the request's actual send, before the load fails.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests due in this first stretch open the connections and the tunnels and are not recorded.
pub(crate) const WARM_UP: Duration = Duration::from_secs(1);
/// The significant decimal digits the histograms keep.
const SIGNIFICANT_DIGITS: u8 = 3;
/// The largest latency the histograms record exactly, µs (larger ones are recorded as this); far above
/// the answer timeout, so it is never reached by an answer that counts.
const HIGHEST_US: u64 = 60_000_000;
/// How long a server connection may wait for a request.
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections the server serves at once; later ones are closed at accept.
const SERVER_MAX_CONNECTIONS: usize = 256;
/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The upstream server of the fixed-rate load: answers every 1 KiB it reads with that 1 KiB. Its listener
/// is bound inside the server namespace; it is served by this process's runtime and stops when dropped.
#[derive(Debug)]
pub(crate) struct EchoServer {
    task: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
}

impl EchoServer {
    /// Serves `listener` (bound anywhere, typically inside a namespace) on the current runtime.
    pub(crate) fn start(listener: std::net::TcpListener) -> std::io::Result<EchoServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let task = tokio::spawn(echo_accept_loop(listener));
        Ok(EchoServer { task, addr })
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // Dropping the accept loop's `JoinSet` aborts every connection task.
        self.task.abort();
    }
}

async fn echo_accept_loop(listener: tokio::net::TcpListener) {
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
                if active.load(Ordering::Relaxed) >= SERVER_MAX_CONNECTIONS {
                    continue;
                }
                active.fetch_add(1, Ordering::Relaxed);
                let active = active.clone();
                connections.spawn(async move {
                    // An I/O error, a short message or idleness only ends this connection.
                    let _ = echo(stream).await;
                    active.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Serves one connection: whole messages in, the same messages out, until the client closes or stays idle.
async fn echo(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut message = [0u8; MESSAGE_BYTES];
    loop {
        match tokio::time::timeout(SERVER_IDLE_TIMEOUT, stream.read_exact(&mut message)).await {
            Ok(Ok(_)) => stream.write_all(&message).await?,
            // The client closed (cleanly or mid-message), failed, or went idle.
            Ok(Err(_)) | Err(_) => return Ok(()),
        }
    }
}

/// What the generator does: how many requests, over how many connections, for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Requests per second over all connections.
    pub(crate) rate_per_second: u32,
    /// Connections, each sending its share of the timetable.
    pub(crate) connections: u32,
    /// Requests due before this are sent but not recorded.
    pub(crate) warm_up: Duration,
    /// Requests due in this stretch after the warm-up are recorded.
    pub(crate) duration: Duration,
    /// How long an answer may take from the request's actual send.
    pub(crate) answer_timeout: Duration,
}

impl Plan {
    /// When request `k` of connection `connection` is due, after the start.
    fn due(&self, connection: u32, k: u64) -> Duration {
        let n = u64::from(connection) + k * u64::from(self.connections);
        let nanos = u128::from(n) * 1_000_000_000 / u128::from(self.rate_per_second.max(1));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The end of the timetable, after the start: requests due from here on are not sent.
    fn end(&self) -> Duration {
        self.warm_up + self.duration
    }
}

/// What the generator measured.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FixedRateOutput {
    /// The timetable's rate, requests per second.
    pub(crate) target_per_second: f64,
    /// Requests recorded (those due after the warm-up).
    pub(crate) requests: u64,
    /// Recorded requests over the time from the end of the warm-up to the last answer (or the end of the
    /// timetable, if the last answer came before it): below the target when answers fell behind.
    pub(crate) achieved_per_second: f64,
    /// Each recorded request's latency, from when it was due to when its whole answer was read, µs.
    pub(crate) latency_us: Histogram<u64>,
    /// For requests whose connection was idle when they fell due: how late the thread woke to send
    /// them, µs. This much of each latency is the generator's, not the path's.
    pub(crate) timer_lag_us: Histogram<u64>,
}

impl FixedRateOutput {
    /// The latency at percentile `p` (0 to 100), µs.
    pub(crate) fn latency_at(&self, p: f64) -> u64 {
        self.latency_us.value_at_percentile(p)
    }
}

/// A new, empty histogram in µs.
fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, HIGHEST_US, SIGNIFICANT_DIGITS)
        .map_err(|e| format!("cannot create a histogram: {e:?}"))
}

/// A duration in whole µs, rounded.
fn micros(duration: Duration) -> u64 {
    u64::try_from((duration.as_nanos() + 500) / 1000).unwrap_or(u64::MAX)
}

/// The thread result of a generator running in a namespace.
type Outcome = Result<Result<FixedRateOutput, String>, NetnsError>;

/// The generator running on its own threads; told to stop (within about one answer timeout) when dropped.
#[derive(Debug)]
pub(crate) struct Running {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Outcome>>,
}

impl Running {
    /// Starts `plan` against `addr` from inside `node`.
    pub(crate) fn start(node: &Netns, addr: SocketAddr, plan: Plan) -> Result<Running, NetnsError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = node.spawn(move || generate(addr, plan, &flag))?;
        Ok(Running {
            stop,
            thread: Some(thread),
        })
    }

    /// Whether the generator has finished (its result is ready).
    pub(crate) fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the generator and returns what it measured, or why it failed.
    pub(crate) fn join(mut self) -> Result<FixedRateOutput, String> {
        let thread = self.thread.take().ok_or("the generator was already joined")?;
        match thread.join() {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => Err(error.0),
            Err(_) => Err("the generator's thread panicked".into()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The threads check the flag before each request; each blocking call is bounded by the answer
        // timeout, so they end shortly after. Not joined here: a drop must not wait.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What one connection recorded.
struct Recorded {
    latency_us: Histogram<u64>,
    timer_lag_us: Histogram<u64>,
    /// When its last recorded answer came in.
    last_answer: Option<Instant>,
}

/// Opens the plan's connections to `addr` (from the calling thread, hence its namespace), drives each on a
/// thread of its own, and merges what they recorded. Bounded: the timetable's end plus, per connection,
/// at most one answer timeout of waiting.
pub(crate) fn generate(addr: SocketAddr, plan: Plan, stop: &AtomicBool) -> Result<FixedRateOutput, String> {
    if plan.connections == 0 || plan.rate_per_second == 0 {
        return Err("the fixed-rate plan needs at least one connection and one request per second".into());
    }
    let streams = (0..plan.connections)
        .map(|i| {
            let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                .map_err(|e| format!("fixed-rate connection {i} to {addr}: {e}"))?;
            stream
                .set_nodelay(true)
                .map_err(|e| format!("fixed-rate connection {i}: TCP_NODELAY: {e}"))?;
            Ok(stream)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let start = Instant::now();
    let recorded = std::thread::scope(|scope| {
        let threads: Vec<_> = streams
            .into_iter()
            .zip(0u32..)
            .map(|(stream, i)| scope.spawn(move || drive(stream, &plan, i, start, stop)))
            .collect();
        threads
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .map_err(|_| "a fixed-rate connection's thread panicked".to_owned())?
            })
            .collect::<Result<Vec<_>, String>>()
    })?;
    let mut latency_us = histogram()?;
    let mut timer_lag_us = histogram()?;
    let mut last_answer = start + plan.end();
    for connection in &recorded {
        latency_us
            .add(&connection.latency_us)
            .map_err(|e| format!("merging histograms: {e:?}"))?;
        timer_lag_us
            .add(&connection.timer_lag_us)
            .map_err(|e| format!("merging histograms: {e:?}"))?;
        last_answer = last_answer.max(connection.last_answer.unwrap_or(last_answer));
    }
    let requests = latency_us.len();
    let recorded_for = last_answer.duration_since(start + plan.warm_up).as_secs_f64();
    Ok(FixedRateOutput {
        target_per_second: f64::from(plan.rate_per_second),
        requests,
        achieved_per_second: if recorded_for > 0.0 {
            requests as f64 / recorded_for
        } else {
            0.0
        },
        latency_us,
        timer_lag_us,
    })
}

/// Sends connection `connection`'s share of the timetable on `stream`, one request at a time, and records
/// each answer's latency from the request's due time.
fn drive(
    mut stream: TcpStream,
    plan: &Plan,
    connection: u32,
    start: Instant,
    stop: &AtomicBool,
) -> Result<Recorded, String> {
    // The kernel may otherwise defer a sleeping thread's wake-up by up to 50 µs to batch timers, and that
    // delay would count as latency. Failing to lower it only makes the timer lag (reported) larger.
    let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
    let fail = |k: u64, what: String| format!("fixed-rate connection {connection}, request {k}: {what}");
    stream
        .set_write_timeout(Some(plan.answer_timeout))
        .map_err(|e| fail(0, format!("setting the write timeout: {e}")))?;
    let mut recorded = Recorded {
        latency_us: histogram()?,
        timer_lag_us: histogram()?,
        last_answer: None,
    };
    let mut request = [0u8; MESSAGE_BYTES];
    let mut answer = [0u8; MESSAGE_BYTES];
    request[8..12].copy_from_slice(&connection.to_be_bytes());
    for k in 0u64.. {
        let offset = plan.due(connection, k);
        if offset >= plan.end() {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            return Err(fail(k, "stopped".into()));
        }
        let due = start + offset;
        let now = Instant::now();
        let waited = now < due;
        if waited {
            std::thread::sleep(due - now);
        }
        let sent = Instant::now();
        request[..8].copy_from_slice(&k.to_be_bytes());
        stream
            .write_all(&request)
            .map_err(|e| fail(k, format!("sending: {e}")))?;
        read_answer(&mut stream, &mut answer, sent + plan.answer_timeout).map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                fail(
                    k,
                    format!("no answer within {:?} of sending it", plan.answer_timeout),
                )
            } else {
                fail(k, format!("reading the answer: {e}"))
            }
        })?;
        let answered = Instant::now();
        if answer != request {
            return Err(fail(k, "the answer is not the request's echo".into()));
        }
        if offset >= plan.warm_up {
            recorded
                .latency_us
                .saturating_record(micros(answered.duration_since(due)));
            if waited {
                recorded
                    .timer_lag_us
                    .saturating_record(micros(sent.saturating_duration_since(due)));
            }
            recorded.last_answer = Some(answered);
        }
    }
    Ok(recorded)
}

/// Reads exactly `answer.len()` bytes before `deadline`.
fn read_answer(stream: &mut TcpStream, answer: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < answer.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut answer[filled..])? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            n => filled += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rate_per_second: u32, connections: u32, warm_up_ms: u64, duration_ms: u64) -> Plan {
        Plan {
            rate_per_second,
            connections,
            warm_up: Duration::from_millis(warm_up_ms),
            duration: Duration::from_millis(duration_ms),
            answer_timeout: Duration::from_secs(2),
        }
    }

    /// An echo server on 127.0.0.1, on its own runtime (kept alive with it).
    fn echo_server() -> (tokio::runtime::Runtime, EchoServer) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = runtime.block_on(async { EchoServer::start(listener) }).unwrap();
        (runtime, server)
    }

    #[test]
    fn the_timetable_interleaves_the_connections_evenly() {
        let plan = plan(1000, 4, 1000, 3000);
        assert_eq!(plan.due(0, 0), Duration::ZERO);
        assert_eq!(plan.due(1, 0), Duration::from_millis(1));
        assert_eq!(plan.due(3, 0), Duration::from_millis(3));
        assert_eq!(plan.due(0, 1), Duration::from_millis(4));
        assert_eq!(plan.due(2, 250), Duration::from_millis(1002));
        assert_eq!(plan.end(), Duration::from_secs(4));
        // 1/3 ms steps are kept to the nanosecond, without drift.
        assert_eq!(
            super::tests::plan(3000, 1, 0, 1000).due(0, 3000),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn every_request_due_after_the_warm_up_is_recorded_once_with_a_checked_echo() {
        let (_runtime, server) = echo_server();
        let stop = AtomicBool::new(false);
        // 500/s over 2 connections: 100 due in the 200 ms warm-up, 200 in the 400 ms after it.
        let output = generate(server.addr(), plan(500, 2, 200, 400), &stop).unwrap();
        assert_eq!(output.requests, 200);
        assert_eq!(output.latency_us.len(), 200);
        assert_eq!(output.target_per_second, 500.0);
        assert!(output.achieved_per_second > 0.0 && output.achieved_per_second <= 500.0);
        let (p50, p99, max) = (
            output.latency_at(50.0),
            output.latency_at(99.0),
            output.latency_us.max(),
        );
        assert!(p50 <= p99 && p99 <= max, "{p50} {p99} {max}");
        // Loopback answers within the answer timeout, or the run would have failed.
        assert!(max < 2_000_000, "{max}");
        assert!(output.timer_lag_us.len() <= 200);
    }

    #[test]
    fn a_stalled_answer_counts_for_every_request_that_was_due_behind_it() {
        // A server that answers the first 10 messages at once, then holds the 11th for 300 ms.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut message = [0u8; MESSAGE_BYTES];
            for n in 0.. {
                if stream.read_exact(&mut message).is_err() {
                    return;
                }
                if n == 10 {
                    std::thread::sleep(Duration::from_millis(300));
                }
                if stream.write_all(&message).is_err() {
                    return;
                }
            }
        });
        let stop = AtomicBool::new(false);
        // 1,000/s on one connection, nothing in warm-up, 600 ms recorded: the stall begins at request 10
        // (due at 10 ms), so requests due from 10 to 160 ms wait until at least 310 ms: each of those
        // 150 requests is at least 150 ms late from its due time, however fast the machine. A generator
        // that timed from the actual send would count one slow request, not 150.
        let output = generate(addr, plan(1000, 1, 0, 600), &stop).unwrap();
        server.join().unwrap();
        assert_eq!(output.requests, 600);
        let late = output.latency_us.count_between(150_000, HIGHEST_US);
        assert!(late >= 150, "only {late} requests counted the stall");
        assert!(output.latency_us.max() >= 300_000);
    }

    #[test]
    fn a_missing_answer_fails_the_load_within_the_answer_timeout() {
        // Accepts and reads, never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        });
        let stop = AtomicBool::new(false);
        let mut plan = plan(100, 1, 0, 5_000);
        plan.answer_timeout = Duration::from_millis(300);
        let error = generate(addr, plan, &stop).unwrap_err();
        assert!(
            error.contains("request 0") && error.contains("no answer within 300ms"),
            "{error}"
        );
        server.join().unwrap();
    }

    #[test]
    fn an_answer_that_is_not_the_echo_fails_the_load() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut message = [0u8; MESSAGE_BYTES];
            stream.read_exact(&mut message).unwrap();
            message[0] ^= 0xff;
            let _ = stream.write_all(&message);
        });
        let stop = AtomicBool::new(false);
        let error = generate(addr, plan(100, 1, 0, 1_000), &stop).unwrap_err();
        assert!(error.contains("not the request's echo"), "{error}");
        server.join().unwrap();
    }

    #[test]
    fn a_stop_request_ends_the_generator_early() {
        let (_runtime, server) = echo_server();
        let stop = AtomicBool::new(true);
        let error = generate(server.addr(), plan(100, 2, 0, 60_000), &stop).unwrap_err();
        assert!(error.contains("stopped"), "{error}");
    }

    #[test]
    fn the_echo_server_returns_each_message_and_drops_a_short_one() {
        let (_runtime, server) = echo_server();
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for fill in [1u8, 2] {
            let message = [fill; MESSAGE_BYTES];
            stream.write_all(&message).unwrap();
            let mut answer = [0u8; MESSAGE_BYTES];
            stream.read_exact(&mut answer).unwrap();
            assert_eq!(answer, message);
        }
        // Half a message, then the client's half-close: the server closes without answering.
        stream.write_all(&[3u8; MESSAGE_BYTES / 2]).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
