//! Nobody can fill the broker's log on demand: acks nobody asked for must
//! not reach rumqttd (it logs an ERROR for each), and refused TLS
//! handshakes (anyone who reaches the port can cause one) are logged at
//! most once a second. Each test runs in a process of its own (the test
//! binary re-executed), because it counts the events the whole process logs.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cityplane_proto::Role;
use common::*;
use rumqttc::QoS;
use tokio::io::AsyncWriteExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

static ROUTER_ERRORS: AtomicUsize = AtomicUsize::new(0);
static REFUSAL_LINES: AtomicUsize = AtomicUsize::new(0);

struct Count;

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() == tracing::Level::ERROR && meta.target().starts_with("rumqttd") {
            ROUTER_ERRORS.fetch_add(1, Ordering::Relaxed);
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        if message.0 == "TLS handshake refused" {
            REFUSAL_LINES.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// In the parent test process: runs `test` alone in a child and returns
/// `false`. In that child: installs the counting subscriber, returns `true`.
fn counting_alone(test: &str) -> bool {
    if cityplane_testkit::process::run_alone(test) {
        return false;
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing_subscriber::registry()
            .with(Count)
            .with(tracing_subscriber::filter::LevelFilter::WARN)
            .init();
    });
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_acks_are_dropped_at_the_edge_and_real_ones_pass() {
    if !counting_alone("log_floods::stray_acks_are_dropped_at_the_edge_and_real_ones_pass") {
        return;
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_are_logged_at_most_once_a_second() {
    if !counting_alone("log_floods::refused_handshakes_are_logged_at_most_once_a_second") {
        return;
    }
    let t = TestPki::new();
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    // A client without a certificate: refused at the handshake every time.
    let anonymous = tls_config(t.path(), None);
    for _ in 0..200 {
        if let Ok(mut s) = raw_tls(addr, anonymous.clone()).await {
            let _ = s.write_all(&connect_packet("x", 0x02, 30, &[])).await;
            let _ = read_until_closed(&mut s).await;
        }
    }
    let lines = REFUSAL_LINES.load(Ordering::Relaxed);
    assert!(lines >= 1, "refusals are still logged");
    // 200 refusals take well under 20 s even on a slow machine.
    assert!(lines <= 20, "{lines} log lines for 200 refused handshakes");
    broker.shutdown().await;
}
