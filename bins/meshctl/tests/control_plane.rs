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
    scenario(&["--ztunnel-node", "node-a"], "dev", None).await;
}

#[tokio::test]
async fn with_static_tokens_only_those_tokens_are_accepted() {
    scenario(
        &[
            "--token",
            "s3cret=spiffe://cluster.local/ns/istio-system/sa/ztunnel@node-a",
        ],
        "s3cret",
        Some("guess"),
    )
    .await;
}

/// Runs `meshctl control-plane` with `extra` arguments, reads it with `token` (and, if given, checks that
/// `refused` is turned away), and stops it with SIGTERM.
async fn scenario(extra: &[&str], token: &str, refused: Option<&str>) {
    let dir = std::env::temp_dir().join(format!("meshctl-cp-{}-{}", std::process::id(), unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mesh.yaml");
    let root = dir.join("root.pem");
    std::fs::write(&config, CONFIG).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["control-plane", "--listen", "127.0.0.1:0"])
        .args(extra)
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
    let grpc = GrpcClientConfig::new(url).with_roots_pem(roots);
    if let Some(refused) = refused {
        let mut builder = AdsClientBuilder::new(ZtunnelNode::default().to_proto());
        let _addresses = builder.watch::<XdsAddress>();
        let credentials = CallCredentials::bearer(TokenSource::Literal(refused.into())).unwrap();
        let (client, handle) = builder.build(connect_lazy(&grpc).unwrap(), credentials);
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(client.run(async {
            let _ = stopped.await;
        }));
        let mut status = handle.status_watch();
        let status = tokio::time::timeout(
            Duration::from_secs(20),
            status.wait_for(|s| s.last_error.is_some()),
        )
        .await
        .unwrap()
        .unwrap()
        .clone();
        assert!(
            status.last_error.as_deref().unwrap().contains("Unauthenticated"),
            "{status:?}"
        );
    }
    let channel = connect_lazy(&grpc).unwrap();
    let mut builder = AdsClientBuilder::new(ZtunnelNode::default().to_proto());
    let mut addresses = builder.watch::<XdsAddress>();
    let credentials = CallCredentials::bearer(TokenSource::Literal(token.into())).unwrap();
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
