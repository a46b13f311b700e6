//! `meshctl demo`, the README's first command, runs to the end and shows what it promises.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::process::Command;

#[test]
fn the_demo_runs_and_shows_rotation_refusals_and_a_pushed_policy() {
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["demo", "--cert-lifetime", "2s", "--run-for", "3s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for expected in [
        "control  local control plane at https://localhost:",
        "xds      ready: 2 workloads, 1 services and 1 L4 policy (default/allow-client) received",
        "issued by the control plane's CA",
        "allowed by default/allow-client rule 0",
        "rotate   spiffe://cluster.local/ns/default/sa/client renewed",
        "refused  spiffe://cluster.local/ns/default/sa/intruder -> 127.0.0.1:8080: HBONE 401",
        "denied: no ALLOW policy matched (1 applied)",
        "refused  spiffe://cluster.local/ns/default/sa/client -> 127.0.0.1:9090: HBONE 401",
        "now opens: got \"pong to client (hello on 9090)\"",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}\n{stderr}"
        );
    }
}
