//! Criterion benches for the hot paths: publishing (encode once + fan-out) to 10,000
//! subscribers' queues, and registry admission/release under contention.
//! Run: `cargo bench -p tether-core --bench hot_paths`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tether_core::{
    ClientLimitPolicy, ConnIdGen, ConnSpec, ConnectionGuard, EventBus, Hub, HubSettings, Metrics,
    Registry, RegistrySettings, Transport,
};

fn setup(subscribers: usize) -> (Registry, Vec<ConnectionGuard>) {
    let ids = ConnIdGen::new("b");
    let events = EventBus::new(ids.node_id().clone());
    let metrics = Metrics::new();
    let hub = Hub::new(
        HubSettings {
            history_size: 1000,
            history_ttl: Duration::from_secs(300),
            max_channels: 1000,
            max_channels_per_connection: 16,
        },
        events.clone(),
        metrics.clone(),
    );
    let registry = Registry::new(
        RegistrySettings {
            max_connections: 1_000_000,
            max_connections_per_client: 16,
            on_client_limit: ClientLimitPolicy::Reject,
            offline_grace: Duration::ZERO,
            // Large enough that the bench never overflows a queue between drains.
            max_queue_messages: 100_000,
            max_queue_bytes: 1 << 30,
        },
        ids,
        events,
        metrics,
        hub,
    );
    let guards = (0..subscribers)
        .map(|i| {
            let g = registry
                .reserve(&format!("c{i}"), Transport::Ws, None)
                .unwrap()
                .commit(ConnSpec {
                    transport: Transport::Ws,
                    remote_addr: Ipv4Addr::LOCALHOST.into(),
                    user_agent: None,
                    meta: serde_json::Value::Null,
                    upstream: None,
                });
            registry
                .hub()
                .subscribe(g.conn(), "bench", None, None)
                .unwrap();
            g
        })
        .collect();
    (registry, guards)
}

fn fanout(c: &mut Criterion) {
    let (registry, guards) = setup(10_000);
    let data = format!("{{\"p\":\"{}\"}}", "x".repeat(90));
    let mut g = c.benchmark_group("publish");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function(
        "100B to 10k subscribers (encode once + 10k queue pushes)",
        |b| {
            b.iter_batched(
                || {
                    // Empty every queue so each publish measures pushes, not overflow.
                    let mut sink = Vec::new();
                    for gd in &guards {
                        sink.clear();
                        gd.conn().outbox().take(&mut sink);
                    }
                },
                |()| registry.hub().publish("bench", &data, None).unwrap(),
                BatchSize::PerIteration,
            )
        },
    );
    g.finish();
}

fn admission(c: &mut Criterion) {
    let (registry, _none) = setup(0);
    let registry = Arc::new(registry);
    let mut g = c.benchmark_group("registry");
    g.throughput(Throughput::Elements(1));
    g.bench_function("reserve + commit + release, 4 threads contending", |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(4);
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for t in 0..4 {
                    let registry = registry.clone();
                    s.spawn(move || {
                        for i in 0..per {
                            let g = registry
                                .reserve(&format!("t{t}-{}", i % 64), Transport::Ws, None)
                                .unwrap()
                                .commit(ConnSpec {
                                    transport: Transport::Ws,
                                    remote_addr: Ipv4Addr::LOCALHOST.into(),
                                    user_agent: None,
                                    meta: serde_json::Value::Null,
                                    upstream: None,
                                });
                            drop(g);
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, fanout, admission);
criterion_main!(benches);
