//! In-pod mode against a fake istio-cni (`mesh_test::cni::FakeCni`): a `SOCK_SEQPACKET` listener in a
//! temporary directory that speaks ZDS with the messages mesh-xds generates from `zds.proto` (so the
//! hand-written ones in `mesh_proxy::inpod::proto` are checked against them on the wire), sending pods'
//! network namespaces as `SCM_RIGHTS`.
//!
//! The protocol tests need no privileges (they send this process's own namespace, or pipes where a
//! namespace is refused). The tests with per-pod listeners create network namespaces, each in a sandbox
//! of its own (`mesh_test::netns::isolated`), so they need no root either; where no sandbox can be made
//! they fail loudly and say why, as mesh-test's netns tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::drain::{self, DrainTrigger};
use mesh_proxy::inpod::{
    self, BoxError, InPodNetns, ListenerPodManager, PodFuture, PodListenerConfig, PodListeners, PodManager,
    PodStart, WorkloadInfo, ZdsClient, ZdsConfig, ZdsStatus,
};
use mesh_test::cni::{self, FakeCni};
use mesh_test::netns::{Netns, isolated};
use mesh_xds::proto::istio::workload::zds as generated;
use prost::Message;
use test_case::test_case;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// Every wait of these tests gives up after this (the fake istio-cni bounds its own steps), so a test can
/// never hang.
const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------------
// The wire contract.

#[test]
fn hand_written_zds_messages_encode_exactly_like_the_generated_ones() {
    use inpod::proto as ours;

    fn same<A: Message + Default + PartialEq + std::fmt::Debug, B: Message + Default>(a: A, b: B) {
        let (mine, theirs) = (a.encode_to_vec(), b.encode_to_vec());
        assert_eq!(mine, theirs, "{a:?}");
        assert_eq!(A::decode(theirs.as_slice()).unwrap(), a);
        B::decode(mine.as_slice()).unwrap();
    }

    same(
        ours::ZdsHello {
            version: ours::Version::V1.into(),
        },
        generated::ZdsHello {
            version: generated::Version::V1.into(),
        },
    );
    let info = || ours::WorkloadInfo {
        name: "web-0".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
    };
    let generated_info = || generated::WorkloadInfo {
        name: "web-0".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
    };
    same(info(), generated_info());
    let requests = [
        (
            ours::workload_request::Payload::Add(ours::AddWorkload {
                uid: "uid-1".into(),
                workload_info: Some(info()),
            }),
            generated::workload_request::Payload::Add(generated::AddWorkload {
                uid: "uid-1".into(),
                workload_info: Some(generated_info()),
            }),
        ),
        (
            ours::workload_request::Payload::Del(ours::DelWorkload { uid: "uid-2".into() }),
            generated::workload_request::Payload::Del(generated::DelWorkload { uid: "uid-2".into() }),
        ),
        (
            ours::workload_request::Payload::Keep(ours::KeepWorkload { uid: "uid-3".into() }),
            generated::workload_request::Payload::Keep(generated::KeepWorkload { uid: "uid-3".into() }),
        ),
        (
            ours::workload_request::Payload::SnapshotSent(ours::SnapshotSent {}),
            generated::workload_request::Payload::SnapshotSent(generated::SnapshotSent {}),
        ),
    ];
    for (mine, theirs) in requests {
        same(
            ours::WorkloadRequest { payload: Some(mine) },
            generated::WorkloadRequest {
                payload: Some(theirs),
            },
        );
    }
    same(
        ours::WorkloadResponse {
            payload: Some(ours::workload_response::Payload::Ack(ours::Ack {
                error: "no netns".into(),
            })),
        },
        generated::WorkloadResponse {
            payload: Some(generated::workload_response::Payload::Ack(generated::Ack {
                error: "no netns".into(),
            })),
        },
    );
}

// ---------------------------------------------------------------------------------------------------
// The fake istio-cni is mesh_test::cni.

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mk-inpod-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// istio-cni's description of pod `uid` in these tests.
fn info(uid: &str) -> cni::WorkloadInfo {
    cni::workload_info("shop", &format!("{uid}-pod"), "web")
}

