//! The controller as a client of an external broker (mosquitto here, with
//! an ACL that mirrors `cityplane cluster sync`'s RabbitMQ permissions):
//! a delivery is acknowledged to the broker only once what it changed is
//! durable, so a controller that dies before its commit loses nothing.

use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use cityplane_certs::Pki;
use cityplane_controller::runtime::external::ExternalBroker;
use cityplane_controller::store::{CommitGate, Store};
use cityplane_controller::{Controller, ControllerConfig};
use cityplane_proto::Role;
use serde_json::json;

use crate::common::{self, Client};

/// A controller on its own runtime (its own thread), so the test can end
/// it the way a crash does: every task dropped, the socket closed, no
/// shutdown commit, nothing acknowledged after.
struct Crashable {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Crashable {
    fn start(broker: ExternalBroker, config: ControllerConfig) -> Crashable {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (up_tx, up_rx) = std_mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let controller = Controller::start_external(broker, config, None)
                    .await
                    .expect("controller starts");
                let _ = up_tx.send(());
                let _ = stopped.await;
                drop(controller);
            });
            rt.shutdown_background();
        });
        up_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("controller up");
        Crashable {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn crash(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("controller thread");
        }
    }
}

/// The device record `id` in a commit's records, if its reported state
/// has `dimming: 77`.
fn commits_report(pending: &cityplane_controller::store::Pending<'_>, id: &str) -> bool {
    pending.devices.iter().any(|(k, v)| {
        k == id.as_bytes()
            && serde_json::from_slice::<serde_json::Value>(v)
                .is_ok_and(|r| r["reported"]["dimming"] == json!(77))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_is_acknowledged_to_the_broker_only_once_stored() {
    if cityplane_testkit::mosquitto::skip_unless_installed(
        "a_report_is_acknowledged_to_the_broker_only_once_stored",
    ) {
        return;
    }
    common::init_tracing();
    let pki_dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(pki_dir.path(), false).expect("pki");
    pki.issue(Role::Controller, "ctl").expect("controller");
    pki.issue(Role::Device, "d1").expect("device");
    let work = tempfile::tempdir().expect("tempdir");
    let acl = cityplane_testkit::mosquitto::cluster_acl(work.path(), &["ctl"]).expect("acl");
    let (_mosquitto, addr) = cityplane_testkit::mosquitto::start_with(
        "external controller",
        &pki,
        work.path(),
        "",
        &acl,
    )
    .expect("mosquitto");
    let broker = ExternalBroker {
        nodes: vec![("localhost".into(), addr.port())],
        id: "ctl".into(),
        tls: common::tls(pki_dir.path(), "ctl"),
        identities: pki_dir.path().to_path_buf(),
        firmware: None,
        pins: Default::default(),
        unanswered: None,
        shard_sessions: None,
        member: None,
    };

    // Controller A stores the report, then its disk stalls: the commit
    // never completes. It dies like that.
    let (seen_tx, seen) = std_mpsc::channel();
    let (_never_tx, never) = std_mpsc::channel::<()>();
    let never = std::sync::Mutex::new(never);
    // The registry learns of d1 from the PKI, as `cityplane controller` does.
    let mut a_config = ControllerConfig::new(work.path().join("a"));
    a_config.registry_source = Some(pki_dir.path().to_path_buf());
    a_config.commit_gate = Some(CommitGate::new(move |pending| {
        if commits_report(pending, "d1") {
            let _ = seen_tx.send(());
            let _ = never.lock().expect("gate").recv();
        }
        Ok(())
    }));
    let a = Crashable::start(broker.clone(), a_config);

    let device = Client::connect(addr, pki_dir.path(), "d1", &[], None).await;
    // QoS 1: the broker acknowledged it to the device, so it must not be
    // lost. Sent again until A has it: A subscribes after it starts, and a
    // publish before that reaches nobody.
    let mut received = false;
    for _ in 0..60 {
        device
            .publish(
                "devices/d1/reported",
                json!({"version": 1, "state": {"dimming": 77}}).to_string(),
            )
            .await;
        if seen.recv_timeout(Duration::from_millis(500)).is_ok() {
            received = true;
            break;
        }
    }
    assert!(
        received,
        "controller A received the report and is committing it"
    );
    a.crash();

    // Controller B: another disk (an empty one), the same identity, so the
    // same session on the broker. The broker redelivers what A never
    // acknowledged.
    let (stored_tx, stored) = std_mpsc::channel();
    let mut b_config = ControllerConfig::new(work.path().join("b"));
    b_config.registry_source = Some(pki_dir.path().to_path_buf());
    b_config.commit_gate = Some(CommitGate::new(move |pending| {
        if commits_report(pending, "d1") {
            let _ = stored_tx.send(());
        }
        Ok(())
    }));
    let b = Crashable::start(broker, b_config);
    stored.recv_timeout(Duration::from_secs(30)).expect(
        "the report A received but never stored reaches controller B: A must not have acknowledged it",
    );
    b.crash();
    let store = Store::open(&work.path().join("b"), 8 << 20).expect("store b");
    let loaded = store.load().expect("load");
    let d1 = loaded
        .devices
        .iter()
        .find(|d| d.id == "d1")
        .expect("d1 stored");
    assert_eq!(d1.reported.get("dimming"), Some(json!(77)));
}
