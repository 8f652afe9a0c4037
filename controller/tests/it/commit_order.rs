//! "Answered or commanded only after fsync", over real mTLS. A SIGKILL test
//! cannot show it (the page cache survives the process), so the store's
//! commit gate holds or fails commits here while the test watches what
//! reaches the operator and the device.
//!
//! Absence is shown without a timeout: while a commit is held (or failing),
//! a controller-role client publishes a sentinel on the topic the answer
//! (or command) would take. Both pass the same router filter log, so
//! whatever the controller handed to the router first arrives first; an
//! answer or command queued before its commit began is handed over well
//! before the sentinel, which is published only once the gate holds that
//! commit and then crosses a TLS connection.

use crate::common;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cityplane_controller::model::DeviceRecord;
use cityplane_controller::reconcile::RetryPolicy;
use cityplane_controller::store::{CommitGate, Pending, StoreError};
use cityplane_proto::messages::Command;
use common::*;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Holding,
    Passed,
    Failed,
}

#[derive(Debug, Clone)]
struct Seen {
    docs: Vec<String>,
    /// (device, command id) of every in-flight command in the commit.
    commands: Vec<(String, String)>,
    outcome: Outcome,
}

#[derive(Default)]
struct Rules {
    /// Commits writing a document wait while this is set.
    hold_docs: bool,
    /// Commits writing an in-flight command fail while this is set.
    fail_commands: bool,
    /// Commits writing this device's in-flight command fail.
    fail_device: Option<&'static str>,
    log: Vec<Seen>,
}

#[derive(Default)]
struct Gate {
    rules: Mutex<Rules>,
    changed: Condvar,
}

impl Gate {
    fn commit_gate(self: &Arc<Self>) -> CommitGate {
        let gate = self.clone();
        CommitGate::new(move |pending| gate.pass(pending))
    }

    /// Runs on the store's committing thread.
    fn pass(&self, pending: &Pending<'_>) -> Result<(), StoreError> {
        let docs: Vec<String> = pending
            .docs
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect();
        let commands: Vec<(String, String)> = pending
            .devices
            .iter()
            .filter_map(|(_, v)| {
                let d: DeviceRecord = serde_json::from_slice(v).expect("device record");
                d.inflight.map(|c| (d.id, c.id))
            })
            .collect();
        let mut rules = self.rules.lock().expect("gate lock");
        let at = rules.log.len();
        rules.log.push(Seen {
            docs: docs.clone(),
            commands: commands.clone(),
            outcome: Outcome::Holding,
        });
        self.changed.notify_all();
        while rules.hold_docs && !docs.is_empty() {
            rules = self.changed.wait(rules).expect("gate lock");
        }
        let fail = (rules.fail_commands && !commands.is_empty())
            || rules
                .fail_device
                .is_some_and(|id| commands.iter().any(|(d, _)| d == id));
        rules.log[at].outcome = if fail {
            Outcome::Failed
        } else {
            Outcome::Passed
        };
        self.changed.notify_all();
        if fail {
            return Err(StoreError::Io(std::io::Error::other(
                "injected fsync failure",
            )));
        }
        Ok(())
    }

    fn set(&self, f: impl FnOnce(&mut Rules)) {
        f(&mut self.rules.lock().expect("gate lock"));
        self.changed.notify_all();
    }

    fn log(&self) -> Vec<Seen> {
        self.rules.lock().expect("gate lock").log.clone()
    }

    /// Blocks (off the runtime) until `what` holds of the log.
    async fn until(self: &Arc<Self>, what: &'static str, check: fn(&[Seen]) -> bool) {
        let gate = self.clone();
        tokio::task::spawn_blocking(move || {
            let rules = gate.rules.lock().expect("gate lock");
            let (rules, timeout) = gate
                .changed
                .wait_timeout_while(rules, Duration::from_secs(20), |r| !check(&r.log))
                .expect("gate lock");
            assert!(!timeout.timed_out(), "never {what}: {:#?}", rules.log);
        })
        .await
        .expect("gate waiter");
    }
}

/// Lets every held commit go when the test ends, also by a panic: the
/// runtime waits for its blocking threads before it shuts down.
struct ReleaseOnDrop(Arc<Gate>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.set(|r| {
            r.hold_docs = false;
            r.fail_commands = false;
            r.fail_device = None;
        });
    }
}