// ---------------------------------------------------------------------------------------------------
// The node proxy under test.

/// The ZDS client running on its own runtime, stopped when dropped.
struct Client {
    runtime: Option<Runtime>,
    status: watch::Receiver<ZdsStatus>,
    _drain: DrainTrigger,
}

impl Client {
    fn start(path: &Path, manager: Arc<dyn PodManager>) -> Client {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let config = ZdsConfig {
            socket_path: path.to_owned(),
            retry_interval: Duration::from_millis(50),
            reconnect_backoff_min: Duration::from_millis(5),
            reconnect_backoff_max: Duration::from_millis(200),
            ..ZdsConfig::default()
        };
        let client = ZdsClient::new(config, manager).unwrap();
        let status = client.status();
        let (trigger, watch) = drain::channel();
        runtime.spawn(client.run(watch));
        Client {
            runtime: Some(runtime),
            status,
            _drain: trigger,
        }
    }

    fn status(&self) -> ZdsStatus {
        *self.status.borrow()
    }

    /// Waits (bounded) until the status satisfies `f`.
    fn wait_for(&mut self, f: impl Fn(&ZdsStatus) -> bool) -> ZdsStatus {
        let mut status = self.status.clone();
        let waited = self.runtime.as_ref().unwrap().block_on(async {
            tokio::time::timeout(STEP, status.wait_for(|s| f(s)))
                .await
                .map(|s| s.map(|s| *s))
        });
        waited.expect("the client's status never got there").unwrap()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// A [`PodManager`] that records calls, and fails the adds of the UIDs in `fail`.
#[derive(Debug, Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    fail: Mutex<HashSet<String>>,
}

impl Recorder {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl PodManager for Recorder {
    fn add(
        &self,
        uid: Arc<str>,
        info: WorkloadInfo,
        _netns: InPodNetns,
    ) -> PodFuture<'_, Result<(), BoxError>> {
        Box::pin(async move {
            let call = format!(
                "add {uid} {}/{} {}",
                info.namespace, info.name, info.service_account
            );
            self.calls.lock().unwrap().push(call);
            if self.fail.lock().unwrap().contains(&*uid) {
                return Err("port 15008 is taken".into());
            }
            Ok(())
        })
    }

    fn del(&self, uid: Arc<str>) -> PodFuture<'_, ()> {
        Box::pin(async move { self.calls.lock().unwrap().push(format!("del {uid}")) })
    }
}

/// This process's own network namespace: a real namespace anyone may open.
fn own_netns() -> File {
    File::open("/proc/self/ns/net").unwrap()
}

