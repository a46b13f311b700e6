//! `meshctl control-plane` as a user runs it: a real process serving a YAML file over TLS, read by our
//! ADS client, stopped with SIGTERM.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use mesh_xds::XdsAddress;
use mesh_xds::client::{AdsClientBuilder, ZtunnelNode};
use mesh_xds::transport::{CallCredentials, GrpcClientConfig, TokenSource, connect_lazy};

const CONFIG: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  trustDomain: cluster.local
  workloadIps: ["198.18.0.1"]
  protocol: HBONE
  node: node-a
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/198.19.0.10"]
  ports: {80: 8080}
"#;

#[tokio::test]
async fn serves_a_config_file_until_sigterm() {
    let dir = std::env::temp_dir().join(format!("meshctl-cp-{}-{}", std::process::id(), unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mesh.yaml");
    let root = dir.join("root.pem");
    std::fs::write(&config, CONFIG).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args([
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--ztunnel-node",
            "node-a",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--root-cert-out")
        .arg(&root)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Lines are read off the runtime (reads block) and handed over one by one; the reader keeps draining
    // until the process exits, so its last words are seen too.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::task::spawn_blocking(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines_tx.send(line);
        }
    });
    let line = tokio::time::timeout(Duration::from_secs(30), lines.recv())
        .await
        .expect("no output within 30 s")
        .expect("meshctl exited without output");
    let url = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    assert!(url.starts_with("https://localhost:"), "{line}");

    let roots = std::fs::read(&root).unwrap();
    let channel = connect_lazy(&GrpcClientConfig::new(url).with_roots_pem(roots)).unwrap();
    let mut builder = AdsClientBuilder::new(ZtunnelNode::default().to_proto());
    let mut addresses = builder.watch::<XdsAddress>();
    let credentials = CallCredentials::bearer(TokenSource::Literal("dev".into())).unwrap();
    let (client, handle) = builder.build(channel, credentials);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(client.run(async {
        let _ = stopped.await;
    }));
    tokio::time::timeout(Duration::from_secs(20), handle.wait_ready())
        .await
        .unwrap()
        .unwrap();
    let held = addresses.current();
    assert_eq!(held.len(), 2, "the workload and the service");
    assert!(held.get("default/echo.default.svc.cluster.local").is_some());
    let _ = stop.send(());

    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -TERM {}", child.id()))
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .expect("meshctl did not stop on SIGTERM")
    .unwrap()
    .unwrap();
    assert!(exit.success(), "{exit:?}");
    tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    while let Ok(line) = lines.try_recv() {
        rest.push(line);
    }
    assert_eq!(rest.last().map(String::as_str), Some("stopping"), "{rest:?}");
    let _ = std::fs::remove_dir_all(PathBuf::from(&dir));
}

/// Distinguishes directories of test runs started in the same process id namespace.
fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
