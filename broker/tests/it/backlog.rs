//! rumqttd drops the oldest segment of a full message log even when a reader
//! has not read it. An in-process reader that holds the device backlog limit
//! (the controller) gets every message of a burst several times larger than
//! the log: devices are slowed down instead. The control case without the
//! limit loses messages, so the harness does overflow the log.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use cityplane_proto::Role;
use common::*;
use rumqttc::{Event, Packet, QoS};
use rumqttd::Notification;

const DEVICES: usize = 64;
const EACH: usize = 50;
/// 64 × 50 × 8 KiB = 25 MiB: more than the 16 MiB log of
/// `devices/+/reported` plus the 200 messages a link buffers (1.6 MiB).
const PAYLOAD: usize = 8 * 1024;

/// Publishes the burst, then reads what reaches an in-process subscriber
/// that starts reading only after every publish was acknowledged.
async fn burst(limited: bool) -> usize {
    let pki = TestPki::new();
    let ids: Vec<String> = (0..DEVICES).map(|n| format!("burst{n:02}")).collect();
    for id in &ids {
        pki.issue(Role::Device, id);
    }
    let broker = start(pki.path(), test_limits()).await;
    let (mut tx, mut rx) = broker.link("_slow-reader").await.expect("link");
    tx.subscribe("devices/+/reported").expect("subscribe");
    let credit = limited.then(|| {
        broker
            .limit_device_backlog(&["reported"])
            .expect("first limit")
    });

    let mut publishers = Vec::new();
    for id in ids {
        let (client, mut eventloop) = mqtt_with(
            broker.local_addr(),
            tls_config(pki.path(), Some(&id)),
            &id,
            |o| {
                o.set_max_packet_size(1 << 20, 1 << 20);
            },
        );
        connack(&mut eventloop).await.expect("connects");
        publishers.push(tokio::spawn(async move {
            for n in 0..EACH {
                let mut payload = format!("{id}/{n}/").into_bytes();
                payload.resize(PAYLOAD, b'x');
                client
                    .publish(
                        format!("devices/{id}/reported"),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await
                    .expect("publish");
            }
            let mut acked = 0;
            while acked < EACH {
                match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) => {}
                    other => panic!("{id}: publishing failed: {other:?}"),
                }
            }
            (client, eventloop)
        }));
    }
    let mut clients = Vec::new();
    for p in publishers {
        clients.push(p.await.expect("publisher"));
    }
    // Every publish is acknowledged; let the router take in all it will.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut seen = HashSet::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(3), rx.next()).await;
        match next {
            Ok(Ok(Some(Notification::Forward(f)))) => {
                if let Some(c) = &credit {
                    c.consumed(&f.publish.topic, &f.publish.payload);
                }
                let marker = f
                    .publish
                    .payload
                    .split(|b| *b == b'x')
                    .next()
                    .map(<[u8]>::to_vec);
                seen.insert(marker);
                if seen.len() == DEVICES * EACH {
                    break;
                }
            }
            Ok(Ok(Some(Notification::Unschedule))) => {
                rx.wake().await.expect("wake");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("link: {e}"),
            // Nothing more is coming.
            Err(_) => break,
        }
    }
    drop(clients);
    broker.shutdown().await;
    seen.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_reader_gets_a_burst_larger_than_the_log_whole() {
    assert_eq!(burst(true).await, DEVICES * EACH);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_limit_the_same_burst_overflows_the_log() {
    let got = burst(false).await;
    assert!(
        got < DEVICES * EACH,
        "all {got} messages arrived: the burst did not overflow the router's log, so the test above proves nothing"
    );
}