/// Asserts that every copy of the pipe's write end is closed: the reader sees end-of-file (bounded).
fn assert_closed(mut reader: io::PipeReader) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = tx.send(reader.read_to_end(&mut rest).map(|_| rest));
    });
    let read = rx
        .recv_timeout(STEP)
        .expect("a received descriptor was left open");
    assert!(read.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------------
// Protocol tests (no privileges needed).

#[derive(Debug, Clone, Copy)]
enum Bad {
    AddWithoutFd,
    DelWithFd,
    AddWithTwoFds,
    Truncated,
    Garbage,
    KeepAfterSnapshot,
}

#[test_case(Bad::AddWithoutFd, "carries no network namespace" ; "add without a descriptor")]
#[test_case(Bad::DelWithFd, "del carries 1 file descriptor" ; "del with a descriptor")]
#[test_case(Bad::AddWithTwoFds, "add carries 2 file descriptors" ; "add with two descriptors")]
#[test_case(Bad::Truncated, "truncated" ; "a packet larger than the buffer")]
#[test_case(Bad::Garbage, "malformed" ; "bytes that are not a request")]
#[test_case(Bad::KeepAfterSnapshot, "after the snapshot" ; "keep after the snapshot")]
fn a_bad_message_gets_an_error_ack_then_a_new_connection(bad: Bad, expected: &str) {
    let dir = TempDir::new();
    let path = dir.0.join("ztunnel.sock");
    let cni = FakeCni::bind(&path).unwrap();
    let recorder = Arc::new(Recorder::default());
    let client = Client::start(&path, recorder.clone());
    let conn = cni.accept().unwrap();

    let mut readers = Vec::new();
    let mut pipe = || {
        let (reader, writer) = io::pipe().unwrap();
        readers.push(reader);
        writer
    };
    let error = match bad {
        Bad::AddWithoutFd => {
            let add = generated::AddWorkload {
                uid: "pod-a".into(),
                workload_info: Some(info("pod-a")),
            };
            conn.request(generated::workload_request::Payload::Add(add), &[])
                .unwrap()
        }
        Bad::DelWithFd => {
            let writer = pipe();
            let del = generated::DelWorkload { uid: "pod-a".into() };
            conn.request(generated::workload_request::Payload::Del(del), &[writer.as_fd()])
                .unwrap()
        }
        Bad::AddWithTwoFds => {
            let (one, two) = (pipe(), pipe());
            let add = generated::AddWorkload {
                uid: "pod-a".into(),
                workload_info: Some(generated::WorkloadInfo::default()),
            };
            let payload = generated::workload_request::Payload::Add(add);
            conn.request(payload, &[one.as_fd(), two.as_fd()]).unwrap()
        }
        Bad::Truncated => {
            let add = generated::AddWorkload {
                uid: "u".repeat(2000),
                workload_info: Some(generated::WorkloadInfo::default()),
            };
            let request = generated::WorkloadRequest {
                payload: Some(generated::workload_request::Payload::Add(add)),
            };
            conn.send_raw(&request.encode_to_vec(), &[]).unwrap();
            conn.read_ack().unwrap()
        }
        Bad::Garbage => {
            conn.send_raw(&[0xff; 16], &[]).unwrap();
            conn.read_ack().unwrap()
        }
        Bad::KeepAfterSnapshot => {
            assert_eq!(conn.snapshot_sent().unwrap(), "");
            conn.keep("pod-a").unwrap()
        }
    };
    assert!(
        error.contains(expected),
        "ack error {error:?} should say {expected:?}"
    );
    // Our write ends are gone with the closure's temporaries; the client must have closed its copies.
    for reader in readers {
        assert_closed(reader);
    }
    conn.expect_closed().unwrap();

    // The client reconnects and works again.
    let conn = cni.accept().unwrap();
    assert_eq!(conn.snapshot_sent().unwrap(), "");
    assert_eq!(client.status().connections, 2);
    assert!(client.status().ready());
    assert!(
        recorder.take().is_empty(),
        "no pod may be started by a bad message"
    );
}

#[test]
fn a_descriptor_that_is_not_a_namespace_is_refused_and_closed_but_the_connection_stays() {
    let dir = TempDir::new();
    let path = dir.0.join("ztunnel.sock");
    let cni = FakeCni::bind(&path).unwrap();
    let recorder = Arc::new(Recorder::default());
    let client = Client::start(&path, recorder.clone());
    let conn = cni.accept().unwrap();

    let (reader, writer) = io::pipe().unwrap();
    let error = conn.add("pod-a", &info("pod-a"), &writer).unwrap();
    drop(writer);
    assert!(error.contains("not a namespace"), "{error:?}");
    assert_closed(reader);
    assert_eq!(conn.snapshot_sent().unwrap(), "");
    assert_eq!(client.status().connections, 1);
    assert!(recorder.take().is_empty());
}

#[test]
fn a_reconnection_reconciles_pods_with_the_new_snapshot() {
    let dir = TempDir::new();
    let path = dir.0.join("ztunnel.sock");
    let cni = FakeCni::bind(&path).unwrap();
    let recorder = Arc::new(Recorder::default());
    let mut client = Client::start(&path, recorder.clone());
    let netns = own_netns();

    let conn = cni.accept().unwrap();
    for uid in ["a", "b", "c", "d"] {
        assert_eq!(conn.add(uid, &info(uid), &netns).unwrap(), "");
    }
    assert_eq!(conn.snapshot_sent().unwrap(), "");
    let calls = recorder.take();
    assert_eq!(calls[0], "add a shop/a-pod web");
    assert_eq!(calls.len(), 4);
    assert_eq!(client.wait_for(|s| s.pods == 4).pending, 0);

    // istio-cni restarts: its socket goes away and comes back.
    drop(conn);
    drop(cni);
    client.wait_for(|s| !s.connected);
    let cni = FakeCni::bind(&path).unwrap();
    let conn = cni.accept().unwrap();
    assert!(!client.status().snapshot_received);
    // "a" is sent again (same namespace: nothing to redo), "b" is kept without a namespace, "c" was
    // deleted before the snapshot, and "d" is not mentioned.
    assert_eq!(conn.add("a", &info("a"), &netns).unwrap(), "");
    assert_eq!(conn.keep("b").unwrap(), "");
    assert_eq!(conn.del("c").unwrap(), "");
    assert!(
        recorder.take().is_empty(),
        "nothing changes before the snapshot is complete"
    );
    assert_eq!(conn.snapshot_sent().unwrap(), "");
    let mut removed = recorder.take();
    removed.sort();
    assert_eq!(removed, ["del c", "del d"]);
    assert_eq!(client.status().pods, 2);
    assert!(client.status().ready());

    // After the snapshot, del acts at once.
    assert_eq!(conn.del("b").unwrap(), "");
    assert_eq!(recorder.take(), ["del b"]);
}

#[test]
fn a_pod_that_fails_to_start_is_reported_and_retried() {
    let dir = TempDir::new();
    let path = dir.0.join("ztunnel.sock");
    let cni = FakeCni::bind(&path).unwrap();
    let recorder = Arc::new(Recorder::default());
    recorder.fail.lock().unwrap().insert("a".into());
    let mut client = Client::start(&path, recorder.clone());
    let netns = own_netns();

    let conn = cni.accept().unwrap();
    let error = conn.add("a", &info("a"), &netns).unwrap();
    assert!(error.contains("port 15008 is taken"), "{error:?}");
    assert_eq!(conn.snapshot_sent().unwrap(), "");
    let status = client.status();
    assert_eq!((status.pods, status.pending), (0, 1));
    assert!(!status.ready(), "not ready while a pod cannot be served");

    recorder.fail.lock().unwrap().clear();
    let status = client.wait_for(|s| s.pending == 0);
    assert_eq!(status.pods, 1);
    assert!(status.ready());
    assert!(recorder.take().iter().all(|call| call == "add a shop/a-pod web"));
}

// ---------------------------------------------------------------------------------------------------
// Per-pod listeners (root).

/// What the serve function saw.
#[derive(Debug, Default)]
struct Served {
    /// `uid namespace/name` per started pod.
    starts: Mutex<Vec<String>>,
    /// `(port, mark, reuse_port)` per listener.
    options: Mutex<Vec<(u16, u32, bool)>>,
}

/// A manager whose pods answer every connection with `"<uid> <port>"`, until their drain fires.
fn listener_manager(served: Arc<Served>) -> Arc<ListenerPodManager> {
    Arc::new(ListenerPodManager::new(
        PodListenerConfig::default(),
        move |pod: PodStart| {
            let uid = pod.uid.clone();
            served
                .starts
                .lock()
                .unwrap()
                .push(format!("{uid} {}/{}", pod.info.namespace, pod.info.name));
            let PodListeners {
                outbound,
                inbound_plaintext,
                inbound_hbone,
            } = pod.listeners;
            for (listener, port) in [
                (outbound, 15001),
                (inbound_plaintext, 15006),
                (inbound_hbone, 15008),
            ] {
                let mark = mesh_core::sys::mark(&listener).unwrap();
                let reuse_port = socket2::SockRef::from(&listener).reuse_port().unwrap();
                served.options.lock().unwrap().push((port, mark, reuse_port));
                let (uid, drain) = (uid.clone(), pod.drain.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = drain.signaled() => break,
                            accepted = listener.accept() => {
                                if let Ok((mut stream, _)) = accepted {
                                    let _ = stream.write_all(format!("{uid} {port}").as_bytes()).await;
                                }
                            }
                        }
                    }
                    // The listener is dropped here: the port closes inside the pod.
                });
            }
        },
    ))
}

