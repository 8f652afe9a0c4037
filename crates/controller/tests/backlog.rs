//! A burst of device reports bigger than the router's message log (rumqttd
//! drops a full log's oldest segment even when a reader is behind) reaches
//! the controller whole: devices are slowed down, no report is lost.

mod common;

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
