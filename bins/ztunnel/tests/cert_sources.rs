//! ztunnel's certificate sources other than a CA: a development root on disk (`DEV_CA_DIR`, our FAKE_CA)
//! and PEM files (`CERT_DIR`). Each runs the binary in a network namespace of its own (the ports are
//! fixed), with inline static configuration, and reads `config_dump` to see which certificate it serves.
//!
//! Each test runs in a sandbox of its own (`mesh_test::netns::isolated`), so it needs no root; it needs
//! util-linux and iproute2 (CI has both), and fails saying why when it cannot have them.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use mesh_core::ca::LeafSpec;
use mesh_core::{DevCa, TrustDomain};
use mesh_test::netns::{Netns, isolated};

const LOCAL_XDS: &str = r#"
workloads:
- uid: Kubernetes//Pod/default/app
  name: app
  namespace: default
  serviceAccount: app
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: node-a
"#;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("meshkit-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Proxy(Child, PathBuf);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(node: &Netns, log: &Path, env: &[(&str, &Path)]) -> Proxy {
    let child = node
        .command(env!("CARGO_BIN_EXE_ztunnel"))
        .env_clear()
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", "default/app/app")
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS", LOCAL_XDS)
        .env("IPV6_ENABLED", "false")
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Proxy(child, log.to_owned())
}

