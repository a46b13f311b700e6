//! In-pod mode as a Kubernetes node runs it, in network namespaces, laid out as Istio's own netns harness
//! lays it out (`src/test_helpers/netns.rs` in istio/ztunnel): a network namespace holding a bridge
//! (172.172.0.1/16, where the control plane listens), each node a namespace on that bridge (172.172.0.N),
//! and each pod a namespace of its own joined to its node by a veth pair, with IP `10.0.<node>.<pod>`
//! routed through the node (so traffic between two pods of one node crosses the node too). Istio's in-pod
//! capture rules are applied inside each pod, as istio-cni applies them, and the node's ztunnel receives
//! the pods from a fake istio-cni ([`mesh_test::cni::FakeCni`]).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

use mesh_test::cni::{self, WorkloadInfo};
use mesh_test::netns::{self, Netns};

use super::{Ztunnel, http_get, pod};

/// The bridge's address in the network namespace; the control plane listens here.
pub const NETWORK_IP: &str = "172.172.0.1";
/// The control plane's address, reachable from every node.
pub const CONTROL_PLANE_ADDR: &str = "172.172.0.1:15012";
/// Pods live in this Kubernetes namespace.
pub const POD_NAMESPACE: &str = "default";

/// Istio's in-pod capture rules (istio/ztunnel `scripts/ztunnel-redirect-inpod.sh`: istio-cni's rules in
/// their REDIRECT form, without TPROXY), in `iptables-restore` form: the pod's outbound TCP goes to 15001 and
/// its inbound TCP, except HBONE on 15008, to 15006; packets with ztunnel's mark 0x539 (1337) are left
/// alone and their connections connmarked 0x111 so replies are too; loopback traffic and kubelet's probes
/// (SNATed to 169.254.7.127 on the node) are exempt.
const INPOD_RULES: &str = "\
*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
COMMIT
*nat
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
COMMIT
";