/// Connects to `127.0.0.1:port` from inside `pod` and reads the greeting.
fn greeting(pod: &Netns, port: u16) -> io::Result<String> {
    pod.run(move || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut greeting = String::new();
        stream.read_to_string(&mut greeting)?;
        Ok(greeting)
    })
    .expect("joining the pod's namespace")
}

/// Waits (bounded) until nothing listens on `port` inside `pod`.
fn wait_until_refused(pod: &Netns, port: u16) {
    for _ in 0..400 {
        match greeting(pod, port) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return,
            _ => std::thread::sleep(Duration::from_millis(25)),
        }
    }
    panic!(
        "port {port} still open in {} after the pod was deleted",
        pod.name()
    );
}

#[test]
fn pods_are_served_inside_their_own_namespaces_until_deleted() {
    isolated(|| {
        inpod::verify_capabilities(Some(mesh_core::sys::PROXY_MARK)).unwrap();
        let (a, b) = (Netns::create("poda").unwrap(), Netns::create("podb").unwrap());
        let dir = TempDir::new();
        let path = dir.0.join("ztunnel.sock");
        let cni = FakeCni::bind(&path).unwrap();
        let served = Arc::new(Served::default());
        let _client = Client::start(&path, listener_manager(served.clone()));

        let conn = cni.accept().unwrap();
        assert_eq!(conn.add("uid-a", &info("uid-a"), &a.file().unwrap()).unwrap(), "");
        assert_eq!(conn.add("uid-b", &info("uid-b"), &b.file().unwrap()).unwrap(), "");
        assert_eq!(conn.snapshot_sent().unwrap(), "");
        // The ack means the listeners are bound: each pod reaches its own on its loopback.
        for port in [15001, 15006, 15008] {
            assert_eq!(greeting(&a, port).unwrap(), format!("uid-a {port}"));
            assert_eq!(greeting(&b, port).unwrap(), format!("uid-b {port}"));
        }
        let mut starts = served.starts.lock().unwrap().clone();
        starts.sort();
        assert_eq!(starts, ["uid-a shop/uid-a-pod", "uid-b shop/uid-b-pod"]);
        let options = served.options.lock().unwrap().clone();
        assert_eq!(options.len(), 6);
        assert!(
            options.iter().all(|&(_, mark, reuse)| mark == 1337 && reuse),
            "{options:?}"
        );

        assert_eq!(conn.del("uid-a").unwrap(), "");
        for port in [15001, 15006, 15008] {
            wait_until_refused(&a, port);
        }
        assert_eq!(greeting(&b, 15008).unwrap(), "uid-b 15008");
    });
}

