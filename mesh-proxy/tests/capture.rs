//! Transparent capture with `iptables TPROXY` ([`CaptureMode::Tproxy`]), in network namespaces: a pod
//! behind a node, the node's mangle rule handing the pod's TCP to the outbound listener unchanged (no
//! NAT), and a server on another link. The proxy must read the original destination from the accepted
//! socket and reach it itself (the server sees the node's address, not the pod's, so the connection was
//! proxied, not forwarded), and must refuse a destination on its own ports, which would loop; both in
//! TPROXY mode and in the node proxy's Auto mode. The inbound plaintext side reads the same original
//! destination from such a connection.
//! (`REDIRECT` capture is covered end to end by the ztunnel suites.)
//!
//! Each test runs in a sandbox of its own (`mesh_test::netns::isolated`), so it needs no root; it needs
//! util-linux, iproute2 and iptables, and fails saying why when it cannot have them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::cert::StaticCertProvider;
use mesh_core::model::{MeshSnapshot, Workload};
use mesh_hbone::{HboneConfig, HboneConnector};
use mesh_policy::L4PolicySet;
use mesh_proxy::inbound::PlaintextConnection;
use mesh_proxy::listener::{ListenerConfig, bind_capture_listener, serve_tcp};
use mesh_proxy::outbound::{CaptureMode, Outbound, OutboundConfig, SourceLookup};
use mesh_proxy::state::ProxyState;
use mesh_proxy::telemetry::Observers;
use mesh_test::netns::{self, Netns, isolated};

const POD_IP: &str = "10.1.0.2";
const NODE_POD_SIDE: &str = "10.1.0.1";
const NODE_SERVER_SIDE: &str = "10.2.0.1";
const SERVER_IP: &str = "10.2.0.2";
const SERVER_PORT: u16 = 8080;
const OUTBOUND_PORT: u16 = 15001;

/// Every socket operation of these tests gives up after this, so a test can never hang.
const STEP: Duration = Duration::from_secs(10);

/// The three namespaces, wired: pod -- node -- server, the node routing between its two links.
struct Topology {
    pod: Netns,
    node: Netns,
    server: Netns,
}

fn topology() -> Topology {
    let pod = Netns::create("pod").expect("network namespaces are required for this test");
    let node = Netns::create("node").expect("network namespaces are required for this test");
    let server = Netns::create("server").expect("network namespaces are required for this test");
    netns::connect(
        &pod,
        &format!("{POD_IP}/24"),
        &node,
        &format!("{NODE_POD_SIDE}/24"),
    )
    .unwrap();
    netns::connect(
        &node,
        &format!("{NODE_SERVER_SIDE}/24"),
        &server,
        &format!("{SERVER_IP}/24"),
    )
    .unwrap();
    pod.ip(&["route", "add", "default", "via", NODE_POD_SIDE])
        .unwrap();
    server
        .ip(&["route", "add", "default", "via", NODE_SERVER_SIDE])
        .unwrap();
    node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .unwrap()
        .unwrap();
    // The capture: the pod's TCP goes, untouched, to the outbound listener (a socket lookup finds the
    // established connection for later packets); marked packets are delivered locally.
    let port = OUTBOUND_PORT.to_string();
    node.iptables(&[
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-s",
        "10.1.0.0/24",
        "-p",
        "tcp",
        "-j",
        "TPROXY",
        "--on-port",
        &port,
        "--tproxy-mark",
        "0x1/0x1",
    ])
    .expect("iptables with the TPROXY target is required for this test");
    node.ip(&["rule", "add", "fwmark", "0x1/0x1", "lookup", "100"])
        .unwrap();
    node.ip(&["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
        .unwrap();
    Topology { pod, node, server }
}

/// An echo server in `server` that answers each line with the line and the peer's address.
fn echo_server(server: &Netns) -> std::thread::JoinHandle<Result<(), netns::NetnsError>> {
    let listener = server
        .run(|| std::net::TcpListener::bind((SERVER_IP, SERVER_PORT)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        // One connection per test run is all the cases need; more would only be from a test gone wrong.
        for stream in listener.incoming().take(2) {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(STEP));
            let peer = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            let mut line = String::new();
            if BufReader::new(stream.try_clone().unwrap())
                .read_line(&mut line)
                .is_ok()
            {
                let _ = writeln!(stream, "{} from {peer}", line.trim_end());
            }
        }
        Ok(())
    })
}

/// The capture listener on the node's 15001, bound by `bind_capture_listener`, which must have made it
/// transparent (the sandbox grants `CAP_NET_ADMIN` over its namespaces), or TPROXY could not use it.
fn capture_listener() -> tokio::net::TcpListener {
    let (listener, transparent) =
        bind_capture_listener(SocketAddr::from(([0, 0, 0, 0], OUTBOUND_PORT))).unwrap();
    assert!(transparent, "IP_TRANSPARENT needs CAP_NET_ADMIN in the namespace");
    listener
}

/// The outbound proxy with capture `mode`, listening on the node with `IP_TRANSPARENT`, serving until
/// `stop` fires. Runs on a thread inside the node's namespace, so its upstream sockets are the node's.
fn outbound_proxy(
    node: &Netns,
    mode: CaptureMode,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    let pod = Workload {
        addresses: vec![POD_IP.parse().unwrap()],
        service_account: "client".into(),
        ..Workload::new("cluster1//v1/Pod/default/client", "client", "default")
    };
    let snapshot = MeshSnapshot::builder().add_workload(pod).build().unwrap();
    let state = ProxyState::fixed(snapshot, L4PolicySet::default());
    let connector = HboneConnector::new(HboneConfig::default(), Arc::new(StaticCertProvider::new()));
    let outbound = Outbound::new(
        OutboundConfig {
            source: SourceLookup::PeerIp { network: "".into() },
            capture: mode,
            connect_timeout: STEP,
            ..OutboundConfig::default()
        },
        state,
        connector,
        Observers::default(),
    );
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = node
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = capture_listener();
                let (trigger, drain) = mesh_core::drain::channel();
                ready_tx.send(()).unwrap();
                let serving = tokio::spawn(async move {
                    serve_tcp(listener, outbound, &ListenerConfig::default(), drain).await;
                });
                let _ = stop.await;
                trigger.drain().await;
                let _ = serving.await;
            });
        })
        .unwrap();
    ready_rx
        .recv_timeout(STEP)
        .expect("the outbound proxy did not start");
    std::thread::spawn(move || {
        let _ = thread.join();
    })
}

