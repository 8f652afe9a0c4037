//! Limits: publish rate, subscriptions per connection, total connections,
//! and a flood of idle sockets that must not keep good devices out.

use crate::common;

use std::time::Duration;

use cityplane_broker::Limits;
use cityplane_proto::Role;
use common::*;
use rumqttc::{Event, Packet, QoS, SubscribeReasonCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_device_connects_while_500_idle_sockets_are_open() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    let limits = Limits {
        // Long enough that none of the idle sockets is reaped during the test.
        handshake_timeout: Duration::from_secs(60),
        ..test_limits()
    };
    let broker = start(t.path(), limits).await;
    let addr = broker.local_addr();
    let mut idle = Vec::new();
    for i in 0..500 {
        let mut s = TcpStream::connect(addr).await.expect("tcp");
        if i % 2 == 0 {
            // Half of them stall inside a TLS record.
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
                .await
                .expect("write");
        }
        idle.push(s);
    }
    let (_d1, _) = connected(addr, t.path(), "d1", &["devices/d1/commands"]).await;
    drop(idle);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_faster_than_the_limit_disconnects() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    let limits = Limits {
        max_publishes_per_sec: 5,
        ..test_limits()
    };
    let broker = start(t.path(), limits).await;
    let mut s = raw_connected(broker.local_addr(), t.path(), "d1").await;
    let mut burst = Vec::new();
    for _ in 0..50 {
        burst.extend(publish_packet("devices/d1/telemetry", b"{}"));
    }
    s.write_all(&burst).await.expect("write");
    assert_eq!(
        read_until_closed(&mut s).await,
        Some(vec![]),
        "flooding client must be disconnected"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_beyond_the_limit_are_refused() {
    let t = TestPki::new();
    t.issue(Role::Operator, "op");
    let limits = Limits {
        max_subscriptions: 2,
        ..test_limits()
    };
    let broker = start(t.path(), limits).await;
    let (client, mut eventloop) = mqtt(broker.local_addr(), t.path(), "op", "op");
    connack(&mut eventloop).await.expect("connect");
    let mut codes = Vec::new();
    for filter in ["fleet/a", "fleet/b", "fleet/c"] {
        client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .expect("sub");
        loop {
            if let Event::Incoming(Packet::SubAck(ack)) = eventloop.poll().await.expect("poll") {
                codes.push(ack.return_codes[0]);
                break;
            }
        }
    }
    assert!(matches!(codes[0], SubscribeReasonCode::Success(_)));
    assert!(matches!(codes[1], SubscribeReasonCode::Success(_)));
    assert_eq!(codes[2], SubscribeReasonCode::Failure);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_and_slots_come_back() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Device, "d2");
    let limits = Limits {
        max_connections: 1,
        ..test_limits()
    };
    let broker = start(t.path(), limits).await;
    let addr = broker.local_addr();
    let first = raw_connected(addr, t.path(), "d1").await;
    let refused = raw_tls(addr, tls_config(t.path(), Some("d2"))).await;
    if let Ok(mut s) = refused {
        assert_eq!(
            read_until_closed(&mut s).await,
            Some(vec![]),
            "second connection must be closed"
        );
    }
    drop(first);
    // The slot frees once the first session ends.
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(mut s) = raw_tls(addr, tls_config(t.path(), Some("d2"))).await {
            let _ = s.write_all(&connect_packet("d2", 0x02, 30, &[])).await;
            if read_exact(&mut s, 4).await.ok().as_deref() == Some(&[0x20, 2, 0, 0][..]) {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "slot must be released when a connection ends");
    broker.shutdown().await;
}
