//! Acks nobody asked for must not reach rumqttd, which logs an ERROR for
//! each: any client could fill the broker's log on demand. Its own binary,
//! because it counts every ERROR event the process logs.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cityplane_proto::Role;
use common::*;
use rumqttc::QoS;
use tokio::io::AsyncWriteExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

static ROUTER_ERRORS: AtomicUsize = AtomicUsize::new(0);

struct CountRouterErrors;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountRouterErrors {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() == tracing::Level::ERROR && meta.target().starts_with("rumqttd") {
            ROUTER_ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_acks_are_dropped_at_the_edge_and_real_ones_pass() {
    tracing_subscriber::registry()
        .with(CountRouterErrors)
        .with(tracing_subscriber::filter::LevelFilter::ERROR)
        .init();
    let t = TestPki::new();
    t.issue(Role::Operator, "op");
    t.issue(Role::Controller, "ctl");
    t.issue(Role::Operator, "reader");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    let mut s = raw_connected(addr, t.path(), "op").await;
    let mut stray = Vec::new();
    for pkid in 1..=50u8 {
        // PUBACK, PUBREC, PUBREL, PUBCOMP for packets that never were.
        for header in [0x40, 0x50, 0x62, 0x70] {
            stray.extend_from_slice(&[header, 2, 0, pkid]);
        }
    }
    s.write_all(&stray).await.expect("write");
    s.write_all(&[0xC0, 0]).await.expect("ping");
    assert_eq!(
        read_exact(&mut s, 2).await.expect("still served"),
        [0xD0, 0]
    );

    // Real acks still reach the router: more QoS 1 messages than the
    // router lets be unacknowledged (200) arrive only if they do.
    let (_reader, mut rx) = connected(addr, t.path(), "reader", &["devices/+/telemetry"]).await;
    let (ctl, _) = connected(addr, t.path(), "ctl", &[]).await;
    for i in 0..300 {
        ctl.publish(
            format!("devices/d{i}/telemetry"),
            QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .expect("publish");
    }
    let got = drain(&mut rx, Duration::from_secs(2)).await;
    assert_eq!(
        got.len(),
        300,
        "QoS 1 delivery stalls if real PUBACKs are lost"
    );
    assert_eq!(
        ROUTER_ERRORS.load(Ordering::Relaxed),
        0,
        "rumqttd logged ERRORs for acks a client sent"
    );
    broker.shutdown().await;
}