/// Everything `client` receives up to the sentinel `spy` publishes on
/// `topic` (same router filter as what is being watched for).
async fn until_sentinel(spy: &Client, client: &mut Client, topic: &str) -> Vec<(String, Vec<u8>)> {
    spy.publish(topic, br#"{"sentinel":true}"#.to_vec()).await;
    let mut before = Vec::new();
    loop {
        let (t, p) = tokio::time::timeout(Duration::from_secs(20), client.rx.recv())
            .await
            .expect("sentinel within 20 s")
            .expect("connected");
        if t == topic && p == br#"{"sentinel":true}"# {
            return before;
        }
        before.push((t, p));
    }
}

fn text(messages: &[(String, Vec<u8>)]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|(t, p)| (t.clone(), String::from_utf8_lossy(p).into_owned()))
        .collect()
}

const COMMANDS: &str = "devices/lamp0001/commands";

/// A server behind `gate`, device `lamp0001` (a raw client subscribed to
/// its commands) known to the controller, and an operator.
async fn gated_lamp(gate: &Arc<Gate>, retry: RetryPolicy) -> (Server, Client, Client) {
    let s = Server::start_gated(retry, Some(gate.commit_gate())).await;
    s.devices("lamp", 1);
    let lamp = Client::connect(s.addr, s.pki_path(), "lamp0001", &[COMMANDS], None).await;
    lamp.publish(
        "devices/lamp0001/reported",
        json!({"version": 1, "state": {"dimming": 100}}).to_string(),
    )
    .await;
    let mut op = s.operator().await;
    op.eventually_device("lamp0001", "known", |v| v["online"] == true)
        .await;
    (s, lamp, op)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_answered_or_commanded_before_its_commit_succeeds() {
    let gate = Arc::new(Gate::default());
    // Enough attempts that the failing phase cannot mark the device failed.
    let retry = RetryPolicy {
        max_attempts: 50,
        ..fast_retry()
    };
    let _release = ReleaseOnDrop(gate.clone());
    let (mut s, mut lamp, mut op) = gated_lamp(&gate, retry).await;
    let spy = Client::connect(s.addr, s.pki_path(), "spy", &[], None).await;
    let commands_topic = COMMANDS;

    // 1. An operator write whose commit is held: no answer until it is durable.
    // (It targets a device not yet known, so no device commit follows that
    // would hold the answer back for its own reason.)
    gate.set(|r| {
        r.hold_docs = true;
        r.fail_commands = true;
    });
    let write = json!({"request_id": "w1", "name": "later", "target": {"ids": ["lamp0002"]}, "state": {"dimming": 1}});
    op.publish("fleet/desired/later", write.to_string()).await;
    gate.until("holding the document's commit", |log| {
        log.iter()
            .any(|s| s.docs == ["later"] && s.outcome == Outcome::Holding)
    })
    .await;
    let early = until_sentinel(&spy, &mut op, "fleet/responses/op/sentinel-1").await;
    assert!(
        early.iter().all(|(t, _)| t != "fleet/responses/op/w1"),
        "answered while the commit was held: {:?}",
        text(&early)
    );
    gate.set(|r| r.hold_docs = false);
    let answer: Value =
        serde_json::from_slice(&op.next_on("fleet/responses/op/w1").await).expect("JSON");
    assert_eq!(answer["status"], "accepted", "{answer}");

    // 2. A write that makes a command, whose commits fail: accepted (the
    // document is durable), but the command stays home while its record
    // (the outbox) cannot be written, through a retry of the commit.
    let answer = op
        .apply(json!({"name": "dim", "target": {"ids": ["lamp0001"]}, "state": {"dimming": 40}}))
        .await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    gate.until("failing two commits of the command", |log| {
        log.iter()
            .filter(|s| s.outcome == Outcome::Failed && !s.commands.is_empty())
            .count()
            >= 2
    })
    .await;
    let early = until_sentinel(&spy, &mut lamp, commands_topic).await;
    assert!(
        early.is_empty(),
        "a command left while its commit failed: {:?}",
        text(&early)
    );
    let outbox: Vec<(String, String)> =
        gate.log().iter().flat_map(|s| s.commands.clone()).collect();

    // 3. Storage works again: the command goes out, after a commit of its record.
    gate.set(|r| r.fail_commands = false);
    let payload = lamp.next_on(commands_topic).await;
    let cmd: Command = serde_json::from_slice(&payload).expect("a command");
    let committed = gate.log().iter().any(|s| {
        s.outcome == Outcome::Passed
            && s.commands
                .iter()
                .any(|(d, c)| d == "lamp0001" && *c == cmd.id)
    });
    assert!(
        committed,
        "command {} received before a commit of it succeeded: {:#?}",
        cmd.id,
        gate.log()
    );
    assert!(
        outbox.iter().all(|(_, c)| *c == cmd.id),
        "the command sent is the one recorded while storage failed: {outbox:?}, sent {}",
        cmd.id
    );
    assert_eq!(cmd.state.get("dimming"), Some(&json!(40)));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_outage_longer_than_every_retry_fails_no_device() {
    let gate = Arc::new(Gate::default());
    // Three attempts: the outage below outlasts them several times over.
    let retry = RetryPolicy {
        max_attempts: 3,
        ..fast_retry()
    };
    let _release = ReleaseOnDrop(gate.clone());
    let (mut s, mut lamp, mut op) = gated_lamp(&gate, retry).await;
    let commands_topic = COMMANDS;

    gate.set(|r| r.fail_commands = true);
    let answer = op
        .apply(json!({"name": "dim", "target": {"ids": ["lamp0001"]}, "state": {"dimming": 40}}))
        .await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    gate.until(
        "failing the command's commit 9 times (3 per attempt)",
        |log| {
            log.iter()
                .filter(|s| s.outcome == Outcome::Failed && !s.commands.is_empty())
                .count()
                >= 9
        },
    )
    .await;
    let described = op.query("describe", json!({"id": "lamp0001"})).await;
    assert!(
        described["failed"].is_null(),
        "marked Failed for commands that never left: {described:#}"
    );

    // Storage is back: the command goes out; the device was never given up.
    gate.set(|r| r.fail_commands = false);
    let cmd: Command =
        serde_json::from_slice(&lamp.next_on(commands_topic).await).expect("command");
    assert_eq!(cmd.state.get("dimming"), Some(&json!(40)));
    s.stop().await;
}

/// A commit is written in chunks of device records (one each here), and
/// each chunk's commands leave as soon as it is durable: a chunk whose write
/// fails holds back its own device's command only, until it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_chunk_of_a_commit_commands_its_devices_once_durable_and_a_failing_one_only_its_own() {
    let gate = Arc::new(Gate::default());
    let retry = RetryPolicy {
        max_attempts: 50,
        ..fast_retry()
    };
    let _release = ReleaseOnDrop(gate.clone());
    let s = Server::start_gated(retry, Some(gate.commit_gate())).await;
    let ids = s.devices("lamp", 3);
    let mut lamps = Vec::new();
    for id in &ids {
        let topic = format!("devices/{id}/commands");
        let lamp = Client::connect(s.addr, s.pki_path(), id, &[topic.as_str()], None).await;
        lamp.publish(
            &format!("devices/{id}/reported"),
            json!({"version": 1, "state": {"dimming": 100}}).to_string(),
        )
        .await;
        lamps.push(lamp);
    }
    let mut op = s.operator().await;
    for id in &ids {
        op.eventually_device(id, "known", |v| v["online"] == true)
            .await;
    }
    let spy = Client::connect(s.addr, s.pki_path(), "spy", &[], None).await;

    gate.set(|r| r.fail_device = Some("lamp0002"));
    let answer = op
        .apply(json!({"name": "dim", "target": {"all": true}, "state": {"dimming": 40}}))
        .await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    // lamp0001 and lamp0003 are commanded while lamp0002's record cannot be
    // written (one commit of all three would have held back every command).
    for i in [0, 2] {
        let cmd: Command = serde_json::from_slice(
            &lamps[i]
                .next_on(&format!("devices/{}/commands", ids[i]))
                .await,
        )
        .expect("a command");
        assert_eq!(cmd.state.get("dimming"), Some(&json!(40)), "{}", ids[i]);
    }
    gate.until("failing lamp0002's chunk twice", |log| {
        log.iter()
            .filter(|s| {
                s.outcome == Outcome::Failed && s.commands.iter().any(|(d, _)| d == "lamp0002")
            })
            .count()
            >= 2
    })
    .await;
    let log = gate.log();
    assert!(
        log.iter().all(|s| s.commands.len() <= 1),
        "one device record per chunk: {log:#?}"
    );
    let early = until_sentinel(&spy, &mut lamps[1], "devices/lamp0002/commands").await;
    assert!(
        early.is_empty(),
        "lamp0002 commanded while its record failed: {:?}",
        text(&early)
    );

    // Its record is written at last: then, and only then, its command.
    gate.set(|r| r.fail_device = None);
    let cmd: Command = serde_json::from_slice(&lamps[1].next_on("devices/lamp0002/commands").await)
        .expect("a command");
    assert_eq!(cmd.state.get("dimming"), Some(&json!(40)));
    let committed = gate.log().iter().any(|s| {
        s.outcome == Outcome::Passed
            && s.commands
                .iter()
                .any(|(d, c)| d == "lamp0002" && *c == cmd.id)
    });
    assert!(
        committed,
        "lamp0002's command left before its record: {:#?}",
        gate.log()
    );
    let mut s = s;
    s.stop().await;
}
