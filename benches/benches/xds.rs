//! xDS at mesh scale: 10,000 workloads (behind 1,000 services) converted, indexed, and delivered over a
//! real delta-ADS stream on loopback.
//!
//! Printed once before the criterion groups: the time from the client's start until its `MeshSnapshot`
//! holds every workload, and the memory that state retains, each next to a same-run baseline (decoding
//! and converting the same resources in-process; the encoded size of the resources). Then criterion
//! times `decode + convert` of all 10,000 against protobuf decoding alone, and the snapshot build.
#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::alloc::System;
use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use mesh_core::model::{
    MeshSnapshot, NetworkAddr, Service, ServicePort, SnapshotPublisher, TunnelProtocol, Workload,
};
use mesh_xds::client::{AdsClientBuilder, ZtunnelNode, publish_snapshots};
use mesh_xds::server::{AdsLimits, AdsService, ResourcePublisher, ResourceSnapshot, resources_from_mesh};
use mesh_xds::{ADDRESS_TYPE_URL, XdsAddress, XdsAuthorization};
use prost::Message;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const WORKLOADS: usize = 10_000;
const SERVICES: usize = 1_000;

fn mesh() -> (Vec<Workload>, Vec<Service>) {
    let services: Vec<Service> = (0..SERVICES)
        .map(|s| {
            let ns = format!("ns{}", s / 20);
            let mut service = Service::new(
                format!("svc{s}"),
                ns.clone(),
                format!("svc{s}.{ns}.svc.cluster.local"),
            );
            let vip: IpAddr = [10, 96, (s / 250) as u8, (s % 250) as u8].into();
            service.vips = vec![NetworkAddr::on_default_network(vip)];
            service.ports = vec![ServicePort::new(80, 8080), ServicePort::new(443, 8443)];
            service
        })
        .collect();
    let workloads = (0..WORKLOADS)
        .map(|w| {
            let s = w % SERVICES;
            let service = &services[s];
            let name = format!("pod{w}");
            let mut workload = Workload::new(
                format!("Kubernetes//v1/Pod/{}/{name}", service.namespace),
                name,
                service.namespace.clone(),
            );
            workload.service_account = format!("sa{s}").into();
            workload.addresses = vec![[10, 244, (w / 250) as u8, (w % 250) as u8].into()];
            workload.protocol = TunnelProtocol::Hbone;
            workload.node = format!("node{}", w % 50).into();
            workload
                .services
                .insert(service.key(), [(80, 8080), (443, 8443)].into());
            workload
        })
        .collect();
    (workloads, services)
}

fn encoded(resources: &ResourceSnapshot) -> Vec<Vec<u8>> {
    resources
        .resources(ADDRESS_TYPE_URL)
        .unwrap()
        .iter()
        .map(|resource| resource.value.to_vec())
        .collect()
}

fn decode_and_convert(encoded: &[Vec<u8>]) -> Vec<XdsAddress> {
    encoded
        .iter()
        .map(|bytes| mesh_xds::decode_address(bytes).unwrap())
        .collect()
}

/// One delivery of everything over loopback gRPC, timed and measured.
fn delivery(resources: ResourceSnapshot, encoded: &[Vec<u8>]) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let encoded_bytes: usize = encoded.iter().map(Vec::len).sum();

    // Baseline, same run: the same resources decoded and converted in-process, no network.
    let start = Instant::now();
    black_box(decode_and_convert(encoded));
    let in_process = start.elapsed();

    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = AdsService::new(ResourcePublisher::new(resources), AdsLimits::default());
        tokio::spawn(
            tonic::transport::Server::builder()
                .serve_with_incoming(service.into_server(), tonic::transport::server::TcpIncoming::from(listener)),
        );

        let region = Region::new(GLOBAL);
        let start = Instant::now();
        let node = ZtunnelNode { pod_name: "ztunnel".into(), pod_namespace: "istio-system".into(), ..Default::default() };
        let mut builder = AdsClientBuilder::new(node.to_proto());
        let addresses = builder.watch::<XdsAddress>();
        let _policies = builder.watch::<XdsAuthorization>();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        let (client, handle) = builder.build(channel, |request: tonic::Request<()>| Ok(request));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let client_task = tokio::spawn(client.run(async {
            let _ = stopped.await;
        }));
        let snapshots = SnapshotPublisher::new();
        let mut receiver = snapshots.subscribe();
        tokio::spawn(publish_snapshots(addresses, snapshots));
        tokio::time::timeout(Duration::from_secs(60), async {
            while receiver.current().workload_count() < WORKLOADS {
                receiver.changed().await.unwrap();
            }
        })
        .await
        .expect("10,000 workloads within a minute");
        let delivered = start.elapsed();
        assert!(handle.is_ready());
        let stats = region.change();
        let retained = stats.bytes_allocated.saturating_sub(stats.bytes_deallocated);
        println!(
            "xds delivery: {WORKLOADS} workloads + {SERVICES} services over loopback delta ADS, indexed: {delivered:.2?} \
             = {:.1}x decoding and converting them in-process ({in_process:.2?})",
            delivered.as_secs_f64() / in_process.as_secs_f64()
        );
        println!(
            "xds memory: {:.1} MiB retained by the client's state and snapshot ({} bytes per workload) \
             = {:.1}x the encoded resources ({:.1} MiB); {} allocations during delivery",
            retained as f64 / f64::from(1 << 20),
            retained / (WORKLOADS + SERVICES),
            retained as f64 / encoded_bytes as f64,
            encoded_bytes as f64 / f64::from(1 << 20),
            stats.allocations,
        );
        let _ = stop.send(());
        let _ = client_task.await;
    });
}

fn conversion(c: &mut Criterion) {
    let (workloads, services) = mesh();
    let resources = resources_from_mesh(&workloads, &services, &[]);
    let encoded = encoded(&resources);
    let mut group = c.benchmark_group("xds_10k_workloads");
    group.sample_size(20);
    group.bench_function("prost_decode_only_baseline", |b| {
        b.iter(|| {
            for bytes in &encoded {
                black_box(mesh_xds::proto::istio::workload::Address::decode(bytes.as_slice()).unwrap());
            }
        })
    });
    group.bench_function("decode_and_convert", |b| {
        b.iter(|| black_box(decode_and_convert(&encoded)))
    });
    let converted = decode_and_convert(&encoded);
    group.bench_function("build_snapshot", |b| {
        b.iter(|| {
            let mut builder = MeshSnapshot::builder();
            builder.allow_unknown_services(true);
            for address in &converted {
                match address {
                    XdsAddress::Workload(w) => builder.add_workload(w.clone()),
                    XdsAddress::Service(s) => builder.add_service(s.clone()),
                };
            }
            black_box(builder.build_lenient())
        })
    });
    group.finish();
}

criterion_group!(benches, conversion);

fn main() {
    let (workloads, services) = mesh();
    let resources = resources_from_mesh(&workloads, &services, &[]);
    let encoded = encoded(&resources);
    drop((workloads, services));
    delivery(resources, &encoded);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
