//! Arbitrary bytes as a series of ZDS packets from istio-cni (the in-pod protocol): each packet is
//! decoded as a `WorkloadRequest` with the file descriptors it claims to carry (real ones: our own
//! network namespace, another namespace, or a file that is none), and handled by the node proxy's pod
//! table against a pod manager that records what it is asked to start and stop
//! (`mesh_proxy::inpod::zds::__fuzz::session`, which documents the packet format and the checks).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    runtime.block_on(mesh_proxy::inpod::zds::__fuzz::session(data));
});