/// Applies [`INPOD_RULES`] inside `pod`, with the script's route for connmarked replies.
pub fn redirect_inpod(pod: &Netns) {
    let mut restore = pod
        .command("iptables-restore")
        .args(["-w", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("iptables-restore (apt-get install iptables)");
    restore
        .stdin
        .take()
        .unwrap()
        .write_all(INPOD_RULES.as_bytes())
        .unwrap();
    let output = restore.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "iptables-restore in {}: {}",
        pod.name(),
        String::from_utf8_lossy(&output.stderr)
    );
    pod.ip(&["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
        .unwrap();
    pod.ip(&[
        "rule",
        "add",
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ])
    .unwrap();
}

/// Runs `sysctl -w <setting>` inside `ns`.
fn sysctl(ns: &Netns, setting: &str) {
    netns::run(ns.command("sysctl").args(["-q", "-w", setting])).unwrap();
}

/// The network the nodes share: a bridge in its own namespace.
pub struct Network {
    pub netns: Netns,
    /// The nodes so far: id and namespace name, to route every new node's pods from the others.
    nodes: Mutex<Vec<(u8, String)>>,
}

impl Network {
    pub fn new() -> Network {
        super::sandboxed();
        let netns = Netns::create("net").expect("network namespaces are required for this test");
        netns.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
        netns
            .ip(&["addr", "add", &format!("{NETWORK_IP}/16"), "dev", "br0"])
            .unwrap();
        netns.ip(&["link", "set", "br0", "up"]).unwrap();
        Network {
            netns,
            nodes: Mutex::new(Vec::new()),
        }
    }

    /// A node named `name` (its Kubernetes node name) on the bridge, forwarding for its pods, with routes
    /// to the pods of every node before it (and theirs to its own).
    pub fn node(&self, name: &str) -> Node {
        let mut nodes = self.nodes.lock().unwrap();
        let id = u8::try_from(nodes.len() + 2).unwrap();
        let netns = Netns::create(name).unwrap();
        let bridge_end = format!("vn{id}");
        self.netns
            .ip(&[
                "link",
                "add",
                &bridge_end,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns.name(),
            ])
            .unwrap();
        self.netns
            .ip(&["link", "set", &bridge_end, "master", "br0"])
            .unwrap();
        self.netns.ip(&["link", "set", &bridge_end, "up"]).unwrap();
        let ip = format!("172.172.0.{id}");
        netns
            .ip(&["addr", "add", &format!("{ip}/16"), "dev", "eth0"])
            .unwrap();
        netns.ip(&["link", "set", "eth0", "up"]).unwrap();
        sysctl(&netns, "net.ipv4.ip_forward=1");
        // The pods' veths share the node's gateway address: the reverse-path filter would drop their
        // packets.
        sysctl(&netns, "net.ipv4.conf.all.rp_filter=0");
        sysctl(&netns, "net.ipv4.conf.default.rp_filter=0");
        for (other, other_ns) in nodes.iter() {
            netns
                .ip(&[
                    "route",
                    "add",
                    &format!("10.0.{other}.0/24"),
                    "via",
                    &format!("172.172.0.{other}"),
                ])
                .unwrap();
            netns::run(Command::new("ip").args([
                "-n",
                other_ns,
                "route",
                "add",
                &format!("10.0.{id}.0/24"),
                "via",
                &ip,
            ]))
            .unwrap();
        }
        // The network's own namespace (not a workload) reaches the node's pods through it: it stands for
        // clients and servers outside the mesh.
        self.netns
            .ip(&["route", "add", &format!("10.0.{id}.0/24"), "via", &ip])
            .unwrap();
        nodes.push((id, netns.name().to_owned()));
        Node {
            netns,
            name: name.to_owned(),
            id,
            next_pod: AtomicU8::new(2),
        }
    }
}

/// A node: its namespace is where its ztunnel runs.
pub struct Node {
    pub netns: Netns,
    /// The Kubernetes node name.
    pub name: String,
    pub id: u8,
    next_pod: AtomicU8,
}

impl Node {
    /// The node's address on the bridge (its metrics and readiness listen there too).
    pub fn ip(&self) -> String {
        format!("172.172.0.{}", self.id)
    }

    /// A pod named `name` (service account `name`, namespace [`POD_NAMESPACE`]) on this node, with
    /// Istio's in-pod capture rules already applied, as istio-cni applies them before the pod's
    /// containers start.
    pub fn pod(&self, name: &str) -> Pod {
        let pod_id = self.next_pod.fetch_add(1, Ordering::Relaxed);
        let (node_id, gateway) = (self.id, format!("10.0.{}.1", self.id));
        let ip = format!("10.0.{node_id}.{pod_id}");
        let netns = Netns::create(name).unwrap();
        let node_end = format!("vp{pod_id}");
        self.netns
            .ip(&[
                "link",
                "add",
                &node_end,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns.name(),
            ])
            .unwrap();
        self.netns.ip(&["link", "set", &node_end, "up"]).unwrap();
        self.netns
            .ip(&["addr", "add", &format!("{gateway}/32"), "dev", &node_end])
            .unwrap();
        self.netns
            .ip(&["route", "add", &format!("{ip}/32"), "dev", &node_end])
            .unwrap();
        sysctl(&self.netns, &format!("net.ipv4.conf.{node_end}.rp_filter=0"));
        netns
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])
            .unwrap();
        netns.ip(&["link", "set", "eth0", "up"]).unwrap();
        // Everything, the node's other pods included, goes through the node (a point-to-point link, as
        // the CNI `ptp` plugin sets it up).
        netns
            .ip(&["route", "del", &format!("10.0.{node_id}.0/24")])
            .unwrap();
        netns
            .ip(&[
                "route", "add", &gateway, "dev", "eth0", "scope", "link", "src", &ip,
            ])
            .unwrap();
        netns
            .ip(&["route", "add", "default", "via", &gateway, "src", &ip])
            .unwrap();
        redirect_inpod(&netns);
        Pod {
            netns,
            name: name.to_owned(),
            ip,
            uid: kubernetes_uid(),
        }
    }
}

/// A pod: its own network namespace, its address, and the UID istio-cni names it by.
pub struct Pod {
    pub netns: Netns,
    pub name: String,
    pub ip: String,
    /// The Kubernetes pod UID (`metadata.uid`), which istio-cni sends in ZDS; xDS keys the same pod as
    /// `<cluster>//Pod/<namespace>/<name>`, so the node proxy must not mistake one for the other.
    pub uid: String,
}

impl Pod {
    /// What istio-cni says of the pod in `add`.
    pub fn info(&self) -> WorkloadInfo {
        cni::workload_info(POD_NAMESPACE, &self.name, &self.name)
    }

    /// The pod as the control plane reads it (Kubernetes YAML).
    pub fn yaml(&self, node: &Node) -> String {
        pod(&self.name, POD_NAMESPACE, &self.ip, &node.name)
    }

    /// `spiffe://cluster.local/ns/default/sa/<name>`.
    pub fn principal(&self) -> String {
        format!("spiffe://cluster.local/ns/{POD_NAMESPACE}/sa/{}", self.name)
    }

    /// `ip:port` of the pod.
    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }
}

/// A UUID as the Kubernetes API server gives pods, unique within this run.
fn kubernetes_uid() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-5e2e-4a1b-9c3d-{n:012x}", std::process::id())
}

/// Starts our ztunnel in `node`'s namespace in in-pod mode, talking to the control plane at
/// [`CONTROL_PLANE_ADDR`] with `token`, and to istio-cni at `socket`.
/// `extra` environment variables come last, so they override.
pub fn start_ztunnel(
    node: &Node,
    dir: &Path,
    socket: &Path,
    token: &str,
    extra: &[(&str, String)],
) -> Ztunnel {
    let mut env = vec![
        ("PROXY_MODE", "shared".to_owned()),
        ("NODE_NAME", node.name.clone()),
        ("INPOD_ENABLED", "true".to_owned()),
        ("INPOD_UDS", socket.display().to_string()),
        ("XDS_ADDRESS", format!("https://{CONTROL_PLANE_ADDR}")),
        ("INSTANCE_IP", node.ip()),
    ];
    env.extend(extra.iter().cloned());
    Ztunnel::start(&node.netns, dir, &node.name, token, &env)
}

/// The node proxy's readiness: status and body, trimmed (`None` while it does not answer).
pub fn readiness(node: &Node) -> Option<(u16, String)> {
    http_get(&node.netns, &format!("{}:15021", node.ip()), "/healthz/ready")
        .map(|(status, body)| (status, body.trim().to_owned()))
}

/// Whether something listens on `127.0.0.1:port` inside `pod` (a refused connection says no; loopback is
/// exempt from the capture rules, so this reaches the pod's own sockets).
pub fn listening(pod: &Pod, port: u16) -> bool {
    pod.netns
        .run(move || {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
        })
        .unwrap()
}