#[test]
fn a_restarted_cni_keeps_resent_pods_and_removes_the_others() {
    isolated(|| {
        let (a, b) = (Netns::create("poda").unwrap(), Netns::create("podb").unwrap());
        let dir = TempDir::new();
        let path = dir.0.join("ztunnel.sock");
        let cni = FakeCni::bind(&path).unwrap();
        let served = Arc::new(Served::default());
        let mut client = Client::start(&path, listener_manager(served.clone()));

        let conn = cni.accept().unwrap();
        assert_eq!(conn.add("uid-a", &info("uid-a"), &a.file().unwrap()).unwrap(), "");
        assert_eq!(conn.add("uid-b", &info("uid-b"), &b.file().unwrap()).unwrap(), "");
        assert_eq!(conn.snapshot_sent().unwrap(), "");
        drop(conn);
        drop(cni);
        client.wait_for(|s| !s.connected);
        // Pods stay served while istio-cni is away.
        assert_eq!(greeting(&b, 15008).unwrap(), "uid-b 15008");

        let cni = FakeCni::bind(&path).unwrap();
        let conn = cni.accept().unwrap();
        assert_eq!(conn.add("uid-a", &info("uid-a"), &a.file().unwrap()).unwrap(), "");
        assert_eq!(conn.snapshot_sent().unwrap(), "");
        wait_until_refused(&b, 15008);
        assert_eq!(greeting(&a, 15008).unwrap(), "uid-a 15008");
        // "uid-a" kept its listeners: it was started once.
        assert_eq!(served.starts.lock().unwrap().len(), 2);
        assert_eq!(client.status().pods, 1);
    });
}
