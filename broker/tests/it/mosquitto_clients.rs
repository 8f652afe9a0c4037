//! Plain `mosquitto_pub` / `mosquitto_sub`, given the files `cityplane certs`
//! writes, see the same rules as our own clients. CI installs the clients and
//! sets CITYPLANE_REQUIRE_MOSQUITTO=1 so this test cannot silently skip there.

use crate::common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cityplane_proto::Role;
use common::*;
use tokio::process::Command;

fn available() -> bool {
    let found = std::process::Command::new("mosquitto_pub")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CITYPLANE_REQUIRE_MOSQUITTO").is_none(),
            "mosquitto clients are required (apt-get install mosquitto-clients)"
        );
        eprintln!("skipping: mosquitto_pub not installed");
    }
    found
}

fn tls_args(cmd: &mut Command, pki: &Path, port: u16, id: &str, client_id: &str) {
    cmd.args([
        "-h",
        "localhost",
        "-p",
        &port.to_string(),
        "-i",
        client_id,
        "--cafile",
    ])
    .arg(pki.join("ca.crt"))
    .arg("--cert")
    .arg(pki.join(format!("{id}.crt")))
    .arg("--key")
    .arg(pki.join(format!("{id}.key")))
    .stdin(Stdio::null())
    .kill_on_drop(true);
}

async fn run(mut cmd: Command) -> (bool, String) {
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("mosquitto client finishes")
        .expect("runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_obey_the_same_rules() {
    if !available() {
        return;
    }
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Operator, "op");
    let broker = start(t.path(), test_limits()).await;
    let port = broker.local_addr().port();

    // An operator waits for one report; the device publishes it.
    let mut sub = Command::new("mosquitto_sub");
    tls_args(&mut sub, t.path(), port, "op", "op");
    sub.args([
        "-t",
        "devices/+/reported",
        "-C",
        "1",
        "-v",
        "-q",
        "1",
        "-W",
        "15",
    ]);
    sub.stdout(Stdio::piped()).stderr(Stdio::piped());
    let sub = sub.spawn().expect("mosquitto_sub");
    // Retained, so the report is there whenever the subscriber gets in.
    let mut publish = Command::new("mosquitto_pub");
    tls_args(&mut publish, t.path(), port, "d1", "d1");
    publish.args([
        "-t",
        "devices/d1/reported",
        "-m",
        r#"{"version":1,"state":{}}"#,
        "-q",
        "1",
        "-r",
    ]);
    let (ok, text) = run(publish).await;
    assert!(ok, "allowed publish failed: {text}");
    let out = tokio::time::timeout(Duration::from_secs(20), sub.wait_with_output())
        .await
        .expect("sub finishes")
        .expect("sub runs");
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        got.contains(r#"devices/d1/reported {"version":1,"state":{}}"#),
        "operator got: {got}"
    );

    // Spoofed client id: refused with 'not authorised'.
    let mut spoof = Command::new("mosquitto_pub");
    tls_args(&mut spoof, t.path(), port, "d1", "d2");
    spoof.args(["-t", "devices/d2/reported", "-m", "x", "-q", "1"]);
    let (ok, text) = run(spoof).await;
    assert!(
        !ok && text.to_lowercase().contains("not authori"),
        "spoof must be refused: {text}"
    );

    // Another device's commands: the subscription is denied.
    let mut snoop = Command::new("mosquitto_sub");
    tls_args(&mut snoop, t.path(), port, "d1", "d1");
    snoop.args(["-t", "devices/d2/commands", "-C", "1", "-W", "5"]);
    let (ok, text) = run(snoop).await;
    // mosquitto_sub reports the denial but may still exit 0.
    let _ = ok;
    assert!(
        text.contains("denied"),
        "foreign subscription must be denied: {text}"
    );

    // Publishing for another device: the connection is closed, the message is not delivered.
    let mut forge = Command::new("mosquitto_pub");
    tls_args(&mut forge, t.path(), port, "d1", "d1");
    forge.args(["-t", "devices/d2/reported", "-m", "forged", "-q", "1"]);
    let (ok, text) = run(forge).await;
    assert!(!ok, "forged publish must fail: {text}");
    broker.shutdown().await;
}