/// One line from the pod to `to`: the reply, or how the connection ended.
fn exchange_from_pod(pod: &Netns, to: SocketAddr) -> Result<String, String> {
    pod.run(move || -> Result<String, String> {
        let mut stream = TcpStream::connect_timeout(&to, STEP).map_err(|e| format!("connect: {e}"))?;
        stream.set_read_timeout(Some(STEP)).unwrap();
        stream.write_all(b"hello\n").map_err(|e| format!("write: {e}"))?;
        let mut reply = String::new();
        match stream.read_to_string(&mut reply) {
            Ok(_) if !reply.is_empty() => Ok(reply.trim_end().to_owned()),
            Ok(_) => Err("closed without a reply".into()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err("hung".into()),
            Err(e) => Err(format!("read: {e}")),
        }
    })
    .unwrap()
}

#[test]
fn tproxy_captured_connections_reach_their_original_destination_through_the_proxy() {
    isolated(|| {
        let net = topology();
        let server = echo_server(&net.server);
        // TPROXY's own mode, and Auto (the node proxy's: REDIRECT or TPROXY, whichever the rules use).
        for mode in [CaptureMode::Tproxy, CaptureMode::Auto] {
            let (stop, stopped) = tokio::sync::oneshot::channel();
            let proxy = outbound_proxy(&net.node, mode, stopped);
            let reply = exchange_from_pod(&net.pod, SocketAddr::new(SERVER_IP.parse().unwrap(), SERVER_PORT));
            // The server saw the node's address: the proxy made the connection (a forwarded packet
            // would have kept the pod's source), to the destination the pod asked for.
            assert_eq!(reply, Ok(format!("hello from {NODE_SERVER_SIDE}")), "{mode:?}");
            let _ = stop.send(());
            proxy.join().unwrap();
        }
        drop(server);
    });
}

/// The inbound plaintext side (15006) reads a TPROXY'd connection's original destination the same way:
/// `PlaintextConnection::accepted` gives the address the pod asked for, and the pod as the peer.
#[test]
fn a_tproxy_plaintext_connection_knows_its_original_destination() {
    isolated(|| {
        let net = topology();
        let (accepted_tx, accepted_rx) = std::sync::mpsc::channel();
        let node_side = net
            .node
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = capture_listener();
                    let accepted = tokio::time::timeout(STEP, listener.accept()).await;
                    let result = match accepted {
                        Ok(Ok((stream, peer))) => PlaintextConnection::accepted(stream, peer)
                            .map(|c| (c.peer_addr, c.original_dst))
                            .map_err(|e| e.to_string()),
                        Ok(Err(error)) => Err(error.to_string()),
                        Err(_) => Err("nothing was captured".to_owned()),
                    };
                    let _ = accepted_tx.send(result);
                });
            })
            .unwrap();
        // The pod connects; nothing answers it, which does not matter here.
        let target = SocketAddr::new(SERVER_IP.parse().unwrap(), SERVER_PORT);
        let _client = net
            .pod
            .run(move || TcpStream::connect_timeout(&target, STEP))
            .unwrap();
        let (peer, original) = accepted_rx.recv_timeout(STEP * 2).unwrap().unwrap();
        assert_eq!(original, target);
        assert_eq!(peer.ip().to_string(), POD_IP);
        node_side.join().unwrap().unwrap();
    });
}

#[test]
fn a_tproxy_destination_on_the_proxys_own_ports_is_refused() {
    isolated(|| {
        let net = topology();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let proxy = outbound_proxy(&net.node, CaptureMode::Auto, stopped);
        // Captured like any other connection, its original destination is the outbound port itself:
        // proxying it would connect the proxy to itself, so it is closed.
        let reply = exchange_from_pod(
            &net.pod,
            SocketAddr::new(SERVER_IP.parse().unwrap(), OUTBOUND_PORT),
        );
        assert!(
            reply
                .as_ref()
                .is_err_and(|e| e == "closed without a reply" || e.starts_with("read: ")),
            "{reply:?}"
        );
        let _ = stop.send(());
        proxy.join().unwrap();
    });
}