/// The config_dump once the proxy is ready (bounded wait), or the proxy's log in the panic.
fn config_dump(node: &Netns, proxy: &Proxy) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dump = node
            .run(|| -> Option<String> {
                let ready = get("127.0.0.1:15021", "/healthz/ready")?;
                if !ready.starts_with("HTTP/1.1 200") {
                    return None;
                }
                get("127.0.0.1:15000", "/config_dump")
            })
            .unwrap();
        if let Some(dump) = dump {
            return dump;
        }
        assert!(
            Instant::now() < deadline,
            "ztunnel not ready:\n{}",
            std::fs::read_to_string(&proxy.1).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A GET (see [`request`]).
fn get(addr: &str, path: &str) -> Option<String> {
    request("GET", addr, path)
}

fn ca() -> DevCa {
    DevCa::new(
        TrustDomain::new("cluster.local").unwrap(),
        Duration::from_secs(3600),
    )
    .unwrap()
}

#[test]
fn a_development_root_on_disk_signs_the_workload_certificate() {
    isolated(|| {
        let node = Netns::create("devca").expect("network namespaces are required for this test");
        let dir = Dir::new("devca");
        let ca = ca();
        std::fs::write(dir.0.join("root-cert.pem"), ca.root_pem()).unwrap();
        std::fs::write(dir.0.join("ca-key.pem"), ca.root_key_pem()).unwrap();
        let proxy = start(&node, &dir.0.join("ztunnel.log"), &[("DEV_CA_DIR", &dir.0)]);
        let dump = config_dump(&node, &proxy);
        assert!(
            dump.contains("spiffe://cluster.local/ns/default/sa/app"),
            "{dump}"
        );
        assert!(!dump.contains("PRIVATE KEY"), "{dump}");
        // Its health on the metrics endpoint: one certificate held, valid for at most SECRET_TTL (a day).
        let metrics = node.run(|| get("127.0.0.1:15020", "/metrics")).unwrap().unwrap();
        assert!(
            metrics.contains("\nmeshkit_workload_certificates 1\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("\nmeshkit_workload_certificate_failures_total 0\n"),
            "{metrics}"
        );
        let expiry = metrics
            .lines()
            .find(|line| {
                line.starts_with(
                    "meshkit_workload_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/default/sa/app\"} ",
                )
            })
            .unwrap_or_else(|| panic!("no expiry sample:\n{metrics}"));
        let seconds: f64 = expiry.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(seconds > 0.0 && seconds <= 86_400.0, "{expiry}");
    });
}

#[test]
fn certificates_from_pem_files_are_served() {
    isolated(|| {
        let node = Netns::create("certdir").expect("network namespaces are required for this test");
        let dir = Dir::new("certdir");
        let ca = ca();
        let now = std::time::SystemTime::now();
        let (chain, key) = ca
            .issue_raw(&LeafSpec {
                uri_sans: vec!["spiffe://cluster.local/ns/default/sa/app".to_owned()],
                not_before: now - Duration::from_secs(60),
                not_after: now + Duration::from_secs(3600),
            })
            .unwrap();
        let pem = |der: &[u8], label: &str| {
            use base64::Engine;
            let body = base64::engine::general_purpose::STANDARD.encode(der);
            let lines: Vec<&str> = body
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            format!(
                "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
                lines.join("\n")
            )
        };
        let chain: String = chain.iter().map(|c| pem(c, "CERTIFICATE")).collect();
        std::fs::write(dir.0.join("cert-chain.pem"), chain).unwrap();
        std::fs::write(dir.0.join("root-cert.pem"), ca.root_pem()).unwrap();
        std::fs::write(dir.0.join("key.pem"), pem(key.secret_der(), "PRIVATE KEY")).unwrap();
        let proxy = start(&node, &dir.0.join("ztunnel.log"), &[("CERT_DIR", &dir.0)]);
        let dump = config_dump(&node, &proxy);
        assert!(
            dump.contains("spiffe://cluster.local/ns/default/sa/app"),
            "{dump}"
        );
    });
}

/// LOG_FORMAT=json (as Istio's chart sets it): every line the proxy writes while it starts up and serves
/// is one JSON object with the level and the message at its top level, as log collectors expect.
#[test]
fn json_logs_are_one_object_per_line() {
    isolated(|| {
        let node = Netns::create("jsonlog").expect("network namespaces are required for this test");
        let dir = Dir::new("jsonlog");
        let ca = ca();
        std::fs::write(dir.0.join("root-cert.pem"), ca.root_pem()).unwrap();
        std::fs::write(dir.0.join("ca-key.pem"), ca.root_key_pem()).unwrap();
        let log = dir.0.join("ztunnel.log");
        let proxy = start(
            &node,
            &log,
            &[("DEV_CA_DIR", &dir.0), ("LOG_FORMAT", Path::new("json"))],
        );
        config_dump(&node, &proxy);
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().filter(|line| !line.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "a proxy that started logged nothing");
        for line in &lines {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}\n{text}"));
            // Istio ztunnel's keys: a lower-case level, the time, the target as "scope".
            let level = value["level"].as_str().unwrap_or_default();
            assert!(
                ["error", "warn", "info", "debug", "trace"].contains(&level),
                "no lower-case level: {line}"
            );
            assert!(value["time"].is_string(), "no time: {line}");
            assert!(value["scope"].is_string(), "no scope: {line}");
            assert!(value["message"].is_string(), "no top-level message: {line}");
        }
        assert!(
            lines.iter().any(|line| line.contains("\"identity\"")),
            "the event's fields are not at the top level:\n{text}"
        );
    });
}

/// One HTTP/1.1 request with an empty body, the whole response back (bounded by timeouts).
fn request(method: &str, addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// Plaintext on the HBONE port: the proxy refuses it, and says so only at DEBUG.
fn plaintext_probe() {
    if let Ok(mut stream) =
        TcpStream::connect_timeout(&"127.0.0.1:15008".parse().unwrap(), Duration::from_secs(2))
    {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let _ = stream.read_to_end(&mut Vec::new());
    }
}

/// The running binary's log filter changes through the admin endpoint (`/logging`), as Istio's ztunnel
/// allows: events below the level stay out of the log until it is lowered, and `reset` restores it.
#[test]
fn the_log_level_changes_at_run_time_through_the_admin_endpoint() {
    isolated(|| {
        let node = Netns::create("loglevel").expect("network namespaces are required for this test");
        let dir = Dir::new("loglevel");
        let ca = ca();
        std::fs::write(dir.0.join("root-cert.pem"), ca.root_pem()).unwrap();
        std::fs::write(dir.0.join("ca-key.pem"), ca.root_key_pem()).unwrap();
        let log = dir.0.join("ztunnel.log");
        let proxy = start(&node, &log, &[("DEV_CA_DIR", &dir.0)]);
        config_dump(&node, &proxy);
        let admin = |method: &'static str, path: &'static str| {
            node.run(move || request(method, "127.0.0.1:15000", path))
                .unwrap()
                .unwrap_or_default()
        };
        let debug_lines = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter(|line| line.contains(" DEBUG "))
                .count()
        };

        assert!(
            admin("GET", "/logging").contains("info"),
            "{}",
            admin("GET", "/logging")
        );
        node.run(plaintext_probe).unwrap();
        assert_eq!(debug_lines(), 0, "DEBUG lines at level info");

        let set = admin("POST", "/logging?level=debug");
        assert!(set.starts_with("HTTP/1.1 200"), "{set}");
        assert!(
            admin("GET", "/logging").contains("debug"),
            "{}",
            admin("GET", "/logging")
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while debug_lines() == 0 {
            assert!(
                Instant::now() < deadline,
                "no DEBUG line after the level was lowered:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            node.run(plaintext_probe).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }

        let reset = admin("POST", "/logging?reset");
        assert!(reset.starts_with("HTTP/1.1 200"), "{reset}");
        assert!(
            admin("GET", "/logging").contains("info"),
            "{}",
            admin("GET", "/logging")
        );
        drop(proxy);
    });
}
