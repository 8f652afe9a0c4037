//! Flow control, end to end: a burst of device reports bigger than the
//! router's message log (rumqttd drops a full log's oldest segment even when
//! a reader is behind) reaches the controller whole, devices are slowed down
//! instead; and a subscriber that never reads slows nobody.

use crate::common;

use common::*;
use serde_json::json;

const DEVICES: usize = 100;
const REPORTS: u64 = 4;
/// Just under the controller's 64 KiB document limit.
const PAD: usize = 60 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_burst_larger_than_the_router_log_loses_nothing() {
    let mut s = Server::start().await;
    let ids = s.devices("burst", DEVICES);
    let mut op = s.operator().await;
    let mut devices = Vec::new();
    for id in &ids {
        devices.push(Client::connect(s.addr, s.pki_path(), id, &[], None).await);
    }
    // 100 devices × 4 reports × 60 KiB = 24 MiB, above the 16 MiB log of
    // `devices/+/reported`, published as fast as the devices can.
    let pad = "x".repeat(PAD);
    let mut bursts = Vec::new();
    for device in devices {
        let pad = pad.clone();
        bursts.push(tokio::spawn(async move {
            for version in 1..=REPORTS {
                let body =
                    json!({"version": version, "state": {"class": "streetlight", "pad": pad}});
                device
                    .publish(&format!("devices/{}/reported", device.id), body.to_string())
                    .await;
            }
            device
        }));
    }
    let mut devices = Vec::new();
    for burst in bursts {
        devices.push(burst.await.expect("burst"));
    }
    let want = DEVICES as u64 * REPORTS;
    let mut counted = 0;
    for _ in 0..600 {
        let status = op.query("status", json!({})).await;
        let c = &status["counters"];
        counted = c["reports"].as_u64().unwrap_or(0);
        if counted >= want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(counted, want, "reports reached the controller");
    for id in ids.iter().step_by(10) {
        let d = op.query("describe", json!({"id": id})).await;
        assert_eq!(d["reported_version"], REPORTS, "{id}: {d}");
    }
    for device in devices {
        device.close().await;
    }
    op.close().await;
    s.stop().await;
}

/// An operator that subscribes to everything and then never reads (a hung
/// dashboard) slows no one: the broker stops feeding it, the controller's
/// writes, commands and answers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_blocks_nobody() {
    let mut s = Server::start().await;
    s.pki
        .issue(cityplane_proto::Role::Operator, "hung")
        .expect("operator");
    let ids = s.devices("lamp", 40);
    let mut devices = Vec::new();
    for id in &ids {
        let mut d = Device::new(
            &s,
            id,
            json!({"class": "streetlight", "labels": {"zone": "north"}, "dimming": 100}),
        );
        d.connect(s.addr).await;
        devices.push(d);
    }
    let hung = hung_subscriber(&s, &["fleet/#", "devices/+/reported"]).await;
    let mut op = s.operator().await;
    op.register(&devices.iter().collect::<Vec<_>>()).await;

    // 40 devices × 20 reports × 32 KiB = 25 MiB: far more than the hung client's
    // socket buffers hold, all of it addressed to it too.
    let pad = "p".repeat(32 * 1024);
    for round in 0..20 {
        for d in &devices {
            d.tamper("pad", json!(format!("{round}{pad}"))).await;
        }
    }
    let answer = op
        .apply(json!({"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": 30}}))
        .await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    op.eventually_status(json!({"name": "dim"}), "converged", |v| {
        v["total"] == 40 && v["converged"] == 40
    })
    .await;
    for d in &devices {
        assert_eq!(d.get("dimming"), Some(json!(30)), "{}", d.id);
    }
    drop(hung);
    op.close().await;
    s.stop().await;
}

/// Connects, subscribes, and from then on never reads its socket.
async fn hung_subscriber(
    s: &Server,
    filters: &[&str],
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let mut opts = rumqttc::MqttOptions::new("hung", "localhost", s.addr.port());
    opts.set_keep_alive(std::time::Duration::from_secs(60));
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls(s.pki_path(), "hung")),
    ));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 16);
    for f in filters {
        client
            .subscribe(*f, rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    let mut subacks = 0;
    while subacks < filters.len() {
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) =
            eventloop.poll().await.expect("hung subscriber connects")
        {
            subacks += 1;
        }
    }
    (client, eventloop)
}
